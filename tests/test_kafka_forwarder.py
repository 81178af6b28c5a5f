"""The Kafka forwarder against a real Kafka-compatible broker over real sockets.

Pure logic (topic names, the binding's encoding, how a round is settled) is tested without a
broker; everything else goes buffer -> forwarder -> broker -> consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka.errors import KafkaTimeoutError, MessageSizeTooLargeError
from aiokafka.producer.message_accumulator import BatchBuilder
from pydantic import ValidationError
from structlog.testing import capture_logs

from gateway.buffer.disk import BufferConfig, BufferedRecord, DiskBuffer
from gateway.metrics import Metrics
from gateway.model import DomainEvent, EventIds, decode_envelope, encode_json
from gateway.sinks import kafka
from gateway.sinks.kafka import KafkaConfig, KafkaForwarder, binary_message, topic_for
from tests import support

try:
    from cloudevents.kafka import KafkaMessage, from_binary, from_structured
except ImportError:  # cloudevents >= 2 moved the v1 API
    from cloudevents.v1.kafka import KafkaMessage, from_binary, from_structured

pytestmark = pytest.mark.timeout(60)

TYPE = "production.CountChanged.v1"
_ids = EventIds()


def event(n: int, subject: str = "acme/plant1/press1", type_: str = TYPE,
          **extra: Any) -> DomainEvent:
    return DomainEvent(id=_ids.next(), source="digispine-gateway/gw1/plc", type=type_,
                       subject=subject, time=1_700_000_000.25 + n, data={"n": n, **extra})


def spread(count: int, subjects: int = 5, **kw: Any) -> list[DomainEvent]:
    return [event(n, subject=f"acme/plant1/press{n % subjects}", **kw) for n in range(count)]


def kafka_config(bootstrap: str, prefix: str, **kw: Any) -> KafkaConfig:
    options: dict[str, Any] = {
        "bootstrap_servers": [bootstrap],
        "topic_template": f"{prefix}.{{type}}",
        "enable_idempotence": support.real_kafka(),  # Tansu refuses InitProducerId
        "request_timeout_ms": 5000,
        "retry_min_s": 0.1,
        "retry_max_s": 0.5,
        **kw,
    }
    return KafkaConfig(**options)


@pytest.fixture
async def buffer(tmp_path: Path) -> AsyncIterator[DiskBuffer]:
    buf = DiskBuffer(BufferConfig(directory=tmp_path, sync="normal"), Metrics())
    await buf.open()
    yield buf
    await buf.close()


@contextlib.asynccontextmanager
async def running(forwarder: KafkaForwarder) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(forwarder.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(check: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(0.02)


def per_key(records: list[Any]) -> dict[bytes, list[int]]:
    out: dict[bytes, list[int]] = defaultdict(list)
    for r in records:
        out[r.key].append(json.loads(r.value)["n"])
    return out


def last_occurrences(ns: list[int]) -> list[int]:
    """The order a consumer that keeps the latest value per id ends up with."""
    seen: dict[int, int] = {}
    for i, n in enumerate(ns):
        seen[n] = i
    return sorted(seen, key=seen.__getitem__)


@contextlib.contextmanager
def proxied_broker() -> Iterator[tuple[str, support.TcpProxy]]:
    """A broker whose advertised address is a proxy, so ``cut()`` really cuts Kafka off."""
    if support.real_kafka():
        pytest.skip("cutting the link needs a broker whose advertised address is the proxy (Tansu)")
    with support.tansu_behind_proxy() as (bootstrap, proxy):
        yield bootstrap, proxy


# -- pure logic --------------------------------------------------------------------------


def test_topic_template_placeholders() -> None:
    t = "{domain}|{name}|{version}|{gateway_id}|{type}"
    assert topic_for(t, "production.MachineStateChanged.v1", "gw1") == (
        "production|MachineStateChanged|v1|gw1|production.MachineStateChanged.v1")
    assert topic_for(t, "acme.plant.quality.PartInspected.v2", "g") == (
        "acme.plant.quality|PartInspected|v2|g|acme.plant.quality.PartInspected.v2")


def test_config_refuses_unknown_placeholders_and_small_requests() -> None:
    with pytest.raises(ValidationError, match="unknown placeholder"):
        KafkaConfig(topic_template="x.{typ}")
    with pytest.raises(ValidationError, match="max_record_bytes"):
        KafkaConfig(max_batch_bytes=500_000, max_record_bytes=100_000)


def test_binary_message_matches_the_generic_encoding() -> None:
    plain = event(1, state="RUNNING", nested={"a": [1, 2.5, None, "é"]})
    with_schema = event(2)
    with_schema.dataschema = "https://schemas.acme/count/v1.json"
    for e in (plain, with_schema):
        value, headers = binary_message(e.encode())
        env = decode_envelope(e.encode())
        assert value == encode_json(env["data"])
        assert (value, headers) == kafka._binary_message_generic(e.encode())
    _, headers = binary_message(with_schema.encode())
    assert [h for h, _ in headers] == ["ce_specversion", "ce_id", "ce_source", "ce_type",
                                      "ce_subject", "ce_time", "ce_dataschema", "content-type"]


def test_binary_message_keeps_extension_attributes() -> None:
    envelope = {**event(3).envelope(), "sequence": 7, "traceparent": "00-abc-01"}
    value, headers = binary_message(encode_json(envelope))
    assert ("ce_sequence", b"7") in headers and ("ce_traceparent", b"00-abc-01") in headers
    assert json.loads(value) == {"n": 3}


def forwarder_for_logic(tmp_path: Path, metrics: Metrics | None = None) -> KafkaForwarder:
    buf = DiskBuffer(BufferConfig(directory=tmp_path), Metrics())  # never opened: not used
    return KafkaForwarder(KafkaConfig(), buf, "gw1", metrics or Metrics())


def fake_batch(partition: int, *seqs: int) -> kafka._Batch:
    return kafka._Batch("t", partition, BatchBuilder(16384, 0), list(seqs))


def test_settle_keeps_a_failed_partitions_tail_and_deletes_the_rest(tmp_path: Path) -> None:
    fwd = forwarder_for_logic(tmp_path)
    batches = [fake_batch(0, 1, 2), fake_batch(1, 3), fake_batch(0, 4, 5), fake_batch(1, 6)]
    ok = object()
    out = fwd._settle(batches, [ok, KafkaTimeoutError(), ok, ok], last_seq=6)
    assert sorted(out.done) == [1, 2, 4, 5]  # 6 was acked but sits behind 3: resent with it
    assert out.acked == 5 and out.failed_batches == 1
    assert isinstance(out.error, KafkaTimeoutError)
    assert out.resume_after == 2


def test_settle_isolates_permanent_rejections(tmp_path: Path) -> None:
    fwd = forwarder_for_logic(tmp_path)
    ok = object()
    out = fwd._settle([fake_batch(0, 1, 2), fake_batch(1, 3), fake_batch(0, 4)],
                      [MessageSizeTooLargeError(), ok, ok], last_seq=4)
    assert out.error is None  # nothing to back off for: find the culprit one by one
    assert out.done == [3] and out.probe_until == 2 and out.resume_after == 0

    out = fwd._settle([fake_batch(0, 1), fake_batch(0, 2)], [MessageSizeTooLargeError(), ok], 2)
    assert out.done == [2]  # 1 is deleted once its dead-letter record is acknowledged
    assert [s for s, _ in out.rejected] == [1] and out.error is None


def test_build_sends_suspects_one_record_per_batch(tmp_path: Path) -> None:
    fwd = forwarder_for_logic(tmp_path)
    fwd._probe_until = 3
    records = [BufferedRecord(i, TYPE, "acme/a", event(i).encode()) for i in range(1, 8)]

    class Producer:
        def create_batch(self) -> BatchBuilder:
            return BatchBuilder(16384, 0)

    batches, rejected = fwd._build(Producer(), records,  # type: ignore[arg-type]
                                   {f"digispine.{TYPE}": [0, 1, 2]})
    assert [b.seqs for b in batches] == [[1], [2], [3], [4, 5, 6, 7]]
    assert rejected == []


def test_aiokafka_reconnect_noise_is_filtered_and_real_errors_pass(tmp_path: Path) -> None:
    forwarder_for_logic(tmp_path)  # installs the filter
    logger = logging.getLogger("aiokafka")
    root_level = logging.getLogger().level
    logging.getLogger().setLevel(logging.INFO)
    try:
        def passes(msg: str) -> bool:
            record = logger.makeRecord("aiokafka", logging.ERROR, __file__, 1, msg, ("x", 1), None)
            return all(f.filter(record) for f in logger.filters)

        assert not passes("Unable connect to node with id %s: %s")
        assert not passes("Unable to update metadata from %s")
        assert passes("Unexpected error in sender routine")
        logging.getLogger().setLevel(logging.DEBUG)
        assert passes("Unable to update metadata from %s")  # debugging shows everything
    finally:
        logging.getLogger().setLevel(root_level)


def test_backoff_doubles_within_bounds_with_jitter() -> None:
    b = kafka._Backoff(0.5, 4.0)
    delays = [b.next() for _ in range(8)]
    assert all(0.5 <= d <= 4.0 for d in delays)
    assert delays[0] <= 0.6 and delays[-1] >= 3.2
    b.reset()
    assert b.next() <= 0.6


# -- against the broker ------------------------------------------------------------------


@pytest.mark.integration
async def test_binary_mode_delivers_in_order_per_key_and_empties_the_buffer(
        kafka_bootstrap: str, topic_prefix: str, buffer: DiskBuffer) -> None:
    metrics = Metrics()
    sent = spread(500)
    await buffer.append(sent[:200])
    forwarder = KafkaForwarder(kafka_config(kafka_bootstrap, topic_prefix), buffer, "gw1", metrics)
    async with running(forwarder):
        await buffer.append(sent[200:])  # some before the start, some while running
        await until(lambda: buffer.pending_events == 0)
        assert forwarder.connected and forwarder.last_ack_time is not None
    records = await support.consume(kafka_bootstrap, [f"{topic_prefix}.{TYPE}"], expect=500,
                                    quiet_s=1.0)

    assert len(records) == 500
    for key, ns in per_key(records).items():
        assert ns == sorted(ns) and ns == [n for n in range(500) if n % 5 == int(key[-1:])]
    by_id = {e.id: e for e in sent}
    for r in records:
        headers = dict(r.headers)
        e = by_id[headers["ce_id"].decode()]
        assert r.key == e.subject.encode()
        assert json.loads(r.value) == e.data
        assert headers == {
            "ce_specversion": b"1.0", "ce_id": e.id.encode(), "ce_source": e.source.encode(),
            "ce_type": TYPE.encode(), "ce_subject": e.subject.encode(),
            "ce_time": e.envelope()["time"].encode(), "content-type": b"application/json"}
    assert metrics.value("events_forwarded_total") == 500
    assert metrics.value("kafka_records_acked_total", topic=f"{topic_prefix}.{TYPE}") == 500
    assert buffer.pending_events == 0 and await buffer.read(0, 10) == []


@pytest.mark.integration
async def test_structured_mode_sends_the_buffered_envelope(
        kafka_bootstrap: str, topic_prefix: str, buffer: DiskBuffer) -> None:
    sent = spread(20)
    await buffer.append(sent)
    config = kafka_config(kafka_bootstrap, topic_prefix, content_mode="structured")
    async with running(KafkaForwarder(config, buffer, "gw1", Metrics())):
        await until(lambda: buffer.pending_events == 0)
    records = await support.consume(kafka_bootstrap, [f"{topic_prefix}.{TYPE}"], expect=20,
                                    quiet_s=1.0)
    assert sorted(r.value for r in records) == sorted(e.encode() for e in sent)
    assert all(dict(r.headers) == {"content-type": b"application/cloudevents+json"}
               for r in records)


@pytest.mark.integration
async def test_topic_template_routes_each_type(
        kafka_bootstrap: str, topic_prefix: str, buffer: DiskBuffer) -> None:
    await buffer.append([event(1, type_="production.MachineStateChanged.v1"),
                         event(2, type_="acme.quality.PartInspected.v2")])
    config = kafka_config(kafka_bootstrap, topic_prefix,
                          topic_template=f"{topic_prefix}.{{domain}}.{{name}}.{{version}}."
                                         "{gateway_id}")
    async with running(KafkaForwarder(config, buffer, "edge-7", Metrics())):
        await until(lambda: buffer.pending_events == 0)
    records = await support.consume(kafka_bootstrap, [
        f"{topic_prefix}.production.MachineStateChanged.v1.edge-7",
        f"{topic_prefix}.acme.quality.PartInspected.v2.edge-7"], expect=2, quiet_s=1.0)
    assert {(r.topic.removeprefix(topic_prefix), json.loads(r.value)["n"]) for r in records} == {
        (".production.MachineStateChanged.v1.edge-7", 1), (".acme.quality.PartInspected.v2.edge-7", 2)}


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["binary", "structured"])
async def test_the_cloudevents_sdk_reads_our_records(
        kafka_bootstrap: str, topic_prefix: str, buffer: DiskBuffer, mode: str) -> None:
    sent = spread(10, state="RUNNING")
    sent[3].dataschema = "https://schemas.acme/count/v1.json"
    await buffer.append(sent)
    config = kafka_config(kafka_bootstrap, topic_prefix, content_mode=mode)
    async with running(KafkaForwarder(config, buffer, "gw1", Metrics())):
        await until(lambda: buffer.pending_events == 0)
    records = await support.consume(kafka_bootstrap, [f"{topic_prefix}.{TYPE}"], expect=10,
                                    quiet_s=1.0)
    convert = from_binary if mode == "binary" else from_structured
    got = {}
    for r in records:
        ce = convert(KafkaMessage(headers=dict(r.headers), key=r.key, value=r.value))
        got[ce["id"]] = ce
    assert len(got) == 10
    for e in sent:
        ce = got[e.id]
        assert (ce["type"], ce["source"], ce["subject"]) == (e.type, e.source, e.subject)
        assert ce["specversion"] == "1.0" and ce["time"] == e.envelope()["time"]
        assert ce.get_data() == e.data
        assert ce.get("dataschema") == e.dataschema
        assert ce["partitionkey"] == e.subject.encode()
        if mode == "binary":
            assert ce["datacontenttype"] == "application/json"


@pytest.mark.integration
async def test_records_kafka_can_never_take_are_dead_lettered_and_the_rest_flows(
        kafka_bootstrap: str, topic_prefix: str, buffer: DiskBuffer) -> None:
    metrics = Metrics()
    await buffer.append([event(1), event(2, pad="x" * 10_000), event(3, type_="bad type.X.v1"),
                         event(4)])
    config = kafka_config(kafka_bootstrap, topic_prefix, max_batch_bytes=1024,
                          max_record_bytes=4096)
    with capture_logs() as logs:
        async with running(KafkaForwarder(config, buffer, "gw1", metrics)):
            await until(lambda: buffer.pending_events == 0)
    records = await support.consume(kafka_bootstrap, [f"{topic_prefix}.{TYPE}"], expect=2,
                                    quiet_s=1.0)
    assert [json.loads(r.value)["n"] for r in records] == [1, 4]
    letters = await support.consume(kafka_bootstrap, [f"{topic_prefix}.gateway.DeadLetter.v1"],
                                    expect=2, quiet_s=1.0)
    assert sorted(json.loads(r.value)["reason"] for r in letters) == ["invalid_topic", "too_large"]
    assert metrics.value("events_dead_lettered_total", reason="too_large") == 1
    assert metrics.value("events_dead_lettered_total", reason="invalid_topic") == 1
    assert metrics.total("events_dropped_total") == 0
    assert metrics.value("events_forwarded_total") == 2
    dead = [e for e in logs if e["event"] == "kafka.dead_lettered"]
    assert len(dead) == 2 and all(e["id"] and e["type"] for e in dead)


@pytest.mark.integration
async def test_an_outage_keeps_events_buffered_and_delivers_them_after(buffer: DiskBuffer) -> None:
    prefix = support.unique_topic_prefix()
    with proxied_broker() as (bootstrap, proxy), capture_logs() as logs:
        metrics = Metrics()
        config = kafka_config(bootstrap, prefix, request_timeout_ms=2000)
        forwarder = KafkaForwarder(config, buffer, "gw1", metrics)
        async with running(forwarder) as task:
            await buffer.append(spread(100))
            await until(lambda: buffer.pending_events == 0)

            proxy.cut()
            await buffer.append(spread(300)[100:])
            await until(lambda: not forwarder.connected, timeout_s=15)
            await asyncio.sleep(2.0)  # several retries while Kafka is away
            assert buffer.pending_events == 200
            assert not task.done()  # an outage is waited out, never raised

            proxy.restore()
            await until(lambda: buffer.pending_events == 0, timeout_s=30)
            assert forwarder.connected and not task.done()
        records = await support.consume(bootstrap, [f"{prefix}.{TYPE}"], expect=300, quiet_s=1.5)

    assert {json.loads(r.value)["n"] for r in records} == set(range(300))  # nothing lost
    for ns in per_key(records).values():
        assert last_occurrences(ns) == sorted(set(ns))  # duplicates allowed, reordering not
    events = [e["event"] for e in logs if e.get("component") == "kafka"]
    assert events.count("kafka.unreachable") == 1  # once per outage, not per retry
    assert events.count("kafka.connected") == 2  # first connect, and once when back
    assert metrics.total("kafka_send_errors_total") >= 2
    assert metrics.value("events_forwarded_total") >= 300


@pytest.mark.integration
async def test_run_waits_for_a_kafka_that_is_not_there_yet(buffer: DiskBuffer) -> None:
    prefix = support.unique_topic_prefix()
    with proxied_broker() as (bootstrap, proxy):
        proxy.cut()
        await buffer.append(spread(50))
        forwarder = KafkaForwarder(kafka_config(bootstrap, prefix), buffer, "gw1", Metrics())
        async with running(forwarder) as task:
            await asyncio.sleep(1.0)
            assert not task.done() and not forwarder.connected
            assert buffer.pending_events == 50
            proxy.restore()
            await until(lambda: buffer.pending_events == 0)


@pytest.mark.integration
async def test_an_idle_forwarder_notices_a_lost_kafka(
        buffer: DiskBuffer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kafka, "IDLE_CHECK_S", 0.3)
    prefix = support.unique_topic_prefix()
    with proxied_broker() as (bootstrap, proxy), capture_logs() as logs:
        config = kafka_config(bootstrap, prefix, request_timeout_ms=2000)
        forwarder = KafkaForwarder(config, buffer, "gw1", Metrics())
        async with running(forwarder) as task:
            await until(lambda: forwarder.connected, timeout_s=15)
            proxy.cut()
            await until(lambda: not forwarder.connected, timeout_s=15)  # nothing was sent
            proxy.restore()
            await until(lambda: forwarder.connected, timeout_s=15)
            assert not task.done()
    events = [e["event"] for e in logs if e.get("component") == "kafka"]
    assert events.count("kafka.unreachable") == 1 and events.count("kafka.connected") == 2


@pytest.mark.integration
async def test_drain_forwards_what_is_buffered(
        kafka_bootstrap: str, topic_prefix: str, buffer: DiskBuffer) -> None:
    await buffer.append(spread(300))
    forwarder = KafkaForwarder(kafka_config(kafka_bootstrap, topic_prefix), buffer, "gw1",
                               Metrics())
    assert await forwarder.drain(20) == 300
    assert buffer.pending_events == 0
    assert await forwarder.drain(5) == 0  # nothing left: returns at once


async def timed(coro: Awaitable[Any]) -> tuple[Any, float]:
    start = time.monotonic()
    result = await coro
    return result, time.monotonic() - start


@pytest.mark.integration
async def test_stopping_while_kafka_is_cut_respects_the_deadlines(buffer: DiskBuffer) -> None:
    prefix = support.unique_topic_prefix()
    with proxied_broker() as (bootstrap, proxy):
        config = kafka_config(bootstrap, prefix, request_timeout_ms=10_000)
        forwarder = KafkaForwarder(config, buffer, "gw1", Metrics())
        task = asyncio.create_task(forwarder.run())
        await buffer.append(spread(10))
        await until(lambda: buffer.pending_events == 0)

        proxy.cut()
        await buffer.append(spread(60)[10:])
        await asyncio.sleep(0.3)  # the batch is in flight, its request times out in 10 s
        task.cancel()
        _, took = await timed(asyncio.gather(task, return_exceptions=True))
        assert took < 3.0  # cancelling does not wait for the producer's request timeout

        delivered, took = await timed(forwarder.drain(1.5))
        assert delivered == 0 and 1.4 <= took < 3.5
        assert buffer.pending_events == 50  # still buffered for the next start

        proxy.restore()
        assert await forwarder.drain(20) == 50
        assert buffer.pending_events == 0
