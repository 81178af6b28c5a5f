"""The state directory's disk fills up (a tmpfs of a few MB, topped up with a filler file).

Promises under test (gateway/app/pipeline.py, gateway/buffer/disk.py): a failed append is
retried with backoff and nothing is acknowledged meanwhile, so mosquitto keeps the messages;
the daemon stays up and says so (``pipeline.buffer_append_failed``,
``buffer_append_errors_total``); once space is back everything acknowledged arrives, also
when the daemon was SIGKILLed while the disk was full. Needs root (mount); skipped otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.faults.harness import (
    Figures,
    Generator,
    Ledger,
    counter,
    read_back,
    rig,
    scrape_metrics,
    wait_health,
)

pytestmark = [pytest.mark.faults, pytest.mark.integration]

SmallDisk = tuple[Path, Callable[[str], None]]
"""The tmpfs mount point, and a function that resizes it (``"64m"``)."""

SIZE = "4m"
LEFT_FREE = 400 * 1024  # bytes the filler leaves, so that a few thousand events fill the disk


def _mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30,
                          check=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    """A tmpfs of ``SIZE`` at ``tmp_path/state``; yields it and ``resize("64m")``."""
    mnt = tmp_path / "state"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    done = _mount("-t", "tmpfs", "-o", f"size={SIZE},mode=0755", "tmpfs", str(mnt))
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")

    def resize(size: str) -> None:
        out = _mount("-o", f"remount,size={size}", str(mnt))
        assert out.returncode == 0, f"remount failed: {out.stderr}"

    try:
        yield mnt, resize
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


def _fill(mnt: Path, leave: int) -> Path:
    """A filler file that leaves ``leave`` bytes free on the mount."""
    st = os.statvfs(mnt)
    free = st.f_bavail * st.f_frsize
    filler = mnt / "filler"
    with open(filler, "wb") as f:
        remaining = max(0, free - leave)
        chunk = b"\0" * (1 << 20)
        while remaining > 0:
            n = min(len(chunk), remaining)
            with contextlib.suppress(OSError):
                f.write(chunk[:n])
            remaining -= n
    return filler



@pytest.mark.parametrize("recovery", ["same_process", "after_kill9"])
async def test_disk_full(tmp_path: Path, figures: Figures, small_disk: SmallDisk,
                         recovery: str) -> None:
    """Kafka cut, input until the disk is full: the daemon stays up, reports it, holds the
    acknowledgements; space back (and Kafka back): everything acknowledged arrives."""
    mnt, resize = small_disk
    started = time.monotonic()
    with rig(tmp_path, ["m1", "m2"], needs_kafka_proxy=True, state=mnt) as r:
        assert r.kafka_proxy is not None
        r.kafka_proxy.cut()
        gw = r.start()
        await r.ready()
        filler = _fill(mnt, LEFT_FREE)
        gen = Generator(r.publish_port, r.prefix, ["m1", "m2"], rate=1e9)
        try:
            h = gw.health()
            for _ in range(100):  # at most 40,000 events
                for m in ("m1", "m2"):
                    gen.publish_now(m, 200)
                await asyncio.to_thread(gen.wait_acknowledged, 30)
                await asyncio.sleep(0.3)
                h = gw.health()
                if counter(h, "buffer_append_errors_total") > 0:
                    break
            assert counter(h, "buffer_append_errors_total") > 0, \
                f"the disk never filled: {h}\n{gw.tail()}"
            at_full = len(gen.sent)
            # More input while full: none of it may be acknowledged by the gateway.
            for m in ("m1", "m2"):
                gen.publish_now(m, 150)
            await asyncio.to_thread(gen.wait_acknowledged, 30)
            await asyncio.sleep(1.5)  # the retry backoff doubles: a longer hold, a later retry
            full = gw.health()
            assert gw.proc.poll() is None, f"the daemon died on a full disk:\n{gw.tail()}"
            assert full is not None
            metrics_full = scrape_metrics(gw)
            buffered_full = full["buffer"]["pending_events"]
            mapped_full = counter(full, "events_mapped_total")
            if recovery == "after_kill9":
                r.kill9()
            filler.unlink()
            resize("64m")
            t_space = time.monotonic()
            if recovery == "after_kill9":
                gw = r.start()
            r.kafka_proxy.restore()
            acked = gen.wait_acknowledged(30)
            ledger = Ledger(r.subjects(), gen.produced(), gen.acknowledged())
            await read_back(r.bootstrap, r.topic, ledger, quiet_s=3, timeout_s=120)
            back_s = time.monotonic() - t_space
            end = await wait_health(gw, lambda h: h["buffer"]["pending_events"] == 0, 60,
                                    "buffer empty")
            assert gw.terminate() == 0, gw.tail()
        finally:
            gen.close()
    failed = r.events_logged("pipeline.buffer_append_failed")
    recovered = r.events_logged("pipeline.buffer_append_recovered")
    figures(recovery=recovery, events=len(gen.sent), acked=acked, published_until_full=at_full,
            buffered_when_full=buffered_full, mapped_when_full=int(mapped_full),
            append_errors=int(metrics_full.get("buffer_append_errors_total", 0)),
            healthz_when_full=full["status"], healthz_problems=full.get("problems"),
            queued_when_full=int(
                counter(full, "pipeline_queued_deliveries")),
            all_arrived_after_space_s=round(back_s, 1), records=ledger.records,
            distinct=ledger.distinct, lost=len(ledger.missing), duplicates=ledger.duplicates,
            recovered_log=[e.get("down_s") for e in recovered],
            forwarded=int(counter(end, "events_forwarded_total")),
            total_s=round(time.monotonic() - started, 1))
    ledger.assert_clean(f"disk full ({recovery})")
    assert acked == len(gen.sent)
    assert buffered_full < at_full + 300, "everything was buffered: the disk never filled"
    assert failed, "no pipeline.buffer_append_failed logged"
    assert "disk" in failed[0].get("error", "") or "full" in failed[0].get("error", ""), failed[0]
    if recovery == "same_process":
        assert recovered, "no pipeline.buffer_append_recovered logged"


async def test_disk_full_then_kafka_back_then_space(tmp_path: Path, figures: Figures,
                                                   small_disk: SmallDisk) -> None:
    """Kafka cut, disk full, Kafka back while the disk is still full, then space: the daemon
    must ride it out in one process (no exit), and everything acknowledged must arrive."""
    mnt, resize = small_disk
    with rig(tmp_path, ["m1"], needs_kafka_proxy=True, state=mnt) as r:
        assert r.kafka_proxy is not None
        r.kafka_proxy.cut()
        gw = r.start()
        await r.ready()
        filler = _fill(mnt, LEFT_FREE)
        gen = Generator(r.publish_port, r.prefix, ["m1"], rate=200).start()
        try:
            await wait_health(gw, lambda h: counter(h, "buffer_append_errors_total") > 0, 60,
                              "appends failing (disk full)")
            r.kafka_proxy.restore()
            full_back = await wait_health(
                gw, lambda h: counter(h, "events_forwarded_total") > 0, 30,
                "what was buffered forwarded while the disk is full")
            await asyncio.sleep(3)
            pending_full = (await wait_health(gw, lambda h: True, 10, "health"))["buffer"][
                "pending_events"]
            filler.unlink()
            resize("64m")
            await asyncio.sleep(5)  # appends resume; the stale delete failure surfaces here
            alive_after_space = gw.proc.poll() is None
            exit_code = gw.proc.returncode
            gen.stop()
            if not alive_after_space:  # let the next generation finish the job, for figures
                gw = r.start()
            acked = gen.wait_acknowledged(30)
            ledger = Ledger(r.subjects(), gen.produced(), gen.acknowledged())
            await read_back(r.bootstrap, r.topic, ledger, quiet_s=3, timeout_s=90)
            assert gw.terminate() == 0, gw.tail()
        finally:
            gen.close()
    figures(events=len(gen.sent), acked=acked,
            forwarded_while_full=int(counter(full_back, "events_forwarded_total")),
            pending_while_full=pending_full, alive_after_space=alive_after_space,
            exit_code=exit_code, records=ledger.records, lost=len(ledger.missing),
            duplicates=ledger.duplicates)
    ledger.assert_clean("disk full, Kafka back, space back")
    assert alive_after_space, f"the daemon exited {exit_code} once space was back"
