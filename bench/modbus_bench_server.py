"""The Modbus TCP server of bench/bench_modbus.py, run as a subprocess (its CPU is not the
clients').

    python -m bench.modbus_bench_server --port 5020 --units 10 --registers 400

A pymodbus ``ModbusTcpServer`` simulating units (device ids) 1..``--units``, each with holding
registers 0..``--registers``-1 holding fixed values (register i of unit u: ``(u * 1000 + i) &
0xFFFF``) and a few coils, discrete inputs and input registers. Its ``trace_pdu`` counts every
request it receives and the registers asked for.

Protocol on stdout, one line each: ``READY <port>`` once it serves, then every second
``STATS <monotonic> <requests> <registers> <cpu_s>`` (cumulative; the monotonic clock is the
machine's, comparable with the benchmark's). Ends on SIGTERM / SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time
from typing import Any

from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice


class Counter:
    def __init__(self) -> None:
        self.requests = 0
        self.registers = 0

    def trace(self, sending: bool, pdu: Any) -> Any:
        if not sending:
            self.requests += 1
            self.registers += max(int(getattr(pdu, "count", 0) or 0), 0)
        return pdu


async def main_async(args: argparse.Namespace) -> None:
    counter = Counter()
    devices = [SimDevice(u, simdata=(
        [SimData(0, values=[False] * 16, datatype=DataType.BITS)],
        [SimData(0, values=[False] * 16, datatype=DataType.BITS)],
        [SimData(0, values=[(u * 1000 + i) & 0xFFFF for i in range(args.registers)],
                 datatype=DataType.REGISTERS)],
        [SimData(0, count=16, values=0, datatype=DataType.REGISTERS)],
    )) for u in range(1, args.units + 1)]
    server = ModbusTcpServer(devices, address=("127.0.0.1", args.port), trace_pdu=counter.trace)
    await server.serve_forever(background=True)
    print(f"READY {args.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def stats() -> None:
        while True:
            await asyncio.sleep(1.0)
            print(f"STATS {time.monotonic():.6f} {counter.requests} {counter.registers} "
                  f"{time.process_time():.6f}", flush=True)

    task = asyncio.create_task(stats())
    await stop.wait()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    with contextlib.suppress(Exception):
        await asyncio.wait_for(server.shutdown(), 5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--units", type=int, default=10)
    parser.add_argument("--registers", type=int, default=400,
                        help="holding registers per unit (0..n-1)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)  # frame dumps of closed links
    asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
