"""The gateway's exceptions, one tree, translated where third-party errors enter our code.

::

    GatewayError
    ├── ConfigError              a human must fix a file or a variable; exit 78 (EX_CONFIG)
    │                            carries every Finding at once, each located (file:line:col)
    ├── SourceUnavailable        temporary: the peer is unreachable; the supervisor retries
    ├── SinkUnavailable          temporary: Kafka is unreachable; the buffer absorbs it
    └── BufferError              the on-disk buffer cannot be opened or written
"""

from __future__ import annotations

from dataclasses import dataclass

EX_CONFIG = 78
"""sysexits.h EX_CONFIG: systemd's ``RestartPreventExitStatus=78`` keeps a bad config from looping."""


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem in one file, located as precisely as the input allows."""

    file: str
    line: int | None
    column: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        path = f" {self.path}:" if self.path else ""
        return f"{where}{path} {self.message}"


class GatewayError(Exception):
    """Root of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """A configuration or mapping file (or an environment override) is invalid."""

    def __init__(self, findings: list[Finding]) -> None:
        self.findings = findings
        super().__init__("\n".join(str(f) for f in findings))


class SourceUnavailable(GatewayError):
    """A source lost (or could not reach) its peer; retrying later may succeed."""


class SinkUnavailable(GatewayError):
    """The sink (Kafka) is unreachable or refused a batch; the buffer keeps the events."""


class BufferError(GatewayError):
    """The on-disk buffer cannot be opened, recovered or written."""
