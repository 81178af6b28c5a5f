"""OpcUaSource against a real asyncua Server in the test's event loop, over a real socket:
subscriptions, polling, deadbands, namespace URIs that move, restarts under the supervisor,
unknown nodes, operation limits, status codes, users and passwords, Basic256Sha256.

asyncua's server builds the standard address space in ~6 s of CPU; the tests build it once per
machine into a shelf (``_shelf``) that every server loads lazily in ~0.2 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncua
import pytest
import structlog
from asyncua import Server, ua
from asyncua.common.utils import ServiceError
from asyncua.crypto import cert_gen
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.internal_session import InternalSession
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import DNSName, UniformResourceIdentifier
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway.app.supervisor import State, Supervisor
from gateway.errors import SourceUnavailable
from gateway.localbrokers import free_port
from gateway.metrics import Metrics
from gateway.model import Quality, Signal
from gateway.sources.base import Delivery
from gateway.sources.opcua import (
    BAD_COMMUNICATION_ERROR,
    OpcUaAddress,
    OpcUaConnectionConfig,
    OpcUaSource,
)
from tests import support

pytestmark = pytest.mark.timeout(90)

NAME = "cell_opcua"
MACHINES = "urn:acme:machines"
DUMMY = "urn:acme:dummy-first"


# -- the server --------------------------------------------------------------------------------

_SHELF: Path | None = None


async def _shelf() -> Path:
    """A shelf of asyncua's standard address space, built once per machine and asyncua version
    (in a temporary directory renamed into place, so concurrent sessions do not collide)."""
    global _SHELF
    if _SHELF is not None:
        return _SHELF
    base = Path(tempfile.gettempdir()) / f"digispine-opcua-aspace-{asyncua.__version__}"
    shelf = base / "aspace"
    if not shelf.is_file():
        building = Path(tempfile.mkdtemp(prefix=base.name + ".", dir=base.parent))
        await Server().init(shelf_file=building / "aspace")
        # dbm.dumb writes aspace.dat/.dir; asyncua loads a shelf only when "aspace" exists.
        (building / "aspace").touch()
        try:
            building.rename(base)
        except OSError:  # built meanwhile by another session
            shutil.rmtree(building, ignore_errors=True)
    _SHELF = shelf
    return shelf


class UaServer:
    """An asyncua server with ``Objects/Machines/<machine>/<variable>`` in the machines
    namespace (string node ids ``<machine>.<variable>``), started and stopped by the test."""

    def __init__(self, port: int | None = None, *, machines: int = 2, dummy_first: bool = False,
                 user_manager: Any = None, secure: tuple[Path, Path] | None = None,
                 limits: dict[str, int] | None = None,
                 policies: list[ua.SecurityPolicyType] | None = None) -> None:
        self.port = port or free_port()
        self.policies = policies or [ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt]
        self.machines = machines
        self.dummy_first = dummy_first
        self.user_manager = user_manager
        self.secure = secure
        self.limits = limits or {}
        self.server: Server | None = None
        self.vars: dict[str, Any] = {}
        self.ns = 0

    @property
    def endpoint(self) -> str:
        return f"opc.tcp://127.0.0.1:{self.port}/"

    async def start(self) -> UaServer:
        server = Server(user_manager=self.user_manager)
        await server.init(shelf_file=await _shelf())
        server.set_endpoint(self.endpoint)
        if self.secure is None:
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        else:
            server.set_security_policy(self.policies)
            await server.load_certificate(str(self.secure[0]))
            await server.load_private_key(str(self.secure[1]))
        if self.dummy_first:
            dummy = await server.register_namespace(DUMMY)
            # A decoy where the machines' namespace used to be: following the index finds this.
            await server.nodes.objects.add_variable(ua.NodeId("CNC-101.State", dummy),
                                                    ua.QualifiedName("Decoy", dummy), "Decoy")
        self.ns = await server.register_namespace(MACHINES)
        ns = self.ns
        folder = await server.nodes.objects.add_folder(ua.NodeId("Machines", ns),
                                                       ua.QualifiedName("Machines", ns))
        for m in range(1, self.machines + 1):
            name = f"CNC-{100 + m}"
            machine = await folder.add_object(ua.NodeId(name, ns), ua.QualifiedName(name, ns))
            for var, initial in (("State", "Idle"), ("Temperature", 20.0), ("Counter", 0)):
                node = await machine.add_variable(ua.NodeId(f"{name}.{var}", ns),
                                                  ua.QualifiedName(var, ns), initial)
                self.vars[f"{name}/{var}"] = node
        for key, value in self.limits.items():
            node = server.get_node(ua.NodeId(getattr(
                ua.ObjectIds, f"Server_ServerCapabilities_OperationLimits_{key}")))
            await node.write_value(ua.Variant(value, ua.VariantType.UInt32))
        await server.start()
        self.server = server
        return self

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
            self.server = None

    async def write(self, key: str, value: Any, *, status: int = 0,
                    source_time: datetime | None = None,
                    variant: ua.VariantType | None = None) -> None:
        dv = ua.DataValue(
            ua.Variant(value, variant) if variant is not None else ua.Variant(value),
            StatusCode=ua.StatusCode(status),
            SourceTimestamp=source_time or datetime.now(UTC),
            ServerTimestamp=datetime.now(UTC),
        )
        await self.vars[key].write_value(dv)

    async def add_many(self, folders: int, per_folder: int) -> list[str]:
        """``Objects/Bulk/F<n>/V<m>``: variables under folders, never thousands under one."""
        assert self.server is not None
        ns = self.ns
        bulk = await self.server.nodes.objects.add_folder(ua.NodeId("Bulk", ns),
                                                          ua.QualifiedName("Bulk", ns))
        ids = []
        for f in range(folders):
            folder = await bulk.add_folder(ua.NodeId(f"F{f}", ns), ua.QualifiedName(f"F{f}", ns))
            for v in range(per_folder):
                ident = f"F{f}.V{v}"
                self.vars[ident] = await folder.add_variable(
                    ua.NodeId(ident, ns), ua.QualifiedName(f"V{v}", ns), float(v))
                ids.append(ident)
        return ids


@contextlib.asynccontextmanager
async def serving(**kwargs: Any) -> AsyncIterator[UaServer]:
    server = await UaServer(**kwargs).start()
    try:
        yield server
    finally:
        await server.stop()


# -- the source --------------------------------------------------------------------------------


def config(endpoint: str, **overrides: Any) -> OpcUaConnectionConfig:
    fields: dict[str, Any] = {"protocol": "opcua", "endpoint": endpoint,
                              "security_policy": "None", "allow_insecure": True,
                              "publishing_interval_ms": 50, "keepalive_s": 1.0,
                              "request_timeout_s": 3.0, "reconnect_min_s": 0.2,
                              "reconnect_max_s": 1.0}
    fields.update(overrides)
    return OpcUaConnectionConfig(**fields)


def node(machine: str, var: str, **fields: Any) -> OpcUaAddress:
    return OpcUaAddress(node=f"nsu={MACHINES};s={machine}.{var}", **fields)


def source(endpoint: str, addresses: list[OpcUaAddress], *, metrics: Metrics | None = None,
           pki: Path | None = None, **overrides: Any) -> OpcUaSource:
    return OpcUaSource(NAME, config(endpoint, **overrides), addresses, metrics or Metrics(),
                       pki_dir=pki, application_uri="urn:digispine:edge-gateway:test")


class Collector:
    """An ``emit`` that records deliveries."""

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []

    async def __call__(self, delivery: Delivery) -> None:
        assert delivery.ack is None
        self.deliveries.append(delivery)

    @property
    def signals(self) -> list[Signal]:
        return [s for d in self.deliveries for s in d.signals]

    def of(self, tag: str) -> list[Signal]:
        return [s for s in self.signals if s.tag == tag]

    def values(self, tag: str) -> list[Any]:
        return [s.value for s in self.of(tag) if s.quality is Quality.GOOD]

    async def until(self, check: Callable[[], bool], timeout_s: float = 15.0,
                    what: str = "condition") -> None:
        deadline = time.monotonic() + timeout_s
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not met; got {[(s.tag, s.value, s.quality.value) for s in self.signals][-20:]}")
            await asyncio.sleep(0.02)


async def wait_connected(src: OpcUaSource, task: asyncio.Task[None], timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while not src.connected:
        if task.done():
            task.result()
            raise AssertionError("run returned before connecting")
        if time.monotonic() > deadline:
            raise AssertionError("the source did not connect in time")
        await asyncio.sleep(0.02)


async def stop(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)


@contextlib.asynccontextmanager
async def running(src: OpcUaSource, emit: Collector) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(src.run(emit))
    try:
        await wait_connected(src, task)
        yield task
    finally:
        await stop(task)


STATE = f"nsu={MACHINES};s=CNC-101.State"
TEMP = f"nsu={MACHINES};s=CNC-101.Temperature"
COUNTER = f"nsu={MACHINES};s=CNC-101.Counter"


# -- subscriptions -----------------------------------------------------------------------------


async def test_subscription_delivers_values_with_quality_status_and_source_time() -> None:
    emit = Collector()
    async with serving() as server:
        src = source(server.endpoint, [node("CNC-101", "State"), node("CNC-101", "Temperature")])
        async with running(src, emit):
            await emit.until(lambda: emit.values(STATE) == ["Idle"] and emit.values(TEMP) == [20.0],
                             what="initial values")
            stamp = datetime(2026, 11, 28, 22, 9, 1, 123000, tzinfo=UTC)
            await server.write("CNC-101/State", "Running", source_time=stamp)
            await emit.until(lambda: "Running" in emit.values(STATE), what="Running")
    running_signal = emit.of(STATE)[-1]
    assert running_signal.quality is Quality.GOOD
    assert running_signal.status == 0
    assert running_signal.source_time == pytest.approx(stamp.timestamp())
    assert running_signal.connection == NAME
    assert abs(running_signal.receive_time - time.time()) < 30
    # Both initial values came in one publish, so in one delivery.
    assert any({s.tag for s in d.signals} == {STATE, TEMP} for d in emit.deliveries)


async def test_server_timestamps_when_configured() -> None:
    emit = Collector()
    async with serving() as server:
        src = source(server.endpoint, [node("CNC-101", "State")], timestamp_source="server")
        async with running(src, emit):
            await emit.until(lambda: emit.values(STATE) == ["Idle"])
            await server.write("CNC-101/State", "Running",
                               source_time=datetime(2001, 1, 1, tzinfo=UTC))
            await emit.until(lambda: "Running" in emit.values(STATE))
    assert emit.of(STATE)[-1].source_time == pytest.approx(time.time(), abs=30)


async def test_a_path_address_is_browsed_from_objects() -> None:
    emit = Collector()
    path = "Objects/Machines/CNC-102/Temperature"
    qualified = f"Objects/Machines/<{MACHINES}>:CNC-102/State"
    async with serving() as server:
        src = source(server.endpoint, [OpcUaAddress(path=path), OpcUaAddress(path=qualified)])
        async with running(src, emit):
            await emit.until(lambda: emit.values(path) == [20.0] and emit.values(qualified) == ["Idle"])
            await server.write("CNC-102/Temperature", 35.5)
            await emit.until(lambda: 35.5 in emit.values(path))


async def test_absolute_deadband_suppresses_small_changes() -> None:
    emit = Collector()
    async with serving() as server:
        src = source(server.endpoint, [node("CNC-101", "Temperature", deadband={"absolute": 1.0})])
        async with running(src, emit):
            await emit.until(lambda: emit.values(TEMP) == [20.0])
            for value in (20.5, 20.9, 22.0, 22.5, 19.0):
                await server.write("CNC-101/Temperature", value)
                await asyncio.sleep(0.15)  # a few publishing intervals: each change on its own
            await emit.until(lambda: 19.0 in emit.values(TEMP))
    # 20.5, 20.9 and 22.5 differ by less than 1.0 from the value before them: not reported.
    assert emit.values(TEMP) == [20.0, 22.0, 19.0]


async def test_queue_size_keeps_every_change_between_publishes_in_one_delivery() -> None:
    """Five changes within one publishing interval: an item with queue_size 10 reports all of
    them, in one Delivery; one with the default queue_size 1 only the last."""
    emit = Collector()
    async with serving() as server:
        src = source(server.endpoint, [node("CNC-101", "Counter", queue_size=10),
                                       node("CNC-102", "Counter")], publishing_interval_ms=2000)
        other = f"nsu={MACHINES};s=CNC-102.Counter"
        async with running(src, emit):
            await emit.until(lambda: emit.values(COUNTER) == [0] and emit.values(other) == [0])
            for n in range(1, 6):
                await server.write("CNC-101/Counter", n, variant=ua.VariantType.Int64)
                await server.write("CNC-102/Counter", n, variant=ua.VariantType.Int64)
            await emit.until(lambda: 5 in emit.values(COUNTER) and 5 in emit.values(other))
    assert emit.values(COUNTER) == [0, 1, 2, 3, 4, 5]
    # One publish (two, should the writes straddle a publishing boundary) carried them all.
    changes = [d for d in emit.deliveries if any(s.tag == COUNTER and s.value for s in d.signals)]
    assert 1 <= len(changes) <= 2
    assert emit.values(other)[0] == 0 and emit.values(other)[-1] == 5
    assert len(emit.values(other)) <= 3  # the server kept only the newest value per publish


async def test_bad_and_uncertain_status_keep_the_raw_code_and_overflows_are_counted() -> None:
    emit = Collector()
    metrics = Metrics()
    async with serving() as server:
        src = source(server.endpoint, [node("CNC-101", "Temperature")], metrics=metrics)
        async with running(src, emit):
            await emit.until(lambda: emit.values(TEMP) == [20.0])
            await server.write("CNC-101/Temperature", None, status=0x808D0000)  # BadSensorFailure
            await emit.until(lambda: emit.of(TEMP)[-1].quality is Quality.BAD)
            await server.write("CNC-101/Temperature", 21.0, status=0x40900000)  # UncertainLastUsable
            await emit.until(lambda: emit.of(TEMP)[-1].quality is Quality.UNCERTAIN)
            await server.write("CNC-101/Temperature", 22.0, status=0x00000480)  # Good + Overflow
            await emit.until(lambda: 22.0 in emit.values(TEMP))
    bad, uncertain, overflow = emit.of(TEMP)[-3:]
    assert (bad.value, bad.quality, bad.status) == (None, Quality.BAD, 0x808D0000)
    assert (uncertain.value, uncertain.quality, uncertain.status) == (
        21.0, Quality.UNCERTAIN, 0x40900000)
    assert (overflow.quality, overflow.status) == (Quality.GOOD, 0x00000480)
    assert metrics.value("opcua_queue_overflows_total", connection=NAME) == 1


async def test_out_of_order_values_are_emitted_and_counted() -> None:
    emit = Collector()
    metrics = Metrics()
    t0 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    async with serving() as server:
        src = source(server.endpoint, [node("CNC-101", "Counter")], metrics=metrics)
        async with running(src, emit):
            await emit.until(lambda: emit.values(COUNTER) == [0])
            await server.write("CNC-101/Counter", 1, source_time=t0 + timedelta(seconds=10),
                               variant=ua.VariantType.Int64)
            await emit.until(lambda: 1 in emit.values(COUNTER))
            await server.write("CNC-101/Counter", 2, source_time=t0, variant=ua.VariantType.Int64)
            await emit.until(lambda: 2 in emit.values(COUNTER))
    assert emit.values(COUNTER) == [0, 1, 2]
    # The initial value (timed now) is newer than both: each of them is out of order.
    assert metrics.value("opcua_out_of_order_total", connection=NAME) == 2


# -- polling -----------------------------------------------------------------------------------


async def test_polling_reads_cyclically_in_batches_of_max_nodes_per_read(
        monkeypatch: pytest.MonkeyPatch) -> None:
    sizes: list[int] = []
    original = InternalSession.read

    async def counting_read(self: InternalSession, params: ua.ReadParameters) -> Any:
        if self.external:
            sizes.append(len(params.NodesToRead))
        return await original(self, params)

    monkeypatch.setattr(InternalSession, "read", counting_read)
    emit = Collector()
    async with serving(machines=3, limits={"MaxNodesPerRead": 2}) as server:
        addresses = [node(f"CNC-{100 + m}", var, mode="poll", poll_interval_ms=100)
                     for m in (1, 2, 3) for var in ("State", "Temperature")]
        src = source(server.endpoint, addresses)
        async with running(src, emit):
            await emit.until(lambda: len(emit.deliveries) >= 3, what="three poll cycles")
            await server.write("CNC-101/Temperature", 30.0)
            await emit.until(lambda: 30.0 in emit.values(TEMP))
    polls = [d for d in emit.deliveries if len(d.signals) == 6]
    assert len(polls) >= 4  # one delivery per cycle, all six signals in it
    assert all(s.quality is Quality.GOOD for d in polls for s in d.signals)
    reads = sizes[sizes.index(3) + 1:]  # after the read of the three OperationLimits
    assert reads and max(reads) == 2


# -- namespaces, unknown nodes, limits ----------------------------------------------------------


async def test_namespace_uri_is_followed_when_its_index_moves() -> None:
    """Run 1 registers the machines' namespace at index 2; run 2 (same port) registers a dummy
    namespace first, so it is index 3, and puts a decoy at ns=2 with the same string id."""
    emit = Collector()
    port = free_port()
    server = await UaServer(port).start()
    assert server.ns == 2
    src = source(server.endpoint, [node("CNC-101", "State")])
    task = asyncio.create_task(src.run(emit))
    try:
        await wait_connected(src, task)
        await emit.until(lambda: emit.values(STATE) == ["Idle"])
        await server.stop()
        with pytest.raises(SourceUnavailable):
            await asyncio.wait_for(task, 15)
        server = await UaServer(port, dummy_first=True).start()
        assert server.ns == 3
        await server.write("CNC-101/State", "Running")
        task = asyncio.create_task(src.run(emit))
        await wait_connected(src, task)
        await emit.until(lambda: emit.values(STATE)[-1:] == ["Running"])
    finally:
        await stop(task)
        await server.stop()
    assert "Decoy" not in emit.values(STATE)


async def test_an_unknown_node_is_bad_and_logged_once_the_others_stream() -> None:
    emit = Collector()
    missing = f"nsu={MACHINES};s=CNC-999.State"
    unknown_ns = "nsu=urn:nobody;s=X"
    no_child = "Objects/Machines/CNC-101/Pressure"
    folder = "Objects/Machines/CNC-101"
    an_object = f"nsu={MACHINES};s=CNC-102"
    polled_missing = f"nsu={MACHINES};s=CNC-998.State"
    with structlog.testing.capture_logs() as logged:
        async with serving() as server:
            src = source(server.endpoint, [
                OpcUaAddress(node=missing), OpcUaAddress(node=unknown_ns),
                OpcUaAddress(path=no_child), OpcUaAddress(path=folder),
                OpcUaAddress(node=an_object), node("CNC-101", "State"),
                OpcUaAddress(node=polled_missing, mode="poll", poll_interval_ms=100),
            ])
            async with running(src, emit):
                await emit.until(lambda: emit.values(STATE) == ["Idle"])
                await server.write("CNC-101/State", "Running")
                await emit.until(lambda: "Running" in emit.values(STATE))
                await emit.until(lambda: len(emit.of(polled_missing)) >= 3)
            async with running(src, emit):  # a second session: reported again, logged once
                await emit.until(lambda: len(emit.of(missing)) == 2)
    for tag in (missing, unknown_ns, no_child, folder, an_object):
        assert [s.quality for s in emit.of(tag)] == [Quality.BAD, Quality.BAD], tag
        assert emit.of(tag)[0].value is None
    assert emit.of(missing)[0].status == 0x80340000
    assert {(s.quality, s.status) for s in emit.of(polled_missing)} == {(Quality.BAD, 0x80340000)}
    unusable = {e["tag"]: e["reason"] for e in logged if e["event"] == "opcua.address_unusable"}
    assert sum(1 for e in logged if e["event"] == "opcua.address_unusable") == 6  # once each
    assert unusable[missing] == ("BadNodeIdUnknown: the server has no such node (check the "
                                 "identifier and namespace URI; the server's address space may "
                                 "have changed)")
    assert unusable[polled_missing] == unusable[missing]
    assert unusable[unknown_ns].startswith(
        "namespace urn:nobody is not in the server's NamespaceArray (http://opcfoundation.org/UA/")
    assert unusable[no_child] == ("Objects/Machines/CNC-101 has no child 'Pressure' (its "
                                  "children: Counter, State, Temperature)")
    assert unusable[folder] == ("Objects/Machines/CNC-101 is an Object, not a Variable: address "
                                "a Variable (e.g. one of its children)")
    assert unusable[an_object] == ("BadAttributeIdInvalid: the node has no value: it is not a "
                                   "Variable (address a Variable, e.g. a child of this object)")


async def test_items_are_created_in_batches_within_the_servers_limits(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The server says MaxMonitoredItemsPerCall 7 and refuses larger calls; a second server
    says nothing (0) but refuses more than 7 too: both get all 60 items."""
    calls: list[int] = []
    original = InternalSession.create_monitored_items

    async def limited(self: InternalSession, params: ua.CreateMonitoredItemsParameters) -> Any:
        calls.append(len(params.ItemsToCreate))
        if len(params.ItemsToCreate) > 7:
            raise ServiceError(ua.StatusCodes.BadTooManyOperations)
        return await original(self, params)

    monkeypatch.setattr(InternalSession, "create_monitored_items", limited)

    async def create_all(limits: dict[str, int]) -> Collector:
        calls.clear()
        emit = Collector()
        async with serving(limits=limits) as server:
            ids = await server.add_many(folders=6, per_folder=10)
            src = source(server.endpoint, [OpcUaAddress(node=f"nsu={MACHINES};s={i}") for i in ids])
            async with running(src, emit):
                await emit.until(lambda: len({s.tag for s in emit.signals}) == 60)
        return emit

    emit = await create_all({"MaxMonitoredItemsPerCall": 7})
    assert all(s.quality is Quality.GOOD for s in emit.signals)
    assert calls == [7] * 8 + [4]  # within the limit the server declares: no refused call

    emit = await create_all({"MaxMonitoredItemsPerCall": 0})
    assert all(s.quality is Quality.GOOD for s in emit.signals)
    assert calls[:4] == [60, 30, 15, 7]  # halved until the server took them, then kept
    assert sum(n for n in calls if n <= 7) == 60


# -- connection loss, restart, supervisor -------------------------------------------------------


async def test_server_restart_marks_signals_bad_then_values_flow_again_under_the_supervisor(
) -> None:
    emit = Collector()
    metrics = Metrics()
    port = free_port()
    server = await UaServer(port).start()
    src = source(server.endpoint, [node("CNC-101", "State"),
                                   node("CNC-101", "Temperature", mode="poll", poll_interval_ms=100)],
                 metrics=metrics)
    supervisor = Supervisor(metrics, healthy_after_s=1.0)
    supervised = asyncio.create_task(supervisor.supervise(
        NAME, "opcua", lambda: src.run(emit), running_after_s=0.2,
        min_backoff_s=src.config.reconnect_min_s, max_backoff_s=src.config.reconnect_max_s))
    try:
        await emit.until(lambda: emit.values(STATE) == ["Idle"] and src.connected)
        assert metrics.snapshot()["opcua_connected"] == 1
        await server.stop()
        await emit.until(lambda: emit.of(STATE)[-1].quality is Quality.BAD, what="marked bad")
        marked = emit.deliveries[-1].signals
        assert {s.tag for s in marked} == {STATE, TEMP}
        assert {(s.quality, s.status, s.value) for s in marked} == {
            (Quality.BAD, BAD_COMMUNICATION_ERROR, None)}
        await emit.until(lambda: supervisor.components[NAME].state is State.BACKOFF)
        assert metrics.snapshot()["opcua_connected"] == 0
        assert "OPC UA connection cell_opcua" in (supervisor.components[NAME].last_error or "")
        await asyncio.sleep(1.5)  # a few failed retries: still only one BAD delivery
        assert sum(1 for d in emit.deliveries if d.signals and d.signals[0].status ==
                   BAD_COMMUNICATION_ERROR) == 1
        server = await UaServer(port).start()
        await server.write("CNC-101/State", "Running")
        await emit.until(lambda: emit.values(STATE)[-1:] == ["Running"], timeout_s=20)
        await emit.until(lambda: emit.of(TEMP)[-1].quality is Quality.GOOD)
        await emit.until(lambda: supervisor.components[NAME].state is State.RUNNING)
        assert not supervised.done()
        assert metrics.snapshot()["opcua_connected"] == 1
    finally:
        await stop(supervised)
        await server.stop()


async def test_a_hung_link_is_detected_by_the_keepalive() -> None:
    """The TCP connection stays open but nothing moves (a black-holed route): the keep-alive
    probe (or the silent subscription) ends the session within a few keep-alive periods."""
    emit = Collector()
    async with serving() as server:
        with support.TcpProxy("127.0.0.1", server.port) as proxy:
            src = source(f"opc.tcp://127.0.0.1:{proxy.port}/", [node("CNC-101", "State")])
            task = asyncio.create_task(src.run(emit))
            await wait_connected(src, task)
            await emit.until(lambda: emit.values(STATE) == ["Idle"])
            proxy.stall()
            stalled = time.monotonic()
            with pytest.raises(SourceUnavailable) as caught:
                await asyncio.wait_for(task, 20)
            detected = time.monotonic() - stalled
            proxy.release()
    message = str(caught.value)
    assert message.startswith(f"OPC UA connection {NAME} (opc.tcp://127.0.0.1:")
    assert ("did not answer the keep-alive probe within 1 s" in message
            or "no publish response or keep-alive for" in message), message
    assert detected < 10
    assert emit.of(STATE)[-1].quality is Quality.BAD


async def test_unreachable_endpoint_is_one_clear_line() -> None:
    emit = Collector()
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = source(f"opc.tcp://127.0.0.1:{port}/", [node("CNC-101", "State")])
    with pytest.raises(SourceUnavailable) as caught:
        await asyncio.wait_for(src.run(emit), 15)
    message = str(caught.value)
    assert message == (f"OPC UA connection {NAME} (opc.tcp://127.0.0.1:{port}/): connection "
                       f"refused while connecting (check the endpoint's host and port, and that "
                       f"the server runs)")
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    # Never connected: the signals are marked bad once, not per attempt.
    with pytest.raises(SourceUnavailable):
        await asyncio.wait_for(src.run(emit), 15)
    assert [len(d.signals) for d in emit.deliveries] == [1]


# -- users and security ------------------------------------------------------------------------


class Users:
    def get_user(self, iserver: Any, username: str | None = None, password: str | None = None,
                 certificate: Any = None) -> User | None:
        if username == "gateway" and password == "s3cret":
            return User(role=UserRole.User, name=username)
        return None


async def test_username_and_password() -> None:
    async with serving(user_manager=Users()) as server:
        emit = Collector()
        src = source(server.endpoint, [node("CNC-101", "State")], username="gateway",
                     password="s3cret")
        async with running(src, emit):
            await emit.until(lambda: emit.values(STATE) == ["Idle"])
        wrong = source(server.endpoint, [node("CNC-101", "State")], username="gateway",
                       password="nope")
        with pytest.raises(SourceUnavailable) as caught:
            await asyncio.wait_for(wrong.run(Collector()), 15)
    message = str(caught.value)
    assert message.startswith(f"OPC UA connection {NAME} ({server.endpoint}): the server refused "
                              f"user 'gateway' (BadUserAccessDenied)")
    assert message.endswith("check username and password (and that the server allows this user)")
    assert "nope" not in message and "\n" not in message


def _server_certificate(directory: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    key = cert_gen.generate_private_key()
    cert = cert_gen.generate_self_signed_app_certificate(
        key, "Test OPC UA Server", {}, [UniformResourceIdentifier("urn:freeopcua:python:server"),
                                        DNSName(host)],
        extended=[ExtendedKeyUsageOID.SERVER_AUTH], days=30)
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "server.der", directory / "server.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


async def test_basic256sha256_sign_and_encrypt_with_a_trusted_server(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    secure = {"security_policy": "Basic256Sha256", "security_mode": "SignAndEncrypt",
              "allow_insecure": False}
    async with serving(secure=_server_certificate(tmp_path / "server"),
                       user_manager=Users()) as server:
        # 1. Unknown server certificate: refused, saved to rejected/, one line says what to do.
        src = source(server.endpoint, [node("CNC-101", "State")], pki=pki, username="gateway",
                     password="s3cret", **secure)
        with pytest.raises(SourceUnavailable) as caught:
            await asyncio.wait_for(src.run(Collector()), 20)
        (rejected,) = (pki / "rejected").iterdir()
        assert str(caught.value).startswith(
            f"OPC UA connection {NAME} ({server.endpoint}): the server's certificate "
            f"(CN=Test OPC UA Server, SHA-1 ")
        assert str(caught.value).endswith(
            f"is not trusted; it was saved as {rejected}: move it to {pki / 'trusted'} to trust "
            f"this server")
        own = (pki / "own" / "cert.der").read_bytes()
        assert (pki / "own" / "private" / "key.pem").stat().st_mode & 0o077 == 0

        # 2. Trusted: the channel is Basic256Sha256/SignAndEncrypt, the user token encrypted.
        rejected.rename(pki / "trusted" / rejected.name)
        emit = Collector()
        async with running(src, emit):
            await emit.until(lambda: emit.values(STATE) == ["Idle"])
            await server.write("CNC-101/State", "Running")
            await emit.until(lambda: "Running" in emit.values(STATE))
        assert (pki / "own" / "cert.der").read_bytes() == own  # generated once, kept

        # 3. A policy the server does not offer: one line listing what it offers.
        other = source(server.endpoint, [node("CNC-101", "State")], pki=pki,
                       **{**secure, "security_policy": "Aes256_Sha256_RsaPss"})
        with pytest.raises(SourceUnavailable) as caught:
            await asyncio.wait_for(other.run(Collector()), 20)
        assert str(caught.value).endswith(
            "the server offers no endpoint with security Aes256_Sha256_RsaPss/SignAndEncrypt; "
            "it offers Basic256Sha256/SignAndEncrypt (set security_policy and security_mode "
            "accordingly)")

        # 4. security None against a server that requires security.
        insecure = source(server.endpoint, [node("CNC-101", "State")])
        with pytest.raises(SourceUnavailable) as caught:
            await asyncio.wait_for(insecure.run(Collector()), 20)
        assert str(caught.value).endswith(
            "the server offers no endpoint with security None (set security_policy and "
            "security_mode to one the server offers)")

        # 5. The server does not trust the gateway's certificate: one line naming it.
        async def untrusted(cert: Any, app: Any) -> None:
            raise ServiceError(ua.StatusCodes.BadCertificateUntrusted)

        assert server.server is not None
        server.server.set_certificate_validator(untrusted)
        with pytest.raises(SourceUnavailable) as caught:
            await asyncio.wait_for(src.run(Collector()), 20)
        assert str(caught.value) == (
            f"OPC UA connection {NAME} ({server.endpoint}): the server rejected the secure channel "
            f"(BadCertificateUntrusted) while opening the session: trust the gateway's "
            f"certificate {pki / 'own' / 'cert.der'} on the server, and check the security "
            f"policy and mode")


SECURE_POLICIES = [(policy, mode) for policy in ("Basic256Sha256", "Aes128_Sha256_RsaOaep",
                                                  "Aes256_Sha256_RsaPss")
                   for mode in ("Sign", "SignAndEncrypt")]


@pytest.mark.parametrize(("policy", "mode"), SECURE_POLICIES)
async def test_every_security_policy_and_mode_with_user_and_password(
        tmp_path: Path, policy: str, mode: str) -> None:
    """A server offering all six secure endpoints; the gateway picks the configured one (the
    server's session shows which) and reads values through it."""
    cert, key = _server_certificate(tmp_path / "server")
    pki = tmp_path / "pki"
    (pki / "trusted").mkdir(parents=True)
    shutil.copy(cert, pki / "trusted" / "server.der")
    offered = [getattr(ua.SecurityPolicyType, f"{p.replace('_', '')}_{m}")
               for p, m in SECURE_POLICIES]
    async with serving(secure=(cert, key), user_manager=Users(), policies=offered) as server:
        emit = Collector()
        src = source(server.endpoint, [node("CNC-101", "State")], pki=pki, username="gateway",
                     password="s3cret", security_policy=policy, security_mode=mode,
                     allow_insecure=False)
        async with running(src, emit):
            await emit.until(lambda: emit.values(STATE) == ["Idle"])
            await server.write("CNC-101/State", "Running")
            await emit.until(lambda: "Running" in emit.values(STATE))
            assert server.server is not None
            channels = [conn.security_policy for conn in _server_connections(server.server)]
        wanted = policy.replace("_", "")
        assert any(type(c).__name__ == f"SecurityPolicy{wanted}" and c.Mode.name == mode
                   for c in channels), [(type(c).__name__, c.Mode.name) for c in channels]


class CertificateUsers:
    """Accepts one user certificate (by its DER bytes) as the user 'operator'."""

    def __init__(self, der: bytes) -> None:
        self.der = der

    def get_user(self, iserver: Any, username: str | None = None, password: str | None = None,
                 certificate: Any = None) -> User | None:
        if isinstance(certificate, bytes) and certificate == self.der:  # the token's DER
            return User(role=UserRole.User, name="operator")
        return None


async def test_x509_user_token(tmp_path: Path) -> None:
    cert, key = _server_certificate(tmp_path / "server")
    pki = tmp_path / "pki"
    (pki / "trusted").mkdir(parents=True)
    shutil.copy(cert, pki / "trusted" / "server.der")
    user_cert, _ = _server_certificate(pki / "user", host="operator")
    stranger_cert, stranger_key = _server_certificate(tmp_path / "stranger", host="stranger")
    secure = {"security_policy": "Basic256Sha256", "allow_insecure": False}
    users = CertificateUsers(user_cert.read_bytes())
    async with serving(secure=(cert, key), user_manager=users) as server:
        emit = Collector()
        src = source(server.endpoint, [node("CNC-101", "State")], pki=pki,
                     user_certificate=Path("user/server.der"),
                     user_private_key=Path("user/server.pem"), **secure)
        async with running(src, emit):
            await emit.until(lambda: emit.values(STATE) == ["Idle"])
        # A certificate the server does not map to a user: one line saying what to check.
        stranger = source(server.endpoint, [node("CNC-101", "State")], pki=pki,
                          user_certificate=stranger_cert, user_private_key=stranger_key,
                          **secure)
        with pytest.raises(SourceUnavailable) as caught:
            await asyncio.wait_for(stranger.run(Collector()), 20)
        assert str(caught.value).endswith(
            f"the server refused the user certificate {stranger_cert} (BadUserAccessDenied) "
            f"while opening the session: check that the server trusts this user certificate "
            f"and maps it to a user")
        # A missing key file: named, no traceback.
        missing = source(server.endpoint, [node("CNC-101", "State")], pki=pki,
                         user_certificate=Path("user/server.der"),
                         user_private_key=Path("user/nope.pem"), **secure)
        with pytest.raises(SourceUnavailable) as caught:
            await asyncio.wait_for(missing.run(Collector()), 20)
        assert f"cannot load the user private key {pki / 'user' / 'nope.pem'}: " \
            in str(caught.value)


@pytest.mark.parametrize(("fields", "words"), [
    ({"user_certificate": "u.der"}, "needs both user_certificate and user_private_key"),
    ({"user_certificate": "u.der", "user_private_key": "u.pem", "username": "x"},
     "not both"),
    ({"user_certificate": "u.der", "user_private_key": "u.pem", "security_policy": "None",
      "allow_insecure": True}, "other than None"),
])
def test_x509_user_token_config_errors(fields: dict[str, Any], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        OpcUaConnectionConfig(protocol="opcua", endpoint="opc.tcp://h:4840", **fields)


def _server_connections(server: Server) -> list[Any]:
    """The server's open secure channels (asyncua keeps them on its binary server's
    protocols)."""
    bserver = server.bserver
    assert bserver is not None
    return [protocol.processor._connection for protocol in bserver.clients]


# -- scale -------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_ten_thousand_items_are_created_and_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """10,000 monitored items in folders of 100: all created (in calls of 1000), every initial
    value delivered, then a wave of 1,000 changes; the timings are printed."""
    emit = Collector()
    metrics = Metrics()
    t0 = time.perf_counter()
    async with serving(machines=0) as server:
        ids = await server.add_many(folders=100, per_folder=100)
        built = time.perf_counter()
        src = source(server.endpoint, [OpcUaAddress(node=f"nsu={MACHINES};s={i}") for i in ids],
                     metrics=metrics, publishing_interval_ms=200, keepalive_s=10.0,
                     request_timeout_s=60.0)
        task = asyncio.create_task(src.run(emit))
        try:
            await wait_connected(src, task, timeout_s=600)
            connected = time.perf_counter()
            await emit.until(lambda: len({s.tag for s in emit.signals}) == 10_000, timeout_s=600,
                             what="10,000 initial values")
            initial = time.perf_counter()
            before = len(emit.signals)
            for n, ident in enumerate(ids[::10]):
                await server.write(ident, 1000.0 + n)
            written = time.perf_counter()
            await emit.until(lambda: len(emit.signals) - before >= 1000, timeout_s=600,
                             what="1,000 changes")
            changed = time.perf_counter()
        finally:
            await stop(task)
    assert all(s.quality is Quality.GOOD for s in emit.signals)
    print(f"\n10,000 items: server built in {built - t0:.1f} s; connected+subscribed in "
          f"{connected - built:.1f} s; all initial values after {initial - built:.1f} s "
          f"({len(emit.deliveries)} deliveries); 1,000 changes written in {written - initial:.1f} s,"
          f" all received {changed - initial:.1f} s after the first write")
