"""Secure-by-default checks of a loaded configuration: warnings, located in the file.

``validate`` prints them (``warning: file:line:col path: ...``) and exits 0; ``run`` logs each
once at start (``config.warning``). They name what an administrator should change:

- a secret (``password``, ``sasl_password``, ``key_password``, ...) written in the YAML file in
  clear: it belongs in the environment or a credentials file (systemd ``LoadCredential=``);
- Kafka, MQTT or OPC UA without transport security to a host that is not this machine (for
  Kafka and MQTT that is an *error* unless ``allow_plaintext: true``, see
  :func:`plaintext_errors`);
- the health/metrics endpoint listening beyond localhost;
- a PKI or credentials file that other users can read.
"""

from __future__ import annotations

import ipaddress
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from gateway import yamlfile
from gateway.errors import Finding
from gateway.settings import GatewaySettings

SECRET_KEYS = frozenset({"password", "sasl_password", "key_password",
                         "user_private_key_password", "ssl_password"})
"""Keys whose values are secrets wherever they appear in the config file."""


def is_local(host: str) -> bool:
    """Loopback address or ``localhost`` (a broker on this machine needs no transport security
    against the network)."""
    host = host.strip("[]").lower()
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_of(server: str) -> str:
    host, _, _ = server.rpartition(":")
    return host or server


def _locator(path: Path) -> tuple[Any, Callable[[Sequence[str | int], str], Finding]]:
    """The config file's data, and a function making a finding located at a key of it."""
    try:
        data, located = yamlfile.load(path)
    except Exception:  # noqa: BLE001 - load_settings read it already; positions are a bonus
        data, located = None, None

    def at(keys: Sequence[str | int], message: str) -> Finding:
        if located is not None:
            try:
                return located.finding(list(keys), message)
            except Exception:  # noqa: BLE001 - a key set only by the environment has no line
                pass
        return Finding(str(path), None, None, ".".join(str(k) for k in keys), message)

    return data, at


def config_warnings(settings: GatewaySettings, path: Path) -> list[Finding]:
    """Everything about ``settings`` (read from ``path``) that is not secure by default."""
    data, at = _locator(path)
    out: list[Finding] = []
    for keys in _secret_paths(data):
        env = "DIGISPINE_" + "__".join(str(k).upper() for k in keys)
        out.append(at(keys, f"a secret in the config file in clear: set it in the environment "
                            f"({env}) or a credentials file of that name (systemd "
                            f"LoadCredential=), and remove it here"))
    kafka = settings.kafka
    remote = [s for s in kafka.bootstrap_servers if not is_local(_host_of(s))]
    if remote and kafka.security_protocol in ("PLAINTEXT", "SASL_PLAINTEXT"):
        out.append(at(["kafka", "security_protocol"],
                      f"Kafka at {', '.join(remote)} without TLS ({kafka.security_protocol}): "
                      f"events{' and the SASL password' if kafka.sasl_password else ''} cross "
                      f"the network in clear; use SSL or SASL_SSL"))
    for name, conn in settings.connections.items():
        base: list[str | int] = ["connections", name]
        if conn.protocol == "mqtt":
            tls = getattr(conn, "tls", None)
            if not tls and not is_local(conn.host):
                out.append(at([*base, "host"],
                              f"MQTT broker {conn.host} without TLS: readings"
                              f"{' and the password' if conn.password else ''} cross the "
                              f"network in clear; configure tls"))
        elif conn.protocol == "opcua" and conn.security_policy == "None":
            out.append(at([*base, "security_policy"],
                          "OPC UA without security (allow_insecure: true): no signing, no "
                          "encryption, any server accepted"))
    listen = settings.health.listen
    if listen and not is_local(_host_of(listen)):
        out.append(at(["health", "listen"],
                      f"the health and metrics endpoint listens on {listen}, beyond this "
                      f"machine; keep it on 127.0.0.1 unless a monitoring agent elsewhere must "
                      f"scrape it (and then firewall it)"))
    out += _loose_files(settings)
    return out


def plaintext_errors(settings: GatewaySettings, path: Path) -> list[Finding]:
    """Links that would carry data in clear to another machine without the configuration
    saying so (``allow_plaintext: true``): errors, located, for ``validate`` and ``run``."""
    _, at = _locator(path)
    out: list[Finding] = []
    kafka = settings.kafka
    remote = [s for s in kafka.bootstrap_servers if not is_local(_host_of(s))]
    if remote and kafka.security_protocol in ("PLAINTEXT", "SASL_PLAINTEXT") \
            and not kafka.allow_plaintext:
        out.append(at(["kafka", "security_protocol"],
                      f"Kafka at {', '.join(remote)} without TLS ({kafka.security_protocol}) is "
                      f"refused: use SSL or SASL_SSL (with ssl_cafile for the plant's CA), or set "
                      f"kafka.allow_plaintext: true to send in clear knowingly"))
    for name, conn in settings.connections.items():
        if conn.protocol == "mqtt" and not getattr(conn, "tls", None) \
                and not getattr(conn, "allow_plaintext", False) and not is_local(conn.host):
            out.append(at(["connections", name, "host"],
                          f"MQTT broker {conn.host} without TLS is refused: configure tls (port "
                          f"8883 by convention), or set allow_plaintext: true to read in clear "
                          f"knowingly"))
    return out


def _secret_paths(data: Any, prefix: tuple[str | int, ...] = ()) -> Iterator[tuple[str | int, ...]]:
    if isinstance(data, dict):
        for key, value in data.items():
            if isinstance(key, str) and key in SECRET_KEYS and value not in (None, ""):
                yield (*prefix, key)
            else:
                yield from _secret_paths(value, (*prefix, key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from _secret_paths(value, (*prefix, i))


def _loose_files(settings: GatewaySettings) -> list[Finding]:
    """Private keys and credential files that group or others may read."""
    out: list[Finding] = []
    candidates: list[Path] = []
    for conn in settings.connections.values():
        pki = getattr(conn, "pki_dir", None)
        if isinstance(pki, Path):
            pki = pki if pki.is_absolute() else settings.buffer.directory / pki
            candidates += [pki / "own" / "private" / "key.pem"]
            key = getattr(conn, "user_private_key", None)
            if isinstance(key, Path):
                candidates.append(key if key.is_absolute() else pki / key)
        tls = getattr(conn, "tls", None)
        key_file = getattr(tls, "key_file", None)
        if key_file:
            candidates.append(Path(key_file))
    if settings.kafka.ssl_keyfile:
        candidates.append(Path(settings.kafka.ssl_keyfile))
    folder = os.environ.get("CREDENTIALS_DIRECTORY") or os.environ.get("DIGISPINE_SECRETS_DIR")
    if folder and Path(folder).is_dir():
        candidates += [p for p in Path(folder).iterdir() if p.is_file()]
    for file in candidates:
        try:
            mode = file.stat().st_mode
        except OSError:
            continue
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            out.append(Finding(str(file), None, None, "",
                               f"readable by other users (mode {stat.filemode(mode)}): "
                               f"chmod 600 {file}"))
    return out
