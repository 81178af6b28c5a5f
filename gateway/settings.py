"""Gateway settings: ``config/gateway.yaml`` plus ``DIGISPINE_*`` environment overrides and secrets.

Precedence, highest first:

1. environment variables ``DIGISPINE_<SECTION>__<KEY>`` (``__`` descends one level, e.g.
   ``DIGISPINE_KAFKA__BOOTSTRAP_SERVERS='["k1:9092"]'``,
   ``DIGISPINE_CONNECTIONS__PLANT_MQTT__PASSWORD=...``);
2. credential files named the same way (case-insensitive) in ``$CREDENTIALS_DIRECTORY`` (systemd
   ``LoadCredential=``) or the directory named by ``DIGISPINE_SECRETS_DIR``;
3. the YAML file: ``--config``, else ``$DIGISPINE_CONFIG``, else ``config/gateway.yaml`` in the
   working directory, else ``/etc/digispine-gateway/gateway.yaml``.

Relative paths in the file (mappings, buffer directory) are relative to the file's directory.
Unknown keys are errors, wherever they come from; every error is reported at once, located.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from gateway import yamlfile
from gateway.buffer.disk import BufferConfig
from gateway.configbase import Strict
from gateway.errors import ConfigError, Finding
from gateway.sinks.kafka import KafkaConfig
from gateway.sources.modbus import ModbusConnectionConfig
from gateway.sources.mqtt import MqttConnectionConfig
from gateway.sources.opcua import OpcUaConnectionConfig

ENV_PREFIX = "DIGISPINE_"
CONFIG_ENV = "DIGISPINE_CONFIG"
SECRETS_DIR_ENV = "DIGISPINE_SECRETS_DIR"
DEFAULT_PATHS = (Path("config/gateway.yaml"), Path("/etc/digispine-gateway/gateway.yaml"))
_NOT_SETTINGS = {CONFIG_ENV, SECRETS_DIR_ENV, "DIGISPINE_TEST_KAFKA_BOOTSTRAP"}

NAME = r"^[a-z][a-z0-9_]{0,62}$"


class GatewayIdentity(Strict):
    """Who this gateway is, as the central platform sees it."""

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$", examples=["edge-press-hall-01"])
    """Stable gateway id: part of every event's ``source`` and of MQTT client ids. Never reuse
    one id on two machines."""
    site: str | None = Field(default=None, examples=["acme/plant1"])
    """Optional site path, for humans and the catalog."""


class LoggingConfig(Strict):
    """Log output. Lines go to stderr (journald and Docker collect them)."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    """Lowest level written."""
    format: Literal["auto", "console", "json"] = "auto"
    """``auto``: human-readable on a terminal, one JSON object per line otherwise."""
    stats_interval_s: float = Field(default=60.0, ge=0)
    """Seconds between one-line throughput summaries; 0 turns them off."""


class MappingsConfig(Strict):
    """Where the mapping files are."""

    directory: Path = Field(default=Path("mappings"), examples=["../mappings", "/etc/digispine-gateway/mappings"])
    """Directory of ``*.yaml`` mapping files (relative to this file's directory)."""
    watch_interval_s: float = Field(default=0.0, ge=0, examples=[0, 2])
    """Reload the mappings by themselves when a file in the directory (or its ``contracts/``)
    changes, checking this often; 0 (the default) reloads only on SIGHUP
    (``systemctl reload``). A change is applied once the files stopped changing for one
    interval; a broken file is rejected like on SIGHUP, and the running mappings stay."""


class HealthConfig(Strict):
    """The HTTP endpoint for health checks and Prometheus metrics."""

    listen: str | None = Field(default="127.0.0.1:8311", examples=["127.0.0.1:8311", "0.0.0.0:8311"])
    """``host:port`` serving ``/healthz``, ``/readyz`` and ``/metrics``; null turns it off.
    Keep it on localhost unless a monitoring agent elsewhere must scrape it."""
    heartbeat_interval_s: float = Field(default=60.0, ge=0, examples=[60, 300])
    """Seconds between ``gateway.Heartbeat.v1`` events sent to Kafka (version, uptime, buffer,
    connection states, config and mapping hashes); 0 sends none."""
    connection_events: bool = True
    """Send a ``gateway.ConnectionStateChanged.v1`` event when a connection goes down or comes
    back (once per outage, like the log lines)."""
    ready_kafka_grace_s: float = Field(default=60.0, ge=0)
    """``/readyz`` reports not ready once Kafka has been unreachable this long (the buffer
    absorbs shorter outages)."""


Connection = Annotated[
    MqttConnectionConfig | OpcUaConnectionConfig | ModbusConnectionConfig,
    Field(discriminator="protocol"),
]


class GatewaySettings(BaseSettings):
    """The whole gateway configuration."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
    )

    gateway: GatewayIdentity
    """Identity of this gateway."""
    connections: dict[Annotated[str, Field(pattern=NAME)], Connection] = Field(default_factory=dict)
    """Named connections to shop-floor peers; mapping files refer to them by name."""
    kafka: KafkaConfig = Field(default_factory=KafkaConfig)
    """The central Kafka cluster."""
    buffer: BufferConfig = Field(default_factory=BufferConfig)
    """The durable on-disk buffer."""
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    """Log output."""
    mappings: MappingsConfig = Field(default_factory=MappingsConfig)
    """Mapping files."""
    health: HealthConfig = Field(default_factory=HealthConfig)
    """Health and metrics endpoint."""

    @field_validator("connections", mode="before")
    @classmethod
    def _lower_names(cls, value: Any) -> Any:
        # Environment variable names are case-insensitive; connection names are lower case.
        if isinstance(value, dict):
            return {k.lower() if isinstance(k, str) else k: v for k, v in value.items()}
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (env_settings, _CredentialFiles(settings_cls), init_settings)


class _CredentialFiles(EnvSettingsSource):
    """Credential files read as if they were environment variables (name = file name)."""

    def _load_env_vars(self) -> dict[str, str | None]:
        folder = os.environ.get(SECRETS_DIR_ENV) or os.environ.get("CREDENTIALS_DIRECTORY")
        out: dict[str, str | None] = {}
        if not folder or not Path(folder).is_dir():
            return out
        for entry in sorted(Path(folder).iterdir()):
            if entry.is_file() and entry.name.upper().startswith(ENV_PREFIX):
                out[entry.name.lower()] = entry.read_text(encoding="utf-8").rstrip("\n")
        return out


def find_config(explicit: str | os.PathLike[str] | None) -> Path:
    """The config file to use (see the module docstring for the order)."""
    if explicit:
        return Path(explicit)
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV])
    for candidate in DEFAULT_PATHS:
        if candidate.exists():
            return candidate
    return DEFAULT_PATHS[0]


def load_settings(path: Path) -> GatewaySettings:
    """Read, override and validate; raise :class:`ConfigError` with every located finding."""
    data, located = yamlfile.load(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([located.finding([], "expected a mapping of sections (gateway, connections, kafka, ...)")])
    findings = _unknown_environment()
    try:
        settings = GatewaySettings(**data)
    except ValidationError as exc:
        findings += _locate(exc, located, data)
        raise ConfigError(findings) from None
    if findings:
        raise ConfigError(findings)
    return _resolve_paths(settings, path.parent)


def _unknown_environment() -> list[Finding]:
    """DIGISPINE_* variables that name no section are typos: say so rather than ignore them."""
    sections = set(GatewaySettings.model_fields)
    out = []
    for name in sorted(os.environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in _NOT_SETTINGS:
            continue
        section = upper.removeprefix(ENV_PREFIX).split("__", 1)[0].lower()
        if section not in sections:
            out.append(Finding("environment", None, None, name,
                               f"unknown setting; expected DIGISPINE_<{'|'.join(sorted(sections)).upper()}>__..."))
    return out


def _locate(exc: ValidationError, located: yamlfile.Located, data: dict[str, Any]) -> list[Finding]:
    out = []
    for err in exc.errors(include_url=False):
        loc, message, at_value = yamlfile.normalize(err)
        loc = _without_tags(data, loc)
        env = ENV_PREFIX + "__".join(str(p) for p in loc).upper()
        from_env = any(name.upper() == env for name in os.environ)
        if not from_env and (_present(data, loc) or err["type"] == "missing"):
            out.append(located.finding(loc, message, at_value=at_value))
        else:
            out.append(Finding("environment", None, None, env, message))
    return out


def _without_tags(data: Any, loc: list[str | int]) -> list[str | int]:
    """The location without the discriminator pydantic inserts for a tagged union
    (``connections.plant_mqtt.mqtt.port`` -> ``connections.plant_mqtt.port``): a key that
    is not in the data but is the node's ``protocol``."""
    out: list[str | int] = []
    node = data
    for key in loc:
        if isinstance(node, dict) and key not in node and node.get("protocol") == key:
            continue
        out.append(key)
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            node = None
    return out


def _present(data: Any, loc: list[str | int]) -> bool:
    node = data
    for key in loc:
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            return False
    return True


def _resolve_paths(settings: GatewaySettings, base: Path) -> GatewaySettings:
    def resolve(p: Path) -> Path:
        return p if p.is_absolute() else (base / p).resolve()

    return settings.model_copy(
        update={
            "mappings": settings.mappings.model_copy(update={"directory": resolve(settings.mappings.directory)}),
            "buffer": settings.buffer.model_copy(update={"directory": resolve(settings.buffer.directory)}),
        }
    )
