"""OPC UA events and alarms as signals: event fields of a notifier node against a real asyncua
server, the event type filter, the delivery order that lets one DomainEvent carry one OPC UA
event's fields, a notifier that does not report events, and the address checks."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path
from typing import Any

import pytest
from asyncua import ua
from pydantic import ValidationError

from gateway.mapping import Mapper, load_mappings
from gateway.metrics import Metrics
from gateway.model import Quality
from gateway.sources.opcua import OpcUaAddress, OpcUaSource
from tests.test_opcua_source import MACHINES, NAME, Collector, UaServer, running, serving, source

pytestmark = pytest.mark.timeout(90)

MACHINE = "Objects/Machines/CNC-101"
ALARM_TYPE = "i=2915"  # AlarmConditionType


def field(name: str, **extra: Any) -> OpcUaAddress:
    return OpcUaAddress(path=MACHINE, event_field=name, **extra)


async def notifier(srv: UaServer, name: str = "CNC-101") -> Any:
    """Let the machine object report events (EventNotifier SubscribeToEvents)."""
    assert srv.server is not None
    node = srv.server.get_node(ua.NodeId(name, srv.ns))
    await node.write_attribute(ua.AttributeIds.EventNotifier,
                               ua.DataValue(ua.Variant(1, ua.VariantType.Byte)))
    return node


# -- the source --------------------------------------------------------------------------------


async def test_event_fields_arrive_together_with_the_event_time_and_event_id_last() -> None:
    async with serving() as srv:
        assert srv.server is not None
        machine = await notifier(srv)
        gen = await srv.server.get_event_generator(ua.ObjectIds.BaseEventType, machine)
        metrics = Metrics()
        src = source(srv.endpoint, [field("EventId"), field("Message"), field("Severity"),
                                    field("SourceName"), field("EventType")], metrics=metrics)
        emit = Collector()
        async with running(src, emit):
            await asyncio.sleep(0.2)
            for n, (text, severity) in enumerate((("door opened", 300), ("door opened", 300),
                                                  ("spindle overload", 800))):
                gen.event.Message = ua.LocalizedText(text)
                gen.event.Severity = severity
                await gen.trigger()
                await emit.until(lambda n=n: len(emit.of(f"{MACHINE}#event:EventId")) > n,
                                 what=f"event {n + 1}")
        deliveries = [d for d in emit.deliveries if d.signals]
        assert len(deliveries) == 3  # one delivery per event (one publish each here)
        for d in deliveries:
            tags = [s.tag.split("#event:")[1] for s in d.signals]
            assert tags[-1] == "EventId"
            assert sorted(tags) == ["EventId", "EventType", "Message", "Severity", "SourceName"]
            assert len({s.source_time for s in d.signals}) == 1  # the event's Time
            assert all(s.quality is Quality.GOOD and s.status == 0 for s in d.signals)
        assert emit.values(f"{MACHINE}#event:Message") == ["door opened", "door opened",
                                                           "spindle overload"]
        assert emit.values(f"{MACHINE}#event:Severity") == [300, 300, 800]
        assert emit.values(f"{MACHINE}#event:SourceName") == ["CNC-101"] * 3
        assert emit.values(f"{MACHINE}#event:EventType") == ["i=2041"] * 3
        ids = emit.values(f"{MACHINE}#event:EventId")
        assert len(set(ids)) == 3  # distinct per occurrence, even for equal messages
        assert metrics.value("opcua_events_total", connection=NAME) == 3


async def test_event_type_filters_and_names_the_alarm_fields() -> None:
    async with serving() as srv:
        assert srv.server is not None
        machine = await notifier(srv)
        plain = await srv.server.get_event_generator(ua.ObjectIds.BaseEventType, machine)
        alarm = await srv.server.get_event_generator(ua.ObjectIds.AlarmConditionType, machine)
        active = field("ActiveState/Id", event_type=ALARM_TYPE)
        message = field("Message", event_type=ALARM_TYPE)
        src = source(srv.endpoint, [active, message, field("Message")])
        emit = Collector()
        async with running(src, emit):
            await asyncio.sleep(0.2)
            plain.event.Message = ua.LocalizedText("operator logged in")
            await plain.trigger()
            for state, text in ((True, "oven over temperature"), (False, "back in band")):
                setattr(alarm.event, "ActiveState/Id", state)
                alarm.event.Message = ua.LocalizedText(text)
                await alarm.trigger()
            await emit.until(lambda: len(emit.of(message.tag)) == 2, what="two alarm events")
            await emit.until(lambda: len(emit.of(f"{MACHINE}#event:Message")) == 3,
                             what="three events of any type")
        assert active.tag == f"{MACHINE}#event(i=2915):ActiveState/Id"
        assert emit.values(active.tag) == [True, False]
        assert emit.values(message.tag) == ["oven over temperature", "back in band"]
        assert emit.values(f"{MACHINE}#event:Message") == [
            "operator logged in", "oven over temperature", "back in band"]


async def test_a_node_that_reports_no_events_is_bad_and_the_rest_streams() -> None:
    async with serving() as srv:
        # CNC-102 keeps EventNotifier 0: the server refuses an event item on it.
        silent = OpcUaAddress(path="Objects/Machines/CNC-102", event_field="Message")
        temp = OpcUaAddress(node=f"nsu={MACHINES};s=CNC-101.Temperature")
        src = source(srv.endpoint, [silent, temp])
        emit = Collector()
        async with running(src, emit):
            await srv.write("CNC-101/Temperature", 71.5)
            await emit.until(lambda: 71.5 in emit.values(temp.tag), what="temperature")
        (bad,) = emit.of(silent.tag)
        assert bad.quality is Quality.BAD and bad.value is None


async def test_an_unknown_event_type_namespace_is_bad_not_fatal() -> None:
    async with serving() as srv:
        await notifier(srv)
        odd = field("Message", event_type="nsu=urn:nobody;i=1002")
        good = field("Message")
        src = source(srv.endpoint, [odd, good])
        emit = Collector()
        async with running(src, emit):
            await emit.until(lambda: bool(emit.of(odd.tag)), what="the unusable signal")
        (bad,) = emit.of(odd.tag)
        assert bad.quality is Quality.BAD
        assert src.connected is False  # stopped by the test, not by the bad address


# -- through the mapping engine ----------------------------------------------------------------

MAPPING = """\
version: 1
asset:
  subject: acme/plant1/machining/line1/cnc101
signals:
  event_id:
    connection: cell_opcua
    opcua: {path: Objects/Machines/CNC-101, event_field: EventId}
    type: string
  message:
    connection: cell_opcua
    opcua: {path: Objects/Machines/CNC-101, event_field: Message}
    type: string
  severity:
    connection: cell_opcua
    opcua: {path: Objects/Machines/CNC-101, event_field: Severity}
    type: integer
  alarm_active:
    connection: cell_opcua
    opcua: {path: Objects/Machines/CNC-101, event_field: ActiveState/Id, event_type: "i=2915"}
    type: boolean
events:
  machine_event:
    type: maintenance.MachineEventReported.v1
    trigger: {kind: on_change, signal: event_id}
    data:
      message: {signal: message}
      severity: {signal: severity}
  alarm_raised:
    type: maintenance.AlarmRaised.v1
    trigger: {kind: edge, signal: alarm_active, edge: rising}
    data:
      message: {signal: message}
"""


async def test_one_domain_event_per_opcua_event_with_that_events_fields(tmp_path: Path) -> None:
    (tmp_path / "cnc101.yaml").write_text(textwrap.dedent(MAPPING))
    mapper = Mapper(load_mappings(tmp_path, {NAME: "opcua"}), "edge-01")
    async with serving() as srv:
        assert srv.server is not None
        machine = await notifier(srv)
        plain = await srv.server.get_event_generator(ua.ObjectIds.BaseEventType, machine)
        alarm = await srv.server.get_event_generator(ua.ObjectIds.AlarmConditionType, machine)
        addresses = list(mapper.bindings()[NAME])
        src = source(srv.endpoint, addresses)
        emit = Collector()
        async with running(src, emit):
            await asyncio.sleep(0.2)
            for text, severity in (("tool change", 200), ("tool change", 200)):
                plain.event.Message = ua.LocalizedText(text)
                plain.event.Severity = severity
                await plain.trigger()
            setattr(alarm.event, "ActiveState/Id", False)
            alarm.event.Message = ua.LocalizedText("coolant ok")
            await alarm.trigger()
            setattr(alarm.event, "ActiveState/Id", True)
            alarm.event.Message = ua.LocalizedText("coolant low")
            alarm.event.Severity = 700
            await alarm.trigger()
            await emit.until(lambda: len(emit.of(f"{MACHINE}#event:EventId")) == 4,
                             what="four events")
    events = [e for d in emit.deliveries for s in d.signals for e in mapper.map(s)]
    reported = [(e.data["message"], e.data["severity"]) for e in events
                if e.type == "maintenance.MachineEventReported.v1"]
    # Equal messages twice are two occurrences; every event carries its own fields (the
    # alarm generator's default Severity is 1).
    assert reported == [("tool change", 200), ("tool change", 200), ("coolant ok", 1),
                        ("coolant low", 700)]
    raised = [e.data["message"] for e in events if e.type == "maintenance.AlarmRaised.v1"]
    assert raised == ["coolant low"]


# -- address checks ----------------------------------------------------------------------------


@pytest.mark.parametrize(("fields", "words"), [
    ({"event_field": "Message", "mode": "poll", "poll_interval_ms": 1000}, "never polled"),
    ({"event_field": "Message", "deadband": {"absolute": 1.0}}, "not to event fields"),
    ({"event_field": "Message", "sampling_interval_ms": 100}, "not to event fields"),
    ({"event_type": "i=2915"}, "event_type needs event_field"),
    ({"event_field": "Active//Id"}, "empty segment"),
    ({"event_field": "Message", "event_type": "nsu=;i=5"}, "nsu"),
])
def test_event_address_errors(fields: dict[str, Any], words: str) -> None:
    with pytest.raises(ValidationError) as caught:
        OpcUaAddress(path=MACHINE, **fields)
    assert words in str(caught.value)


def test_event_tags_are_canonical_and_distinct() -> None:
    a = OpcUaAddress(node="i=2253", event_field="Message")
    b = OpcUaAddress(node="i=2253", event_field="Message", event_type="i=2915")
    c = OpcUaAddress(node="i=2253", event_field="<urn:acme:machines>:Shift")
    assert a.tag == "i=2253#event:Message"
    assert b.tag == "i=2253#event(i=2915):Message"
    assert c.tag == "i=2253#event:<urn:acme:machines>:Shift"
    assert len({a.tag, b.tag, c.tag, OpcUaAddress(node="i=2253").tag}) == 4


async def test_connection_state_is_a_gauge_per_connection() -> None:
    metrics = Metrics()
    async with serving() as srv:
        up = source(srv.endpoint, [OpcUaAddress(node=f"nsu={MACHINES};s=CNC-101.State")],
                    metrics=metrics)
        other = OpcUaSource("other_opcua", up.config, [field("Message")], metrics)
        assert metrics.gauge_value("opcua_connected", connection=NAME) == 0
        async with running(up, Collector()):
            assert metrics.gauge_value("opcua_connected", connection=NAME) == 1
            assert metrics.gauge_value("opcua_connected", connection="other_opcua") == 0
            text = metrics.render()
            assert f'opcua_connected{{connection="{NAME}"}} 1' in text
            assert 'opcua_connected{connection="other_opcua"} 0' in text
        assert other.connected is False
        assert metrics.gauge_value("opcua_connected", connection=NAME) == 0
