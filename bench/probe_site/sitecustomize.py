"""Loaded by the gateway subprocess when ``bench.bench_durability --probe`` puts this directory on
its PYTHONPATH: installs :mod:`bench.daemon_probe` (nothing happens without its variable)."""

import os

if os.environ.get("BENCH_PROBE_OUT"):
    import bench.daemon_probe

    bench.daemon_probe.install(os.environ["BENCH_PROBE_OUT"])
