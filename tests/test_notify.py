"""systemd's notify protocol against a fake ``$NOTIFY_SOCKET`` (a datagram socket the test binds).

The unit is ``Type=notify`` with ``WatchdogSec=``: the gateway must say ``READY=1`` only once the
buffer is open and the forwarder runs, ``WATCHDOG=1`` every ``WATCHDOG_USEC``/2 only while it is
healthy, ``STOPPING=1`` on SIGTERM, and nothing at all when it cannot start.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.app import daemon as daemon_module
from gateway.app.health import sd_notify
from gateway.buffer.disk import FILE_NAME, LOCK_NAME
from tests import support


class FakeSystemd:
    """The receiving end of ``$NOTIFY_SOCKET``: every datagram with the time it arrived."""

    def __init__(self, *, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._dir: str | None = None
        if abstract:  # "@name" in $NOTIFY_SOCKET is a name in the abstract namespace
            name = f"digispine-test-{os.getpid()}-{time.monotonic_ns()}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:  # a short path: sun_path holds 108 bytes, pytest's tmp_path can be longer
            self._dir = tempfile.mkdtemp(prefix="sdn-", dir="/tmp")
            self.address = os.path.join(self._dir, "notify")
            self.sock.bind(self.address)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, dict[str, str]]] = []

    def close(self) -> None:
        self.sock.close()
        if self._dir is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.address)
            os.rmdir(self._dir)

    def receive(self, timeout_s: float) -> list[dict[str, str]]:
        """Collect what arrives within ``timeout_s``; returns the new messages."""
        deadline = time.monotonic() + timeout_s
        new: list[dict[str, str]] = []
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            new.append(self._record(data))
        self.sock.setblocking(False)  # and whatever is queued already, however slow this host
        try:
            while True:
                new.append(self._record(self.sock.recv(4096)))
        except BlockingIOError:
            pass
        finally:
            self.sock.settimeout(0.1)
        return new

    def _record(self, data: bytes) -> dict[str, str]:
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        self.messages.append((time.monotonic(), fields))
        return fields

    def wait_for(self, key: str, timeout_s: float, proc: subprocess.Popen[bytes] | None = None,
                 log: Path | None = None) -> dict[str, str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for fields in self.receive(0.2):
                if key in fields:
                    return fields
            if proc is not None and proc.poll() is not None:
                break
        tail = log.read_text(errors="replace")[-3000:] if log is not None else ""
        raise AssertionError(f"no {key} within {timeout_s} s; got {self.messages}\n{tail}")


@pytest.fixture
def fake_systemd() -> Iterator[FakeSystemd]:
    fake = FakeSystemd()
    yield fake
    fake.close()


def _start(config: Path, log: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], int]:
    health_port = support.free_port()
    full = {**os.environ, "DIGISPINE_HEALTH__LISTEN": f"127.0.0.1:{health_port}",
            "DIGISPINE_LOGGING__FORMAT": "json", **env}
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", "--config", str(config)],
                                stdout=out, stderr=subprocess.STDOUT, env=full)
    return proc, health_port


def _health(port: int) -> dict[str, Any] | None:
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            return dict(json.loads(r.read()))
    except urllib.error.HTTPError as exc:
        return dict(json.loads(exc.read()))
    except (OSError, ValueError):
        return None


@pytest.mark.integration
def test_ready_after_startup_then_watchdog_then_stopping(
        tmp_path, mqtt_port, kafka_bootstrap, topic_prefix, fake_systemd):
    config, _ = support.counting_gateway(tmp_path, mqtt_port, kafka_bootstrap, topic_prefix)
    log = tmp_path / "gw.log"
    started = time.monotonic()
    proc, health_port = _start(config, log, {"NOTIFY_SOCKET": fake_systemd.address,
                                             "WATCHDOG_USEC": "1000000"})
    try:
        ready = fake_systemd.wait_for("READY", 60, proc, log)
        # Nothing came before READY=1, and READY=1 says what runs.
        assert fake_systemd.messages[0][1] is ready and ready["READY"] == "1"
        assert ready["STATUS"] == "forwarding; 1 source(s)"
        # By then the buffer is open (its lock is held), the health endpoint answers, and the
        # forwarder and pipeline run (health would say core_stopped otherwise).
        state = tmp_path / "state"
        assert (state / FILE_NAME).exists()
        with (state / LOCK_NAME).open("a+b") as lock, pytest.raises(BlockingIOError):
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        health = _health(health_port)
        assert health is not None and "core_stopped" not in health["problems"], health
        # WATCHDOG_USEC=1 s: a ping every 0.5 s while healthy.
        pings = [m for m in fake_systemd.receive(2.6) if m.get("WATCHDOG") == "1"]
        assert 3 <= len(pings) <= 7, fake_systemd.messages
        proc.send_signal(signal.SIGTERM)
        stopping = fake_systemd.wait_for("STOPPING", 30, proc, log)
        assert stopping["STOPPING"] == "1"
        assert proc.wait(timeout=30) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    fake_systemd.receive(0.3)
    order = [next(iter(m)) for _, m in fake_systemd.messages]
    assert order[0] == "READY" and order.count("READY") == 1, order
    assert order.count("STOPPING") == 1 and order[-1] == "STOPPING", order  # no ping after it
    assert set(order[1:-1]) == {"WATCHDOG"}, order
    assert time.monotonic() - started < 120


def test_no_ready_when_the_config_is_invalid(tmp_path, fake_systemd):
    bad = tmp_path / "gw.yaml"
    bad.write_text("gateway:\n  id: 'bad id with spaces'\n")
    log = tmp_path / "gw.log"
    proc, _ = _start(bad, log, {"NOTIFY_SOCKET": fake_systemd.address})
    assert proc.wait(timeout=60) == 78
    assert fake_systemd.receive(0.3) == [] and fake_systemd.messages == []


def test_no_ready_when_the_buffer_cannot_open(tmp_path, fake_systemd):
    """Another process holds the buffer's lock: exit 73 before anything is started."""
    config, _ = support.counting_gateway(tmp_path, support.free_port(), "127.0.0.1:1", "t")
    state = tmp_path / "state"
    state.mkdir()
    log = tmp_path / "gw.log"
    with (state / LOCK_NAME).open("a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc, _ = _start(config, log, {"NOTIFY_SOCKET": fake_systemd.address})
        code = proc.wait(timeout=60)
    assert code == 73, log.read_text()[-3000:]
    assert fake_systemd.receive(0.3) == [] and fake_systemd.messages == []


# -- the watchdog loop in-process: pings only while healthy ---------------------------------


class _Health:
    """Stands in for the daemon: what ``_watchdog_loop`` asks is ``status()``."""

    def __init__(self) -> None:
        self.healthy = True

    def status(self) -> tuple[bool, dict[str, Any]]:
        return self.healthy, {}


async def test_watchdog_pings_only_while_healthy(fake_systemd, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", fake_systemd.address)
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # a ping every 50 ms
    daemon = _Health()
    loop_task = asyncio.create_task(daemon_module.Daemon._watchdog_loop(daemon))  # type: ignore[arg-type]
    try:
        await asyncio.sleep(0.5)
        healthy = await asyncio.to_thread(fake_systemd.receive, 0.05)
        daemon.healthy = False  # a fatal problem: /healthz 503, systemd must not be fed
        await asyncio.sleep(0.1)  # a ping already under way may still land
        await asyncio.to_thread(fake_systemd.receive, 0.05)
        await asyncio.sleep(0.5)
        while_down = await asyncio.to_thread(fake_systemd.receive, 0.05)
        daemon.healthy = True
        await asyncio.sleep(0.3)
        recovered = await asyncio.to_thread(fake_systemd.receive, 0.05)
    finally:
        loop_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop_task
    assert len(healthy) >= 5 and all(m == {"WATCHDOG": "1"} for m in healthy), healthy
    assert while_down == []
    assert len(recovered) >= 2


async def test_no_watchdog_without_watchdog_usec(fake_systemd, monkeypatch):
    """Started without WatchdogSec= (or outside systemd): the loop ends at once."""
    monkeypatch.setenv("NOTIFY_SOCKET", fake_systemd.address)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    await asyncio.wait_for(daemon_module.Daemon._watchdog_loop(_Health()), 1)  # type: ignore[arg-type]
    assert await asyncio.to_thread(fake_systemd.receive, 0.2) == []


def test_sd_notify_reaches_an_abstract_socket_and_is_a_no_op_without_one(monkeypatch):
    fake = FakeSystemd(abstract=True)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", fake.address)
        assert sd_notify("READY=1\nSTATUS=x")
        assert fake.receive(0.3) == [{"READY": "1", "STATUS": "x"}]
        monkeypatch.setenv("NOTIFY_SOCKET", "@nobody-listens-here")
        assert not sd_notify("WATCHDOG=1")  # systemd gone: no exception, no hang
        monkeypatch.delenv("NOTIFY_SOCKET")
        assert not sd_notify("READY=1")
    finally:
        fake.close()
