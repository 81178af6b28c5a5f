"""Issue 4, item 5: what Kafka can never take goes to the dead-letter path; bounded rounds.

Against the real broker where it can answer (Tansu, or a real Kafka named by
$DIGISPINE_TEST_KAFKA_BOOTSTRAP). Tansu enforces no ``max.message.bytes`` (neither per topic nor
per broker: it takes a 120 MB record), so broker-side refusals are emulated by a producer that
answers a batch the way Kafka would (``broker_answers``) while everything else goes to Tansu;
with a real Kafka one test has the broker itself refuse a record over a topic's limit.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    MessageSizeTooLargeError,
    NotEnoughReplicasError,
    RecordListTooLargeError,
    RecordTooLargeError,
)
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from pydantic import ValidationError
from structlog.testing import capture_logs

from gateway.buffer.disk import BufferConfig, BufferedRecord, DiskBuffer
from gateway.metrics import Metrics
from gateway.sinks import kafka
from gateway.sinks.kafka import (
    DEAD_LETTER_TYPE,
    DeadLetterFile,
    KafkaConfig,
    KafkaForwarder,
    binary_message,
)
from tests import support
from tests.test_kafka_forwarder import (
    TYPE,
    event,
    kafka_config,
    last_occurrences,
    per_key,
    running,
    spread,
    until,
)

pytestmark = pytest.mark.timeout(60)

SUBJECT = "acme/plant1/press1"


@pytest.fixture
async def buffer(tmp_path: Path) -> AsyncIterator[DiskBuffer]:
    buf = DiskBuffer(BufferConfig(directory=tmp_path, sync="normal"), Metrics())
    await buf.open()
    yield buf
    await buf.close()


def dead_letter_topic(prefix: str) -> str:
    return f"{prefix}.{DEAD_LETTER_TYPE}"


def values(records: list[Any]) -> list[int]:
    return [json.loads(r.value)["n"] for r in records]


HANG = object()
"""An answer that never comes (aiokafka's idempotent producer retrying a lost link forever)."""


def broker_answers(monkeypatch: pytest.MonkeyPatch,
                   answer: Callable[[str, BatchBuilder], BaseException | object | None]) -> None:
    """The forwarder's producers answer a batch with ``answer(topic, batch)`` when it returns an
    exception (as the broker's produce response would) or :data:`HANG`; with ``None`` the batch
    really goes to the broker."""

    class Producer(AIOKafkaProducer):  # type: ignore[misc]
        async def send_batch(self, batch: BatchBuilder, topic: str, *, partition: int) -> Any:
            result = answer(topic, batch)
            if result is None:
                return await super().send_batch(batch, topic, partition=partition)
            future = asyncio.get_running_loop().create_future()
            if isinstance(result, BaseException):
                future.set_exception(result)
            return future

    monkeypatch.setattr(kafka, "AIOKafkaProducer", Producer)


# -- config and pure logic ----------------------------------------------------------------


def test_config_defaults_and_consistency_checks(tmp_path: Path) -> None:
    c = KafkaConfig()
    assert c.max_record_bytes == 1_048_576 and c.max_in_flight_bytes == 16_777_216
    assert c.dead_letter_topic is None and c.dead_letter_file_max_bytes == 64 * 2**20
    buf = DiskBuffer(BufferConfig(directory=tmp_path), Metrics())  # never opened
    assert KafkaForwarder(c, buf, "gw1", Metrics()).dead_letter_topic == (
        "digispine.gateway.DeadLetter.v1")
    by_parts = KafkaConfig(topic_template="plant1.{domain}.{name}.{version}.{gateway_id}")
    assert KafkaForwarder(by_parts, buf, "gw1", Metrics()).dead_letter_topic == (
        "plant1.gateway.DeadLetter.v1.gw1")
    named = KafkaConfig(dead_letter_topic="central.dlq")
    assert KafkaForwarder(named, buf, "gw1", Metrics()).dead_letter_topic == "central.dlq"

    for bad in ("bad topic", "..", ""):
        with pytest.raises(ValidationError, match="dead_letter_topic"):
            KafkaConfig(dead_letter_topic=bad)
    with pytest.raises(ValidationError, match="acks: all"):
        KafkaConfig(acks="1")  # the idempotent producer (default) needs acks=all
    assert KafkaConfig(acks="1", enable_idempotence=False).acks == "1"
    with pytest.raises(ValidationError, match="sasl_username and sasl_password"):
        KafkaConfig(security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512")
    KafkaConfig(security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-256",
                sasl_username="gw", sasl_password="secret")  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_the_size_check_matches_the_batch_kafka_would_get(tmp_path: Path, mode: str) -> None:
    """Refused exactly when aiokafka's upper bound for a batch of one passes max_record_bytes;
    whatever passes builds into a batch no larger than the limit (the fast path included)."""
    limit = 4096
    config = KafkaConfig(max_batch_bytes=1024, max_record_bytes=limit, content_mode=mode)  # type: ignore[arg-type]
    fwd = KafkaForwarder(config, DiskBuffer(BufferConfig(directory=tmp_path), Metrics()), "gw1",
                         Metrics())
    outcomes = set()
    for pad in range(2000, 4200, 3):
        body = event(1, subject=SUBJECT, pad="x" * pad).encode()
        message = fwd._message(BufferedRecord(1, TYPE, SUBJECT, body))
        key = SUBJECT.encode()
        value, headers = (binary_message(body) if mode == "binary"
                          else (body, [("content-type", b"application/cloudevents+json")]))
        estimate = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers)
        refused = isinstance(message, kafka._Rejection)
        assert refused == (estimate > limit), pad
        if refused:
            assert message.reason == "too_large" and message.error == "MessageSizeTooLargeError"
            assert f"{estimate} bytes" in message.message
        else:
            batch = BatchBuilder(1024, 0)
            batch.append(timestamp=None, key=key, value=value, headers=headers)
            assert len(batch._build()) <= estimate <= limit
        outcomes.add(refused)
    assert outcomes == {True, False}


def test_a_round_is_cut_at_max_in_flight_bytes_and_the_next_read_sized(tmp_path: Path) -> None:
    config = KafkaConfig(max_in_flight_bytes=10_000, max_in_flight_events=500)
    fwd = KafkaForwarder(config, DiskBuffer(BufferConfig(directory=tmp_path), Metrics()), "gw1",
                         Metrics())

    def records(*sizes: int) -> list[BufferedRecord]:
        return [BufferedRecord(i, TYPE, SUBJECT, b"x" * s) for i, s in enumerate(sizes, 1)]

    small = records(*[100] * 50)
    assert fwd._within_bytes(small) == small and fwd._read_limit == 100  # 10 000 / 100
    assert [r.seq for r in fwd._within_bytes(records(4000, 4000, 4000, 10))] == [1, 2]
    assert fwd._read_limit == 3  # 10 000 * 4 // 12 010
    assert [r.seq for r in fwd._within_bytes(records(50_000, 10))] == [1]  # one, however large
    assert fwd._read_limit == 1
    assert fwd._within_bytes(records(*[10] * 5)) and fwd._read_limit == 500  # back up at once
    assert fwd._within_bytes([]) == []


def test_a_dead_letter_record_never_carries_the_data(tmp_path: Path) -> None:
    fwd = KafkaForwarder(KafkaConfig(), DiskBuffer(BufferConfig(directory=tmp_path), Metrics()),
                         "gw1", Metrics())
    big = event(7, subject=SUBJECT, pad="p" * 5000)
    letter = fwd._dead_letter_event(kafka._Rejection(
        BufferedRecord(3, TYPE, SUBJECT, big.encode()), "digispine." + TYPE, "too_large",
        "MessageSizeTooLargeError", "m" * 5000))
    assert letter["id"] == big.id + "-dead-letter" and letter["type"] == DEAD_LETTER_TYPE
    assert (letter["subject"], letter["source"], letter["time"]) == (
        SUBJECT, big.source, big.envelope()["time"])
    assert letter["data"]["size"] == len(big.encode()) and len(letter["data"]["message"]) == 1000
    assert "p" * 100 not in json.dumps(letter)

    garbage = fwd._message(BufferedRecord(4, TYPE, SUBJECT, b"\xff not a cloudevent"))
    assert isinstance(garbage, kafka._Rejection) and garbage.reason == "invalid_record"
    letter = fwd._dead_letter_event(garbage)
    assert letter["id"].endswith("-dead-letter") and letter["source"] == "/gateways/gw1"
    assert letter["data"]["event_id"] is None and letter["data"]["event_type"] == TYPE


def test_the_dead_letter_file_is_bounded(tmp_path: Path) -> None:
    path = tmp_path / "deadletter.jsonl"
    file = DeadLetterFile(path, max_bytes=1000)
    body = event(1).encode()
    file.write([({"seq": i, "reason": "too_large"}, body) for i in range(12)])
    older = path.with_name("deadletter.jsonl.1")
    assert path.stat().st_size <= 1000 and 0 < older.stat().st_size <= 1000
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[-1]["seq"] == 11 and lines[-1]["event"] == json.loads(body)

    file.write([({"seq": 12}, event(2, pad="z" * 2000).encode()), ({"seq": 13}, b"\xff\x00")])
    last = [json.loads(line) for line in path.read_text().splitlines()][-2:]
    assert last[0] == {"seq": 12, "event_omitted": True}  # larger than the whole file may be
    assert last[1]["seq"] == 13 and last[1]["event_base64"] == "/wA="


# -- against the broker --------------------------------------------------------------------


@pytest.mark.integration
async def test_a_too_large_event_is_dead_lettered_and_the_others_arrive_in_order(
        kafka_bootstrap: str, topic_prefix: str, buffer: DiskBuffer, tmp_path: Path) -> None:
    metrics = Metrics()
    sent = [event(n, subject=SUBJECT) for n in range(1, 9)]
    big = sent[3] = event(4, subject=SUBJECT, pad=secrets.token_hex(3000))
    await buffer.append(sent)
    config = kafka_config(kafka_bootstrap, topic_prefix, max_batch_bytes=2048,
                          max_record_bytes=4096)
    with capture_logs() as logs:
        async with running(KafkaForwarder(config, buffer, "gw1", metrics)):
            await until(lambda: buffer.pending_events == 0)
    records = await support.consume(kafka_bootstrap, [f"{topic_prefix}.{TYPE}"], expect=7,
                                    quiet_s=1.0)
    assert values(records) == [1, 2, 3, 5, 6, 7, 8]
    letters = await support.consume(kafka_bootstrap, [dead_letter_topic(topic_prefix)], expect=1,
                                    quiet_s=1.5)

    assert len(letters) == 1
    letter = letters[0]
    assert letter.key == SUBJECT.encode() and len(letter.value) < 1000  # no data in it
    headers = dict(letter.headers)
    assert headers["ce_type"] == b"gateway.DeadLetter.v1"
    assert headers["ce_id"] == f"{big.id}-dead-letter".encode()
    assert headers["ce_subject"] == SUBJECT.encode() and headers["ce_source"] == big.source.encode()
    data = json.loads(letter.value)
    message = data.pop("message")
    assert "more than max_record_bytes (4096)" in message
    assert data == {
        "reason": "too_large", "error": "MessageSizeTooLargeError", "gateway_id": "gw1",
        "topic": f"{topic_prefix}.{TYPE}", "size": len(big.encode()), "event_id": big.id,
        "event_type": TYPE, "event_subject": SUBJECT, "event_source": big.source,
        "event_time": big.envelope()["time"]}

    assert metrics.value("events_dead_lettered_total", reason="too_large") == 1
    assert metrics.value("events_forwarded_total") == 7
    assert metrics.total("events_dropped_total") == 0
    assert buffer.pending_events == 0 and await buffer.read(0, 10) == []
    dead = [e for e in logs if e["event"] == "kafka.dead_lettered"]
    assert [(e["id"], e["reason"], e["seq"]) for e in dead] == [(big.id, "too_large", 4)]
    lines = (tmp_path / "deadletter.jsonl").read_text().splitlines()
    assert len(lines) == 1
    kept = json.loads(lines[0])
    assert kept["event"] == big.envelope() and kept["reason"] == "too_large"
    assert kept["seq"] == 4 and kept["dead_letter_topic"] == dead_letter_topic(topic_prefix)


@pytest.mark.integration
async def test_a_batch_the_broker_refuses_as_too_large_is_probed_and_its_culprit_dead_lettered(
        kafka_bootstrap: str, topic_prefix: str, buffer: DiskBuffer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    def answer(topic: str, batch: BatchBuilder) -> BaseException | None:  # max.message.bytes=3000
        if topic != dead_letter_topic(topic_prefix) and batch.size() > 3000:
            return MessageSizeTooLargeError()
        return None

    broker_answers(monkeypatch, answer)
    metrics = Metrics()
    sent = spread(30, subjects=3)
    big = event(100, subject="acme/plant1/press1", pad="y" * 5000)  # passes the client's check
    await buffer.append([*sent[:10], big, *sent[10:]])
    with capture_logs() as logs:
        async with running(KafkaForwarder(kafka_config(kafka_bootstrap, topic_prefix), buffer,
                                          "gw1", metrics)):
            await until(lambda: buffer.pending_events == 0)
    records = await support.consume(kafka_bootstrap, [f"{topic_prefix}.{TYPE}"], expect=30,
                                    quiet_s=1.0)
    assert sorted(set(values(records))) == list(range(30))
    for ns in per_key(records).values():
        assert last_occurrences(ns) == sorted(set(ns))
    letters = await support.consume(kafka_bootstrap, [dead_letter_topic(topic_prefix)], expect=1,
                                    quiet_s=1.5)
    assert len(letters) == 1
    data = json.loads(letters[0].value)
    assert (data["event_id"], data["reason"], data["error"]) == (
        big.id, "too_large", "MessageSizeTooLargeError")
    assert data["message"] == "[Error 10] MessageSizeTooLargeError"
    assert metrics.value("events_dead_lettered_total", reason="too_large") == 1
    assert metrics.value("events_forwarded_total") >= 30
    assert [e["id"] for e in logs if e["event"] == "kafka.dead_lettered"] == [big.id]


@pytest.mark.integration
async def test_a_refused_dead_letter_is_dropped_and_never_loops(
        kafka_bootstrap: str, topic_prefix: str, buffer: DiskBuffer, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    attempts: list[str] = []

    def answer(topic: str, batch: BatchBuilder) -> BaseException | None:
        if topic == dead_letter_topic(topic_prefix):
            attempts.append(topic)
            return RecordTooLargeError()
        return None

    broker_answers(monkeypatch, answer)
    metrics = Metrics()
    await buffer.append([event(1), event(2, pad="x" * 10_000), event(3)])
    config = kafka_config(kafka_bootstrap, topic_prefix, max_batch_bytes=1024,
                          max_record_bytes=4096)
    with capture_logs() as logs:
        async with running(KafkaForwarder(config, buffer, "gw1", metrics)) as task:
            await until(lambda: buffer.pending_events == 0)
            await buffer.append([event(4)])  # the forwarder goes on
            await until(lambda: buffer.pending_events == 0)
            assert not task.done()
    records = await support.consume(kafka_bootstrap, [f"{topic_prefix}.{TYPE}"], expect=3,
                                    quiet_s=1.0)
    assert values(records) == [1, 3, 4]
    assert len(attempts) == 1
    assert metrics.value("events_dropped_total", reason="dead_letter_refused") == 1
    assert metrics.total("events_dead_lettered_total") == 0
    refused = [e for e in logs if e["event"] == "kafka.dead_letter_refused"]
    assert len(refused) == 1 and "RecordTooLargeError" in refused[0]["dead_letter_error"]
    kept = [json.loads(line) for line in (tmp_path / "deadletter.jsonl").read_text().splitlines()]
    assert len(kept) == 1 and kept[0]["event"]["data"]["n"] == 2 and kept[0]["dead_letter_error"]


@pytest.mark.integration
async def test_a_dead_letter_kafka_cannot_take_yet_keeps_the_event_buffered(
        kafka_bootstrap: str, topic_prefix: str, buffer: DiskBuffer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    attempts: list[str] = []

    def answer(topic: str, batch: BatchBuilder) -> BaseException | None:
        if topic == dead_letter_topic(topic_prefix):
            attempts.append(topic)
            if len(attempts) == 1:
                return NotEnoughReplicasError()  # retriable: not a reason to give up the event
        return None

    broker_answers(monkeypatch, answer)
    metrics = Metrics()
    big = event(2, pad="x" * 10_000)
    await buffer.append([event(1), big, event(3)])
    config = kafka_config(kafka_bootstrap, topic_prefix, max_batch_bytes=1024,
                          max_record_bytes=4096)
    with capture_logs() as logs:
        async with running(KafkaForwarder(config, buffer, "gw1", metrics)):
            await until(lambda: len(attempts) == 1)
            assert metrics.total("events_dead_lettered_total") == 0
            await until(lambda: buffer.pending_events == 0)
    letters = await support.consume(kafka_bootstrap, [dead_letter_topic(topic_prefix)], expect=1,
                                    quiet_s=1.5)
    assert [json.loads(r.value)["event_id"] for r in letters] == [big.id]
    assert len(attempts) == 2
    assert metrics.value("events_dead_lettered_total", reason="too_large") == 1
    assert metrics.value("events_forwarded_total") == 2
    assert [e["event"] for e in logs].count("kafka.dead_lettered") == 1


@pytest.mark.integration
async def test_a_round_kafka_never_answers_is_abandoned_and_resent(
        kafka_bootstrap: str, topic_prefix: str, buffer: DiskBuffer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    hung: list[str] = []

    def answer(topic: str, batch: BatchBuilder) -> object | None:
        if not hung:
            hung.append(topic)
            return HANG
        return None

    broker_answers(monkeypatch, answer)
    metrics = Metrics()
    await buffer.append(spread(40))
    config = kafka_config(kafka_bootstrap, topic_prefix, request_timeout_ms=1000)
    forwarder = KafkaForwarder(config, buffer, "gw1", metrics)
    with capture_logs() as logs:
        async with running(forwarder) as task:
            await until(lambda: buffer.pending_events == 0, timeout_s=20)
            assert forwarder.connected and not task.done()
    records = await support.consume(kafka_bootstrap, [f"{topic_prefix}.{TYPE}"], expect=40,
                                    quiet_s=1.0)
    assert sorted(set(values(records))) == list(range(40))
    for ns in per_key(records).values():
        assert last_occurrences(ns) == sorted(set(ns))
    events = [e["event"] for e in logs if e.get("component") == "kafka"]
    assert events.count("kafka.unreachable") == 1 and events[-1] == "kafka.connected"
    assert metrics.value("kafka_send_errors_total", stage="send") >= 1


@pytest.mark.integration
async def test_rounds_stay_within_max_in_flight_bytes(
        kafka_bootstrap: str, topic_prefix: str, buffer: DiskBuffer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    rounds: list[list[int]] = []
    forward = KafkaForwarder._forward

    async def spy(self: KafkaForwarder, producer: Any, records: Any) -> Any:
        rounds.append([len(r.body) for r in records])
        return await forward(self, producer, records)

    monkeypatch.setattr(KafkaForwarder, "_forward", spy)
    sent = spread(200)
    sent[50] = event(50, subject=sent[50].subject, pad="b" * 5000)  # alone larger than the bound
    await buffer.append(sent)
    config = kafka_config(kafka_bootstrap, topic_prefix, max_in_flight_bytes=4096)
    async with running(KafkaForwarder(config, buffer, "gw1", Metrics())):
        await until(lambda: buffer.pending_events == 0)
    records = await support.consume(kafka_bootstrap, [f"{topic_prefix}.{TYPE}"], expect=200,
                                    quiet_s=1.0)
    assert sorted(values(records)) == list(range(200))
    assert all(sum(sizes) <= 4096 or len(sizes) == 1 for sizes in rounds)
    assert [5000 < s for sizes in rounds for s in sizes].count(True) == 1
    assert len(rounds) >= sum(len(e.encode()) for e in sent) // 4096


@pytest.mark.integration
async def test_a_real_kafka_refusing_a_record_over_the_topic_limit(
        kafka_bootstrap: str, topic_prefix: str, buffer: DiskBuffer) -> None:
    """The broker's own refusal (``max.message.bytes`` of the topic), which Tansu never gives."""
    if not support.real_kafka():
        pytest.skip("Tansu enforces no max.message.bytes; emulated in the tests above")
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(f"{topic_prefix}.{TYPE}", 1, 1,
                                            topic_configs={"max.message.bytes": "4096"})])
    finally:
        await admin.close()
    metrics = Metrics()
    big = event(2, pad=secrets.token_hex(4000))  # 8 KB, incompressible enough
    await buffer.append([event(1), big, event(3)])
    config = kafka_config(kafka_bootstrap, topic_prefix, compression="none")
    async with running(KafkaForwarder(config, buffer, "gw1", metrics)):
        await until(lambda: buffer.pending_events == 0)
    records = await support.consume(kafka_bootstrap, [f"{topic_prefix}.{TYPE}"], expect=2,
                                    quiet_s=1.0)
    assert values(records) == [1, 3]
    letters = await support.consume(kafka_bootstrap, [dead_letter_topic(topic_prefix)], expect=1,
                                    quiet_s=1.5)
    assert len(letters) == 1
    data = json.loads(letters[0].value)
    assert data["event_id"] == big.id and data["reason"] == "too_large"
    assert data["error"] in {e.__name__ for e in (MessageSizeTooLargeError,
                                                  RecordListTooLargeError, RecordTooLargeError)}
    assert metrics.value("events_dead_lettered_total", reason="too_large") == 1


async def test_without_a_legal_dead_letter_topic_refusals_are_dropped_and_kept_on_disk(
        tmp_path: Path) -> None:
    """A template that makes illegal names makes no dead-letter topic either: what cannot be
    sent is then dropped (counted, logged, written to the file), and the forwarder goes on."""
    metrics = Metrics()
    fwd = KafkaForwarder(KafkaConfig(topic_template="bad topic {type}"),
                         DiskBuffer(BufferConfig(directory=tmp_path), Metrics()), "gw1", metrics)
    assert fwd.dead_letter_topic is None
    e = event(1)
    rejection = fwd._message(BufferedRecord(5, TYPE, SUBJECT, e.encode()))
    assert isinstance(rejection, kafka._Rejection) and rejection.reason == "invalid_topic"
    out = kafka._Outcome()
    await fwd._dead_letter(None, [rejection], out)  # type: ignore[arg-type]  # not needed
    assert out.done == [5] and out.error is None
    assert metrics.value("events_dropped_total", reason="dead_letter_refused") == 1
    kept = json.loads((tmp_path / "deadletter.jsonl").read_text())
    assert kept["event"] == e.envelope() and "InvalidTopicError" in kept["dead_letter_error"]
