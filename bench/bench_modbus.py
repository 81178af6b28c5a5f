"""Modbus polling: registers and signals per second for 1,000 signals across 10 units at 100 ms,
requests before and after coalescing, CPU, the gateway's ModbusSource against a bare pymodbus
client reading the same blocks.

    python -m bench.bench_modbus                 # 10 units x 100 signals, 20 s per client (~2 min)
    python -m bench.bench_modbus --quick         # 5 s per client (~40 s)
    python -m bench.bench_modbus --units 20 --per-unit 200 --poll-ms 50 --profile G

One pymodbus TCP server, started once as a subprocess (bench/modbus_bench_server.py, so its
CPU is not the clients'), simulates ``--units`` units with holding registers and counts the
requests it receives. The signals: per unit ``--per-unit`` values in a row, types cycling
uint16, int32 (ABCD), float32 (CDAB), with a 2-register hole after every 7th value (bridged by
coalescing: ``max_gap`` 10) and a 20-register hole after every 40th (too wide: a new read),
all polled every ``--poll-ms``. ``plan`` coalesces them into reads of at most 125 registers;
"before coalescing" is one read per signal.

Then, one after the other, each client in a fresh subprocess of its own (clean RSS), all
against that server in the same run:

- ``G  ModbusSource``: the gateway's source (gateway/sources/modbus.py) as the daemon builds
  it, ``run(emit)`` with an ``emit`` that counts the Signals (decoded values) of each Delivery;
  its own metrics give requests, registers, late reads (``modbus_poll_late_total``: started
  more than a tenth of the interval after their due time), skipped ticks and the worst lag.
- ``R  bare, same cadence``: a pymodbus ``AsyncModbusTcpClient`` (same timeout and retries)
  reading the same coalesced blocks every ``--poll-ms``, in phase, one after the other, no
  decoding: the reference of the CPU ratios. Its late reads and skipped ticks are counted as
  the source counts them (per read, from the cycle's due time): all reads of one interval are
  due at the same instant and the link serves one at a time, so the later reads of a cycle
  start late by the time the earlier ones took, in both.
- ``F  bare, flat out``: the same blocks read back to back as fast as the link allows: the
  headroom of the plan (how many times over the link could carry it).
- ``N  bare, naive flat out``: one read per signal, back to back: what the link does without
  coalescing, and the shortest cycle that would take.

Per client, over a window of ``--duration`` s after ``--warmup`` s: requests, registers and
signals per second (the gateway's signals are decoded values; the bare clients' "signals" are
the values their blocks carry), the requests the server counted in the same window, CPU
(``time.process_time``) in percent of one core and per million registers, peak RSS. The
ratios are to R of the same run. The machine's load average is printed with the table (2 cores:
the server competes with the client, and a busy machine makes polls late).
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
import time
from pathlib import Path
from typing import Any

from bench.serverproc import ServerProcess

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.sources.modbus import (
    ModbusAddress,
    ModbusConnectionConfig,
    Request,
    describe_plan,
    plan,
)

CONNECTION = "bench_modbus"
CLIENTS = ("G", "R", "F", "N")
TITLES = {"G": "G  ModbusSource", "R": "R  bare, same cadence", "F": "F  bare, flat out",
          "N": "N  bare, naive flat out"}
TYPES = (("uint16", None, 1), ("int32", None, 2), ("float32", "CDAB", 2))


def addresses(units: int, per_unit: int) -> tuple[list[ModbusAddress], int]:
    """The signals (see the module docstring) and the registers per unit they span."""
    out: list[ModbusAddress] = []
    top = 0
    for unit in range(1, units + 1):
        register = 0
        for j in range(per_unit):
            kind, order, size = TYPES[j % len(TYPES)]
            block: dict[str, Any] = {"unit": unit, "table": "holding_register",
                                     "address": register, "type": kind}
            if order is not None:
                block["order"] = order
            out.append(ModbusAddress.model_validate(block))
            register += size
            if (j + 1) % 40 == 0:
                register += 20
            elif (j + 1) % 7 == 0:
                register += 2
        top = max(top, register)
    return out, top


def config(args: argparse.Namespace) -> ModbusConnectionConfig:
    return ModbusConnectionConfig(protocol="modbus", host="127.0.0.1", port=args.port,
                                  poll_ms=args.poll_ms, timeout_ms=1000, retries=1)


def naive(requests: list[Request]) -> list[tuple[int, int, int]]:
    """(unit, start, count): one read per value."""
    return [(r.unit, m.start, m.count) for r in requests for m in r.members]


# --- the worker: one client in its own process ------------------------------------------------


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Window:
    """Counters of one client; ``mark`` snapshots them at the window's start and end."""

    def __init__(self) -> None:
        self.requests = 0
        self.registers = 0
        self.signals = 0
        self.late = 0
        self.marks: list[dict[str, float]] = []
        self.extra: dict[str, float] = {"failed": 0, "skipped": 0}

    def mark(self) -> None:
        self.marks.append({"requests": self.requests, "registers": self.registers,
                           "signals": self.signals, "late": self.late, **self.extra,
                           "cpu": time.process_time(), "t": time.perf_counter(),
                           "mono": time.monotonic()})


async def measure(args: argparse.Namespace, window: Window, refresh: Any = None) -> None:
    await asyncio.sleep(args.warmup)
    if refresh:
        refresh()
    window.mark()
    profiler = cProfile.Profile() if args.profile == args.worker else None
    if profiler is not None:
        profiler.enable()
    await asyncio.sleep(args.duration)
    if profiler is not None:
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).strip_dirs().sort_stats("tottime").print_stats(20)
        window.extra["profile"] = out.getvalue()  # type: ignore[assignment]
    if refresh:
        refresh()
    window.mark()


async def gateway_client(args: argparse.Namespace, window: Window) -> None:
    from gateway.metrics import Metrics
    from gateway.sources.base import Delivery
    from gateway.sources.modbus import ModbusSource

    metrics = Metrics()
    addrs, _ = addresses(args.units, args.per_unit)
    source = ModbusSource(CONNECTION, config(args), addrs, metrics)

    async def emit(delivery: Delivery) -> None:
        window.signals += len(delivery.signals)

    def refresh() -> None:
        window.requests = int(metrics.value("modbus_requests_total", connection=CONNECTION,
                                            result="ok"))
        window.registers = int(metrics.total("modbus_registers_read_total"))
        window.late = int(metrics.total("modbus_poll_late_total"))
        window.extra["skipped"] = metrics.total("modbus_polls_skipped_total")
        window.extra["failed"] = metrics.total("modbus_requests_total") - window.requests
        window.extra["lag_max"] = metrics.snapshot().get("modbus_poll_lag_seconds", 0.0)

    task = asyncio.create_task(source.run(emit))
    try:
        await measure(args, window, refresh)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def bare_client(args: argparse.Namespace, window: Window) -> None:
    from pymodbus.client import AsyncModbusTcpClient

    addrs, _ = addresses(args.units, args.per_unit)
    requests = plan(addrs, config(args))
    if args.worker == "N":
        blocks = naive(requests)
        values = [1] * len(blocks)
    else:
        blocks = [(r.unit, r.start, r.count) for r in requests]
        values = [len(r.members) for r in requests]
    from pymodbus.exceptions import ModbusIOException

    client = AsyncModbusTcpClient("127.0.0.1", port=args.port, timeout=1.0, retries=1)
    client.set_max_no_responses(1_000_000_000)  # as the source does: a timeout is no loss
    await client.connect()
    interval = args.poll_ms / 1000
    paced = args.worker == "R"

    running = True

    async def loop() -> None:
        due = time.monotonic()
        read = client.read_holding_registers
        while running:
            if paced:
                now = time.monotonic()
                if now - due > interval:  # skip the ticks missed, as the source does
                    window.extra["skipped"] += (now - due) // interval
                    due += (now - due) // interval * interval
            for (unit, start, count), n in zip(blocks, values, strict=True):
                if paced and time.monotonic() - due > interval * 0.1:
                    window.late += 1  # as the source counts: per read, from its due time
                try:
                    response = await read(start, count=count, device_id=unit)
                except ModbusIOException:  # no answer within timeout x (retries + 1)
                    window.extra["failed"] = window.extra.get("failed", 0) + 1
                    continue
                if response.isError():
                    raise RuntimeError(f"unit {unit} {start}+{count}: {response}")
                window.requests += 1
                window.registers += len(response.registers)
                window.signals += n
            if paced:
                due += interval
                await asyncio.sleep(max(0.0, due - time.monotonic()))

    task = asyncio.create_task(loop())
    try:
        await measure(args, window)
        if task.done():
            task.result()
    finally:
        # A flag, not only cancel(): pymodbus waits for a response with 3.11's wait_for,
        # which can swallow a cancellation that coincides with the response.
        running = False
        task.cancel()
        await asyncio.wait({task}, timeout=5)
        client.close()


async def worker_async(args: argparse.Namespace) -> dict[str, Any]:
    import pymodbus.client  # noqa: F401 - imported before the RSS baseline, by every client

    from gateway import logs
    from gateway.sources.modbus import ModbusSource  # noqa: F401 - ditto

    logs.configure(level="warning", fmt="json", stream=sys.stderr)
    base = rss_kb()
    window = Window()
    if args.worker == "G":
        await gateway_client(args, window)
    else:
        await bare_client(args, window)
    a, b = window.marks
    out = {key: b[key] - a[key] for key in a
           if key not in ("t", "mono", "cpu") and isinstance(a[key], (int, float))}
    return {"name": args.worker, **out, "window_s": b["t"] - a["t"], "cpu_s": b["cpu"] - a["cpu"],
            "mono": [a["mono"], b["mono"]], "lag_max": b.get("lag_max", 0.0),
            "profile": window.extra.get("profile"), "rss_base_kb": base,
            "rss_peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}


def worker(args: argparse.Namespace) -> int:
    faulthandler.dump_traceback_later(args.warmup + args.duration + 90, exit=True)  # never hang

    async def bounded() -> dict[str, Any]:
        async with asyncio.timeout(args.warmup + args.duration + 60):
            return await worker_async(args)

    result = asyncio.run(bounded())
    print("RESULT " + json.dumps(result), flush=True)
    return 0


# --- the parent: server, clients, table -------------------------------------------------------


class Server(ServerProcess):
    """The Modbus server subprocess (STATS: time, requests, registers, CPU s)."""

    def __init__(self, units: int, registers: int) -> None:
        from gateway.localbrokers import free_port

        self.port = free_port()
        super().__init__("bench.modbus_bench_server",
                         ["--port", str(self.port), "--units", str(units),
                          "--registers", str(registers)], "the Modbus server", cpu_column=3)


def run_client(name: str, args: argparse.Namespace, port: int) -> dict[str, Any]:
    argv = [sys.executable, "-m", "bench.bench_modbus", "--worker", name, "--port", str(port),
            "--units", str(args.units), "--per-unit", str(args.per_unit),
            "--poll-ms", str(args.poll_ms), "--duration", str(args.duration),
            "--warmup", str(args.warmup)]
    if args.profile:
        argv += ["--profile", args.profile]
    proc = subprocess.run(argv, cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=args.warmup + args.duration + 120)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line[len("RESULT "):])
            return result
    raise RuntimeError(f"client {name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def print_table(results: list[dict[str, Any]], server: Server, needed_rps: float,
                values: int, poll_ms: int) -> None:
    ref = next((r for r in results if r["name"] == "R"), results[0])

    def per_s(r: dict[str, Any], key: str) -> float:
        return float(r[key] / r["window_s"])

    def cpu_per_m(r: dict[str, Any]) -> float:
        return float(r["cpu_s"] / max(r["registers"], 1) * 1e6)

    print()
    print(f"{'client':<24} {'requests/s':>10} {'srv req/s':>9} {'registers/s':>11} "
          f"{'signals/s':>9} {'late':>5} {'CPU %':>6} {'CPU s/1M reg':>12} {'us/req':>7} "
          f"{'RSS MiB':>7} {'srv CPU':>7}")
    for r in results:
        srv_rps, srv_cpu = server.window(*r["mono"])
        us_per_req = 1e6 * r["cpu_s"] / max(r["requests"], 1)
        print(f"{TITLES[r['name']]:<24} {per_s(r, 'requests'):>10,.0f} {srv_rps:>9,.0f} "
              f"{per_s(r, 'registers'):>11,.0f} {per_s(r, 'signals'):>9,.0f} {r['late']:>5,} "
              f"{100 * r['cpu_s'] / r['window_s']:>5.1f}% {cpu_per_m(r):>12.1f} "
              f"{us_per_req:>7.0f} {r['rss_peak_kb'] / 1024:>7.1f} {100 * srv_cpu:>6.0f}%")
    print()
    print("ratios to R (bare pymodbus, same blocks, same cadence) of the same run:")
    for r in results:
        if r is ref:
            continue
        print(f"  {TITLES[r['name']]:<24} registers/s {per_s(r, 'registers') / per_s(ref, 'registers'):>5.2f}x"
              f"   CPU per register {cpu_per_m(r) / cpu_per_m(ref):>5.2f}x"
              f"   CPU per request {r['cpu_s'] / max(r['requests'], 1) / (ref['cpu_s'] / max(ref['requests'], 1)):>5.2f}x")
    for r in results:
        if r["name"] in ("G", "R"):
            lag = (f", worst lag {1000 * r['lag_max']:.1f} ms (modbus_poll_lag_seconds)"
                   if r["name"] == "G" else "")
            print(f"{TITLES[r['name']]}: late reads (started > {poll_ms / 10:g} ms after "
                  f"due) {r['late']:,} of {r['requests']:,}, skipped ticks "
                  f"{r.get('skipped', 0):,.0f}, failed requests {r.get('failed', 0):,.0f}{lag}")
        if r["name"] in ("F", "N") and r.get("failed"):
            print(f"{TITLES[r['name']]}: {r['failed']:,.0f} requests without an answer within "
                  f"1 s x 2 attempts (pymodbus' timeout)")
        if r["name"] == "F":
            print(f"headroom of the coalesced plan: the link carries {per_s(r, 'requests'):,.0f} "
                  f"requests/s flat out, the plan needs {needed_rps:,.0f}: "
                  f"{per_s(r, 'requests') / needed_rps:.1f}x")
        if r["name"] == "N":
            rps = per_s(r, "requests")
            print(f"without coalescing: {rps:,.0f} one-value reads/s flat out: one cycle of the "
                  f"{values:,} values takes {1000 * values / rps:,.0f} ms (the poll interval "
                  f"is {poll_ms} ms: {values * 1000 / poll_ms:,.0f} reads/s would be needed)")
        if r.get("profile"):
            print(f"\ncProfile of {TITLES[r['name']]}, measured window, top 20 by own time:")
            print("\n".join(line for line in r["profile"].splitlines() if line.strip()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--units", type=int, default=10, help="units (device ids)")
    parser.add_argument("--per-unit", type=int, default=100, help="signals per unit")
    parser.add_argument("--poll-ms", type=int, default=100, help="poll interval of every signal")
    parser.add_argument("--duration", type=float, default=None,
                        help="measured seconds per client; 20 (--quick: 5)")
    parser.add_argument("--warmup", type=float, default=None,
                        help="seconds before measuring; 2 (--quick: 1)")
    parser.add_argument("--clients", default=",".join(CLIENTS),
                        help=f"which clients, in this order (of {', '.join(CLIENTS)})")
    parser.add_argument("--quick", action="store_true", help="5 s per client")
    parser.add_argument("--profile", choices=CLIENTS, help="cProfile this client's window")
    parser.add_argument("--worker", choices=CLIENTS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--json-out", type=Path,
                        help="also write the printed figures to this file (JSON)")
    args = parser.parse_args(argv)
    args.duration = args.duration if args.duration is not None else (5.0 if args.quick else 20.0)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0)
    if args.worker:
        return worker(args)

    clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    unknown = [c for c in clients if c not in CLIENTS]
    if unknown:
        parser.error(f"unknown clients {unknown}; choose from {', '.join(CLIENTS)}")
    addrs, top = addresses(args.units, args.per_unit)
    args.port = 502
    requests = plan(addrs, config(args))
    needed = sum(1000.0 / r.poll_ms for r in requests)
    head = describe_plan(CONNECTION, requests).splitlines()[0]
    print(f"Modbus benchmark: {len(addrs):,} signals on {args.units} units (uint16, int32, "
          f"float32 CDAB; {top} registers per unit), every {args.poll_ms} ms, {args.duration:g} s "
          f"measured per client; {os.cpu_count()} cores, Python {sys.version.split()[0]}",
          flush=True)
    print(f"plan: {head}", flush=True)
    registers = sum(r.count for r in requests)
    asked = sum(m.count for r in requests for m in r.members)
    print(f"requests per cycle: {len(addrs):,} before coalescing (one per signal, "
          f"{len(addrs) * 1000 / args.poll_ms:,.0f}/s), {len(requests)} after "
          f"({needed:,.0f}/s): {len(addrs) / len(requests):.1f}x fewer; {registers:,} registers "
          f"read per cycle for {asked:,} asked ({registers - asked:,} bridged)", flush=True)
    server = Server(args.units, top + 1)
    try:
        results = []
        loads = []
        for name in clients:
            results.append(run_client(name, args, server.port))
            loads.append(Path("/proc/loadavg").read_text().split()[0])
            r = results[-1]
            print(f"  {TITLES[name]}: {r['requests'] / r['window_s']:,.0f} requests/s, "
                  f"{r['registers'] / r['window_s']:,.0f} registers/s, load {loads[-1]}",
                  flush=True)
        print_table(results, server, needed, len(addrs), args.poll_ms)
        print(f"load average (1 min) after each client: {', '.join(loads)}")
        if args.json_out:
            rows = []
            for r in results:
                srv_rps, srv_cpu = server.window(*r["mono"])
                rows.append({**{k: v for k, v in r.items() if k != "profile"},
                             "title": TITLES[r["name"]],
                             "requests_s": r["requests"] / r["window_s"],
                             "registers_s": r["registers"] / r["window_s"],
                             "signals_s": r["signals"] / r["window_s"],
                             "rss_peak_mib": r["rss_peak_kb"] / 1024,
                             "server_requests_s": srv_rps, "server_cpu": srv_cpu})
            args.json_out.write_text(json.dumps({
                "signals": len(addrs), "units": args.units, "per_unit": args.per_unit,
                "poll_ms": args.poll_ms, "duration_s": args.duration,
                "requests_per_cycle_before": len(addrs), "requests_per_cycle_after": len(requests),
                "requests_needed_s": needed, "registers_per_cycle": registers,
                "registers_asked_per_cycle": asked, "loads": loads, "clients": rows}, indent=1))
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
