"""OPC UA subscriptions: data changes per second from 10,000 monitored items, the time to
create them, CPU and memory, the gateway's OpcUaSource against a bare asyncua client.

    python -m bench.bench_opcua                  # 10,000 items, 2 rounds of 4 clients (~6 min)
    python -m bench.bench_opcua --quick          # 2,000 items, 5 s per client (~1 min)
    python -m bench.bench_opcua --items 20000 --period-ms 2000 --profile B1

One server, started once as a subprocess (bench/opcua_bench_server.py, so its CPU is not the
clients'): ``--items`` Double variables in folders of 500 (security None), every one written
once per ``--period-ms`` (1,000 ms: 10,000 changes/s by default) in batches spread evenly over
the period. Then, one after the other, each client in a fresh subprocess of its own (clean
RSS figures), all against that server in the same run:

- ``A  bare asyncua``: asyncua's low-level client (``client.uaclient``): one subscription
  (``--publishing-ms``), monitored items created in calls of ``--batch`` (the gateway's
  ``max_items_per_call`` default), a publish callback that only counts the data changes. The
  reference of every ratio.
- ``A2 asyncua Subscription``: asyncua's high-level API (``create_subscription`` +
  ``subscribe_data_change`` with a handler whose ``datachange_notification`` counts): what an
  application written "the asyncua way" costs.
- ``B1 OpcUaSource``: the gateway's source (gateway/sources/opcua.py) as the daemon builds it
  (``nsu=`` node ids, security None with ``allow_insecure``, the same publishing interval and
  batch), ``run(emit)`` with an ``emit`` that counts the Signals of each Delivery.
- ``B2 source + Mapper``: the same, with ``emit`` feeding every Signal through a Mapper built
  from generated mapping files (one per folder; per variable a float signal and an on_change
  event with an absolute deadband of 0.5, which about one change in five passes). This is
  "delivered to the mapper" (no buffer, no Kafka).

Per client: ``create s``, from the start of the connect until every monitored item is created
(the source: its own ``opcua.connected`` log line, which it writes once subscribed; ``setup``
in that line excludes the connect); ``first s``, until the first value of every item arrived;
then, after ``--warmup`` s, a window of ``--duration`` s: data changes delivered per second,
the server's writes per second in the same window (``delivered`` is their ratio: 100% means
every change reached the client), the client's CPU (``time.process_time``)
as changes per CPU second (``per CPU s``: the most this client could take on one
core, whatever the server manages) and in percent of one core, and its peak RSS (``ru_maxrss``)
and the growth of it over the process after its imports (``RSS +``; B2's includes the Mapper).
The clients run in ``--rounds`` rounds (2; ``--quick``: 1), each round in the reverse order of
the one before; the ratios B/A are per figure, to A of the same round.

asyncua's server is Python too: on 2 cores it cannot write and publish 10,000 changes/s while
a client runs, so ``changes/s`` is mostly the server's pace (``delivered`` near 100% says the
client kept up with it); ``per CPU s`` and ``cr CPU`` (CPU seconds while creating the
items) are the client's own cost.

The machine's load average and the server's CPU in each window are printed with the table: on
2 cores the server competes with the client for CPU, and a busy server delivers late, which
the ``delivered`` column shows. ``--profile B1`` (or A, A2, B2) prints the top functions of a
cProfile of that client's measured window.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import faulthandler
import io
import json
import os
import pstats
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.serverproc import ServerProcess

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NAMESPACE = "urn:digispine:bench"
CONNECTION = "bench_opcua"
CLIENTS = ("A", "A2", "B1", "B2")
TITLES = {"A": "A  bare asyncua", "A2": "A2 asyncua Subscription", "B1": "B1 OpcUaSource",
          "B2": "B2 source + Mapper"}


# --- the worker: one client in its own process ------------------------------------------------


def rss_kb() -> int:
    """Current resident set size (VmRSS) in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


@dataclass
class Probe:
    """What a client's callback sees: counts, and until every item has reported, which not."""

    items: int
    changes: int = 0
    deliveries: int = 0
    events: int = 0
    pending: set[Any] = field(default_factory=set)
    all_seen: asyncio.Event = field(default_factory=asyncio.Event)
    all_seen_at: float = 0.0
    start: float = 0.0
    """perf_counter when the client began to connect."""
    cpu_start: float = 0.0

    def begin(self) -> float:
        self.cpu_start = time.process_time()
        self.start = time.perf_counter()
        return self.start

    def seen(self, keys: Any) -> None:
        pending = self.pending
        for key in keys:
            pending.discard(key)
        if not pending and not self.all_seen.is_set():
            self.all_seen_at = time.perf_counter()
            self.all_seen.set()


async def client_a(args: argparse.Namespace, probe: Probe) -> tuple[Any, float]:
    """The bare low-level asyncua client; returns (client, seconds to create the items)."""
    from asyncua import Client, ua

    probe.pending = set(range(1, args.items + 1))

    def on_publish(result: Any) -> None:
        data = result.NotificationMessage.NotificationData
        if not data:
            return
        probe.deliveries += 1
        for notification in data:
            items = getattr(notification, "MonitoredItems", None)
            if items:
                probe.changes += len(items)
                if probe.pending:
                    probe.seen(mi.ClientHandle for mi in items)

    start = probe.begin()
    client = Client(args.endpoint, timeout=10)
    client.session_timeout = 60_000
    await client.connect()
    ns = await client.get_namespace_index(NAMESPACE)
    params = ua.CreateSubscriptionParameters()
    params.RequestedPublishingInterval = float(args.publishing_ms)
    params.RequestedMaxKeepAliveCount = 50
    params.RequestedLifetimeCount = 600
    params.MaxNotificationsPerPublish = 0
    params.PublishingEnabled = True
    sub = await client.uaclient.create_subscription(params, on_publish)
    for first in range(0, args.items, args.batch):
        create = ua.CreateMonitoredItemsParameters()
        create.SubscriptionId = sub.SubscriptionId
        create.TimestampsToReturn = ua.TimestampsToReturn.Both
        for i in range(first, min(first + args.batch, args.items)):
            req = ua.MonitoredItemCreateRequest()
            req.ItemToMonitor = ua.ReadValueId(NodeId=ua.NodeId(f"V.{i}", ns),
                                               AttributeId=ua.AttributeIds.Value)
            req.MonitoringMode = ua.MonitoringMode.Reporting
            mp = ua.MonitoringParameters()
            mp.ClientHandle = i + 1
            mp.SamplingInterval = -1.0
            mp.QueueSize = 1
            mp.DiscardOldest = True
            req.RequestedParameters = mp
            create.ItemsToCreate.append(req)
        results = await client.uaclient.create_monitored_items(create)
        bad = [r for r in results if not r.StatusCode.is_good()]
        if bad:
            raise RuntimeError(f"{len(bad)} monitored items refused: {bad[0].StatusCode}")
    return client, time.perf_counter() - start


async def client_a2(args: argparse.Namespace, probe: Probe) -> tuple[Any, float]:
    """asyncua's high-level Subscription API; returns (client, seconds to create the items)."""
    from asyncua import Client, ua

    probe.pending = {f"V.{i}" for i in range(args.items)}

    class Handler:
        def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
            probe.changes += 1
            if probe.pending:
                probe.seen((node.nodeid.Identifier,))

    start = probe.begin()
    client = Client(args.endpoint, timeout=10)
    client.session_timeout = 60_000
    await client.connect()
    ns = await client.get_namespace_index(NAMESPACE)
    sub = await client.create_subscription(float(args.publishing_ms), Handler())
    nodes = [client.get_node(ua.NodeId(f"V.{i}", ns)) for i in range(args.items)]
    for first in range(0, args.items, args.batch):
        await sub.subscribe_data_change(nodes[first:first + args.batch], queuesize=1,
                                        sampling_interval=-1.0)
    return client, time.perf_counter() - start


def write_mappings(directory: Path, items: int, folder_size: int) -> None:
    """One mapping file per server folder: a float signal and an on_change event per variable."""
    for k, first in enumerate(range(0, items, folder_size)):
        lines = ["version: 1", "asset:", f"  subject: acme/bench/opcua/f{k}", "signals:"]
        indexes = range(first, min(first + folder_size, items))
        for i in indexes:
            lines += [f"  v{i}:", f"    connection: {CONNECTION}",
                      f'    opcua: {{node: "nsu={NAMESPACE};s=V.{i}"}}', "    type: float"]
        lines.append("events:")
        for i in indexes:
            lines += [f"  v{i}_changed:", "    type: process.ValueChanged.v1",
                      f"    trigger: {{kind: on_change, signal: v{i}, deadband: {{absolute: 0.5}}}}",
                      f"    data: {{value: {{signal: v{i}}}}}"]
        (directory / f"f{k:03d}.yaml").write_text("\n".join(lines) + "\n", "utf-8")


class _LogCapture(io.TextIOBase):
    """The gateway's JSON log lines: notes when ``opcua.connected`` is written; passes on
    warnings and errors to stderr."""

    def __init__(self) -> None:
        self.connected_at = 0.0
        self.connected: dict[str, Any] = {}

    def write(self, text: str) -> int:
        for line in text.splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if record.get("event") == "opcua.connected" and not self.connected_at:
                    self.connected_at = time.perf_counter()
                    self.connected = record
                elif record.get("level") in ("warning", "error", "critical"):
                    sys.stderr.write(line + "\n")
        return len(text)


async def client_b(args: argparse.Namespace, probe: Probe, with_mapper: bool,
                   capture: _LogCapture) -> tuple[Any, float]:
    """The gateway's OpcUaSource (and Mapper); returns (the run task, seconds to create)."""
    from gateway.metrics import Metrics
    from gateway.sources.base import Delivery
    from gateway.sources.opcua import OpcUaAddress, OpcUaConnectionConfig, OpcUaSource

    mapper: Any = None
    if with_mapper:
        from gateway.mapping import Mapper, load_mappings

        with tempfile.TemporaryDirectory(prefix="bench-opcua-") as tmp:
            write_mappings(Path(tmp), args.items, args.folder_size)
            files = load_mappings(Path(tmp), {CONNECTION: "opcua"})
        mapper = Mapper(files, "bench-gw")
        addresses = mapper.bindings()[CONNECTION]
    else:
        addresses = [OpcUaAddress(node=f"nsu={NAMESPACE};s=V.{i}") for i in range(args.items)]
    config = OpcUaConnectionConfig(
        protocol="opcua", endpoint=args.endpoint, security_policy="None", allow_insecure=True,
        publishing_interval_ms=args.publishing_ms, max_items_per_call=args.batch,
        pki_dir=Path(tempfile.gettempdir()) / "bench-opcua-pki")
    source = OpcUaSource(CONNECTION, config, addresses, Metrics())
    probe.pending = {item.tag for item in source.items}
    map_one = mapper.map if mapper is not None else None

    async def emit(delivery: Delivery) -> None:
        signals = delivery.signals
        probe.deliveries += 1
        probe.changes += len(signals)
        if map_one is not None:
            n = 0
            for s in signals:
                n += len(map_one(s))
            probe.events += n
        if probe.pending:
            probe.seen(s.tag for s in signals)

    start = probe.begin()
    task = asyncio.create_task(source.run(emit))
    while not capture.connected_at:
        if task.done():
            task.result()  # raises what ended it
            raise RuntimeError("the source ended before it subscribed")
        await asyncio.sleep(0.005)
    return task, capture.connected_at - start


async def worker_async(args: argparse.Namespace) -> dict[str, Any]:
    import asyncua  # noqa: F401 - imported before the RSS baseline, by every client

    from gateway import logs
    from gateway.mapping import Mapper  # noqa: F401 - the same imports in every client

    capture = _LogCapture()
    logs.configure(level="info", fmt="json", stream=capture)
    probe = Probe(args.items)
    base_rss = rss_kb()
    name = args.worker
    handle: Any
    extra: dict[str, Any] = {}
    if name == "A":
        handle, create_s = await client_a(args, probe)
    elif name == "A2":
        handle, create_s = await client_a2(args, probe)
    else:
        handle, create_s = await client_b(args, probe, name == "B2", capture)
        extra["setup_s"] = capture.connected.get("setup_s")
    create_cpu = time.process_time() - probe.cpu_start
    try:
        await asyncio.wait_for(probe.all_seen.wait(), timeout=max(60.0, args.items / 100))
    except TimeoutError:
        raise RuntimeError(f"{len(probe.pending)} of {args.items} items sent no value") from None
    first_s = probe.all_seen_at - probe.start
    await asyncio.sleep(args.warmup)
    profiler = cProfile.Profile() if args.profile == name else None
    c0, d0, e0 = probe.changes, probe.deliveries, probe.events
    cpu0, t0, m0 = time.process_time(), time.perf_counter(), time.monotonic()
    if profiler is not None:
        profiler.enable()
    await asyncio.sleep(args.duration)
    if profiler is not None:
        profiler.disable()
    cpu1, t1, m1 = time.process_time(), time.perf_counter(), time.monotonic()
    c1, d1, e1 = probe.changes, probe.deliveries, probe.events
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if isinstance(handle, asyncio.Task):
        handle.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await handle
    else:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(handle.disconnect(), 5)
    if profiler is not None:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).strip_dirs().sort_stats("tottime").print_stats(20)
        extra["profile"] = out.getvalue()
    return {"name": name, "items": args.items, "create_s": create_s, "create_cpu_s": create_cpu,
            "first_s": first_s, "changes": c1 - c0, "deliveries": d1 - d0, "events": e1 - e0,
            "window_s": t1 - t0, "cpu_s": cpu1 - cpu0, "mono": [m0, m1],
            "rss_base_kb": base_rss, "rss_peak_kb": peak, **extra}


def worker(args: argparse.Namespace) -> int:
    # never hang the parent: creating the items may take a while, the rest is bounded
    faulthandler.dump_traceback_later(args.warmup + args.duration + max(120, args.items / 50),
                                      exit=True)
    result = asyncio.run(worker_async(args))
    print("RESULT " + json.dumps(result), flush=True)
    return 0


# --- the parent: server, clients, table -------------------------------------------------------


class Server(ServerProcess):
    """The OPC UA server subprocess (READY with its build time; STATS: time, writes, CPU s)."""

    def __init__(self, items: int, period_ms: float, folder_size: int) -> None:
        from gateway.localbrokers import free_port

        self.port = free_port()
        self.endpoint = f"opc.tcp://127.0.0.1:{self.port}/"
        super().__init__("bench.opcua_bench_server",
                         ["--port", str(self.port), "--items", str(items),
                          "--period-ms", str(period_ms), "--folder-size", str(folder_size)],
                         "the OPC UA server", cpu_column=2)
        self.build_s = float(self.ready_line.split()[2])


def run_client(name: str, args: argparse.Namespace, endpoint: str) -> dict[str, Any]:
    argv = [sys.executable, "-m", "bench.bench_opcua", "--worker", name, "--endpoint", endpoint,
            "--items", str(args.items), "--duration", str(args.duration),
            "--warmup", str(args.warmup), "--publishing-ms", str(args.publishing_ms),
            "--batch", str(args.batch), "--folder-size", str(args.folder_size)]
    if args.profile:
        argv += ["--profile", args.profile]
    proc = subprocess.run(argv, cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=600)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line[len("RESULT "):])
            return result
    raise RuntimeError(f"client {name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def print_table(results: list[dict[str, Any]], server: Server) -> None:
    def rate(r: dict[str, Any]) -> float:
        return float(r["changes"] / r["window_s"])

    def per_cpu(r: dict[str, Any]) -> float:
        return float(r["changes"] / max(r["cpu_s"], 1e-9))

    def rss_delta(r: dict[str, Any]) -> float:
        return float(r["rss_peak_kb"] - r["rss_base_kb"]) / 1024

    print()
    print("changes/s: delivered to the client's callback (emit); server w/s: the server's writes "
          "in the same window;\ndelivered: their ratio; per CPU s: changes per second of the "
          "client's CPU (its ceiling on one core)")
    print(f"{'round client':<29} {'create s':>8} {'cr CPU':>6} {'first s':>7} {'changes/s':>9} "
          f"{'server w/s':>10} {'delivered':>9} {'per pub':>7} {'per CPU s':>9} {'CPU %':>6} "
          f"{'RSS MiB':>7} {'RSS +':>6} {'srv CPU':>7}")
    for r in results:
        writes, srv_cpu = server.window(*r["mono"])
        per_pub = f"{r['changes'] / r['deliveries']:,.0f}" if r["deliveries"] else "-"
        print(f"{r['round']:>5} {TITLES[r['name']]:<23} {r['create_s']:>8.2f} "
              f"{r['create_cpu_s']:>6.2f} {r['first_s']:>7.2f} {rate(r):>9,.0f} {writes:>10,.0f} "
              f"{(rate(r) / writes if writes else 0):>9.1%} {per_pub:>7} {per_cpu(r):>9,.0f} "
              f"{100 * r['cpu_s'] / r['window_s']:>5.1f}% {r['rss_peak_kb'] / 1024:>7.1f} "
              f"{rss_delta(r):>6.1f} {100 * srv_cpu:>6.0f}%")
    print()
    print("ratios to A (bare asyncua) of the same round: changes/s | create s | CPU while "
          "creating | first s | CPU per change | RSS growth")
    for r in results:
        ref = next((x for x in results if x["name"] == "A" and x["round"] == r["round"]), None)
        if ref is None or r is ref:
            continue
        print(f"{r['round']:>5} {TITLES[r['name']]:<24} {rate(r) / rate(ref):>5.2f}x  "
              f"{r['create_s'] / ref['create_s']:>5.2f}x  "
              f"{r['create_cpu_s'] / ref['create_cpu_s']:>5.2f}x  "
              f"{r['first_s'] / ref['first_s']:>5.2f}x  {per_cpu(ref) / per_cpu(r):>5.2f}x  "
              f"{rss_delta(r) / max(rss_delta(ref), 0.1):>5.2f}x")
    for r in results:
        if r.get("setup_s") is not None:
            print(f"round {r['round']} {TITLES[r['name']]}: setup_s in its opcua.connected line "
                  f"(the connect excluded): {r['setup_s']:.2f} s")
        if r["events"]:
            print(f"round {r['round']} {TITLES[r['name']]}: {r['events'] / r['window_s']:,.0f} "
                  f"events/s from {rate(r):,.0f} signals/s")
        if r.get("profile"):
            print(f"\ncProfile of {TITLES[r['name']]}, measured window, top 20 by own time:")
            print("\n".join(line for line in r["profile"].splitlines() if line.strip()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--items", type=int, default=None,
                        help="monitored items (variables); 10,000 (--quick: 2,000)")
    parser.add_argument("--duration", type=float, default=None,
                        help="measured seconds per client; 20 (--quick: 5)")
    parser.add_argument("--warmup", type=float, default=None,
                        help="seconds after the first values before measuring; 3 (--quick: 1)")
    parser.add_argument("--period-ms", type=float, default=1000.0,
                        help="the server writes every variable once per period")
    parser.add_argument("--publishing-ms", type=int, default=100,
                        help="publishing interval of the subscription")
    parser.add_argument("--batch", type=int, default=1000,
                        help="monitored items per CreateMonitoredItems call")
    parser.add_argument("--folder-size", type=int, default=500)
    parser.add_argument("--clients", default=",".join(CLIENTS),
                        help=f"which clients, in this order (of {', '.join(CLIENTS)})")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds over the clients, each in the reverse order of the one "
                             "before; 2 (--quick: 1)")
    parser.add_argument("--quick", action="store_true", help="2,000 items, 5 s per client")
    parser.add_argument("--profile", choices=CLIENTS, help="cProfile this client's window")
    parser.add_argument("--worker", choices=CLIENTS, help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    parser.add_argument("--json-out", type=Path,
                        help="also write the printed figures to this file (JSON)")
    args = parser.parse_args(argv)
    args.items = args.items if args.items is not None else (2000 if args.quick else 10_000)
    args.duration = args.duration if args.duration is not None else (5.0 if args.quick else 20.0)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 3.0)
    args.rounds = max(1, args.rounds if args.rounds is not None else (1 if args.quick else 2))
    if args.worker:
        return worker(args)

    clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    unknown = [c for c in clients if c not in CLIENTS]
    if unknown:
        parser.error(f"unknown clients {unknown}; choose from {', '.join(CLIENTS)}")
    print(f"OPC UA benchmark: {args.items:,} items, each written every {args.period_ms:g} ms "
          f"({args.items * 1000 / args.period_ms:,.0f} changes/s offered), publishing interval "
          f"{args.publishing_ms} ms, {args.batch} items per create call, {args.duration:g} s "
          f"measured per client; {os.cpu_count()} cores, Python {sys.version.split()[0]}",
          flush=True)
    server = Server(args.items, args.period_ms, args.folder_size)
    try:
        print(f"server up at {server.endpoint} (built in {server.build_s:.1f} s)", flush=True)
        results = []
        loads = []
        for round_ in range(1, args.rounds + 1):
            for name in clients if round_ % 2 else clients[::-1]:
                r = run_client(name, args, server.endpoint)
                r["round"] = round_
                results.append(r)
                loads.append(Path("/proc/loadavg").read_text().split()[0])
                print(f"  round {round_} {TITLES[name]}: {r['changes'] / r['window_s']:,.0f} "
                      f"changes/s, created in {r['create_s']:.2f} s, load {loads[-1]}",
                      flush=True)
        print_table(results, server)
        print(f"load average (1 min) after each client: {', '.join(loads)}; "
              f"server CPU while building: {server.build_s:.1f} s")
        if args.json_out:
            rows = []
            for r in results:
                writes, srv_cpu = server.window(*r["mono"])
                rows.append({**{k: v for k, v in r.items() if k != "profile"},
                             "title": TITLES[r["name"]],
                             "changes_s": r["changes"] / r["window_s"],
                             "per_cpu_s": r["changes"] / max(r["cpu_s"], 1e-9),
                             "rss_peak_mib": r["rss_peak_kb"] / 1024,
                             "rss_growth_mib": (r["rss_peak_kb"] - r["rss_base_kb"]) / 1024,
                             "server_writes_s": writes, "server_cpu": srv_cpu})
            args.json_out.write_text(json.dumps({
                "items": args.items, "period_ms": args.period_ms,
                "publishing_ms": args.publishing_ms, "duration_s": args.duration,
                "rounds": args.rounds, "server_build_s": server.build_s, "loads": loads,
                "clients": rows}, indent=1))
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
