"""The ``digispine-gateway`` command line.

Commands: ``run`` (the service), ``validate`` (config and mappings, every finding located, exit
78), ``catalog`` (the event types the mappings emit, with topics and contracts, as JSON or as an
AsyncAPI 3.0 document), ``contract check --against REF`` (contract changes that break consumers
without a new major version; exit 1), ``demo`` (a simulated shop floor, local brokers and the gateway, events shown as they arrive
in Kafka), ``buffer stats|inspect|export`` (the disk buffer, read-only, also while ``run`` runs;
exit 66 when there is no buffer file, 73 when the file is not a readable gateway buffer),
``version``. Errors reach the user as located lines, never as tracebacks.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from gateway import __version__
from gateway.errors import EX_CONFIG, BufferError, ConfigError

if TYPE_CHECKING:
    from gateway.mapping.loader import MappingFile
    from gateway.model import Signal
    from gateway.settings import GatewaySettings


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except ConfigError as exc:
        _print_findings(exc)
        return EX_CONFIG
    except BufferError as exc:
        print(f"digispine-gateway: buffer: {exc}", file=sys.stderr)
        return 73  # EX_CANTCREAT
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `digispine-gateway demo | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="digispine-gateway",
        description="DigiSpine Edge Gateway: shop-floor signals to DomainEvents in Kafka.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def config_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("-c", "--config", metavar="PATH",
                       help="config file (default: $DIGISPINE_CONFIG, ./config/gateway.yaml, "
                            "/etc/digispine-gateway/gateway.yaml)")

    run = sub.add_parser("run", help="run the gateway (the systemd service's ExecStart)")
    config_arg(run)
    run.add_argument("--log-format", choices=["auto", "console", "json"],
                     help="override logging.format")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                     help="override logging.level")
    run.add_argument("--record", metavar="FILE",
                     help="append every reading the sources deliver to FILE (JSON lines) "
                          "for `replay`")
    run.set_defaults(func=_run)

    val = sub.add_parser("validate", help="check the config and every mapping file; exit 78 on errors")
    config_arg(val)
    val.add_argument("--plan", action="store_true",
                     help="also print the Modbus reads each connection will make (coalesced)")
    val.set_defaults(func=_validate)

    demo = sub.add_parser("demo", help="simulated shop floor + local MQTT and Kafka brokers + the gateway")
    config_arg(demo)
    demo.add_argument("--duration-s", type=float, default=None,
                      help="stop after this many seconds (default: until Ctrl-C)")
    demo.add_argument("--interval-s", type=float, default=1.0,
                      help="seconds between simulated readings per machine")
    demo.set_defaults(func=_demo)

    rep = sub.add_parser("replay", help="feed a recorded trace through the mappings; print the events")
    config_arg(rep)
    rep.add_argument("trace", metavar="FILE", help="JSON lines written by `run --record`")
    rep.set_defaults(func=_replay)

    test = sub.add_parser("test", help="run the inline test cases of mapping files (no network)")
    config_arg(test)
    test.add_argument("paths", nargs="*", metavar="PATH",
                      help="mapping files or directories (default: the configured mappings)")
    test.set_defaults(func=_test)

    cat = sub.add_parser("catalog", help="print every event type the mappings can emit "
                                         "(topic, subjects, contract), as JSON or AsyncAPI 3.0")
    config_arg(cat)
    cat.add_argument("--format", choices=["json", "asyncapi"], default="json",
                     help="json (default): one object per event type; asyncapi: an AsyncAPI "
                          "3.0.0 document (JSON) of the topics, keys, headers and payloads")
    cat.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    cat.set_defaults(func=_catalog)

    contract = sub.add_parser("contract", help="event type contracts: check compatibility")
    contract_sub = contract.add_subparsers(dest="action", metavar="ACTION", required=True)
    check = contract_sub.add_parser(
        "check", help="compare the contracts with a previous version; exit 1 on a breaking "
                      "change without a new major version",
        description="Compare the contracts of the mapping directory (or --dir) with a previous "
                    "version: a directory, or a git ref (tag, branch, commit) of the repository "
                    "holding them. One located line per finding; exit 1 on errors (a breaking "
                    "change, a compatible change without a higher minor), else 0.")
    config_arg(check)
    check.add_argument("--against", required=True, metavar="REF",
                       help="the previous version: a directory or a git ref")
    check.add_argument("--dir", metavar="PATH",
                       help="the contracts directory (or mapping directory) to check; default: "
                            "the configured mapping directory's contracts/")
    check.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    check.set_defaults(func=_contract_check)

    schema = sub.add_parser("schema", help="print the JSON Schema of mapping files or of the config")
    schema.add_argument("which", choices=["mapping", "config"])
    schema.set_defaults(func=_schema)

    buf = sub.add_parser(
        "buffer", help="look into the disk buffer, read-only (safe while the gateway runs)",
        description="Read the disk buffer without locking or writing it, while the gateway runs "
                    "or not. Exit 66: no buffer file; 73: not a readable gateway buffer.")
    buf_sub = buf.add_subparsers(dest="action", metavar="ACTION", required=True)

    def buffer_args(p: argparse.ArgumentParser) -> None:
        config_arg(p)
        p.add_argument("--dir", metavar="PATH",
                       help="buffer directory (or buffer file) to read instead of the config's "
                            "buffer.directory")

    def selection_args(p: argparse.ArgumentParser, limit: int | None) -> None:
        p.add_argument("--type", action="append", metavar="TYPE",
                       help="only this event type (a glob such as 'production.*'; repeatable)")
        p.add_argument("--subject", action="append", metavar="SUBJECT",
                       help="only this subject (a glob; repeatable)")
        p.add_argument("--from-seq", type=int, metavar="SEQ", help="only events with seq >= SEQ")
        p.add_argument("--limit", type=int, default=limit, metavar="N",
                       help=f"at most N events (default: {limit}; 0: all)" if limit
                       else "at most N events (default: all)")
        p.add_argument("--tail", action="store_true",
                       help="the newest N events instead of the oldest")

    b_stats = buf_sub.add_parser("stats", help="depth, bytes, oldest event and its age, "
                                               "per-type and per-priority counts, the drops "
                                               "not yet reported, size on disk")
    buffer_args(b_stats)
    b_stats.add_argument("--json", action="store_true", help="print JSON")
    b_stats.add_argument("--by-subject", action="store_true", help="also count per subject")
    b_inspect = buf_sub.add_parser("inspect", help="list buffered events (seq, type, subject, "
                                                   "time, id, size)")
    buffer_args(b_inspect)
    selection_args(b_inspect, 20)
    b_inspect.add_argument("--body", action="store_true", help="also print each event's JSON")
    b_export = buf_sub.add_parser("export", help="write buffered events as JSON lines (one "
                                                 "CloudEvent per line, as stored)")
    buffer_args(b_export)
    selection_args(b_export, None)
    b_export.add_argument("-o", "--output", metavar="FILE",
                          help="write to FILE (default: stdout); the count goes to stderr")
    b_export.add_argument("--with-seq", action="store_true",
                          help='write {"seq": N, "event": {...}} per line')
    buf.set_defaults(func=_buffer)

    # Protocol helpers for engineers writing mappings: each module adds its own commands and
    # imports its protocol library only when run.
    from gateway.sources import modbus_probe, opcua_browse, opcua_pki

    opcua_browse.register(sub, config_arg)
    opcua_pki.register(sub, config_arg)
    modbus_probe.register(sub, config_arg)

    ver = sub.add_parser("version", help="print the version")
    ver.set_defaults(func=lambda _: print(f"digispine-gateway {__version__}") or 0)
    return parser


def _load(config: str | None) -> tuple[GatewaySettings, list[MappingFile], Path]:
    from gateway.mapping.loader import load_mappings
    from gateway.security import plaintext_errors
    from gateway.settings import find_config, load_settings

    path = find_config(config)
    settings = load_settings(path)
    refused = plaintext_errors(settings, path)
    if refused:
        raise ConfigError(refused)
    protocols = {name: conn.protocol for name, conn in settings.connections.items()}
    files = load_mappings(settings.mappings.directory, protocols)
    return settings, files, path


def _run(args: argparse.Namespace) -> int:
    from gateway import logs
    from gateway.app.daemon import run_loop, serve
    from gateway.security import config_warnings

    settings, files, path = _load(args.config)
    log_cfg = settings.logging
    logs.configure(args.log_level or log_cfg.level, args.log_format or log_cfg.format)
    log = logs.get("daemon")
    log.info("config.loaded", path=str(path), mapping_files=len(files))
    for warning in config_warnings(settings, path):
        log.warning("config.warning", finding=str(warning))
    record = Path(args.record) if args.record else None
    run_loop(serve(settings, files, record=record))
    return 0


def _validate(args: argparse.Namespace) -> int:
    from gateway.security import config_warnings

    settings, files, path = _load(args.config)
    signals = sum(len(f.spec.signals) for f in files)
    events = sum(len(f.spec.events) for f in files)
    for warning in config_warnings(settings, path):
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{path}: ok")
    for f in files:
        print(f"{f.path}: ok ({len(f.spec.signals)} signals, {len(f.spec.events)} events)")
    print(f"valid: {len(files)} mapping file(s), {signals} signal(s), {events} event(s)")
    if args.plan:
        return _print_plans(settings, files)
    return 0


def _print_plans(settings: GatewaySettings, files: list[MappingFile]) -> int:
    """The coalesced Modbus reads per connection (what ``run`` will ask the devices); exit
    78 when a value cannot be read in one request."""
    from gateway.mapping.engine import Mapper
    from gateway.sources.modbus import ModbusConnectionConfig, describe_plan, plan

    bindings = Mapper(files, settings.gateway.id).bindings()
    shown = 0
    for name, addresses in sorted(bindings.items()):
        conn = settings.connections.get(name)
        if isinstance(conn, ModbusConnectionConfig):
            try:
                print(describe_plan(name, plan(addresses, conn)))
            except ValueError as exc:
                print(f"digispine-gateway: connections.{name}: {exc}", file=sys.stderr)
                return EX_CONFIG
            shown += 1
    if not shown:
        print("plan: no Modbus connection is read by the mapping files")
    return 0


def _replay(args: argparse.Namespace) -> int:
    from gateway import trace
    from gateway.mapping.engine import Mapper

    settings, files, _ = _load(args.config)
    mapper = Mapper(files, settings.gateway.id)  # the same ids as live
    signals = events = 0

    def counted() -> Iterator[Signal]:
        nonlocal signals
        for s in trace.read(Path(args.trace)):
            signals += 1
            yield s

    out = sys.stdout.buffer
    for line in trace.replay(counted(), mapper):
        events += 1
        out.write(line + b"\n")
    out.flush()
    print(trace.summary(signals, events, mapper.unmatched), file=sys.stderr)
    return 0


def _test(args: argparse.Namespace) -> int:
    from gateway.mapping.cases import run_cases
    from gateway.mapping.loader import load_mappings
    from gateway.settings import find_config, load_settings

    if args.paths:  # connections still come from the config: files are checked as `run` would
        settings = load_settings(find_config(args.config))
        protocols = {name: conn.protocol for name, conn in settings.connections.items()}
        files: list[MappingFile] = []
        for raw in args.paths:
            path = Path(raw).resolve()
            folder = path if path.is_dir() else path.parent
            files.extend(f for f in load_mappings(folder, protocols)
                         if path.is_dir() or f.path.resolve() == path)
    else:
        _, files, _ = _load(args.config)
    results = run_cases(files)
    for r in results:
        print(f"{'PASS' if r.passed else 'FAIL'}  {r.file.name}: {r.name}")
        for problem in r.problems:
            print(f"      {problem}")
    failed = sum(not r.passed for r in results)
    untested = [f.path.name for f in files if not f.spec.tests]
    if untested:
        print(f"note: no test cases in {', '.join(untested)}")
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


def _catalog(args: argparse.Namespace) -> int:
    import json

    from gateway.catalog import asyncapi_document, catalog_entries

    settings, files, _ = _load(args.config)
    document = (asyncapi_document(settings, files) if args.format == "asyncapi"
                else catalog_entries(settings, files))
    text = json.dumps(document, indent=2) + "\n"
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


def _contract_check(args: argparse.Namespace) -> int:
    from gateway.mapping import compat
    from gateway.mapping.loader import CONTRACTS_DIRECTORY

    if args.dir:
        current = Path(args.dir)
        if (current / CONTRACTS_DIRECTORY).is_dir():
            current = current / CONTRACTS_DIRECTORY
    else:
        from gateway.settings import find_config, load_settings

        settings = load_settings(find_config(args.config))
        current = Path(settings.mappings.directory) / CONTRACTS_DIRECTORY
    new = compat.load(current)
    with compat.previous(args.against, current) as before:
        old = compat.load(before)
    report = compat.check(old, new)
    for line in report.errors:
        print(f"error: {line}")
    if not args.quiet:
        for line in report.warnings:
            print(f"warning: {line}")
        for line in report.notes:
            print(f"note: {line}")
    print(f"contract check against {args.against}: {len(new)} contract(s), "
          f"{len(report.errors)} error(s), {len(report.warnings)} warning(s)",
          file=sys.stderr)
    return 0 if report.ok else 1


def _buffer(args: argparse.Namespace) -> int:
    from gateway.buffer import tools

    if args.dir:
        location = Path(args.dir)
    else:
        from gateway.settings import find_config, load_settings

        location = load_settings(find_config(args.config)).buffer.directory
    return tools.command(args, location)


def _schema(args: argparse.Namespace) -> int:
    from gateway import schemas

    print(schemas.render(schemas.SCHEMAS[args.which]()), end="")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from gateway.demo.stack import run_demo

    return run_demo(args.config, duration_s=args.duration_s, interval_s=args.interval_s)


def _print_findings(exc: ConfigError) -> None:
    n = len(exc.findings)
    for finding in exc.findings:
        print(f"error: {finding}", file=sys.stderr)
    print(f"{n} error{'s' if n != 1 else ''}: fix the file(s) above and run "
          f"`digispine-gateway validate` again", file=sys.stderr)
