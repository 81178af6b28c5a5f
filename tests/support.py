"""Test helpers: real brokers on ports of their own, a TCP proxy to cut links, Kafka read-back."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from gateway.localbrokers import free_port, mosquitto, tansu, tansu_binary, wait_port

__all__ = ["free_port", "mosquitto", "tansu", "tansu_binary", "wait_port"]

KAFKA_ENV = "DIGISPINE_TEST_KAFKA_BOOTSTRAP"
"""Names the bootstrap servers of a real Apache Kafka to test against instead of Tansu."""


def unique_topic_prefix() -> str:
    """A fresh topic namespace per test (Tansu slows as a log grows; real Kafka keeps topics)."""
    return f"t{uuid.uuid4().hex[:10]}"


@contextlib.contextmanager
def kafka_broker() -> Iterator[str]:
    """Bootstrap servers: a real Kafka when $DIGISPINE_TEST_KAFKA_BOOTSTRAP names one, else Tansu."""
    if os.environ.get(KAFKA_ENV):
        yield os.environ[KAFKA_ENV]
        return
    with tansu() as port:
        yield f"127.0.0.1:{port}"


def real_kafka() -> bool:
    return bool(os.environ.get(KAFKA_ENV))


class TcpProxy:
    """A TCP forwarder on its own thread and loop; ``cut()`` drops every connection and refuses
    new ones, ``restore()`` accepts again (a lost uplink, without touching the broker);
    ``stall()`` / ``release()`` hold every byte instead (a hung link)."""

    def __init__(self, target_host: str, target_port: int,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.target = (target_host, target_port)
        self.ssl_context = ssl_context
        """Terminate TLS here (a TLS listener in front of a plain broker)."""
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> TcpProxy:
        self._thread.start()
        self.restore()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cut()
        self._call(self._cancel_handlers())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    async def _cancel_handlers(self) -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    def restore(self) -> None:
        self._call(self._start())

    def cut(self) -> None:
        self._call(self._stop())

    async def _start(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port,
                                                      ssl=self.ssl_context)

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    def stall(self) -> None:
        """Connections stay open and new ones are accepted, but no byte moves either way until
        :meth:`release`; then what was held flows on (TCP keeps it, as a link that stopped and
        came back would). Models a black-holed route or a hung middlebox: silence, no error."""
        self._call(self._set_flowing(False))

    def release(self) -> None:
        self._call(self._set_flowing(True))

    async def _set_flowing(self, flowing: bool) -> None:
        if flowing:
            self._flowing.set()
        else:
            self._flowing.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._flowing.wait()  # a stalled link does not even reach the other side
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_w))

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while True:
                    await self._flowing.wait()
                    data = await r.read(65536)
                    if not data:
                        break
                    await self._flowing.wait()  # read before the stall: held until release
                    w.write(data)
                    await w.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                w.transport.abort()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))
        self._writers.discard(writer)
        self._writers.discard(up_w)


async def consume(
    bootstrap: str, topics: list[str] | None = None, *, pattern: str | None = None,
    expect: int, quiet_s: float = 5.0, timeout_s: float = 60.0,
) -> list[Any]:
    """Read records until ``expect`` arrived and then ``quiet_s`` passed with nothing new (to see
    duplicates), or ``timeout_s``. Never trusts the end offset (Tansu's can be wrong)."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        *(topics or []), bootstrap_servers=bootstrap, auto_offset_reset="earliest",
        enable_auto_commit=False, group_id=None, metadata_max_age_ms=1000,
    )
    if pattern:
        consumer.subscribe(pattern=pattern)
    await consumer.start()
    out: list[Any] = []
    deadline = time.monotonic() + timeout_s
    last_new = time.monotonic()
    try:
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                out.extend(records)
                if records:
                    last_new = time.monotonic()
            if len(out) >= expect and time.monotonic() - last_new >= quiet_s:
                break
    finally:
        await consumer.stop()
    return out


@contextlib.contextmanager
def tansu_behind_tls(ssl_context: ssl.SSLContext) -> Iterator[str]:
    """A Tansu of its own reachable only through a TLS-terminating :class:`TcpProxy` (which it
    advertises), as a Kafka with an SSL listener. Yields the TLS bootstrap address."""
    broker_port = free_port()
    with (TcpProxy("127.0.0.1", broker_port, ssl_context) as proxy,
          tansu(broker_port, advertised_port=proxy.port)):
        yield f"127.0.0.1:{proxy.port}"


@contextlib.contextmanager
def tansu_behind_proxy() -> Iterator[tuple[str, TcpProxy]]:
    """A Tansu of its own whose advertised address is a :class:`TcpProxy` in front of it, so that
    cutting the proxy really cuts the client off (Kafka clients reconnect to the advertised
    address, not to the bootstrap address). Yields (bootstrap via the proxy, proxy)."""
    broker_port = free_port()
    with TcpProxy("127.0.0.1", broker_port) as proxy, tansu(broker_port, advertised_port=proxy.port):
        yield f"127.0.0.1:{proxy.port}", proxy


class GatewayProcess:
    """``python -m gateway run`` as a child process, with its health endpoint for polling."""

    def __init__(self, config: Path, log: Path, env: dict[str, str] | None = None,
                 args: list[str] | None = None) -> None:
        import sys

        self.health_port = free_port()
        self.log = log
        full_env = {**os.environ, **(env or {}),
                    "DIGISPINE_HEALTH__LISTEN": f"127.0.0.1:{self.health_port}",
                    "DIGISPINE_LOGGING__FORMAT": "json"}
        self._out = log.open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", "--config", str(config),
                                      *(args or [])],
                                     stdout=self._out, stderr=subprocess.STDOUT, env=full_env)

    def health(self) -> dict[str, Any] | None:
        import json
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as r:
                return dict(json.loads(r.read()))
        except urllib.error.HTTPError as exc:
            return dict(json.loads(exc.read()))
        except (OSError, ValueError):
            return None

    def wait_for(self, predicate: Any, timeout_s: float = 30.0, what: str = "condition") -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited with {self.proc.returncode}:\n{self.tail()}")
            last = self.health()
            if last is not None and predicate(last):
                return last
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; last health: {last}\n{self.tail()}")

    def wait_sources_running(self, timeout_s: float = 30.0) -> dict[str, Any]:
        return self.wait_for(
            lambda h: h["sources"] and all(s["state"] == "running" for s in h["sources"].values()),
            timeout_s, "sources running")

    def terminate(self, timeout_s: float = 30.0) -> int:
        import signal as _signal

        self.proc.send_signal(_signal.SIGTERM)
        code = self.proc.wait(timeout=timeout_s)
        self._out.close()
        return code

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._out.close()

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]


def write_config(path: Path, *, mqtt_port: int, bootstrap: str, topic_template: str,
                 mappings: Path, state: Path, extra: str = "") -> Path:
    """A gateway config for tests (Tansu refuses idempotent producers, real Kafka does not)."""
    path.write_text(f"""
gateway:
  id: test-gw
connections:
  plant_mqtt:
    protocol: mqtt
    host: 127.0.0.1
    port: {mqtt_port}
    session: persistent
    qos: 1
kafka:
  bootstrap_servers: ["{bootstrap}"]
  topic_template: "{topic_template}"
  enable_idempotence: {"true" if real_kafka() else "false"}
  allow_plaintext: {"true" if real_kafka() else "false"}  # a real test Kafka may be remote
  linger_ms: 5
  retry_min_s: 0.2
  retry_max_s: 1.0
  request_timeout_ms: 5000
buffer:
  directory: {state}
mappings:
  directory: {mappings}
logging:
  level: info
  stats_interval_s: 0
{extra}
""")
    return path


# -- the counting gateway: one integer per MQTT message, one event per integer -----------------

MAPPING = """
version: 1
asset:
  subject: acme/test/line1/{machine}
  attributes: {{line: line1}}
signals:
  n:
    connection: plant_mqtt
    mqtt: {{topic: "{prefix}/{machine}/data", value_path: n, timestamp_path: ts}}
    type: integer
events:
  count_changed:
    type: test.CountChanged.v1
    trigger: {{kind: on_change, signal: n}}
    data:
      n: {{signal: n}}
      line: {{attribute: line}}
"""


def make_mappings(root: Path, prefix: str, machines: list[str]) -> Path:
    """One mapping file per machine: ``<prefix>/<machine>/data`` {"n": int} -> test.CountChanged.v1."""
    folder = root / "mappings"
    folder.mkdir()
    for m in machines:
        (folder / f"{m}.yaml").write_text(MAPPING.format(machine=m, prefix=prefix))
    return folder


def publisher(port: int) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="")
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


def publish(client: mqtt.Client, prefix: str, machine: str, values: range) -> None:
    infos = [client.publish(f"{prefix}/{machine}/data",
                            json.dumps({"n": n, "ts": 1_700_000_000 + n}), qos=1) for n in values]
    for info in infos:
        info.wait_for_publish(timeout=10)


def values_of(records: list) -> list[int]:
    return [json.loads(r.value)["n"] for r in records]


def counting_gateway(tmp_path: Path, mqtt_port: int, bootstrap: str, prefix: str,
                     machines: list[str] | None = None) -> tuple[Path, Path]:
    """Mappings and a config for the counting gateway; returns (config, mappings directory)."""
    mappings = make_mappings(tmp_path, prefix, machines or ["m1"])
    config = write_config(tmp_path / "gw.yaml", mqtt_port=mqtt_port, bootstrap=bootstrap,
                          topic_template=f"{prefix}.{{type}}", mappings=mappings,
                          state=tmp_path / "state")
    return config, mappings
