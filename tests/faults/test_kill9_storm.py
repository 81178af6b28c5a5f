"""kill -9 storm: a stream of MQTT QoS 1 events through the daemon while it is SIGKILLed at
random points and restarted on the same state directory, and its links to Kafka and to
mosquitto are cut and restored through proxies.

What must hold at the end (at-least-once, per-asset order):

- every message mosquitto acknowledged to the publisher arrives in Kafka at least once (the
  gateway's session is persistent and it acknowledges only after the durable append);
- no record arrives that was never produced;
- duplicates are byte-identical (one CloudEvent id, one value, one set of headers) and one
  message has one id;
- per asset, the first deliveries come in sequence order.

Replay a failure with ``FAULTS_SEED=<seed printed>`` (the schedule of kills and cuts and the
choice of assets follow from it; the timing of the processes does not). Size: ``FAULTS_EVENTS``
(100000), ``FAULTS_KILLS`` (20), ``FAULTS_CUTS`` (6, Kafka link), ``FAULTS_MQTT_CUTS`` (4),
``FAULTS_RATE`` (1000 events/s offered, so that the kills fall while input flows).
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import pytest

from tests.faults.harness import (
    Figures,
    Generator,
    Ledger,
    Rig,
    env_float,
    env_int,
    read_back,
    rig,
    seed_from_env,
    wait_health,
)
from tests.support import TcpProxy

pytestmark = [pytest.mark.faults, pytest.mark.integration]

MACHINES = [f"m{i}" for i in range(1, 9)]


async def _killer(r: Rig, kills: int, spacing_s: float, rng: random.Random,
                  phases: dict[str, int], gen: Generator) -> None:
    """SIGKILL the gateway ``kills`` times, restarting it after each: one kill in four at any
    moment of its start-up, the others at a random moment once it is connected to mosquitto."""
    for _ in range(kills):
        if rng.random() < 0.25:
            await asyncio.sleep(rng.uniform(0.1, 3.0))
        else:
            await r.ready()
            # a restart takes ~3 s: the kills spread over the input when there is room
            await asyncio.sleep(rng.uniform(0.0, max(0.5, 2 * (spacing_s - 3.0))))
        phase = "connected" if b'"mqtt.connected"' in r.logs[-1].read_bytes() else "starting"
        phases[phase] = phases.get(phase, 0) + 1
        if not gen.finished:
            phases["during_input"] = phases.get("during_input", 0) + 1
        r.kill9()  # raises if the gateway had exited on its own (a crash)
        await asyncio.sleep(rng.uniform(0.0, 1.0))
        r.start()


async def _cutter(proxy: TcpProxy, cuts: int, spacing_s: float, rng: random.Random,
                  down: tuple[float, float], downtime: list[float]) -> None:
    """Cut the link ``cuts`` times for a random while each."""
    for _ in range(cuts):
        await asyncio.sleep(rng.uniform(0.5, max(1.0, 2 * spacing_s - 0.5 - sum(down) / 2)))
        proxy.cut()
        d = rng.uniform(*down)
        downtime.append(d)
        try:
            await asyncio.sleep(d)
        finally:
            proxy.restore()


async def storm(tmp_path: Path, figures: Figures, *, events: int, kills: int, kafka_cuts: int,
                mqtt_cuts: int, rate: float, seed: int) -> None:
    print(f"\n[faults] kill9 storm: FAULTS_SEED={seed} events={events} kills={kills} "
          f"kafka_cuts={kafka_cuts} mqtt_cuts={mqtt_cuts} rate={rate:g}/s")
    started = time.monotonic()
    with rig(tmp_path, MACHINES, mqtt_proxy=True) as r:
        r.start()
        await r.ready()  # the persistent session must exist before the first message
        gen = Generator(r.publish_port, r.prefix, MACHINES, rate=rate, total=events, seed=seed)
        phases: dict[str, int] = {}
        kafka_down: list[float] = []
        mqtt_down: list[float] = []
        duration = events / rate
        chaos = [_killer(r, kills, duration / max(kills, 1), random.Random(seed + 1), phases,
                         gen)]
        if r.kafka_proxy is not None:
            chaos.append(_cutter(r.kafka_proxy, kafka_cuts, max(2.0, duration / max(kafka_cuts, 1)),
                                 random.Random(seed + 2), (0.5, 4.0), kafka_down))
        if r.mqtt_proxy is not None:
            chaos.append(_cutter(r.mqtt_proxy, mqtt_cuts, max(2.0, duration / max(mqtt_cuts, 1)),
                                 random.Random(seed + 3), (0.3, 2.0), mqtt_down))
        gen.start()
        try:
            await asyncio.gather(*chaos)
            await asyncio.to_thread(gen.join, duration * 3 + 120)
            publish_s = gen.finished - gen.started
            acked = await asyncio.to_thread(gen.wait_acknowledged, 120)
            chaos_end = time.monotonic()
            ledger = Ledger(r.subjects(), gen.produced(), gen.acknowledged())
            await read_back(r.bootstrap, r.topic, ledger, quiet_s=5,
                            timeout_s=180 + events / 200)
            drain_s = time.monotonic() - chaos_end
            assert r.gw is not None
            h = await wait_health(r.gw, lambda h: h["buffer"]["pending_events"] == 0, 120,
                                  "buffer empty at the end")
            code = r.gw.terminate()
        finally:
            gen.close()
        line = figures(
            seed=seed, events=events, acked=acked, unacked=len(gen.sent) - acked,
            kills=phases.get("starting", 0) + phases.get("connected", 0), kill_phases=phases, generations=r.generation,
            kafka_cuts=len(kafka_down), kafka_down_s=round(sum(kafka_down), 1),
            mqtt_cuts=len(mqtt_down), mqtt_down_s=round(sum(mqtt_down), 1),
            records=ledger.records, distinct=ledger.distinct, lost=len(ledger.missing),
            never_produced=len(ledger.unknown), id_conflicts=len(ledger.id_conflicts),
            order_violations=len(ledger.order_violations), duplicates=ledger.duplicates,
            duplicate_ratio=round(ledger.duplicate_ratio, 4),
            offered_rate=round(len(gen.sent) / publish_s), publish_s=round(publish_s, 1),
            drain_after_chaos_s=round(drain_s, 1),
            total_s=round(time.monotonic() - started, 1))
        ledger.assert_clean(f"FAULTS_SEED={seed}: {line}\nlast log:\n{r.gw.tail()}")
        assert code == 0, f"FAULTS_SEED={seed}: clean stop exited {code}\n{r.gw.tail()}"
        assert h["buffer"]["pending_events"] == 0
        assert acked == events, f"FAULTS_SEED={seed}: mosquitto acknowledged {acked}/{events}"


async def test_kill9_storm_quick(tmp_path: Path, figures: Figures) -> None:
    """The storm in small: 10,000 events, 5 kills, 2 Kafka cuts, 1 MQTT cut (default suite)."""
    await storm(tmp_path, figures, events=10_000, kills=5, kafka_cuts=2, mqtt_cuts=1,
                rate=1000, seed=seed_from_env())


@pytest.mark.slow
@pytest.mark.timeout(3600)
async def test_kill9_storm(tmp_path: Path, figures: Figures) -> None:
    """The storm: ``FAULTS_EVENTS`` (100,000) events, ``FAULTS_KILLS`` (20) SIGKILLs."""
    await storm(tmp_path, figures, events=env_int("FAULTS_EVENTS", 100_000),
                kills=env_int("FAULTS_KILLS", 20), kafka_cuts=env_int("FAULTS_CUTS", 6),
                mqtt_cuts=env_int("FAULTS_MQTT_CUTS", 4), rate=env_float("FAULTS_RATE", 1000),
                seed=seed_from_env())
