"""``digispine-gateway opcua-cert``: the gateway's OPC UA certificate and its trust list.

The PKI directory of an OPC UA connection (``pki_dir``, relative to ``buffer.directory``, the
place the daemon uses) holds ``own/`` (the gateway's application instance certificate and key,
generated once by :func:`gateway.sources.opcua._own_certificate_blocking` and then kept),
``trusted/`` (server certificates, or their issuers, the gateway accepts) and ``rejected/``
(unknown server certificates the gateway refused; the connection error names the file).

Actions:

``show [CONNECTION] [--pem] [--json]``
    The gateway's certificate: file, subject, application URI, SHA-1 thumbprint, validity, key.
    Generated when missing, by the daemon's own function and in the daemon's place, so what is
    shown is what the server will see (copy ``own/cert.der`` into the server's trust list).
``list [CONNECTION] [--json]``
    The trusted and rejected certificates: file, subject, thumbprint, validity, expired or not.
``trust FILE|THUMBPRINT [CONNECTION]``
    A rejected certificate (by a prefix of its SHA-1 thumbprint, its file name, or its path) is
    moved into ``trusted/``; any other DER or PEM file is copied into ``trusted/`` as DER.
``reject THUMBPRINT|FILE [CONNECTION]``
    The reverse: a trusted certificate is moved to ``rejected/``.

The CONNECTION may be omitted when the config has one OPC UA connection (or several sharing one
PKI directory). The daemon reads ``trusted/`` at every connect: a change applies at the next
reconnect, without a restart. Run the command as the gateway's user (``sudo -u ...``) so the
files keep the owner the daemon needs.

Exit codes: 0 done, 64 bad arguments (unknown connection, no such certificate), 66 a file that
cannot be read as a certificate, 73 the PKI directory cannot be written, 78 a config error.

This module imports nothing heavy at import time (the CLI builds its parser for every command).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.settings import GatewaySettings
    from gateway.sources.opcua import OpcUaConnectionConfig

EX_USAGE = 64
EX_NOINPUT = 66
EX_CANTCREAT = 73
CERT_SUFFIXES = (".der", ".pem", ".crt", ".cer")
"""The files the daemon reads from ``trusted/`` (see ``gateway.sources.opcua``)."""


class CliError(Exception):
    """A problem to print as one line (``digispine-gateway: ...``) with an exit code."""

    def __init__(self, message: str, code: int = EX_USAGE) -> None:
        super().__init__(message)
        self.code = code


# --- the connection and its PKI directory ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """An OPC UA connection of the config, with the PKI directory and application URI the
    daemon would use for it."""

    name: str
    config: OpcUaConnectionConfig
    pki: Path
    application_uri: str
    settings: GatewaySettings


def resolve_target(config: str | None, connection: str | None) -> Target:
    """The OPC UA connection named ``connection`` (or the only one) of the config file.

    Raises:
        ConfigError: the config file is invalid (the CLI prints its findings).
        CliError: no such OPC UA connection, or several and none named.
    """
    from gateway.settings import find_config, load_settings
    from gateway.sources.opcua import OpcUaConnectionConfig

    path = find_config(config)
    settings = load_settings(path)
    opcua = {name: conn for name, conn in settings.connections.items()
             if isinstance(conn, OpcUaConnectionConfig)}

    def target(name: str, conn: OpcUaConnectionConfig) -> Target:
        # As the daemon does (gateway.app.daemon): the PKI is state, under buffer.directory.
        pki = conn.pki_dir if conn.pki_dir.is_absolute() else settings.buffer.directory / conn.pki_dir
        return Target(name, conn, pki, f"urn:digispine:edge-gateway:{settings.gateway.id}",
                      settings)

    if connection is not None:
        conn = opcua.get(connection.lower())
        if conn is None:
            other = settings.connections.get(connection.lower())
            if other is not None:
                raise CliError(f"connection {connection} in {path} is {other.protocol}, not "
                               f"OPC UA (OPC UA connections: {', '.join(sorted(opcua)) or 'none'})")
            raise CliError(f"no connection {connection} in {path} (OPC UA connections: "
                           f"{', '.join(sorted(opcua)) or 'none'})")
        return target(connection.lower(), conn)
    if not opcua:
        raise CliError(f"{path} has no OPC UA connection (protocol: opcua)")
    targets = [target(name, conn) for name, conn in sorted(opcua.items())]
    if len(targets) == 1 or len({t.pki for t in targets}) == 1:
        return targets[0]
    raise CliError(f"{path} has several OPC UA connections with different PKI directories; "
                   f"name one: {', '.join(t.name for t in targets)}")


@contextlib.contextmanager
def cli_logging() -> Iterator[None]:
    """While a command runs: the gateway's log lines at warning and above, to stderr, one
    line each (the daemon's info lines, such as a certificate created, are the command's own
    output here); the previous structlog configuration is restored afterwards."""
    import logging

    import structlog

    was = structlog.is_configured()
    old = structlog.get_config()
    structlog.configure(
        processors=[structlog.processors.add_log_level,
                    structlog.dev.ConsoleRenderer(colors=False)],
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=lambda *_: structlog.PrintLogger(sys.stderr),
        cache_logger_on_first_use=False,
    )
    try:
        yield
    finally:
        if was:
            structlog.configure(**old)
        else:
            structlog.reset_defaults()


def fail(message: str) -> None:
    print(f"digispine-gateway: {message}", file=sys.stderr)


# --- certificates -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CertInfo:
    """What an administrator compares: subject, thumbprint, validity, key, application URI."""

    file: Path
    subject: str
    issuer: str
    thumbprint: str
    """SHA-1 of the DER encoding, lower-case hex (what OPC UA tools call the thumbprint)."""
    sha256: str
    not_before: datetime
    not_after: datetime
    application_uri: str | None
    hosts: tuple[str, ...]
    key: str
    is_ca: bool
    der: bytes

    @property
    def expired(self) -> bool:
        return self.not_after < datetime.now(UTC)

    @property
    def not_yet_valid(self) -> bool:
        return self.not_before > datetime.now(UTC)

    @property
    def state(self) -> str:
        if self.expired:
            return "EXPIRED"
        if self.not_yet_valid:
            return "not yet valid"
        return "valid"

    @property
    def common_name(self) -> str:
        from cryptography import x509

        from_der = x509.load_der_x509_certificate(self.der)
        names = from_der.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        return str(names[0].value) if names else "certificate"

    def as_json(self) -> dict[str, Any]:
        return {
            "file": str(self.file), "subject": self.subject, "issuer": self.issuer,
            "thumbprint_sha1": self.thumbprint, "sha256": self.sha256,
            "not_before": self.not_before.isoformat(), "not_after": self.not_after.isoformat(),
            "expired": self.expired, "application_uri": self.application_uri,
            "hosts": list(self.hosts), "key": self.key, "ca": self.is_ca,
        }


def load_certificate(path: Path) -> CertInfo:
    """A DER or PEM certificate file (the first certificate of a PEM chain).

    Raises:
        CliError: the file cannot be read or is not a certificate (code 66).
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}", EX_NOINPUT) from None
    try:
        return describe(_der_of(raw), path)
    except ValueError as exc:
        raise CliError(f"{path} is not a DER or PEM certificate ({exc})", EX_NOINPUT) from None


def _der_of(raw: bytes) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    if b"-----BEGIN" in raw:
        cert = x509.load_pem_x509_certificate(raw)
        return cert.public_bytes(serialization.Encoding.DER)
    x509.load_der_x509_certificate(raw)  # raises ValueError when it is not one
    return raw


def describe(der: bytes, path: Path) -> CertInfo:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    cert = x509.load_der_x509_certificate(der)
    uris: list[str] = []
    hosts: list[str] = []
    with contextlib.suppress(x509.ExtensionNotFound):
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = [str(u) for u in san.get_values_for_type(x509.UniformResourceIdentifier)]
        hosts = [str(h) for h in san.get_values_for_type(x509.DNSName)]
        hosts += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    is_ca = False
    with contextlib.suppress(x509.ExtensionNotFound):
        is_ca = bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    public = cert.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        key = f"RSA {public.key_size} bit"
    elif isinstance(public, ec.EllipticCurvePublicKey):
        key = f"EC {public.curve.name}"
    else:
        key = type(public).__name__
    return CertInfo(
        file=path, subject=_name(cert.subject), issuer=_name(cert.issuer),
        thumbprint=hashlib.sha1(der, usedforsecurity=False).hexdigest(),
        sha256=hashlib.sha256(der).hexdigest(),
        not_before=cert.not_valid_before_utc, not_after=cert.not_valid_after_utc,
        application_uri=uris[0] if uris else None, hosts=tuple(hosts), key=key, is_ca=is_ca,
        der=der)


def _name(name: Any) -> str:
    """A distinguished name, common name first (as OPC UA tools show it)."""
    parts = [attr.rfc4514_string() for attr in name]
    return ", ".join(sorted(parts, key=lambda p: not p.startswith("CN=")))


def certificates(directory: Path) -> tuple[list[CertInfo], list[tuple[Path, str]]]:
    """The certificates of a directory (the files the daemon would read), and the files that
    are not readable as one (with why)."""
    found: list[CertInfo] = []
    broken: list[tuple[Path, str]] = []
    if not directory.is_dir():
        return found, broken
    for entry in sorted(directory.iterdir()):
        if entry.suffix.lower() not in CERT_SUFFIXES or not entry.is_file():
            continue
        try:
            found.append(load_certificate(entry))
        except CliError as exc:
            broken.append((entry, str(exc)))
    return found, broken


def normalize_thumbprint(text: str) -> str | None:
    """``AB:CD:...``, ``ab cd ...`` or ``abcd...`` as lower-case hex; None when it is not one."""
    hexed = re.sub(r"[\s:]", "", text).lower()
    return hexed if re.fullmatch(r"[0-9a-f]{1,40}", hexed) else None


def _colons(hexed: str) -> str:
    return ":".join(hexed[i:i + 2] for i in range(0, len(hexed), 2)).upper()


def _day(stamp: datetime) -> str:
    return stamp.strftime("%Y-%m-%d %H:%M UTC")


# --- the command ------------------------------------------------------------------------------


def register(sub: Any, config_arg: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``opcua-cert show|list|trust|reject`` to the CLI's subparsers."""
    cert = sub.add_parser(
        "opcua-cert", help="the gateway's OPC UA certificate and the trusted/rejected server "
                           "certificates",
        description="Show the gateway's OPC UA application certificate (generated once, as "
                    "the daemon does, and kept) and manage the server certificates it trusts: "
                    "PKI directory of the connection (pki_dir, relative to buffer.directory) "
                    "with own/, trusted/ and rejected/. Changes apply at the next reconnect. "
                    "Exit 64: unknown connection or certificate; 66: unreadable file; 73: "
                    "cannot write the PKI directory.")
    actions = cert.add_subparsers(dest="cert_action", metavar="ACTION", required=True)

    def connection_arg(p: argparse.ArgumentParser) -> None:
        config_arg(p)
        p.add_argument("connection", nargs="?", metavar="CONNECTION",
                       help="OPC UA connection of the config (optional when there is one)")

    show = actions.add_parser("show", help="the gateway's certificate (generated if missing): "
                                           "file, subject, application URI, thumbprint, validity")
    connection_arg(show)
    show.add_argument("--pem", action="store_true", help="also print the certificate as PEM")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(func=_show)

    lst = actions.add_parser("list", help="the trusted and the rejected server certificates")
    connection_arg(lst)
    lst.add_argument("--json", action="store_true", help="print JSON")
    lst.set_defaults(func=_list)

    trust = actions.add_parser(
        "trust", help="move a rejected certificate into trusted/ (by thumbprint prefix or file "
                      "name), or copy a DER/PEM file there")
    trust.add_argument("certificate", metavar="FILE|THUMBPRINT",
                       help="a certificate file, or a prefix (6+ hex digits) of the SHA-1 "
                            "thumbprint of a certificate in rejected/")
    connection_arg(trust)
    trust.set_defaults(func=_trust)

    reject = actions.add_parser("reject", help="move a trusted certificate to rejected/")
    reject.add_argument("certificate", metavar="THUMBPRINT|FILE",
                        help="a prefix (6+ hex digits) of the SHA-1 thumbprint, or the file name, "
                             "of a certificate in trusted/")
    connection_arg(reject)
    reject.set_defaults(func=_reject)


def _guarded(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def wrapped(args: argparse.Namespace) -> int:
        try:
            with cli_logging():
                return run(args)
        except CliError as exc:
            fail(str(exc))
            return exc.code
    return wrapped


@_guarded
def _show(args: argparse.Namespace) -> int:
    from gateway.sources.opcua import _own_certificate_blocking

    target = resolve_target(args.config, args.connection)
    own = target.pki / "own" / "cert.der"
    existed = own.is_file() and (target.pki / "own" / "private" / "key.pem").is_file()
    try:
        cert_file, key_file, _ = _own_certificate_blocking(target.pki, target.application_uri)
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise CliError(f"cannot use the gateway's certificate in {target.pki / 'own'}: {reason} "
                       f"(check the directory's permissions; delete a damaged certificate to "
                       f"generate a new one)", EX_CANTCREAT) from None
    info = load_certificate(cert_file)
    if args.json:
        print(json.dumps({**info.as_json(), "private_key": str(key_file),
                          "created_now": not existed, "connection": target.name,
                          "pki_dir": str(target.pki)}, indent=2))
    else:
        rows = [
            ("certificate", f"{cert_file}" + ("  (created now)" if not existed else "")),
            ("private key", str(key_file)),
            ("subject", info.subject),
            ("application URI", info.application_uri or "-"),
            ("hosts", ", ".join(info.hosts) or "-"),
            ("SHA-1", f"{info.thumbprint}  ({_colons(info.thumbprint)})"),
            ("SHA-256", info.sha256),
            ("valid", f"{_day(info.not_before)} .. {_day(info.not_after)}  ({info.state})"),
            ("key", info.key),
        ]
        width = max(len(label) for label, _ in rows) + 1
        for label, value in rows:
            print(f"{label + ':':<{width}} {value}")
        print(f"Trust this certificate on the OPC UA server of connection {target.name} "
              f"({target.config.endpoint}): copy {cert_file} into the server's trusted "
              f"certificates (or accept it in the server's rejected list).")
        if args.pem:
            from cryptography import x509
            from cryptography.hazmat.primitives import serialization

            cert = x509.load_der_x509_certificate(info.der)
            print(cert.public_bytes(serialization.Encoding.PEM).decode("ascii"), end="")
    return 0


@_guarded
def _list(args: argparse.Namespace) -> int:
    target = resolve_target(args.config, args.connection)
    out: dict[str, Any] = {"pki_dir": str(target.pki)}
    for kind in ("trusted", "rejected"):
        found, broken = certificates(target.pki / kind)
        if args.json:
            out[kind] = [c.as_json() for c in found]
            out[f"{kind}_unreadable"] = [{"file": str(p), "problem": why} for p, why in broken]
            continue
        print(f"{kind} ({target.pki / kind}): {len(found)} certificate(s)")
        for c in found:
            print(f"  {c.file.name}")
            print(f"      subject {c.subject}")
            print("      self-signed" if c.subject == c.issuer else
                  f"      issued by {c.issuer}" + ("" if not c.is_ca else "  (a CA)"))
            print(f"      SHA-1 {c.thumbprint}  valid {_day(c.not_before)} .. "
                  f"{_day(c.not_after)}  {c.state}")
        for path, why in broken:
            print(f"  {path.name}: unreadable ({why})")
    if args.json:
        print(json.dumps(out, indent=2))
    return 0


@_guarded
def _trust(args: argparse.Namespace) -> int:
    target = resolve_target(args.config, args.connection)
    return _move(target, args.certificate, source="rejected", dest="trusted")


@_guarded
def _reject(args: argparse.Namespace) -> int:
    target = resolve_target(args.config, args.connection)
    return _move(target, args.certificate, source="trusted", dest="rejected")


def _move(target: Target, which: str, *, source: str, dest: str) -> int:
    """Move a certificate of ``pki/source`` to ``pki/dest`` (by thumbprint prefix, file name or
    path); with ``dest`` trusted, an outside file is copied in as DER."""
    from gateway.sources.opcua import _write_atomic

    src_dir, dst_dir = target.pki / source, target.pki / dest
    verb = "trusted" if dest == "trusted" else "rejected"
    path = Path(which)
    named = src_dir / which if "/" not in which and (src_dir / which).is_file() else None
    if named is None and path.is_file():
        named = path
    if named is not None:
        cert = load_certificate(named)
        inside = named.resolve().parent == src_dir.resolve()
        if not inside and dest != "trusted":
            raise CliError(f"{named} is not in {src_dir}; reject takes a certificate of "
                           f"{src_dir} (by thumbprint or file name)")
    else:
        prefix = normalize_thumbprint(which)
        if prefix is None:
            raise CliError(f"{which!r} is neither a certificate file nor a SHA-1 thumbprint "
                           f"(hex digits, colons allowed)")
        if len(prefix) < 6:
            raise CliError(f"thumbprint prefix {which!r} is too short: give at least 6 hex "
                           f"digits")
        found, _ = certificates(src_dir)
        matches = [c for c in found if c.thumbprint.startswith(prefix)]
        if not matches:
            done, _ = certificates(dst_dir)
            already = [c for c in done if c.thumbprint.startswith(prefix)]
            if already:
                print(f"already {verb}: {already[0].file} ({already[0].subject}, SHA-1 "
                      f"{already[0].thumbprint})")
                return 0
            listed = ", ".join(f"{c.thumbprint[:16]} ({c.common_name})" for c in found)
            raise CliError(f"no certificate in {src_dir} has a SHA-1 thumbprint starting "
                           f"with {prefix} ({'there: ' + listed if listed else 'it is empty'})")
        distinct = {c.thumbprint for c in matches}
        if len(distinct) > 1:
            raise CliError(f"{prefix} matches several certificates in {src_dir}: "
                           f"{', '.join(sorted(c.file.name for c in matches))}; give more digits")
        cert, inside = matches[0], True
    for existing in certificates(dst_dir)[0]:
        if existing.thumbprint == cert.thumbprint:
            if inside:
                cert.file.unlink()  # the same certificate: keep one copy, in dest
            print(f"already {verb}: {existing.file} ({existing.subject}, SHA-1 "
                  f"{existing.thumbprint})")
            return 0
    try:
        dst_dir.mkdir(parents=True, exist_ok=True)
        if inside:
            moved = _free_name(dst_dir / cert.file.name)
            cert.file.replace(moved)
            for other in matches_of(src_dir, cert.thumbprint):
                other.unlink()
        else:
            safe = re.sub(r"[^A-Za-z0-9._-]+", "_", cert.common_name).strip("_") or "server"
            moved = _free_name(dst_dir / f"{safe}_{cert.thumbprint[:16]}.der")
            _write_atomic(moved, cert.der, 0o644)
    except OSError as exc:
        raise CliError(f"cannot write {dst_dir}: {exc.strerror or exc} (run as the gateway's "
                       f"user)", EX_CANTCREAT) from None
    print(f"{verb}: {moved}")
    print(f"  subject {cert.subject}")
    print(f"  SHA-1 {cert.thumbprint}  valid {_day(cert.not_before)} .. {_day(cert.not_after)}"
          f"  {cert.state}")
    if dest == "trusted":
        print(f"Connection {target.name} accepts this server from its next (re)connect.")
    return 0


def matches_of(directory: Path, thumbprint: str) -> list[Path]:
    """Further copies of one certificate in ``directory`` (same thumbprint)."""
    return [c.file for c in certificates(directory)[0] if c.thumbprint == thumbprint]


def _free_name(path: Path) -> Path:
    n = 2
    candidate = path
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
        n += 1
    return candidate
