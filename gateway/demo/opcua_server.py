"""A simulated machining cell served over OPC UA (asyncua): two CNC machines, secured.

The demo's OPC UA server. Its address space, in the namespace ``urn:acme:plant1:machining``
(resolved by URI, never by index: the index is the server's numbering)::

    Objects/
      Machines/                       folder     ns=<urn>;s=Machines
        CNC-101/                      object     ns=<urn>;s=CNC-101
          State                       Int32      ns=<urn>;s=CNC-101.State
                                                 0 Idle, 1 Running, 2 Fault (EnumStrings)
          SpindleSpeed                Double     ns=<urn>;s=CNC-101.SpindleSpeed
                                                 rpm, EURange 0..24000
          PartCount                   UInt32     ns=<urn>;s=CNC-101.PartCount
                                                 parts made; wraps 4294967295 -> 0
          Temperature                 Double     ns=<urn>;s=CNC-101.Temperature
                                                 spindle housing, degC
        CNC-102/                      (the same four variables, s=CNC-102.<Name>)

In a node id the namespace is written ``nsu=urn:acme:plant1:machining;s=CNC-101.State``; the
browse names of ``Machines``, the machines and their variables are in that namespace too
(``Objects/Machines/CNC-101/State``, or qualified ``Objects/<urn:acme:plant1:machining>:Machines/...``).

The machines go Idle -> Running -> Idle with random dwell times and a Fault now and then; the
spindle turns and the part counter counts only while Running, and the spindle housing warms with
the spindle speed. Every ``interval_s`` each machine advances by ``interval_s`` of simulated
time, all drawn from one ``random.Random(seed)`` (a given seed gives the same sequence), and its
variables are written with the wall-clock time as SourceTimestamp.

Security
    The server offers only Basic256Sha256 with Sign or SignAndEncrypt (no ``None`` endpoint),
    with a self-signed application instance certificate of its own, generated once in
    ``pki_dir`` (``server_cert.der``, ``server_key.pem``) and kept. Clients trust it by putting
    ``server_cert.der`` into their trust list (the gateway: ``<pki_dir>/trusted/``). With
    ``trusted_client_dir`` set, the server accepts a client's certificate only when that
    directory holds it (``.der`` or ``.pem``; read at every session); without it, any client
    certificate is accepted (what asyncua does by default). Anonymous users are allowed.

Run it on its own (Ctrl-C stops)::

    python -m gateway.demo.opcua_server --port 4840 --pki-dir ./demo-pki
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import importlib
import ipaddress
import logging
import math
import os
import random
import socket
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from gateway.demo.threaded import ThreadedDevice, wait_for_interrupt

NAMESPACE_URI = "urn:acme:plant1:machining"
"""The namespace of the machines' nodes."""
APPLICATION_URI = "urn:acme:plant1:machining:opcua-server"
"""The server's application URI (in its certificate)."""
SERVER_NAME = "ACME Plant 1 Machining (DigiSpine demo)"

CNC_STATES = ("Idle", "Running", "Fault")
"""The State codes: 0 Idle, 1 Running, 2 Fault."""
SPINDLE_RANGE_RPM = (0.0, 24_000.0)
"""The EURange of SpindleSpeed."""
UINT32_WRAP = 2**32

CERT_DAYS = 3650


@dataclass(frozen=True, slots=True)
class CncMachine:
    """One simulated CNC machine: its browse name under ``Objects/Machines``."""

    name: str


CNC101 = CncMachine("CNC-101")
CNC102 = CncMachine("CNC-102")
DEFAULT_CNCS = (CNC101, CNC102)

VARIABLES = ("State", "SpindleSpeed", "PartCount", "Temperature")
"""The variables of every machine, in documentation order."""


def node_id(machine: str, variable: str | None = None) -> str:
    """The string identifier of a machine's object or variable, e.g. ``CNC-101.State``."""
    return machine if variable is None else f"{machine}.{variable}"


class CncModel:
    """A CNC machining centre: a state machine with random dwell times, and its telemetry."""

    DWELL_S: ClassVar[dict[str, tuple[float, float]]] = {
        "Idle": (8.0, 25.0), "Running": (40.0, 150.0), "Fault": (10.0, 30.0)}
    """Seconds a machine stays in a state: uniform between the two bounds."""
    NEXT: ClassVar[dict[str, tuple[tuple[str, ...], tuple[float, ...]]]] = {
        "Idle": (("Running", "Fault"), (0.92, 0.08)),
        "Running": (("Idle", "Fault"), (0.8, 0.2)),
        "Fault": (("Idle",), (1.0,))}
    """The states that can follow a state, and their weights."""
    AMBIENT_C = 28.0
    HOT_C = 22.0
    """How much warmer than ambient the spindle housing settles at full speed."""

    def __init__(self, rng: random.Random, part_count: int | None = None,
                 state: str | None = None) -> None:
        self.rng = rng
        self.part_count = (part_count if part_count is not None
                           else rng.randrange(1_000, 200_000)) % UINT32_WRAP
        self.temperature_c = self.AMBIENT_C + 5.0 + rng.uniform(-1.0, 1.0)
        self.state = "Idle"
        self.remaining_s = 0.0
        self.rated_rpm = 0.0
        self.cycle_s = 5.0
        self.progress = rng.random()
        self.spindle_rpm = 0.0
        self._enter(state if state is not None
                    else rng.choices(("Idle", "Running"), (0.3, 0.7))[0])

    @property
    def state_code(self) -> int:
        return CNC_STATES.index(self.state)

    def _enter(self, state: str) -> None:
        if state not in CNC_STATES:
            raise ValueError(f"unknown CNC state {state!r}; expected one of {CNC_STATES}")
        self.state = state
        low, high = self.DWELL_S[state]
        self.remaining_s = self.rng.uniform(low, high)
        self.rated_rpm = self.rng.choice((8000.0, 9500.0, 10_000.0, 12_000.0))
        self.cycle_s = self.rng.uniform(4.0, 8.0)  # seconds per part of this job

    def step(self, dt_s: float) -> None:
        self.remaining_s -= dt_s
        if self.remaining_s <= 0:
            states, weights = self.NEXT[self.state]
            self._enter(self.rng.choices(states, weights)[0])
        running = self.state == "Running"
        self.spindle_rpm = (max(0.0, self.rated_rpm + self.rng.gauss(0.0, 30.0)) if running
                            else 0.0)
        target = self.AMBIENT_C + self.HOT_C * self.spindle_rpm / SPINDLE_RANGE_RPM[1] * 2
        self.temperature_c += (target - self.temperature_c) * min(1.0, 0.03 * dt_s)
        self.temperature_c += self.rng.gauss(0.0, 0.1) * math.sqrt(dt_s)
        if running:
            self.progress += dt_s / self.cycle_s
            made = int(self.progress)
            self.progress -= made
            self.part_count = (self.part_count + made) % UINT32_WRAP

    def values(self) -> dict[str, int | float]:
        """The machine's variables as the server writes them."""
        return {"State": self.state_code, "SpindleSpeed": round(self.spindle_rpm, 1),
                "PartCount": self.part_count, "Temperature": round(self.temperature_c, 2)}


def _mod(name: str) -> Any:
    """An asyncua module, typed Any (its dynamic parts are not described by its annotations),
    imported on first use (asyncua takes about a second to import)."""
    return importlib.import_module(name)


# --- certificates -----------------------------------------------------------------------------


def ensure_certificate(cert_file: Path, key_file: Path, *, common_name: str,
                       application_uri: str, client: bool, days: int = CERT_DAYS) -> Path:
    """A self-signed OPC UA application instance certificate (RSA 2048, DER) and its key (PEM,
    PKCS#8, mode 0600), generated when either file is missing; returns ``cert_file``.

    ``client`` picks the extended key usage (client or server authentication); the subject
    alternative names are the application URI, the host name, ``localhost`` and 127.0.0.1.
    """
    if cert_file.is_file() and key_file.is_file():
        return cert_file
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID

    cert_gen = _mod("asyncua.crypto.cert_gen")
    key = cert_gen.generate_private_key()
    host = socket.gethostname()
    names: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(application_uri), x509.DNSName(host),
        x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    cert = cert_gen.generate_self_signed_app_certificate(
        key, common_name, {"organizationName": "ACME" if not client else "DigiSpine"},
        names, extended=[usage], days=days)
    key_file.parent.mkdir(parents=True, exist_ok=True)
    cert_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    return cert_file


def _certificates_in(directory: Path) -> set[bytes]:
    """The DER bytes of the certificates (``.der``, ``.pem``, ``.crt``) in ``directory``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    found: set[bytes] = set()
    for entry in sorted(directory.iterdir()) if directory.is_dir() else ():
        if entry.suffix.lower() not in (".der", ".pem", ".crt", ".cer") or not entry.is_file():
            continue
        raw = entry.read_bytes()
        with contextlib.suppress(ValueError):
            cert = (x509.load_pem_x509_certificate(raw) if b"-----BEGIN" in raw
                    else x509.load_der_x509_certificate(raw))
            found.add(cert.public_bytes(serialization.Encoding.DER))
    return found


# --- the server -------------------------------------------------------------------------------


class MachiningServer(ThreadedDevice):
    """Serves the simulated CNC machines over OPC UA on its own thread (and event loop).

    ``start`` returns once the server listens (or raises why it cannot); ``stop`` ends it.
    """

    kind = "the OPC UA server"

    def __init__(self, host: str = "127.0.0.1", port: int = 4840, *, pki_dir: Path,
                 interval_s: float = 1.0, seed: int | None = None,
                 machines: Sequence[CncMachine] = DEFAULT_CNCS,
                 trusted_client_dir: Path | None = None,
                 part_counts: Mapping[str, int] | None = None,
                 states: Mapping[str, str] | None = None) -> None:
        super().__init__(interval_s)
        self.host = host
        self.port = port
        self.pki_dir = pki_dir
        self.trusted_client_dir = trusted_client_dir
        self.machines = tuple(machines)
        rng = random.Random(seed)
        counts, wanted = part_counts or {}, states or {}
        self.models = {m.name: CncModel(rng, counts.get(m.name), wanted.get(m.name))
                       for m in self.machines}
        self.certificate = ensure_certificate(
            pki_dir / "server_cert.der", pki_dir / "server_key.pem", common_name=SERVER_NAME,
            application_uri=APPLICATION_URI, client=False)
        """The server's certificate (DER): what a client puts into its trust list."""
        self.private_key = pki_dir / "server_key.pem"
        self._lock = threading.Lock()
        self._advance: list[float] = []

    @property
    def endpoint(self) -> str:
        return f"opc.tcp://{self.host}:{self.port}"

    @property
    def where(self) -> str:
        return self.endpoint

    def advance(self, seconds: float) -> None:
        """Advance the machines by ``seconds`` of simulated time now and publish the values
        (for tests; the server ticks every ``interval_s`` by itself)."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("the server is not running")
        future = asyncio.run_coroutine_threadsafe(self._tick(seconds), loop)
        future.result(timeout=10)

    # -- internals ----------------------------------------------------------------------------

    async def _serve(self) -> None:
        ua = _mod("asyncua.ua")
        server = _mod("asyncua").Server()
        await server.init()
        server.set_endpoint(f"{self.endpoint}/acme/machining")
        server.set_server_name(SERVER_NAME)
        await server.set_application_uri(APPLICATION_URI)
        server.product_uri = "urn:acme:demo:machining"
        await server.load_certificate(str(self.certificate))
        await server.load_private_key(str(self.private_key))
        server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
                                    ua.SecurityPolicyType.Basic256Sha256_Sign])
        if self.trusted_client_dir is not None:
            server.set_certificate_validator(self._validate_client)
        self._nodes = await self._build(server)
        self._server = server
        await self._tick(0.0)
        async with server:
            await self._serving(self._tick)

    async def _build(self, server: Any) -> dict[tuple[str, str], tuple[Any, Any]]:
        """The address space; returns (machine, variable) -> (node id, variant type)."""
        ua = _mod("asyncua.ua")

        idx = await server.register_namespace(NAMESPACE_URI)
        folder = await server.nodes.objects.add_folder(
            ua.NodeId("Machines", idx), ua.QualifiedName("Machines", idx))
        kinds = {"State": ua.VariantType.Int32, "SpindleSpeed": ua.VariantType.Double,
                 "PartCount": ua.VariantType.UInt32, "Temperature": ua.VariantType.Double}
        nodes: dict[tuple[str, str], tuple[Any, Any]] = {}
        for machine in self.machines:
            obj = await folder.add_object(ua.NodeId(node_id(machine.name), idx),
                                          ua.QualifiedName(machine.name, idx))
            values = self.models[machine.name].values()
            for variable in VARIABLES:
                nid = ua.NodeId(node_id(machine.name, variable), idx)
                var = await obj.add_variable(nid, ua.QualifiedName(variable, idx),
                                             ua.Variant(values[variable], kinds[variable]))
                if variable == "State":
                    await var.add_property(
                        ua.NodeId(f"{nid.Identifier}.EnumStrings", idx),
                        ua.QualifiedName("EnumStrings", 0),
                        ua.Variant([ua.LocalizedText(s) for s in CNC_STATES],
                                   ua.VariantType.LocalizedText))
                elif variable == "SpindleSpeed":
                    await var.add_property(ua.NodeId(f"{nid.Identifier}.EURange", idx),
                                           ua.QualifiedName("EURange", 0),
                                           ua.Range(*SPINDLE_RANGE_RPM))
                nodes[(machine.name, variable)] = (nid, kinds[variable])
        return nodes

    async def _tick(self, dt_s: float) -> None:
        ua = _mod("asyncua.ua")

        now = dt.datetime.now(dt.UTC)
        with self._lock:
            snapshot = {}
            for name, model in self.models.items():
                if dt_s > 0:
                    model.step(dt_s)
                snapshot[name] = model.values()
        for (machine, variable), (nid, kind) in self._nodes.items():
            value = ua.DataValue(ua.Variant(snapshot[machine][variable], kind),
                                 SourceTimestamp=now, ServerTimestamp=now)
            await self._server.write_attribute_value(nid, value)

    async def _validate_client(self, certificate: Any, _description: Any) -> None:
        from cryptography.hazmat.primitives import serialization

        ua = _mod("asyncua.ua")
        ServiceError = _mod("asyncua.common.utils").ServiceError

        assert self.trusted_client_dir is not None
        der = certificate.public_bytes(serialization.Encoding.DER)
        trusted = await asyncio.to_thread(_certificates_in, self.trusted_client_dir)
        if der not in trusted:
            logging.getLogger(__name__).warning(
                "OPC UA demo server: refused an untrusted client certificate (%s); put it into "
                "%s to trust it", certificate.subject.rfc4514_string(), self.trusted_client_dir)
            raise ServiceError(ua.StatusCodes.BadCertificateUntrusted)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gateway.demo.opcua_server``: serve until Ctrl-C (or SIGTERM)."""
    parser = argparse.ArgumentParser(prog="python -m gateway.demo.opcua_server",
                                     description="Serve simulated CNC machines over OPC UA.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    parser.add_argument("--port", type=int, default=4840, help="TCP port (4840)")
    parser.add_argument("--pki-dir", type=Path, default=Path("demo-pki"),
                        help="where the server's certificate and key are kept (./demo-pki)")
    parser.add_argument("--trusted-client-dir", type=Path, default=None,
                        help="accept only client certificates found here (default: any)")
    parser.add_argument("--interval-s", type=float, default=1.0,
                        help="seconds between two updates of the values (1.0)")
    parser.add_argument("--seed", type=int, default=None, help="random seed, for a repeatable run")
    args = parser.parse_args(argv)
    if args.interval_s <= 0:
        parser.error("--interval-s must be positive")
    server = MachiningServer(args.host, args.port, pki_dir=args.pki_dir,
                             interval_s=args.interval_s, seed=args.seed,
                             trusted_client_dir=args.trusted_client_dir)
    server.start()
    names = ", ".join(m.name for m in server.machines)
    print(f"opcua server: {names} at {server.endpoint} (namespace {NAMESPACE_URI}, "
          f"Basic256Sha256; certificate {server.certificate}; Ctrl-C stops)", flush=True)
    try:
        wait_for_interrupt()
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
