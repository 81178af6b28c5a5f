"""The Kafka link failing while events keep coming: a long cut (the backlog must drain while new
events keep arriving) and a stall (the link accepts but moves no byte for longer than the
request timeout, then resumes). Nothing may be lost and, per asset, the first deliveries must
keep their order."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.faults.harness import (
    Figures,
    Generator,
    Ledger,
    Rig,
    by_label,
    counter,
    env_float,
    read_back,
    rig,
    scrape_metrics,
    seed_from_env,
    wait_health,
)

pytestmark = [pytest.mark.faults, pytest.mark.integration]

MACHINES = ["m1", "m2", "m3", "m4"]


def _up(h: dict[str, Any]) -> bool:
    return bool(h["kafka"]["connected"])


@dataclass(frozen=True)
class Sample:
    t: float
    appended: float
    forwarded: float
    pending: int


class Sampler:
    """Polls ``/healthz`` on a thread: (time, appended, forwarded, pending) every ``period_s``."""

    def __init__(self, r: Rig, period_s: float = 0.1) -> None:
        self.r, self.period_s = r, period_s
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            assert self.r.gw is not None
            h = self.r.gw.health()
            if h is not None:
                self.samples.append(Sample(time.monotonic(), counter(h, "buffer_appended_total"),
                                           counter(h, "events_forwarded_total"),
                                           int(h["buffer"]["pending_events"])))
            self._stop.wait(self.period_s)

    def at(self, t: float) -> Sample:
        """The last sample taken at or before ``t``."""
        return [s for s in self.samples if s.t <= t][-1]

    def first(self, after: float, predicate: Any) -> Sample | None:
        return next((s for s in self.samples if s.t >= after and predicate(s)), None)


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_long_outage_drains(tmp_path: Path, figures: Figures) -> None:
    """Kafka cut for ``FAULTS_OUTAGE_S`` (25 s) under a steady ``FAULTS_OUTAGE_RATE`` (1000
    events/s): nothing is dropped (the buffer has room), the backlog drains while new events
    keep arriving, and the drain rate is reported against the ingest rate."""
    offered = env_float("FAULTS_OUTAGE_RATE", 1000)
    outage_s = env_float("FAULTS_OUTAGE_S", 25)
    warm_s, after_s = 10.0, 10.0
    seed = seed_from_env()
    started = time.monotonic()
    with rig(tmp_path, MACHINES, needs_kafka_proxy=True,
             buffer={"max_bytes": 256 * 1024 * 1024}) as r:
        assert r.kafka_proxy is not None
        gw = r.start()
        await r.ready()
        await wait_health(gw, _up, 60, "Kafka connected")
        gen = Generator(r.publish_port, r.prefix, MACHINES, rate=offered, seed=seed)
        try:
            with Sampler(r) as sampler:
                gen.start()
                await asyncio.sleep(warm_s)
                t_cut = time.monotonic()
                r.kafka_proxy.cut()
                await asyncio.sleep(outage_s)
                t_restore = time.monotonic()
                r.kafka_proxy.restore()
                steady_pending = max(s.pending for s in sampler.samples
                                     if t_cut - warm_s / 2 <= s.t <= t_cut)
                threshold = max(50, 2 * steady_pending)
                deadline = time.monotonic() + 300
                while (time.monotonic() < deadline and
                       sampler.first(t_restore + 0.5, lambda s: s.pending <= threshold) is None):
                    await asyncio.sleep(0.2)
                drained = sampler.first(t_restore + 0.5, lambda s: s.pending <= threshold)
                assert drained is not None, \
                    f"backlog not drained within 300 s: {sampler.samples[-1]}\n{gw.tail()}"
                await asyncio.sleep(after_s)
                gen.stop()
                t_stop = time.monotonic()
            acked = gen.wait_acknowledged(60)
            ledger = Ledger(r.subjects(), gen.produced(), gen.acknowledged())
            await read_back(r.bootstrap, r.topic, ledger, quiet_s=3, timeout_s=120)
            await wait_health(gw, lambda h: h["buffer"]["pending_events"] == 0, 60, "empty")
            metrics = scrape_metrics(gw)
            assert gw.terminate() == 0, gw.tail()
        finally:
            gen.close()
    s = sampler
    warm_from = s.at(t_cut - warm_s / 2)
    cut = s.at(t_cut)
    restore = s.at(t_restore)
    ingest = (cut.appended - warm_from.appended) / (cut.t - warm_from.t)
    ingest_outage = (restore.appended - cut.appended) / (restore.t - cut.t)
    first_ack = s.first(t_restore, lambda x: x.forwarded > restore.forwarded)
    assert first_ack is not None
    drain_s = drained.t - t_restore
    forward_rate = (drained.forwarded - restore.forwarded) / (drained.t - first_ack.t) \
        if drained.t > first_ack.t else float("inf")
    backlog = restore.pending
    after = s.at(t_stop)
    ingest_after = (after.appended - drained.appended) / (after.t - drained.t)
    dropped = by_label(metrics, "events_dropped_total", "reason")
    figures(seed=seed, offered_rate=offered, outage_s=outage_s, events=len(gen.sent),
            acked=acked, ingest_rate=round(ingest), ingest_rate_during_outage=round(ingest_outage),
            backlog_at_restore=backlog, reconnect_s=round(first_ack.t - t_restore, 2),
            drain_s=round(drain_s, 2), drain_forward_rate=round(forward_rate),
            net_drain_rate=round(backlog / drain_s), drain_to_ingest_ratio=round(
                forward_rate / ingest, 1), ingest_rate_after=round(ingest_after),
            records=ledger.records, distinct=ledger.distinct, lost=len(ledger.missing),
            duplicates=ledger.duplicates, dropped=dropped, total_s=round(time.monotonic() - started))
    ledger.assert_clean("long outage")
    assert not dropped, f"events dropped within the buffer limit: {dropped}"
    assert backlog >= 0.8 * ingest * outage_s, \
        f"backlog {backlog} is not the outage's input (~{ingest * outage_s:.0f}): was the link cut?"
    assert forward_rate > ingest, "the backlog does not drain faster than events arrive"
    unreachable = r.events_logged("kafka.unreachable")
    connected = [e for e in r.events_logged("kafka.connected") if "outage_s" in e]
    assert unreachable and connected, "outage not logged once down and once back"


@pytest.mark.parametrize("request_timeout_ms", [1500])
async def test_stall_longer_than_request_timeout(tmp_path: Path, figures: Figures,
                                                 request_timeout_ms: int) -> None:
    """The Kafka link accepts but moves nothing for 3.5x the request timeout, then resumes
    (bytes held meanwhile are delivered late, as TCP would): no loss, no reorder."""
    stall_s = 3.5 * request_timeout_ms / 1000
    seed = seed_from_env()
    started = time.monotonic()
    with rig(tmp_path, MACHINES, needs_kafka_proxy=True,
             kafka={"request_timeout_ms": request_timeout_ms}) as r:
        assert r.kafka_proxy is not None
        gw = r.start()
        await r.ready()
        await wait_health(gw, _up, 60, "Kafka connected")
        gen = Generator(r.publish_port, r.prefix, MACHINES, rate=400, seed=seed)
        try:
            with Sampler(r) as sampler:
                gen.start()
                await asyncio.sleep(2)
                t_stall = time.monotonic()
                r.kafka_proxy.stall()
                await asyncio.sleep(stall_s)
                t_release = time.monotonic()
                r.kafka_proxy.release()
                await asyncio.sleep(2)
                gen.stop()
            acked = gen.wait_acknowledged(60)
            during = await wait_health(gw, lambda h: True, 5, "health")
            ledger = Ledger(r.subjects(), gen.produced(), gen.acknowledged())
            await read_back(r.bootstrap, r.topic, ledger, quiet_s=2, timeout_s=90)
            await wait_health(gw, lambda h: h["buffer"]["pending_events"] == 0, 60, "empty")
            metrics = scrape_metrics(gw)
            assert gw.terminate() == 0, gw.tail()
        finally:
            gen.close()
    stalled = sampler.at(t_stall + 1.0)
    released = sampler.at(t_release)
    recovered = sampler.first(t_release, lambda s: s.forwarded > released.forwarded)
    errors = by_label(metrics, "kafka_send_errors_total", "stage")
    figures(seed=seed, request_timeout_ms=request_timeout_ms, stall_s=stall_s,
            events=len(gen.sent), acked=acked,
            forwarded_during_stall=int(released.forwarded - stalled.forwarded),
            pending_at_release=released.pending,
            resumed_after_s=round(recovered.t - t_release, 2) if recovered else None,
            send_errors=errors, records=ledger.records, distinct=ledger.distinct,
            lost=len(ledger.missing), duplicates=ledger.duplicates,
            duplicate_ratio=round(ledger.duplicate_ratio, 4),
            order_violations=len(ledger.order_violations),
            forwarded_total=int(counter(during, "events_forwarded_total")),
            total_s=round(time.monotonic() - started, 1))
    ledger.assert_clean("stall")
    assert released.pending > 0, "nothing was held back: did the stall stall anything?"
    assert r.events_logged("kafka.unreachable"), "the stall was never noticed (no timeout)"
