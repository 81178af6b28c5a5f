"""Health from the outside: systemd notifications and a tiny HTTP endpoint.

- :func:`sd_notify` speaks systemd's notify protocol (one datagram to ``$NOTIFY_SOCKET``);
  it is a no-op when not started by systemd.
- :class:`HealthServer` serves ``GET /healthz`` (liveness, JSON; 200 while the gateway accepts
  and buffers data, 503 when a core component is down: restart it), ``GET /readyz``
  (readiness, JSON per component; 200 only while every source is connected, the buffer takes
  events and Kafka is reachable or away for less than a grace period) and ``GET /metrics``
  (Prometheus text).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Callable
from typing import Any

from gateway import logs
from gateway.metrics import Metrics


def sd_notify(message: str) -> bool:
    """Send ``READY=1``, ``STOPPING=1``, ``WATCHDOG=1``, ``STATUS=...`` to systemd, if present."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(message.encode())
        return True
    return False


class HealthServer:
    """``/healthz``, ``/readyz`` and ``/metrics`` over plain HTTP/1.1 (one request per
    connection)."""

    def __init__(self, listen: str, status: Callable[[], tuple[bool, dict[str, Any]]],
                 metrics: Metrics,
                 ready: Callable[[], tuple[bool, dict[str, Any]]] | None = None) -> None:
        host, _, port = listen.rpartition(":")
        self.host, self.port = host or "127.0.0.1", int(port)
        self._status = status
        self._ready = ready or status
        self._metrics = metrics
        self._server: asyncio.AbstractServer | None = None
        self._log = logs.get("health")

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self._log.info("health.listening", address=f"{self.host}:{self.port}")

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), timeout=5)
            while (await asyncio.wait_for(reader.readline(), timeout=5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request.decode("latin-1").split()
            path = parts[1] if len(parts) >= 2 else "/"
            if path.startswith("/healthz"):
                healthy, body = self._status()
                await self._reply(writer, 200 if healthy else 503, "application/json",
                                  json.dumps(body, indent=1).encode())
            elif path.startswith("/readyz"):
                ready, body = self._ready()
                await self._reply(writer, 200 if ready else 503, "application/json",
                                  json.dumps(body, indent=1).encode())
            elif path.startswith("/metrics"):
                await self._reply(writer, 200, "text/plain; version=0.0.4",
                                  self._metrics.render().encode())
            else:
                await self._reply(writer, 404, "text/plain", b"try /healthz, /readyz or /metrics\n")
        except (TimeoutError, OSError, UnicodeError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, code: int, ctype: str, body: bytes) -> None:
        reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[code]
        head = (f"HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
        writer.write(head.encode() + body)
        await writer.drain()
