"""An example consumer of a DigiSpine gateway's topics: deduplicate by id, detect gaps by sequence.

    python examples/consumer.py --bootstrap kafka1.central:9092 --pattern '^digispine\\..*' \\
        --duration-s 60

It reads every topic matching ``--pattern`` (to detect gaps it must read *all* the topics a
gateway writes: its data topics, ``gateway.*`` status, dead-letter and catalog topics, since one
sequence numbers them all), in both CloudEvents content modes, and for each record:

- **deduplicates** on ``(source, id)``: ids are deterministic, so a record re-sent after an
  outage, or an event produced again from readings a broker redelivered, has the id it had the
  first time. A consumer keeps the keys it saw for as long as a duplicate can arrive (here: the
  newest ``--remember`` keys; a real one would keep them with its own state, e.g. a unique key
  in its database);
- **detects gaps** per ``gatewayid`` in ``sequence`` (the gateway's buffer seq: strictly
  increasing, never reused, one number per event it buffered). Records of different keys sit in
  different partitions, so they arrive interleaved: a missing number is only a gap once every
  partition has moved past it; this example reports the missing numbers between the lowest and
  highest seen when it stops. A sequence lower than one already seen, arriving long after, is a
  duplicate (same id) or, with a new id, a gateway whose buffer was reset (a new epoch).

Prints one JSON line per finding and a summary. Runs with the gateway's own dependencies
(aiokafka).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

STRUCTURED = "application/cloudevents+json"


def attributes(headers: Sequence[tuple[str, bytes]], value: bytes | None) -> dict[str, Any]:
    """The CloudEvents attributes of a Kafka record, binary (``ce_*`` headers) or structured
    (the JSON envelope) content mode."""
    found = {k: v for k, v in headers}
    if found.get("content-type", b"").decode().startswith(STRUCTURED):
        envelope = json.loads(value or b"{}")
        return {k: v for k, v in envelope.items() if k not in ("data", "data_base64")}
    return {k[3:]: v.decode() for k, v in found.items() if k.startswith("ce_")}


@dataclass
class Checker:
    """Duplicates by ``(source, id)`` and gaps by ``(gatewayid, sequence)``."""

    remember: int = 1_000_000
    seen: collections.OrderedDict[tuple[str, str], None] = field(
        default_factory=collections.OrderedDict)
    sequences: dict[str, set[int]] = field(default_factory=dict)
    records: int = 0
    duplicates: int = 0
    without_sequence: int = 0

    def add(self, attrs: dict[str, Any]) -> bool:
        """Take one record's attributes; True if it is new (not a duplicate)."""
        self.records += 1
        gateway, sequence = attrs.get("gatewayid"), attrs.get("sequence")
        if gateway is None or sequence is None:
            self.without_sequence += 1
        else:
            self.sequences.setdefault(str(gateway), set()).add(int(sequence))
        key = (str(attrs.get("source")), str(attrs.get("id")))
        if key in self.seen:
            self.seen.move_to_end(key)
            self.duplicates += 1
            return False
        self.seen[key] = None
        if len(self.seen) > self.remember:
            self.seen.popitem(last=False)
        return True

    def gaps(self) -> dict[str, list[tuple[int, int]]]:
        """Per gateway, the ranges ``(first, last)`` of sequence numbers missing between the
        lowest and the highest seen."""
        out: dict[str, list[tuple[int, int]]] = {}
        for gateway, numbers in self.sequences.items():
            ranges = list(_missing(sorted(numbers)))
            if ranges:
                out[gateway] = ranges
        return out


def _missing(numbers: Iterable[int]) -> Iterable[tuple[int, int]]:
    previous: int | None = None
    for n in numbers:
        if previous is not None and n > previous + 1:
            yield previous + 1, n - 1
        previous = n


async def consume(bootstrap: str, pattern: str, duration_s: float, checker: Checker,
                  from_beginning: bool = True) -> None:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
        auto_offset_reset="earliest" if from_beginning else "latest", metadata_max_age_ms=5000)
    consumer.subscribe(pattern=pattern)
    await consumer.start()
    deadline = time.monotonic() + duration_s
    try:
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                for r in records:
                    attrs = attributes(r.headers, r.value)
                    if not checker.add(attrs):
                        print(json.dumps({"duplicate": {k: attrs.get(k) for k in
                                                        ("id", "source", "type", "sequence")}}))
    finally:
        await consumer.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", default="127.0.0.1:9092", help="Kafka bootstrap server")
    parser.add_argument("--pattern", default=r"^digispine\..*",
                        help="regex of the topics to read (all of the gateway's topics)")
    parser.add_argument("--duration-s", type=float, default=30.0, help="read for this long")
    parser.add_argument("--remember", type=int, default=1_000_000,
                        help="how many (source, id) keys to remember for deduplication")
    args = parser.parse_args(argv)
    checker = Checker(remember=args.remember)
    try:
        asyncio.run(consume(args.bootstrap, args.pattern, args.duration_s, checker))
    except KeyboardInterrupt:
        pass
    gaps = checker.gaps()
    for gateway, ranges in gaps.items():
        for first, last in ranges:
            print(json.dumps({"gap": {"gatewayid": gateway, "first": first, "last": last,
                                      "missing": last - first + 1}}))
    print(json.dumps({"records": checker.records, "duplicates": checker.duplicates,
                      "without_sequence": checker.without_sequence,
                      "gateways": {g: {"lowest": min(s), "highest": max(s), "seen": len(s)}
                                   for g, s in checker.sequences.items()},
                      "gaps": sum(len(r) for r in gaps.values())}), file=sys.stderr)
    return 1 if gaps else 0


if __name__ == "__main__":
    sys.exit(main())
