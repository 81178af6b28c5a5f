"""Protocol sources: one module per protocol (``mqtt`` today; ``opcua`` and ``modbus`` next)."""
