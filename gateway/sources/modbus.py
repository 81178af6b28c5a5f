"""Modbus source (pymodbus). This version holds the connection settings only: the source itself
(tables, data layouts, coalesced polling, fault isolation) is issue #6, and the daemon refuses a
mapping that binds a signal to a Modbus connection until then.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from gateway.configbase import Strict


class ModbusConnectionConfig(Strict):
    """A Modbus TCP device or gateway."""

    protocol: Literal["modbus"]
    host: str = Field(examples=["10.0.3.17"])
    """Host name or address of the device."""
    port: int = Field(default=502, ge=1, le=65535)
    """TCP port (502 by convention)."""
    timeout_ms: int = Field(default=1000, ge=10)
    """How long to wait for one response."""
