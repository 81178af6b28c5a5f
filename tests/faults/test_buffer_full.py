"""A buffer too small for an outage: every accepted event is either delivered or counted as
dropped (``events_dropped_total{reason}`` on ``/metrics``), and the ``when_full`` policy keeps
the side it promises: ``drop_oldest`` the newest events, ``drop_newest`` the oldest."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.faults.harness import (
    Figures,
    Generator,
    Ledger,
    by_label,
    counter,
    read_back,
    rig,
    scrape_metrics,
    settled,
    wait_health,
)

pytestmark = [pytest.mark.faults, pytest.mark.integration]

OFFERED = 1000
MAX_BYTES = 65_536  # the smallest buffer the config allows; ~150 events of this test



@pytest.mark.parametrize("when_full", ["drop_oldest", "drop_newest"])
async def test_buffer_full_accounting(tmp_path: Path, figures: Figures,
                                      when_full: str) -> None:
    started = time.monotonic()
    with rig(tmp_path, ["m1"], needs_kafka_proxy=True,
             buffer={"max_bytes": MAX_BYTES, "when_full": when_full}) as r:
        assert r.kafka_proxy is not None
        # Kafka unreachable from the start: the forwarder never holds records it read before
        # they were evicted, so "delivered" and "dropped" cannot overlap.
        r.kafka_proxy.cut()
        gw = r.start()
        await r.ready()
        gen = Generator(r.publish_port, r.prefix, ["m1"], rate=1e9)
        try:
            gen.publish_now("m1", OFFERED)
            assert gen.wait_acknowledged(60) == OFFERED
            h = await wait_health(gw, lambda h: counter(h, "events_mapped_total") == OFFERED
                                  and h["counters"].get("pipeline_queued_deliveries", 0) == 0,
                                  60, f"{OFFERED} events mapped")
            h = await settled(gw, ["buffer_appended_total", "events_dropped_total"])
            metrics = scrape_metrics(gw)
            pending = h["buffer"]["pending_events"]
            pending_bytes = h["buffer"]["pending_bytes"]
            r.kafka_proxy.restore()
            ledger = Ledger(r.subjects(), gen.produced(), set())
            await read_back(r.bootstrap, r.topic, ledger, quiet_s=3, timeout_s=60,
                            done=lambda led: led.distinct >= pending)
            after = await wait_health(gw, lambda h: h["buffer"]["pending_events"] == 0, 30,
                                      "buffer drained")
            assert gw.terminate() == 0, gw.tail()
        finally:
            gen.close()
    dropped = by_label(metrics, "events_dropped_total", "reason")
    dropped_total = sum(dropped.values())
    accepted = counter(h, "events_mapped_total")
    delivered = sorted(n for _, n in ledger.first)
    figures(when_full=when_full, max_bytes=MAX_BYTES, accepted=int(accepted),
            buffered_at_restore=pending, buffered_bytes=pending_bytes,
            delivered=len(delivered), dropped=dropped, records=ledger.records,
            duplicates=ledger.duplicates,
            forwarded_counter=int(counter(after, "events_forwarded_total")),
            total_s=round(time.monotonic() - started, 1))
    ledger.assert_clean("buffer full")
    reason = "buffer_full_oldest" if when_full == "drop_oldest" else "buffer_full_newest"
    assert set(dropped) == {reason}, dropped
    assert dropped_total > 0, "the buffer never filled: the test proves nothing"
    assert accepted == OFFERED
    assert len(delivered) + dropped_total == accepted, \
        f"accepted {accepted} != delivered {len(delivered)} + dropped {dropped_total}"
    kept = int(accepted - dropped_total)
    if when_full == "drop_oldest":
        assert delivered == list(range(OFFERED - kept + 1, OFFERED + 1)), \
            f"drop_oldest kept {delivered[:3]}..{delivered[-3:]}, not the newest {kept}"
    else:
        assert delivered == list(range(1, kept + 1)), \
            f"drop_newest kept {delivered[:3]}..{delivered[-3:]}, not the oldest {kept}"
    assert any(rec.get("event") == "buffer.full" for rec in r.log_records()), \
        "no buffer.full warning logged"
