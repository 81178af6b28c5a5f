"""The OPC UA server of bench/bench_opcua.py, run as a subprocess (its CPU is not the client's).

    python -m bench.opcua_bench_server --port 4840 --items 10000 --period-ms 1000

An asyncua server (security None) with ``--items`` Double variables in the namespace
``urn:digispine:bench``: string node ids ``V.<i>``, browse path ``Objects/Bench/F<k>/V<i>``,
at most ``--folder-size`` variables per folder (asyncua adds children to one parent in time
quadratic in their number). Every variable gets a new value every ``--period-ms``, written
through the server's fast path (``write_attribute_value``, no checks beyond the type) in
batches of one folder, spread evenly over the period; a value is ``i + (tick % 10) / 10``, so
each write is a change. The standard address space comes from a shelf built once per machine
and asyncua version (the same one tests/test_opcua_source.py uses).

Protocol on stdout, one line each: ``READY <port> <build_s>`` once it serves, then every
second ``STATS <monotonic> <writes> <cpu_s>`` (cumulative writes and process CPU seconds; the
monotonic clock is the machine's, comparable with the benchmark's). Ends on SIGTERM / SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import shutil
import signal
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import asyncua
from asyncua import Server, ua

NAMESPACE = "urn:digispine:bench"


async def shelf() -> Path:
    """asyncua's standard address space as a shelf, built once (takes ~6 s of CPU)."""
    base = Path(tempfile.gettempdir()) / f"digispine-opcua-aspace-{asyncua.__version__}"
    path = base / "aspace"
    if not path.is_file():
        building = Path(tempfile.mkdtemp(prefix=base.name + ".", dir=base.parent))
        await Server().init(shelf_file=building / "aspace")
        (building / "aspace").touch()  # asyncua loads a dbm.dumb shelf only when this exists
        try:
            building.rename(base)
        except OSError:  # built meanwhile by someone else
            shutil.rmtree(building, ignore_errors=True)
    return path


async def build(port: int, items: int, folder_size: int) -> tuple[Server, list[ua.NodeId]]:
    server = Server()
    await server.init(shelf_file=await shelf())
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/")
    server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    ns = await server.register_namespace(NAMESPACE)
    root = await server.nodes.objects.add_folder(ua.NodeId("Bench", ns), ua.QualifiedName("Bench", ns))
    ids: list[ua.NodeId] = []
    for k, start in enumerate(range(0, items, folder_size)):
        folder = await root.add_folder(ua.NodeId(f"F{k}", ns), ua.QualifiedName(f"F{k}", ns))
        for i in range(start, min(start + folder_size, items)):
            node = await folder.add_variable(ua.NodeId(f"V.{i}", ns), ua.QualifiedName(f"V{i}", ns),
                                             ua.Variant(float(i), ua.VariantType.Double))
            ids.append(node.nodeid)
    await server.start()
    return server, ids


async def update(server: Server, ids: list[ua.NodeId], period_s: float, batch: int,
                 counter: list[int]) -> None:
    """Write every variable once per period, one batch at a time, batches spread evenly."""
    batches = [ids[i:i + batch] for i in range(0, len(ids), batch)]
    step = period_s / len(batches)
    write = server.iserver.aspace.write_attribute_value
    value_attr = ua.AttributeIds.Value
    next_at = time.monotonic()
    tick = 0
    while True:
        for first, chunk in zip(range(0, len(ids), batch), batches, strict=True):
            now = datetime.now(UTC)
            offset = (tick % 10) / 10
            for j, node_id in enumerate(chunk):
                dv = ua.DataValue(ua.Variant(first + j + offset, ua.VariantType.Double),
                                  SourceTimestamp=now, ServerTimestamp=now)
                await write(node_id, value_attr, dv)
            counter[0] += len(chunk)
            next_at += step
            delay = next_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                await asyncio.sleep(0)  # let the server publish even when behind
                if delay < -period_s:  # far behind: do not try to catch up
                    next_at = time.monotonic()
        tick += 1


async def stats(counter: list[int]) -> None:
    while True:
        await asyncio.sleep(1.0)
        print(f"STATS {time.monotonic():.6f} {counter[0]} {time.process_time():.6f}", flush=True)


async def main_async(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    server, ids = await build(args.port, args.items, args.folder_size)
    print(f"READY {args.port} {time.perf_counter() - started:.2f}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    counter = [0]
    tasks = [asyncio.create_task(update(server, ids, args.period_ms / 1000, args.folder_size,
                                        counter)),
             asyncio.create_task(stats(counter))]
    await stop.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(server.stop(), 5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--period-ms", type=float, default=1000.0,
                        help="every variable is written once per period")
    parser.add_argument("--folder-size", type=int, default=500)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
