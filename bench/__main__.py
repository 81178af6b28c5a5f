"""One benchmark command: every scenario in a subprocess of its own, one table against the targets.

    python -m bench --quick                  # a few minutes: smaller sizes, 1 run (make bench)
    python -m bench                          # full sizes, 3 runs (~25 min on 2 cores)
    python -m bench --runs 5 --only P3,P8    # the scenarios those figures need, 5 runs
    python -m bench --json out.json          # default bench/results/<UTC time>-<git sha>.json

Each scenario is one of the benchmark modules of this directory, run as ``python -m bench.<x>``
with ``--json-out``/``--json`` (so a crash or a hang of one cannot take the suite down; a
scenario over its timeout gets SIGINT, so that it stops its brokers and gateways on the way out,
then SIGTERM, then SIGKILL). The modules start their own brokers (mosquitto, Tansu) and simulators
(OPC UA and Modbus servers). Runs go round-robin (run 1 of every scenario, then run 2, ...), so
a change in the machine's load spreads over all figures. Every figure is reported as the
median of the runs with their min and max; the verdict is taken on the median.

Verdicts:

- ``PASS`` / ``FAIL``: measured as the target says (or a figure that can only be worse than
  the target's, e.g. RSS of the source alone vs the daemon, which already misses);
- ``GAP``: only an optimistic stand-in was measured (the note says how it differs from the
  target) and it meets the target: the target itself is not shown to be met;
- ``n/a``: no scenario measures it yet (the note says what is missing); never a number.
- ``info``: a related figure without a target of its own.

The raw limit is the bare client's figure of the same run (bare paho, bare asyncua, bare
aiokafka), ratio = value / raw limit. Full logs of every scenario run are written next to the
JSON file (``<json stem>-logs/``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"

Metrics = dict[str, float]


# -- scenarios ------------------------------------------------------------------------------------


def _e2e(d: dict[str, Any]) -> Metrics:
    return {"mqtt_bare": d["bare_paho_msg_s"], "mqtt_ingest": d["ingest_events_s"],
            "mqtt_ingest_ratio": d["ingest_vs_bare"] or math.nan,
            "mqtt_out": d["forwarded_events_s"], "mqtt_lost": d["lost"]}


def _mapping(d: dict[str, Any]) -> Metrics:
    mixes = {m["name"].split()[0]: m for m in d["mixes"] if "tick" not in m["name"]}
    return {"map_a": mixes["(a)"]["signals_per_cpu_s"], "map_b": mixes["(b)"]["signals_per_cpu_s"],
            "map_c": mixes["(c)"]["signals_per_cpu_s"]}


def _opcua(d: dict[str, Any]) -> Metrics:
    out: Metrics = {"opcua_items": d["items"]}
    for c in d["clients"]:
        if c.get("round", 1) != 1:
            continue
        key = c["name"].lower()
        out[f"opcua_{key}_first_s"] = c["first_s"]
        out[f"opcua_{key}_create_s"] = c["create_s"]
        out[f"opcua_{key}_rss_mib"] = c["rss_peak_mib"]
        out[f"opcua_{key}_per_cpu_s"] = c["per_cpu_s"]
        out[f"opcua_{key}_changes_s"] = c["changes_s"]
    return out


def _modbus(d: dict[str, Any]) -> Metrics:
    out: Metrics = {"modbus_signals": d["signals"],
                    "modbus_req_before": d["requests_per_cycle_before"],
                    "modbus_req_after": d["requests_per_cycle_after"],
                    "modbus_coalesced_share": _coalesced_share(d)}
    for c in d["clients"]:
        key = c["name"].lower()
        out[f"modbus_{key}_registers_s"] = c["registers_s"]
        out[f"modbus_{key}_signals_s"] = c["signals_s"]
        out[f"modbus_{key}_late_share"] = c["late"] / max(c["requests"], 1)
    return out


def _coalesced_share(d: dict[str, Any]) -> float:
    """Share of the polled (asked-for) registers read in blocks serving more than one signal, of
    the plan bench_modbus polls (the same function, the same signals)."""
    try:
        from bench.bench_modbus import addresses, config
        from gateway.sources.modbus import plan
    except Exception:  # noqa: BLE001 - the module may be broken by a change under way
        return math.nan
    addrs, _ = addresses(d["units"], d["per_unit"])
    requests = plan(addrs, config(argparse.Namespace(port=502, poll_ms=d["poll_ms"])))
    asked = sum(m.count for r in requests for m in r.members)
    shared = sum(m.count for r in requests if len(r.members) > 1 for m in r.members)
    return shared / asked if asked else math.nan


def _durability(d: dict[str, Any]) -> Metrics:
    f = d["figures"]
    out: Metrics = {}
    raw = f.get("raw_send_batch") or []
    if raw:
        out["kafka_raw"] = raw[0]
    runs = f.get("e2e_runs") or {}
    if runs.get("full"):
        out["dur_e2e_full"] = statistics.median(r["e2e"] for r in runs["full"])
    if runs.get("off"):
        out["dur_e2e_off"] = statistics.median(r["e2e"] for r in runs["off"])
    if f.get("e2e_pairs"):
        out["dur_full_vs_off"] = statistics.median(f["e2e_pairs"])
    dl = f.get("drain_under_load")
    if dl:
        out["drain_rate"] = dl["drain_rate"]
        out["drain_ingest_steady"] = dl["ingest_steady"]
        out["drain_offered"] = dl["offered_steady"]
        out["drain_backlog"] = dl["backlog"]
    return out


def _latency(d: dict[str, Any]) -> Metrics:
    return {"lat_p50": d["e2e_ms"]["p50"], "lat_p99": d["e2e_ms"]["p99"],
            "lat_pre_p50": d["to_record_ts_ms"]["p50"], "lat_rate": d["rate_published"],
            "lat_forwarded": d["forwarded_events_s"], "lat_rss": d["gateway_rss_peak_mib"],
            "lat_lost": d["lost"]}


@dataclass(frozen=True)
class Scenario:
    name: str
    module: str
    quick: list[str]
    full: list[str]
    timeout_quick: float
    timeout_full: float
    extract: Callable[[dict[str, Any]], Metrics]
    json_flag: str = "--json-out"


SCENARIOS = [
    Scenario("mqtt_e2e", "bench.bench_e2e", ["--messages", "10000"], ["--messages", "50000"],
             300, 900, _e2e),
    Scenario("mapping", "bench.bench_mapping", ["--quick", "--passes", "1"],
             ["--assets", "1000", "--readings", "200000", "--passes", "1"], 300, 900, _mapping),
    Scenario("opcua", "bench.bench_opcua", ["--quick", "--clients", "A,B1,B2"],
             ["--items", "10000", "--clients", "A,B1,B2", "--rounds", "1", "--duration", "10"],
             600, 1500, _opcua),
    Scenario("modbus", "bench.bench_modbus", ["--quick", "--clients", "G,R"],
             ["--duration", "10", "--clients", "G,R,F"], 300, 600, _modbus),
    Scenario("durability", "bench.bench_durability",
             ["--quick", "--phases", "1,4,5", "--repeats", "1", "--events", "10000",
              "--bulk-events", "20000", "--rate", "2000", "--outage", "10", "--timeout", "120"],
             ["--phases", "1,4,5", "--repeats", "1", "--events", "50000", "--bulk-events",
              "50000", "--rate", "2000", "--outage", "20", "--timeout", "180"],
             900, 1800, _durability, json_flag="--json"),
    Scenario("latency", "bench.bench_latency", ["--duration", "5", "--warmup", "2"],
             ["--duration", "15", "--warmup", "3"], 300, 600, _latency),
    Scenario("latency_1k", "bench.bench_latency", ["--rate", "1000", "--duration", "5",
                                                   "--warmup", "2"],
             ["--rate", "1000", "--duration", "15", "--warmup", "3"], 300, 600,
             lambda d: {f"{k}_1k": v for k, v in _latency(d).items()}),
]


# -- rows of the table ------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    fid: str
    what: str
    target: str
    value: str | None = None
    """Metric key of the value; None: not measured (``note`` says why)."""
    raw: str | None = None
    """Metric key of the bare client's figure of the same run."""
    ok: Callable[[float], bool] | None = None
    """The target, applied to the median; None: an info row."""
    optimistic: bool = False
    """The value is a stand-in that can only look better than the target's quantity."""
    unit: str = "/s"
    note: str = ""
    ratio_of: str | None = None
    """Metric key whose median is the ratio shown (when it is not value / raw)."""
    scenario: str = ""
    gap_if: Callable[[argparse.Namespace], str] | None = field(default=None, compare=False)
    """Returns a reason when, in this mode, the measurement is not the target's (then at best GAP)."""


def _quick_items(args: argparse.Namespace) -> str:
    return "--quick: 2,000 items, not 10,000" if args.quick else ""


ROWS = [
    Row("P1", "events out to Kafka from OPC UA + Modbus, 400 B events, sustained 10 min",
        ">= 30,000 events/s", note="not measured: no scenario drives OPC UA + Modbus sources "
        "into Kafka at that rate for 10 min (the simulators here offer ~10k changes/s each)"),
    Row("P1 rel.", "MQTT QoS 1 -> Kafka acks=all, daemon drains a queued session (sync=full)",
        "", value="dur_e2e_full", raw="kafka_raw", scenario="durability",
        note="raw limit: bare aiokafka send_batch, same records"),
    Row("P2", "OPC UA source + Mapper, changes per client CPU second (1 in 5 produce events)",
        ">= 60,000 signals/s", value="opcua_b2_per_cpu_s", raw="opcua_a_per_cpu_s",
        ok=lambda v: v >= 60_000, optimistic=True, scenario="opcua",
        note="no buffer, no Kafka, not the daemon; raw limit: bare asyncua per CPU s"),
    Row("P2 rel.", "mapping engine alone, all trigger kinds, per CPU second (~8% produce events)",
        "", value="map_b", scenario="mapping"),
    Row("P2 rel.", "Modbus source, 10 units x 100 signals at 100 ms: decoded signals/s", "",
        value="modbus_g_signals_s", raw="modbus_r_signals_s", scenario="modbus",
        note="paced: offered 10,000/s; raw limit: bare pymodbus, same blocks"),
    Row("P3", "MQTT QoS 1 in, mapped + durably buffered (ingest) vs bare paho",
        ">= 0.80x bare paho", value="mqtt_ingest", raw="mqtt_bare",
        ratio_of="mqtt_ingest_ratio", ok=lambda r: r >= 0.80, scenario="mqtt_e2e",
        note="verdict on the ratio; both drain a queued persistent session"),
    Row("P4", "latency p50 at 5,000 events/s, MQTT publish -> Kafka consumer receive",
        "p50 <= 10 ms", value="lat_p50", ok=lambda v: v <= 10, unit=" ms", scenario="latency",
        note="includes the MQTT hop and the consumer fetch (ack not observed)"),
    Row("P4", "latency p99, same run", "p99 <= 50 ms", value="lat_p99", ok=lambda v: v <= 50,
        unit=" ms", scenario="latency"),
    Row("P4 rel.", "  gateway forwarded rate during the latency run", "", value="lat_forwarded",
        scenario="latency", note="below 5,000/s: the gateway did not keep up, queueing in MQTT"),
    Row("P4 rel.", "  latency p50 at 1,000 events/s (same path)", "", value="lat_p50_1k",
        unit=" ms", scenario="latency_1k"),
    Row("P4 rel.", "  latency p99 at 1,000 events/s (same path)", "", value="lat_p99_1k",
        unit=" ms", scenario="latency_1k"),
    Row("P5", "backlog drain (forwarded/s) while ingesting, Kafka cut then restored",
        ">= 100,000 events/s", value="drain_rate", raw="kafka_raw", ok=lambda v: v >= 100_000,
        optimistic=True, scenario="durability", note="MQTT input at 2,000 msg/s, not 5,000 (at "
        "5,000 the daemon's MQTT ingest does not keep up on 2 busy cores, see P4 rel.); raw "
        "limit: bare aiokafka send_batch"),
    Row("P6", "RSS, OPC UA source + Mapper process, 10,000 items (peak)", "<= 120 MiB",
        value="opcua_b2_rss_mib", raw="opcua_a_rss_mib", ok=lambda v: v <= 120, unit=" MiB",
        optimistic=True, scenario="opcua", gap_if=_quick_items,
        note="not the daemon (no buffer, no Kafka client); raw limit: bare asyncua"),
    Row("P6", "RSS flat (+-10%) through a 1M-event backlog", "+-10%",
        note="not measured: no scenario builds a 1M-event backlog and samples RSS"),
    Row("P6 rel.", "  daemon peak RSS in the latency run (MQTT, counting mapping)", "",
        value="lat_rss", unit=" MiB", scenario="latency"),
    Row("P7", "startup, 10,000 OPC UA items: all subscribed + first values (source)", "<= 5 s",
        value="opcua_b1_first_s", raw="opcua_a_first_s", ok=lambda v: v <= 5, unit=" s",
        optimistic=True, scenario="opcua", gap_if=_quick_items,
        note="the source in its own process from connect, not the daemon's start"),
    Row("P8", "Modbus: share of polled registers read in coalesced blocks (the plan polled)",
        ">= 95%", value="modbus_coalesced_share", ok=lambda v: v >= 0.95, unit="",
        scenario="modbus", note="10 units x 100 signals, 100 ms"),
    Row("P8 rel.", "  Modbus source registers/s vs bare pymodbus (same blocks, same cadence)", "",
        value="modbus_g_registers_s", raw="modbus_r_registers_s", scenario="modbus"),
    Row("P9", "durability cost: e2e sync=full / sync=off (MQTT -> Kafka, same run)",
        ">= 0.85 (<= 15% cost)", value="dur_full_vs_off", ok=lambda v: v >= 0.85, unit="x",
        optimistic=True, scenario="durability",
        note="sync=off still writes SQLite (no fsync), and MQTT is not P1's path"),
    Row("S", "mixed plant (OPC UA + Modbus + MQTT in one daemon)", "",
        note="not measured: no mixed-plant scenario yet"),
    Row("S", "MQTT JSON flood, QoS 0", "",
        note="not measured: bench_e2e measures QoS 1 only"),
]


# -- running --------------------------------------------------------------------------------------


def git_sha() -> tuple[str, bool]:
    try:
        sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain",
                                     "gateway"], capture_output=True, text=True,
                                    timeout=10).stdout.strip())
        return sha or "nogit", dirty
    except (OSError, subprocess.TimeoutExpired):
        return "nogit", False


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def run_one(s: Scenario, args: argparse.Namespace, run: int, logs: Path) -> dict[str, Any]:
    out = logs / f"{s.name}-run{run}.json"
    log = logs / f"{s.name}-run{run}.log"
    argv = [sys.executable, "-m", s.module, *(s.quick if args.quick else s.full),
            s.json_flag, str(out)]
    timeout = (s.timeout_quick if args.quick else s.timeout_full) * args.timeout_scale
    result: dict[str, Any] = {"argv": argv[1:], "load_start": loadavg(), "log": str(log)}
    print(f"[run {run}] {s.name}: {' '.join(argv[2:])} (timeout {timeout:.0f} s) ...",
          end="", flush=True)
    start = time.monotonic()
    with log.open("wb") as f:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            result["rc"] = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            result["error"] = f"timed out after {timeout:.0f} s"
            # SIGINT first: KeyboardInterrupt unwinds the modules' context managers, which stop
            # the brokers (in sessions of their own, out of reach of killpg); then SIGTERM, KILL
            stopped = False
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, sig)
                try:
                    proc.wait(30)
                    stopped = True
                    break
                except subprocess.TimeoutExpired:
                    pass
            if not stopped:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            result["rc"] = proc.returncode
    result["seconds"] = time.monotonic() - start
    result["load_end"] = loadavg()
    if out.exists():
        try:
            figures = json.loads(out.read_text())
            result["figures"] = figures
            result["metrics"] = s.extract(figures)
        except (ValueError, KeyError, TypeError) as exc:
            result.setdefault("error", f"unreadable result: {exc!r}")
    elif "error" not in result:
        result["error"] = f"exit {result['rc']}, no result (see {log})"
    if result.get("rc") and "error" not in result:
        result["warning"] = f"exit {result['rc']} (figures written; see {log})"
    status = result.get("error") or result.get("warning") or "ok"
    print(f" {result['seconds']:.0f} s, {status}, load {result['load_end']}", flush=True)
    return result


# -- the table ------------------------------------------------------------------------------------


def fmt(v: float, unit: str) -> str:
    if math.isnan(v):
        return "nan"
    if unit == "":
        return f"{v:.1%}"
    if unit == "x":
        return f"{v:.2f}"
    if unit in (" ms", " s", " MiB"):
        return f"{v:,.1f}"
    return f"{v:,.0f}"


def evaluate(rows: list[Row], results: dict[str, list[dict[str, Any]]],
             args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        entry: dict[str, Any] = {"id": row.fid, "what": row.what, "target": row.target,
                                 "note": row.note, "unit": row.unit.strip()}
        if row.value is None:
            entry.update(status="n/a", value=None)
            out.append(entry)
            continue
        runs = results.get(row.scenario)
        if runs is None:
            entry.update(status="n/a", value=None, note=f"not run (--only) {row.note}".strip())
            out.append(entry)
            continue
        values = [r["metrics"][row.value] for r in runs
                  if row.value in r.get("metrics", {})]
        errors = [r.get("error") or "; ".join((r.get("figures") or {}).get("failures") or [])[:300]
                  for r in runs if row.value not in r.get("metrics", {})]
        if not values:
            why = "; ".join(e for e in errors if e) or "the scenario did not produce it"
            entry.update(status="n/a", value=None, note=f"not measured in this run: {why}")
            out.append(entry)
            continue
        med = statistics.median(values)
        entry.update(values=values, min=min(values), median=med, max=max(values),
                     value=f"{fmt(med, row.unit)}{row.unit} [{fmt(min(values), row.unit)}.."
                           f"{fmt(max(values), row.unit)}]")
        if len(values) < len(runs):
            entry["note"] = f"{len(values)} of {len(runs)} runs produced it; {row.note}"
        raws = [r["metrics"][row.raw] for r in runs if row.raw and row.raw in r.get("metrics", {})]
        raw = statistics.median(raws) if raws else None
        if raw is not None:
            entry["raw"] = raw
        if row.ratio_of:
            ratios = [r["metrics"][row.ratio_of] for r in runs if row.ratio_of in r.get("metrics", {})]
            ratio = statistics.median(ratios) if ratios else None
        else:
            ratio = med / raw if raw else None
        entry["ratio"] = ratio
        if row.ok is None:
            entry["status"] = "info"
        else:
            measured = ratio if row.ratio_of else med
            met = measured is not None and row.ok(measured)
            reason = row.gap_if(args) if row.gap_if else ""
            if not met:
                entry["status"] = "FAIL"
            elif row.optimistic or reason:
                entry["status"] = "GAP"
                if reason:
                    entry["note"] = f"{reason}; {entry['note']}"
            else:
                entry["status"] = "PASS"
        out.append(entry)
    return out


def print_table(table: list[dict[str, Any]], rows: list[Row]) -> None:
    headers = ["fig", "description", "value: median [min..max]", "raw limit", "ratio", "target",
               "verdict"]
    lines = []
    for e, row in zip(table, rows, strict=True):
        raw = fmt(e["raw"], row.unit) + row.unit if e.get("raw") is not None else "-"
        ratio = f"{e['ratio']:.2f}x" if e.get("ratio") is not None else "-"
        value = e["value"] if e.get("value") is not None else "-"
        lines.append([e["id"], e["what"], value, raw, ratio, e["target"] or "-", e["status"]])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(headers)]
    widths[1] = min(widths[1], 78)

    def show(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if len(c) <= w else c for c, w in zip(cells, widths, strict=True))

    print(show(headers))
    print("  ".join("-" * w for w in widths))
    for line in lines:
        print(show(line).rstrip())
    print()
    print("notes:")
    for e in table:
        if e["note"]:
            print(f"  {e['id']:<8} {e['what'][:40]}...: {e['note']}"
                  if len(e["what"]) > 40 else f"  {e['id']:<8} {e['what']}: {e['note']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, a few minutes")
    parser.add_argument("--runs", type=int, help="runs of every scenario (3; --quick: 1)")
    parser.add_argument("--only", help="figures (P1..P9) whose scenarios to run, e.g. P3,P8; "
                                       "or scenario names: " + ", ".join(s.name for s in SCENARIOS))
    parser.add_argument("--json", type=Path, help="result file (default: bench/results/"
                                                  "<UTC time>-<git sha>.json)")
    parser.add_argument("--timeout-scale", type=float, default=1.0,
                        help="multiply every scenario's timeout (slow machines)")
    args = parser.parse_args(argv)
    runs = args.runs or (1 if args.quick else 3)
    scenarios = SCENARIOS
    rows = ROWS
    if args.only:
        wanted = {x.strip() for x in args.only.split(",") if x.strip()}
        names = {s.name for s in SCENARIOS}
        unknown = [w for w in wanted if w not in names and not any(r.fid == w for r in ROWS)]
        if unknown:
            parser.error(f"unknown figures or scenarios: {', '.join(sorted(unknown))}")
        chosen = ({r.scenario for r in ROWS if r.fid.split()[0] in wanted and r.scenario}
                  | (wanted & names))
        scenarios = [s for s in SCENARIOS if s.name in chosen]
        rows = [r for r in ROWS if r.fid.split()[0] in wanted or r.scenario in chosen]
    sha, dirty = git_sha()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    json_path = args.json or RESULTS / f"{stamp}-{sha}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    logs = json_path.with_name(json_path.stem + "-logs")
    logs.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "git": sha,
            "gateway_uncommitted_changes": dirty, "mode": "quick" if args.quick else "full",
            "runs": runs, "cpus": os.cpu_count(), "python": platform.python_version(),
            "machine": f"{platform.system()} {platform.release()}", "load_start": loadavg(),
            "scenarios": [s.name for s in scenarios]}
    print(f"DigiSpine benchmark suite ({meta['mode']}, {runs} run(s)), git {sha}"
          f"{' + uncommitted gateway changes' if dirty else ''}, {os.cpu_count()} cores, "
          f"load {meta['load_start']}; logs in {logs}", flush=True)
    results: dict[str, list[dict[str, Any]]] = {s.name: [] for s in scenarios}
    began = time.monotonic()
    try:
        for run in range(1, runs + 1):
            for s in scenarios:
                results[s.name].append(run_one(s, args, run, logs))
    except KeyboardInterrupt:
        print("\ninterrupted: the table covers the runs finished so far", file=sys.stderr)
    meta["load_end"] = loadavg()
    meta["seconds"] = time.monotonic() - began
    table = evaluate(rows, results, args)
    print()
    print(f"targets: 2-core machine, one run, durable buffering on, acks=all; value = median "
          f"over {runs} run(s); load at end {meta['load_end']}; {meta['seconds'] / 60:.1f} min")
    print_table(table, rows)
    json_path.write_text(json.dumps({"meta": meta, "table": table, "scenarios": results},
                                    indent=1, default=str))
    print(f"\nresults: {json_path}")
    failed = [e for e in table if e["status"] == "FAIL"]
    broken = [f"{name} run {i + 1}: {r['error']}" for name, rs in results.items()
              for i, r in enumerate(rs) if r.get("error")]
    for b in broken:
        print(f"scenario error: {b}")
    print(f"{len(failed)} target(s) failed, {len(broken)} scenario error(s)")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
