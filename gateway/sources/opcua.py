"""OPC UA source (asyncua). This version holds the connection settings only: the source itself
(subscriptions, namespace URIs, security, reconnect) is issue #5, and the daemon refuses a mapping
that binds a signal to an OPC UA connection until then.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr

from gateway.configbase import Strict


class OpcUaConnectionConfig(Strict):
    """An OPC UA server."""

    protocol: Literal["opcua"]
    endpoint: str = Field(pattern=r"^opc\.tcp://", examples=["opc.tcp://10.0.3.21:4840"])
    """Endpoint URL of the server."""
    username: str | None = None
    """User name for user-token authentication."""
    password: SecretStr | None = None
    """Password; from the environment or a credentials file."""
