"""The fault-injection rig: a mosquitto and a Kafka link of the test's own, the real daemon as
a restartable child process, a paced MQTT generator, and a ledger that checks what Kafka holds
against what was produced.

Every event of these tests comes from one MQTT message ``{"n": <seq>, "ts": ...}`` on
``<prefix>/<machine>/data``; ``n`` counts 1, 2, 3... per machine (asset), so loss, invention,
duplication and order can all be read off the Kafka records (key = the asset's subject,
value = ``{"n": <seq>, "line": "line1"}``, header ``ce_id``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests import support
from tests.support import GatewayProcess, TcpProxy

Figures = Callable[..., str]
"""The ``figures`` fixture (tests/faults/conftest.py): records a test's one-line summary."""

SUBJECT = "acme/test/line1/{machine}"
EVENT_TYPE = "test.CountChanged.v1"
TS0 = 1_700_000_000


class KnownGap(AssertionError):
    """The one failure an ``xfail(strict=True, raises=KnownGap)`` test expects: a promise the
    code does not keep yet. Any other failure of such a test is reported as a failure."""


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return int(raw) if raw else default


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return float(raw) if raw else default


def seed_from_env(name: str = "FAULTS_SEED") -> int:
    """A fixed seed from the environment (to replay a failure) or a fresh one (printed)."""
    raw = os.environ.get(name)
    return int(raw) if raw else random.SystemRandom().randrange(1, 2**31)


# -- config -----------------------------------------------------------------------------------


def write_fault_config(path: Path, *, mqtt_port: int, bootstrap: str, prefix: str,
                       mappings: Path, state: Path, kafka: dict[str, Any] | None = None,
                       buffer: dict[str, Any] | None = None,
                       connection: dict[str, Any] | None = None) -> Path:
    """Like :func:`tests.support.write_config`, with every section open to overrides (the
    document is JSON, which is YAML)."""
    doc = {
        "gateway": {"id": "test-gw"},
        "connections": {"plant_mqtt": {
            "protocol": "mqtt", "host": "127.0.0.1", "port": mqtt_port,
            "session": "persistent", "qos": 1, "reconnect_min_s": 0.2, "reconnect_max_s": 2.0,
            **(connection or {})}},
        "kafka": {
            "bootstrap_servers": [bootstrap], "topic_template": f"{prefix}.{{type}}",
            "enable_idempotence": support.real_kafka(), "linger_ms": 5,
            "allow_plaintext": support.real_kafka(),
            "retry_min_s": 0.2, "retry_max_s": 1.0, "request_timeout_ms": 5000,
            "catalog_publish": False,  # catalog entries would share the buffer too
            **(kafka or {})},
        "buffer": {"directory": str(state), **(buffer or {})},
        "mappings": {"directory": str(mappings)},
        "logging": {"level": "info", "stats_interval_s": 0},
        # The accounting here is of mapped events: the gateway's own status events (heartbeat,
        # connection changes; tested in tests/test_status_events.py) would take buffer space
        # and be dropped or delivered alongside them.
        "health": {"heartbeat_interval_s": 0, "connection_events": False},
    }
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


# -- the rig ----------------------------------------------------------------------------------


@dataclass
class Rig:
    """One test's world. ``publish_port`` is mosquitto itself (the generator's link never
    breaks); the gateway reaches mosquitto through ``mqtt_proxy`` when there is one, and Kafka
    through ``kafka_proxy`` (None against a real Kafka: nothing to cut there)."""

    tmp: Path
    prefix: str
    machines: list[str]
    publish_port: int
    bootstrap: str
    kafka_proxy: TcpProxy | None
    mqtt_proxy: TcpProxy | None
    config: Path
    state: Path
    generation: int = 0
    gw: GatewayProcess | None = None
    logs: list[Path] = field(default_factory=list)

    @property
    def topic(self) -> str:
        return f"{self.prefix}.{EVENT_TYPE}"

    def subjects(self) -> dict[bytes, str]:
        return {SUBJECT.format(machine=m).encode(): m for m in self.machines}

    def start(self) -> GatewayProcess:
        """A new gateway generation on the same config and state directory."""
        self.generation += 1
        log = self.tmp / f"gw-{self.generation:02d}.log"
        self.logs.append(log)
        self.gw = GatewayProcess(self.config, log)
        return self.gw

    async def ready(self, timeout_s: float = 60.0) -> None:
        """Wait until the current generation is connected to mosquitto (its log says
        ``mqtt.connected``; the SUBSCRIBE went out before that line, so its persistent session
        and subscriptions exist). Quicker than the health's "running", which waits 2 s more."""
        gw, log = self.gw, self.logs[-1]
        assert gw is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if gw.proc.poll() is not None:
                raise AssertionError(f"gateway generation {self.generation} exited with "
                                     f"{gw.proc.returncode}:\n{gw.tail()}")
            if b'"mqtt.connected"' in log.read_bytes():
                await asyncio.sleep(0.2)
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"generation {self.generation} not connected to mosquitto after "
                             f"{timeout_s:g} s:\n{gw.tail()}")

    def kill9(self) -> None:
        assert self.gw is not None
        if self.gw.proc.poll() is not None:
            raise AssertionError(f"gateway generation {self.generation} exited by itself with "
                                 f"{self.gw.proc.returncode}:\n{self.gw.tail()}")
        self.gw.kill()

    def log_records(self) -> list[dict[str, Any]]:
        """Every JSON log line of every generation, in order."""
        out = []
        for log in self.logs:
            for line in log.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    rec = json.loads(line)
                    if isinstance(rec, dict):
                        out.append(rec)
        return out

    def events_logged(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.log_records() if r.get("event") == name]


@contextlib.contextmanager
def rig(tmp_path: Path, machines: list[str], *, needs_kafka_proxy: bool = False,
        mqtt_proxy: bool = False, state: Path | None = None, kafka: dict[str, Any] | None = None,
        buffer: dict[str, Any] | None = None) -> Iterator[Rig]:
    """mosquitto + Kafka link + mappings + config; stops the gateway (kill) at the end."""
    if support.real_kafka() and needs_kafka_proxy:
        pytest.skip("cutting or stalling the Kafka link needs a broker that advertises the "
                    "proxy's address (Tansu); not possible against $DIGISPINE_TEST_KAFKA_BOOTSTRAP")
    prefix = support.unique_topic_prefix()
    mappings = support.make_mappings(tmp_path, prefix, machines)
    state = state or tmp_path / "state"
    with contextlib.ExitStack() as stack:
        mqtt_port = stack.enter_context(support.mosquitto())
        gw_mqtt_port = mqtt_port
        mproxy = None
        if mqtt_proxy:
            mproxy = stack.enter_context(TcpProxy("127.0.0.1", mqtt_port))
            gw_mqtt_port = mproxy.port
        if support.real_kafka():
            bootstrap, kproxy = os.environ[support.KAFKA_ENV], None
        else:
            bootstrap, kproxy = stack.enter_context(support.tansu_behind_proxy())
        config = write_fault_config(tmp_path / "gw.yaml", mqtt_port=gw_mqtt_port,
                                    bootstrap=bootstrap, prefix=prefix, mappings=mappings,
                                    state=state, kafka=kafka, buffer=buffer)
        r = Rig(tmp_path, prefix, machines, mqtt_port, bootstrap, kproxy, mproxy, config, state)
        try:
            yield r
        finally:
            if r.gw is not None and r.gw.proc.poll() is None:
                r.gw.kill()


# -- input ------------------------------------------------------------------------------------


class Generator:
    """A QoS 1 publisher on a thread of its own. Each message goes to a machine drawn at random
    (seeded) and carries that machine's next sequence number; ``rate`` messages per second at
    most; until ``total`` messages or ``stop()``. ``sent`` lists (machine, n, info); a message
    counts as acknowledged once mosquitto's PUBACK arrived (``info.is_published()``)."""

    def __init__(self, port: int, prefix: str, machines: list[str], *, rate: float,
                 total: int | None = None, seed: int = 0) -> None:
        self.port, self.prefix, self.machines = port, prefix, machines
        self.rate, self.total = rate, total
        self.rng = random.Random(seed)
        self.sent: list[tuple[str, int, mqtt.MQTTMessageInfo]] = []
        self.next_n = dict.fromkeys(machines, 0)
        self.started = self.finished = 0.0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2,
                                   client_id=f"faults-gen-{uuid.uuid4().hex[:8]}")
        self._client.max_inflight_messages_set(1000)
        self._thread = threading.Thread(target=self._run, name="generator", daemon=True)

    def connect(self) -> Generator:
        """Connect (once) and wait for the CONNACK."""
        if not self._client.is_connected():
            connected = threading.Event()
            self._client.on_connect = lambda *_: connected.set()
            self._client.connect("127.0.0.1", self.port)
            self._client.loop_start()
            if not connected.wait(15):
                raise AssertionError(f"generator: no CONNACK from mosquitto :{self.port}")
        return self

    def start(self) -> Generator:
        """Connect and publish on the generator's thread."""
        self.connect()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout=timeout_s)
        if self._thread.is_alive():
            raise AssertionError(f"generator still running after {timeout_s:g} s "
                                 f"({len(self.sent)} sent)")
        if self.error is not None:
            raise AssertionError(f"generator failed: {self.error!r}")

    def publish_now(self, machine: str, count: int) -> None:
        """``count`` more messages for one machine, from the calling thread (generator idle)."""
        self.connect()
        for _ in range(count):
            self._one(machine)

    def _one(self, machine: str) -> None:
        n = self.next_n[machine] = self.next_n[machine] + 1
        i = len(self.sent)
        info = self._client.publish(f"{self.prefix}/{machine}/data",
                                    json.dumps({"n": n, "ts": TS0 + i / 1000}), qos=1)
        self.sent.append((machine, n, info))

    def _run(self) -> None:
        try:
            self.started = time.monotonic()
            i = 0
            while not self._stop.is_set() and (self.total is None or i < self.total):
                self._one(self.rng.choice(self.machines))
                i += 1
                ahead = self.started + i / self.rate - time.monotonic()
                if ahead > 0.005:
                    time.sleep(ahead)
            self.finished = time.monotonic()
        except BaseException as exc:  # noqa: BLE001 - reported by join()
            self.error = exc

    def wait_acknowledged(self, timeout_s: float = 60.0) -> int:
        """Wait for mosquitto's PUBACKs; returns how many messages are acknowledged."""
        deadline = time.monotonic() + timeout_s
        for _, _, info in self.sent:
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(max(0.0, deadline - time.monotonic()))
        return len(self.acknowledged())

    def acknowledged(self) -> set[tuple[str, int]]:
        return {(m, n) for m, n, info in self.sent if _published(info)}

    def produced(self) -> set[tuple[str, int]]:
        return {(m, n) for m, n, _ in self.sent}

    def close(self) -> None:
        self._stop.set()
        self._client.loop_stop()
        with contextlib.suppress(Exception):
            self._client.disconnect()


def _published(info: mqtt.MQTTMessageInfo) -> bool:
    try:
        return info.is_published()
    except (RuntimeError, ValueError):  # never queued: not acknowledged
        return False


# -- output -----------------------------------------------------------------------------------


@dataclass
class Ledger:
    """What came out of Kafka, checked record by record against what was produced."""

    subjects: dict[bytes, str]
    produced: set[tuple[str, int]]
    must_arrive: set[tuple[str, int]]
    records: int = 0
    first: dict[tuple[str, int], str] = field(default_factory=dict)
    """(machine, n) -> ce_id of its first delivery."""
    bytes_of: dict[str, tuple[bytes, tuple[tuple[str, bytes], ...]]] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)
    id_conflicts: list[str] = field(default_factory=list)
    order_violations: list[str] = field(default_factory=list)
    last_first: dict[str, int] = field(default_factory=dict)
    first_order: dict[str, list[int]] = field(default_factory=dict)
    missing: set[tuple[str, int]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.missing = set(self.must_arrive)

    def add(self, record: Any) -> None:
        self.records += 1
        headers = tuple((k, bytes(v)) for k, v in record.headers)
        ce_id = dict(headers).get("ce_id", b"").decode()
        where = f"{record.topic}[{record.partition}]@{record.offset} id={ce_id}"
        machine = self.subjects.get(record.key)
        try:
            data = json.loads(record.value)
            n = data["n"]
        except (ValueError, KeyError, TypeError):
            self.unknown.append(f"{where}: undecodable value {record.value[:80]!r}")
            return
        if machine is None or (machine, n) not in self.produced:
            self.unknown.append(f"{where}: never produced: key={record.key!r} n={n}")
            return
        if data != {"n": n, "line": "line1"}:
            self.unknown.append(f"{where}: data altered: {data}")
            return
        # The event's bytes, without ce_sequence: the buffer position of this delivery (a
        # redelivered message is buffered again, at a new seq; docs/data-products.md).
        content = tuple(h for h in headers if h[0] != "ce_sequence")
        seen = self.bytes_of.setdefault(ce_id, (record.value, content))
        if seen != (record.value, content):
            self.id_conflicts.append(f"{where}: same id, other bytes: {seen!r} vs "
                                     f"{(record.value, content)!r}")
        key = (machine, n)
        if key in self.first:
            if self.first[key] != ce_id:
                self.id_conflicts.append(f"{where}: {machine} n={n} has a second id "
                                         f"({self.first[key]} first)")
            return
        self.first[key] = ce_id
        self.missing.discard(key)
        self.first_order.setdefault(machine, []).append(n)
        last = self.last_first.get(machine, 0)
        if n <= last:
            self.order_violations.append(f"{where}: {machine} first delivery of n={n} after "
                                         f"n={last}")
        self.last_first[machine] = n

    @property
    def distinct(self) -> int:
        return len(self.first)

    @property
    def duplicates(self) -> int:
        return self.records - self.distinct - len(self.unknown)

    @property
    def duplicate_ratio(self) -> float:
        return self.duplicates / self.distinct if self.distinct else 0.0

    def problems(self) -> list[str]:
        out = []
        if self.missing:
            sample = sorted(self.missing)[:10]
            out.append(f"{len(self.missing)} acknowledged events never arrived, e.g. {sample}")
        if self.unknown:
            out.append(f"{len(self.unknown)} records that were never produced: "
                       f"{self.unknown[:5]}")
        if self.id_conflicts:
            out.append(f"{len(self.id_conflicts)} id conflicts: {self.id_conflicts[:5]}")
        if self.order_violations:
            out.append(f"{len(self.order_violations)} order violations: "
                       f"{self.order_violations[:5]}")
        return out

    def assert_clean(self, context: str = "") -> None:
        problems = self.problems()
        assert not problems, f"{context}\n" + "\n".join(problems)


async def read_back(bootstrap: str, topic: str, ledger: Ledger, *, quiet_s: float = 3.0,
                    timeout_s: float = 120.0,
                    done: Callable[[Ledger], bool] | None = None) -> Ledger:
    """Feed the topic's records to ``ledger`` until ``done`` (default: nothing it must see is
    missing) and then ``quiet_s`` without a new record (late duplicates), or ``timeout_s``.
    Never trusts the end offset."""
    from aiokafka import AIOKafkaConsumer

    done = done or (lambda led: not led.missing)
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap,
                                auto_offset_reset="earliest", enable_auto_commit=False,
                                group_id=None, metadata_max_age_ms=1000)
    await consumer.start()
    deadline = time.monotonic() + timeout_s
    last_new = time.monotonic()
    try:
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                for r in records:
                    ledger.add(r)
                if records:
                    last_new = time.monotonic()
            if done(ledger) and time.monotonic() - last_new >= quiet_s:
                break
    finally:
        await consumer.stop()
    return ledger


# -- the daemon's own account ---------------------------------------------------------------


def scrape_metrics(gw: GatewayProcess) -> dict[str, float]:
    """``/metrics`` as {series: value}, a series spelled as in the text (``name{k="v"}``)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.health_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            out[series] = float(value)
    return out


def series(metrics: dict[str, float], name: str) -> list[tuple[dict[str, str], float]]:
    """The series of one metric as (labels, value)."""
    out = []
    for key, value in metrics.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        labels = {}
        for part in rest.rstrip("}").split(","):
            if "=" in part:
                k, _, v = part.partition("=")
                labels[k] = v.strip('"')
        out.append((labels, value))
    return out


def by_label(metrics: dict[str, float], name: str, label: str) -> dict[str, float]:
    """One metric summed per value of one label, e.g. events_dropped_total per reason."""
    out: dict[str, float] = {}
    for labels, value in series(metrics, name):
        out[labels.get(label, "")] = out.get(labels.get(label, ""), 0.0) + value
    return out


def counter(health: dict[str, Any] | None, name: str) -> float:
    return float((health or {}).get("counters", {}).get(name, 0.0))


async def wait_health(gw: GatewayProcess, predicate: Callable[[dict[str, Any]], bool],
                      timeout_s: float, what: str) -> dict[str, Any]:
    """:meth:`GatewayProcess.wait_for` without blocking the event loop."""
    return await asyncio.to_thread(gw.wait_for, predicate, timeout_s, what)


async def settled(gw: GatewayProcess, names: list[str], quiet_s: float = 1.0,
                  timeout_s: float = 30.0) -> dict[str, Any]:
    """The health once the named counters stayed the same for ``quiet_s``."""
    deadline = time.monotonic() + timeout_s
    last: tuple[float, ...] | None = None
    since = time.monotonic()
    while time.monotonic() < deadline:
        h = await asyncio.to_thread(gw.health)
        now = tuple(counter(h, n) for n in names) if h else None
        if now != last:
            last, since = now, time.monotonic()
        elif h is not None and time.monotonic() - since >= quiet_s:
            return h
        await asyncio.sleep(0.2)
    raise AssertionError(f"counters {names} still moving after {timeout_s:g} s: {last}")


def rate(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0
