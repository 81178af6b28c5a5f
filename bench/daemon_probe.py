"""Where a daemon's time goes, for ``bench.bench_durability --probe``: wraps the pipeline's batch
step and the buffer's append / delete (private gateway internals; if they change, the probe
reports nothing and the benchmark goes on) and writes, at exit, one JSON file:

- ``batches``: (signals, seconds) per pipeline batch (map + append + acknowledge);
- ``append_await``: (events, seconds) per ``DiskBuffer.append`` as the pipeline awaits it (encode,
  the queue of the buffer's one SQLite thread, the transaction, the GIL hand-offs);
- ``store_append`` / ``store_delete``: (rows, seconds) of the transactions on that thread
  (insert or delete + commit, fsync included per ``sync``).

Wrapping costs two ``perf_counter`` calls per batch and transaction.
"""

from __future__ import annotations

import atexit
import json
import time
from collections.abc import Sequence
from typing import Any


def install(out: str) -> None:
    try:
        from gateway.app import pipeline
        from gateway.buffer import disk
    except ImportError:
        return
    rec: dict[str, list[tuple[int, float]]] = {
        "batches": [], "append_await": [], "store_append": [], "store_delete": []}
    clock = time.perf_counter

    process = getattr(pipeline.Pipeline, "_process", None)
    append = getattr(disk.DiskBuffer, "append", None)
    store_append = getattr(disk._Store, "append", None)
    store_delete = getattr(disk._Store, "delete", None)
    if None in (process, append, store_append, store_delete):
        return

    async def _process(self: Any, batch: Sequence[Any]) -> None:
        start = clock()
        await process(self, batch)  # type: ignore[misc]
        rec["batches"].append((sum(len(d.signals) for d in batch), clock() - start))

    async def _append(self: Any, events: Sequence[Any], state: Sequence[Any] = ()) -> None:
        start = clock()
        await append(self, events, state)  # type: ignore[misc]
        rec["append_await"].append((len(events), clock() - start))

    def _store_append(self: Any, rows: Sequence[Any], *args: Any, **kwargs: Any) -> Any:
        start = clock()
        result = store_append(self, rows, *args, **kwargs)  # type: ignore[misc]
        rec["store_append"].append((len(rows), clock() - start))
        return result

    def _store_delete(self: Any, seqs: Sequence[int]) -> Any:
        start = clock()
        result = store_delete(self, seqs)  # type: ignore[misc]
        rec["store_delete"].append((len(seqs), clock() - start))
        return result

    pipeline.Pipeline._process = _process  # type: ignore[method-assign]
    disk.DiskBuffer.append = _append  # type: ignore[method-assign]
    disk._Store.append = _store_append  # type: ignore[method-assign]
    disk._Store.delete = _store_delete  # type: ignore[method-assign]

    def dump() -> None:
        with open(out, "w") as f:
            json.dump(rec, f)

    atexit.register(dump)


def summarize(rec: dict[str, list[list[float]]], run_s: float) -> dict[str, float]:
    """Batch sizes and the share of the run each part took (from the first batch to the last)."""
    import statistics

    def med_ms(rows: list[list[float]]) -> float:
        return statistics.median(r[1] for r in rows) * 1000 if rows else 0.0

    def p90_ms(rows: list[list[float]]) -> float:
        return sorted(r[1] for r in rows)[int(len(rows) * 0.9)] * 1000 if rows else 0.0

    batches = [b for b in rec.get("batches", []) if b[0] > 0]
    sizes = [b[0] for b in batches]
    out = {
        "batches": float(len(batches)),
        "batch_mean": statistics.mean(sizes) if sizes else 0.0,
        "batch_median": statistics.median(sizes) if sizes else 0.0,
        "batch_max": max(sizes, default=0.0),
    }
    for key in ("batches", "append_await", "store_append", "store_delete"):
        rows = rec.get(key, [])
        out[f"{key}_s"] = sum(r[1] for r in rows)
        out[f"{key}_share"] = out[f"{key}_s"] / run_s if run_s else 0.0
        out[f"{key}_median_ms"] = med_ms(rows)
        out[f"{key}_p90_ms"] = p90_ms(rows)
        out[f"{key}_count"] = float(len(rows))
    return out
