"""``digispine-gateway browse``: an OPC UA server's address space, for writing mappings.

``browse CONNECTION [PATH_OR_NODE] [--depth N] [--skeleton FILE|-] [--subject S] [--json]``
connects as the gateway does (the connection's endpoint, security policy and mode, user, the
gateway's certificate and its trust list: :meth:`gateway.sources.opcua._Session.open` with
nothing to subscribe) and
lists the nodes below the start node (default: the Objects folder; a browse path such as
``Objects/Machines/CNC-101``, or a node id ``nsu=...;s=...``/``ns=2;i=5``) to ``--depth``
levels: browse name, node class, node id written with its namespace URI (``nsu=``, never a bare
index, as mappings need it), data type, access (``r``/``w`` for this user) and, for variables,
the current value.

Round trips: one Browse per tree level (as many nodes per request as the server's
MaxNodesPerBrowse allows, continuation points fetched together), one Read for the attributes of
all variables (DataType, ValueRank, AccessLevel, UserAccessLevel, Value; split by
MaxNodesPerRead, halved when the server refuses a read as too large), and one Browse per level
of data type inheritance for data types that are not built in. A folder of 1,000 variables
is a handful of requests.

``--skeleton FILE`` (``-``: stdout) writes a mapping file for the subtree: the asset subject
(``--subject``, else derived from the site and the browse path), one signal per scalar variable
(node by URI, the signal type its data type suggests, snake_case names from the browse names,
unique), an example ``on_change`` event, and the schema modeline of ``mappings/*.yaml``. It
loads with :func:`gateway.mapping.loader.load_mappings` as written. Properties of variables
(EURange, EngineeringUnits...), arrays, structures and unreadable variables are listed as
comments rather than mapped.

Exit codes: 0 done, 64 bad arguments, 65 no variable for a skeleton, 66 no such start node,
69 the server cannot be used (unreachable, untrusted certificate, refused user: one line
naming the connection and what to do), 73 the skeleton file exists (``--force``) or cannot be
written, 78 a config error.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from gateway.sources.opcua_pki import CliError, Target, cli_logging, fail, resolve_target

if TYPE_CHECKING:
    from gateway.model import Signal
    from gateway.sources.opcua import _Session

EX_DATAERR = 65
EX_NOINPUT = 66
EX_UNAVAILABLE = 69
EX_CANTCREAT = 73

# Built-in and abstract standard data types (namespace 0, numeric ids): name, signal type.
# None: not a scalar a signal can carry (structures, data values, diagnostics); BaseDataType
# and Number take the type of the current value.
_BASE_TYPES: dict[int, tuple[str, str | None]] = {
    1: ("Boolean", "boolean"), 2: ("SByte", "integer"), 3: ("Byte", "integer"),
    4: ("Int16", "integer"), 5: ("UInt16", "integer"), 6: ("Int32", "integer"),
    7: ("UInt32", "integer"), 8: ("Int64", "integer"), 9: ("UInt64", "integer"),
    10: ("Float", "float"), 11: ("Double", "float"), 12: ("String", "string"),
    13: ("DateTime", "string"), 14: ("Guid", "string"), 15: ("ByteString", "string"),
    16: ("XmlElement", "string"), 17: ("NodeId", "string"), 18: ("ExpandedNodeId", "string"),
    19: ("StatusCode", "integer"), 20: ("QualifiedName", "string"),
    21: ("LocalizedText", "string"), 22: ("Structure", None), 23: ("DataValue", None),
    24: ("BaseDataType", None), 25: ("DiagnosticInfo", None), 26: ("Number", "float"),
    27: ("Integer", "integer"), 28: ("UInteger", "integer"), 29: ("Enumeration", "integer"),
    50: ("Decimal", "float"),
}
_FROM_VALUE = {24, 26}
"""Data types whose signal type is taken from the current value (any type, any number)."""
_SUPERTYPE_LEVELS = 16
_RESERVED = {"true", "false", "null"}
"""Names YAML would read as something other than a string."""
_VALUE_WIDTH = 40
_NAME_WIDTH = 44


@dataclass(slots=True)
class Entry:
    """One node of the listing."""

    depth: int
    path: str
    """Browse path from the start (``Objects/Machines/CNC-101/State`` from Objects)."""
    names: tuple[str, ...]
    """Browse names from the start node (exclusive) to this node."""
    browse_name: str
    browse_namespace: str | None
    node_class: str
    node_id: str
    """Canonical node id with the namespace URI (``nsu=...;s=...``; ``i=2258`` in ns 0)."""
    reference: str
    """Reference from the parent: Organizes, HasComponent, HasProperty..."""
    parent_class: str
    raw: Any = None
    """The server's ``ua.NodeId``."""
    repeated: bool = False
    """Reached before by another reference: listed, not expanded again."""
    data_type: str | None = None
    data_type_id: Any = None
    array: bool = False
    signal_type: str | None = None
    enum: dict[int, str] | None = None
    """The labels of an enumeration data type, by code."""
    access: str | None = None
    value: Any = None
    status: str | None = None
    children: list[Entry] = field(default_factory=list)

    @property
    def is_variable(self) -> bool:
        return self.node_class == "Variable"

    @property
    def is_property(self) -> bool:
        return self.reference == "HasProperty"

    def as_json(self) -> dict[str, Any]:
        return {
            "path": self.path, "depth": self.depth, "browse_name": self.browse_name,
            "browse_namespace": self.browse_namespace, "node_class": self.node_class,
            "node_id": self.node_id, "reference": self.reference, "data_type": self.data_type,
            "array": self.array if self.is_variable else None,
            "signal_type": self.signal_type,
            "enum": {str(k): v for k, v in self.enum.items()} if self.enum else None,
            "access": self.access, "value": self.value,
            "status": self.status, "repeated": self.repeated,
        }


@dataclass(slots=True)
class Listing:
    start: Entry
    entries: list[Entry]
    """Depth-first, in the server's order."""
    truncated: bool
    requests: dict[str, int]


# --- the command ------------------------------------------------------------------------------


def register(sub: Any, config_arg: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``browse`` to the CLI's subparsers."""
    p = sub.add_parser(
        "browse", help="list an OPC UA server's address space (node ids with namespace URIs, "
                       "data types, access, values); write a mapping skeleton",
        description="Connect to an OPC UA connection of the config as the gateway does (same "
                    "security, user and trust list) and list the nodes below a start node. "
                    "Exit 66: no such start node; 69: the server cannot be used (one line says "
                    "why and what to do); 73: the skeleton file exists or cannot be written.")
    config_arg(p)
    p.add_argument("connection", metavar="CONNECTION", help="an OPC UA connection of the config")
    p.add_argument("start", nargs="?", metavar="PATH_OR_NODE",
                   help="where to start: a browse path (Objects/Machines/CNC-101) or a node id "
                        "(nsu=urn:acme:machines;s=CNC-101, ns=2;i=5); default: Objects")
    p.add_argument("--depth", type=int, default=1, metavar="N",
                   help="levels below the start node to list (default: 1, the children)")
    p.add_argument("--skeleton", metavar="FILE",
                   help="write a mapping file skeleton for the listed variables to FILE "
                        "('-': stdout, instead of the listing)")
    p.add_argument("--force", action="store_true", help="overwrite an existing skeleton FILE")
    p.add_argument("--subject", metavar="SUBJECT",
                   help="asset subject of the skeleton (default: the site and the browse path)")
    p.add_argument("--json", action="store_true", help="print the listing as JSON")
    p.add_argument("--max-nodes", type=int, default=5000, metavar="N",
                   help="stop descending after N nodes (default: 5000)")
    p.set_defaults(func=_command)


def _command(args: argparse.Namespace) -> int:
    import asyncio

    from gateway.errors import SourceUnavailable

    try:
        if args.depth < 0:
            raise CliError("--depth takes 0 (the start node only) or more")
        if args.max_nodes < 1:
            raise CliError("--max-nodes takes 1 or more")
        if args.skeleton == "-" and args.json:
            raise CliError("--skeleton - writes the skeleton to stdout; --json cannot go there "
                           "too (give --skeleton a file)")
        if args.subject is not None:
            from gateway.mapping.spec import SUBJECT_PATTERN

            if not re.fullmatch(SUBJECT_PATTERN, args.subject):
                raise CliError(f"--subject {args.subject!r}: expected a slash-separated asset "
                               f"path such as acme/plant1/machining/cnc101")
        with cli_logging():
            target = resolve_target(args.config, args.connection)
            out = Path(args.skeleton) if args.skeleton not in (None, "-") else None
            if out is not None and out.exists() and not args.force:
                raise CliError(f"{out} exists; give another file or --force to overwrite it",
                               EX_CANTCREAT)
            try:
                listing = asyncio.run(browse(target, args.start, args.depth, args.max_nodes))
            except SourceUnavailable as exc:
                raise CliError(_with_hint(str(exc), target), EX_UNAVAILABLE) from None
    except CliError as exc:
        fail(str(exc))
        return exc.code
    if args.skeleton is not None:
        try:
            text = skeleton(listing, target, args.subject, _invocation(args))
        except CliError as exc:
            fail(str(exc))
            return exc.code
        if args.skeleton == "-":
            sys.stdout.write(text)
            return 0
        try:
            Path(args.skeleton).write_text(text, encoding="utf-8")
        except OSError as exc:
            fail(f"cannot write {args.skeleton}: {exc.strerror or exc}")
            return EX_CANTCREAT
    if args.json:
        print(json.dumps({"connection": target.name, "endpoint": target.config.endpoint,
                          "start": listing.start.as_json(), "truncated": listing.truncated,
                          "nodes": [e.as_json() for e in listing.entries]}, indent=2,
                         ensure_ascii=False, default=str))
    else:
        print(render(listing, target))
    if args.skeleton is not None:
        mapped = sum(1 for e in listing.entries if _mappable(e) is None)
        print(f"wrote {args.skeleton}: {mapped} signal(s); check it with `digispine-gateway "
              f"validate`", file=sys.stderr)
    return 0


def _with_hint(message: str, target: Target) -> str:
    """The source's one line, plus the command that does what it asks."""
    thumb = re.search(r"SHA-1 ([0-9a-f]{40})", message)
    if thumb and "is not trusted" in message:
        return (f"{message}, or run: digispine-gateway opcua-cert trust {thumb[1][:16]} "
                f"{target.name}")
    if "trust the gateway's certificate" in message:
        return f"{message} (`digispine-gateway opcua-cert show {target.name}` prints it)"
    return message


def _invocation(args: argparse.Namespace) -> str:
    import shlex

    parts = ["digispine-gateway", "browse", args.connection]
    if args.start:
        parts.append(args.start)
    return shlex.join([*parts, "--depth", str(args.depth)])


# --- browsing ---------------------------------------------------------------------------------


async def browse(target: Target, start: str | None, depth: int, max_nodes: int) -> Listing:
    """Connect as the daemon does, list the tree below ``start``, read the variables."""
    from gateway.sources.opcua import _Lost

    session = await _connect(target)
    try:
        try:
            return await _Browser(session, target).run(start, depth, max_nodes)
        except _Lost as exc:
            raise session.fail(str(exc)) from None
    finally:
        await session.close()


async def _connect(target: Target) -> _Session:
    """A session opened by :meth:`_Session.open` itself (client settings, security and trust
    checks, user token, error lines, NamespaceArray and OperationLimits), with nothing to
    resolve, subscribe or poll."""
    from gateway.metrics import Metrics
    from gateway.sources.opcua import OpcUaAddress, OpcUaSource, _Session

    class BrowseSession(_Session):
        namespaces: list[str]

        async def _resolve(self, namespaces: list[str]) -> list[Signal]:
            self.namespaces = namespaces
            return []

        async def _subscribe(self) -> int:
            return 0

        def _start_polls(self) -> int:
            return 0

    source = OpcUaSource(target.name, target.config, [OpcUaAddress(node="i=2258")], Metrics(),
                         pki_dir=target.pki, application_uri=target.application_uri)
    source._warned_insecure = True  # security None: the listing's header says so

    async def emit(_: Any) -> None:  # nothing is subscribed or polled
        return None

    session = BrowseSession(source, emit)
    try:
        await session.open()
    except BaseException:
        await session.close()
        raise
    return session


class _Browser:
    def __init__(self, session: _Session, target: Target) -> None:
        from gateway.sources.opcua import _mod

        self.session = session
        self.target = target
        self.ua = _mod("asyncua.ua")
        self.namespaces: list[str] = []
        self.requests = {"browse": 0, "read": 0}

    async def run(self, start: str | None, depth: int, max_nodes: int) -> Listing:
        self.namespaces = list(getattr(self.session, "namespaces", []))
        root = await self._start(start)
        truncated = await self._walk(root, depth, max_nodes)
        entries = list(_flatten(root.children))
        await self._read_variables([e for e in entries if e.is_variable and not e.repeated])
        return Listing(root, entries, truncated, self.requests)

    # -- the start node ------------------------------------------------------------------------

    async def _start(self, start: str | None) -> Entry:
        from gateway.sources.opcua import (
            PATH_ROOT,
            STANDARD_NAMESPACE,
            _node_id,
            parse_browse_path,
            parse_node_id,
        )

        ua = self.ua
        objects = ua.NodeId(ua.ObjectIds.ObjectsFolder)
        root = Entry(0, PATH_ROOT, (), PATH_ROOT, None, "Object", "i=85", "", "", objects)
        text = (start or PATH_ROOT).strip()
        if text in (PATH_ROOT, PATH_ROOT + "/"):
            return root
        if text.startswith(PATH_ROOT + "/"):
            try:
                segments = parse_browse_path(text.rstrip("/"))
            except ValueError as exc:
                raise CliError(str(exc)) from None
            node = root
            for i, segment in enumerate(segments):
                where = "/".join([PATH_ROOT, *(str(s) for s in segments[:i])])
                ns = None
                if segment.namespace_uri is not None:
                    if segment.namespace_uri not in self.namespaces:
                        raise CliError(f"namespace {segment.namespace_uri} is not in the "
                                       f"server's NamespaceArray ({', '.join(self.namespaces)})",
                                       EX_NOINPUT)
                    ns = self.namespaces.index(segment.namespace_uri)
                (refs,) = await self._browse([node.raw])
                matches = [r for r in refs if r.BrowseName.Name == segment.name
                           and (ns is None or r.BrowseName.NamespaceIndex == ns)]
                distinct = {self._key(r.NodeId) for r in matches}
                if not distinct:
                    names = sorted({str(r.BrowseName.Name) for r in refs})
                    shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
                    raise CliError(f"{where} has no child '{segment}' (its children: "
                                   f"{shown or 'none'})", EX_NOINPUT)
                if len(distinct) > 1:
                    uris = sorted({self._uri(r.BrowseName.NamespaceIndex) or STANDARD_NAMESPACE
                                   for r in matches})
                    raise CliError(f"{where} has several children '{segment.name}' (namespaces "
                                   f"{', '.join(uris)}); qualify the segment as "
                                   f"<uri>:{segment.name}", EX_NOINPUT)
                node = self._entry(matches[0], node, 0)
            node.path = "/".join([PATH_ROOT, *(str(s) for s in segments)])
            node.names = ()
            return node
        try:
            ref = parse_node_id(text)
        except ValueError as exc:
            if "=" not in text:
                raise CliError(f"{text!r}: a browse path starts at the Objects folder "
                               f"({PATH_ROOT}/{text.strip('/')}), a node id names its "
                               f"namespace (nsu=urn:acme:machines;s=CNC-101)") from None
            raise CliError(f"{exc}; or a browse path such as Objects/Machines") from None
        if ref.namespace_uri is not None:
            if ref.namespace_uri not in self.namespaces:
                raise CliError(f"namespace {ref.namespace_uri} is not in the server's "
                               f"NamespaceArray ({', '.join(self.namespaces)})", EX_NOINPUT)
            ns = self.namespaces.index(ref.namespace_uri)
        else:
            ns = ref.namespace_index or 0
        raw = _node_id(ua, ref, ns)
        name_dv, class_dv = await self._read([(raw, ua.AttributeIds.BrowseName),
                                              (raw, ua.AttributeIds.NodeClass)])
        if not _good(name_dv) or not _good(class_dv):
            code = (name_dv if not _good(name_dv) else class_dv).StatusCode
            raise CliError(f"the server has no node {text} ({_status(code)})", EX_NOINPUT)
        name = name_dv.Value.Value
        node_class = ua.NodeClass(int(class_dv.Value.Value)).name
        return Entry(0, str(name.Name), (), str(name.Name), self._uri(name.NamespaceIndex),
                     node_class, self._canonical(raw), "", "", raw)

    # -- the tree ------------------------------------------------------------------------------

    async def _walk(self, root: Entry, depth: int, max_nodes: int) -> bool:
        """Fill ``children`` level by level; True when stopped by ``max_nodes``."""
        seen = {self._key(root.raw)}
        frontier = [root] if depth > 0 else []
        count = 0
        level = 1
        while frontier:
            results = await self._browse([e.raw for e in frontier])
            following: list[Entry] = []
            for parent, refs in zip(frontier, results, strict=True):
                for r in refs:
                    child = self._entry(r, parent, level)
                    key = self._key(r.NodeId)
                    if key in seen:
                        child.repeated = True
                    else:
                        seen.add(key)
                        following.append(child)
                    parent.children.append(child)
                    count += 1
            if count >= max_nodes and following and level < depth:
                return True
            frontier = following if level < depth else []
            level += 1
        return False

    def _entry(self, r: Any, parent: Entry, depth: int) -> Entry:
        name = str(r.BrowseName.Name)
        return Entry(
            depth=depth, path=f"{parent.path}/{name}", names=(*parent.names, name),
            browse_name=name, browse_namespace=self._uri(r.BrowseName.NamespaceIndex),
            node_class=self.ua.NodeClass(int(r.NodeClass)).name,
            node_id=self._canonical(r.NodeId), reference=self._reference(r.ReferenceTypeId),
            parent_class=parent.node_class, raw=self._key(r.NodeId))

    async def _browse(self, nodes: Sequence[Any], what: str = "children") -> list[list[Any]]:
        """The references of each node: ``children`` (hierarchical, forward), ``supertype``
        (HasSubtype, inverse) or ``properties`` (HasProperty, forward); in requests of at most
        MaxNodesPerBrowse, continuation points followed together."""
        from gateway.sources.opcua import _chunks

        ua = self.ua
        out: list[list[Any]] = []
        for chunk in _chunks(list(nodes), self.session.limits.nodes_per_browse):
            params = ua.BrowseParameters()
            params.RequestedMaxReferencesPerNode = 0
            for node in chunk:
                desc = ua.BrowseDescription()
                desc.NodeId = node
                desc.BrowseDirection = (ua.BrowseDirection.Inverse if what == "supertype"
                                        else ua.BrowseDirection.Forward)
                desc.ReferenceTypeId = ua.NodeId({
                    "children": ua.ObjectIds.HierarchicalReferences,
                    "supertype": ua.ObjectIds.HasSubtype,
                    "properties": ua.ObjectIds.HasProperty}[what])
                desc.IncludeSubtypes = True
                desc.NodeClassMask = 0
                desc.ResultMask = int(ua.BrowseResultMask.All)
                params.NodesToBrowse.append(desc)
            self.requests["browse"] += 1
            results = await self.session._call(self.session.client.uaclient.browse(params),
                                               "browsing")
            refs = [list(r.References or []) if _good(r) else [] for r in results]
            points = {i: r.ContinuationPoint for i, r in enumerate(results)
                      if _good(r) and r.ContinuationPoint}
            while points:
                more = ua.BrowseNextParameters()
                more.ReleaseContinuationPoints = False
                more.ContinuationPoints = list(points.values())
                self.requests["browse"] += 1
                nexts = await self.session._call(
                    self.session.client.uaclient.browse_next(more), "browsing")
                following = {}
                for i, nxt in zip(list(points), nexts, strict=True):
                    if _good(nxt):
                        refs[i] += list(nxt.References or [])
                        if nxt.ContinuationPoint:
                            following[i] = nxt.ContinuationPoint
                points = following
            out += refs
        return out

    # -- reading -------------------------------------------------------------------------------

    async def _read(self, requests: Sequence[tuple[Any, Any]]) -> list[Any]:
        """Attribute values in reads of at most MaxNodesPerRead (halved while the server
        refuses a read as too large)."""
        from gateway.sources.opcua import _is_ua_error, _Lost, _status_of, _within

        ua = self.ua
        out: list[Any] = []
        start = 0
        while start < len(requests):
            batch = requests[start:start + self.session.limits.nodes_per_read]
            params = ua.ReadParameters()
            params.MaxAge = 0
            params.TimestampsToReturn = ua.TimestampsToReturn.Neither
            params.NodesToRead = [ua.ReadValueId(NodeId=n, AttributeId=a) for n, a in batch]
            self.requests["read"] += 1
            try:
                results = await _within(self.session.client.uaclient.read(params),
                                        self.target.config.request_timeout_s * 2)
            except Exception as exc:
                if _status_of(exc) == "BadTooManyOperations" and len(batch) > 1:
                    self.session.limits.nodes_per_read = len(batch) // 2
                    continue
                if isinstance(exc, (OSError, TimeoutError)) or _is_ua_error(exc):
                    raise _Lost(self.session.explain(exc, "reading attributes")) from None
                raise
            out += results
            start += len(batch)
        return out

    async def _read_variables(self, variables: list[Entry]) -> None:
        from gateway.sources.opcua import _plain

        ua = self.ua
        attributes = (ua.AttributeIds.DataType, ua.AttributeIds.ValueRank,
                      ua.AttributeIds.AccessLevel, ua.AttributeIds.UserAccessLevel,
                      ua.AttributeIds.Value)
        values = await self._read([(e.raw, a) for e in variables for a in attributes])
        for i, entry in enumerate(variables):
            dtype, rank, access, user, value = values[i * 5:i * 5 + 5]
            if _good(dtype):
                entry.data_type_id = dtype.Value.Value
            rank_n = int(rank.Value.Value) if _good(rank) else -1
            if _good(access):
                bits = int(access.Value.Value) & (int(user.Value.Value) if _good(user) else 0xFF)
                entry.access = ("r" if bits & 1 else "-") + ("w" if bits & 2 else "-")
            if _good(value):
                raw = value.Value.Value if value.Value is not None else None
                entry.value = _plain(raw)
                entry.array = rank_n >= 0 or isinstance(raw, (list, tuple))
            else:
                entry.status = _status(value.StatusCode)
                entry.array = rank_n >= 0
        names = await self._data_types({e.data_type_id for e in variables
                                        if e.data_type_id is not None})
        enums = [t for t, (_, _, is_enum) in names.items() if is_enum]
        labels = await self._enum_labels(enums) if enums else {}
        for entry in variables:
            if entry.data_type_id is None:
                continue
            name, kind, _ = names.get(entry.data_type_id,
                                      (self._canonical(entry.data_type_id), None, False))
            entry.data_type = name + ("[]" if entry.array else "")
            if kind == "value":
                kind = _kind_of_value(entry.value)
            entry.signal_type = None if entry.array else kind
            entry.enum = labels.get(entry.data_type_id) if kind == "integer" else None

    async def _data_types(self, ids: Iterable[Any]) -> dict[Any, tuple[str, str | None, bool]]:
        """Data type node id -> (name, signal type or ``value`` (from the value), whether it is
        an enumeration with labels to look up); a type that is not built in is resolved
        through its supertypes to one that is (an enumeration is an integer, a structure
        nothing)."""
        ua = self.ua
        ids = list(ids)
        out: dict[Any, tuple[str, str | None, bool]] = {}
        names: dict[Any, str] = {}
        unnamed = []
        for i in ids:
            base = _base(i)
            if base is not None:
                names[i] = base[0]
            elif i.NamespaceIndex == 0 and isinstance(i.Identifier, int) \
                    and i.Identifier in ua.ObjectIdNames:
                names[i] = str(ua.ObjectIdNames[i.Identifier])
            else:
                unnamed.append(i)
        if unnamed:
            for i, dv in zip(unnamed, await self._read(
                    [(i, ua.AttributeIds.BrowseName) for i in unnamed]), strict=True):
                names[i] = str(dv.Value.Value.Name) if _good(dv) else self._canonical(i)
        current = {i: i for i in ids}
        for _ in range(_SUPERTYPE_LEVELS):
            pending = {}
            for orig, cur in current.items():
                base = _base(cur)
                if base is not None:
                    kind = "value" if cur.Identifier in _FROM_VALUE else base[1]
                    out[orig] = (names[orig], kind, _base(orig) is None and cur.Identifier == 29)
                else:
                    pending[orig] = cur
            if not pending:
                break
            parents = list({self._key(c): c for c in pending.values()}.values())
            results = await self._browse(parents, "supertype")
            supertype = {self._key(p): (self._key(refs[0].NodeId) if refs else None)
                         for p, refs in zip(parents, results, strict=True)}
            current = {}
            for orig, cur in pending.items():
                up = supertype.get(self._key(cur))
                if up is None:
                    out[orig] = (names[orig], None, False)
                else:
                    current[orig] = up
        for orig in current:
            out.setdefault(orig, (names[orig], None, False))
        return out

    async def _enum_labels(self, types: list[Any]) -> dict[Any, dict[int, str]]:
        """Code -> label of enumeration data types: from the DataTypeDefinition attribute
        (OPC UA 1.04), else from the type's EnumStrings or EnumValues property."""
        ua = self.ua
        out: dict[Any, dict[int, str]] = {}
        missing = []
        definitions = await self._read([(t, ua.AttributeIds.DataTypeDefinition) for t in types])
        for t, dv in zip(types, definitions, strict=True):
            fields = getattr(dv.Value.Value if _good(dv) and dv.Value else None, "Fields", None)
            labels = {int(f.Value): str(f.Name) for f in fields or () if f.Name}
            if labels:
                out[t] = labels
            else:
                missing.append(t)
        if not missing:
            return out
        wanted = [(t, str(r.BrowseName.Name), self._key(r.NodeId))
                  for t, refs in zip(missing, await self._browse(missing, "properties"),
                                     strict=True)
                  for r in refs if r.BrowseName.Name in ("EnumStrings", "EnumValues")]
        values = await self._read([(n, ua.AttributeIds.Value) for _, _, n in wanted])
        for (t, kind, _), dv in zip(wanted, values, strict=True):
            items = dv.Value.Value if _good(dv) and dv.Value is not None else None
            if not isinstance(items, list) or t in out:
                continue
            if kind == "EnumStrings":
                labels = {i: str(getattr(lt, "Text", lt) or "") for i, lt in enumerate(items)}
            else:
                labels = {int(ev.Value): str(getattr(ev.DisplayName, "Text", "") or "")
                          for ev in items}
            labels = {code: label for code, label in labels.items() if label.strip()}
            if labels:
                out[t] = labels
        return out

    # -- node ids ------------------------------------------------------------------------------

    def _key(self, node: Any) -> Any:
        from gateway.sources.opcua import _plain_node_id

        return _plain_node_id(node)

    def _uri(self, index: int) -> str | None:
        if index == 0:
            return None
        return self.namespaces[index] if index < len(self.namespaces) else f"ns={index}"

    def _canonical(self, node: Any) -> str:
        """``nsu=<uri>;s=...`` (``i=2258`` in namespace 0; ``ns=<n>;...`` only for an index
        the NamespaceArray does not have)."""
        import base64

        from gateway.sources.opcua import NodeRef

        ua = self.ua
        kind_of: dict[Any, Literal["i", "s", "g", "b"]] = {ua.NodeIdType.TwoByte: "i", ua.NodeIdType.FourByte: "i",
                   ua.NodeIdType.Numeric: "i", ua.NodeIdType.String: "s",
                   ua.NodeIdType.Guid: "g", ua.NodeIdType.ByteString: "b"}
        kind = kind_of[node.NodeIdType]
        ident = node.Identifier
        text = (base64.b64encode(bytes(ident)).decode("ascii") if kind == "b" else str(ident))
        ns = int(node.NamespaceIndex)
        uri = getattr(node, "NamespaceUri", None) or None
        if uri is None and 0 < ns < len(self.namespaces):
            uri = self.namespaces[ns]
        if uri is not None:
            return NodeRef(kind, text, str(uri), None).canonical
        return NodeRef(kind, text, None, ns).canonical

    def _reference(self, ref_type: Any) -> str:
        ua = self.ua
        if ref_type.NamespaceIndex == 0 and isinstance(ref_type.Identifier, int):
            return str(ua.ObjectIdNames.get(ref_type.Identifier, ref_type.Identifier))
        return self._canonical(ref_type)


def _base(node: Any) -> tuple[str, str | None] | None:
    if node.NamespaceIndex == 0 and isinstance(node.Identifier, int):
        return _BASE_TYPES.get(node.Identifier)
    return None


def _good(result: Any) -> bool:
    code = result.StatusCode
    return code is None or bool(code.is_good())


def _status(code: Any) -> str:
    from gateway.sources.opcua import status_name

    return status_name(int(code.value)) if code is not None else "Good"


def _kind_of_value(value: Any) -> str | None:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    return None


def _flatten(entries: list[Entry]) -> Iterable[Entry]:
    for e in entries:
        yield e
        yield from _flatten(e.children)


# --- output -----------------------------------------------------------------------------------


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= _VALUE_WIDTH else text[:_VALUE_WIDTH - 3] + "..."


def render(listing: Listing, target: Target) -> str:
    """The indented tree: name, class, data type, access, node id, value."""
    start = listing.start
    cfg = target.config
    security = ("None (insecure)" if cfg.security_policy == "None"
                else f"{cfg.security_policy}/{cfg.security_mode}")
    lines = [f"{target.name} ({cfg.endpoint}, {security}): {start.path}  {start.node_class}  "
             f"{start.node_id}"]
    rows = []
    for e in listing.entries:
        name = "  " * e.depth + e.browse_name
        kind = "Property" if e.is_variable and e.is_property else e.node_class
        dtype = e.data_type or ("" if not e.is_variable else "?")
        access = e.access or ""
        if e.repeated:
            tail = "(listed above)"
        elif e.is_variable:
            tail = f"= {_short(e.value)}" if e.status is None else f"({e.status})"
        else:
            tail = ""
        rows.append((name, kind, dtype, access, e.node_id, tail))
    if rows:
        widths = [min(_NAME_WIDTH, max(len(r[i]) for r in rows)) for i in range(4)]
        for r in rows:
            cells = [r[i].ljust(widths[i]) for i in range(4)]
            lines.append("  ".join([*cells, r[4], r[5]]).rstrip())
    variables = sum(1 for e in listing.entries if e.is_variable and not e.repeated)
    summary = f"{len(listing.entries)} node(s), {variables} variable(s)"
    if listing.truncated:
        summary += " (stopped descending at --max-nodes; start deeper or raise it)"
    elif not listing.entries:
        summary += " (nothing below the start node to this depth)"
    lines.append(summary)
    return "\n".join(lines)


def _mappable(e: Entry) -> str | None:
    """None when the entry becomes a signal of a skeleton, else why not."""
    if not e.is_variable or e.repeated:
        return "not a variable"
    if e.is_property and e.parent_class == "Variable":
        return "a property of a variable"
    if e.access is not None and "r" not in e.access:
        return "not readable"
    if e.array:
        return "an array"
    if e.signal_type is None:
        return "not a scalar a signal can carry"
    return None


def _snake(text: str) -> str:
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    words = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", ascii_text)
    words = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", words)
    return re.sub(r"[^a-z0-9]+", "_", words.lower()).strip("_")


def signal_names(entries: Sequence[Entry]) -> list[str]:
    """snake_case names from the browse names below the start node, unique (``_2``...)."""
    out: list[str] = []
    taken: set[str] = set()
    for e in entries:
        name = "_".join(part for part in (_snake(n) for n in e.names) if part) or "signal"
        if not name[0].isalpha():
            name = f"v_{name}"
        if name in _RESERVED:
            name += "_value"
        name = name[:60].rstrip("_")
        unique, n = name, 2
        while unique in taken:
            unique, n = f"{name}_{n}", n + 1
        taken.add(unique)
        out.append(unique)
    return out


def _segment(text: str) -> str:
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    cleaned = re.sub(r"[^a-z0-9._-]+", "-", ascii_text.lower())
    return re.sub(r"^[^a-z0-9]+", "", cleaned).rstrip("-")


def derive_subject(listing: Listing, target: Target) -> str:
    """The site (``gateway.site``) and the start node's browse path, as a subject."""
    path = listing.start.path.split("/")
    if path and path[0] == "Objects":
        path = path[1:]
    parts = [_segment(re.sub(r"^<[^>]*>:", "", p)) for p in path]
    parts = [p for p in parts if p] or [_segment(target.name.replace("_", "-")) or "asset"]
    site = [_segment(p) for p in (target.settings.gateway.site or "").split("/")]
    return "/".join([*(s for s in site if s), *parts])


def skeleton(listing: Listing, target: Target, subject: str | None, invocation: str) -> str:
    """A mapping file for the listed variables (see the module docstring)."""
    chosen = [e for e in listing.entries if _mappable(e) is None]
    left = [(e, why) for e in listing.entries if e.is_variable and not e.repeated
            and (why := _mappable(e)) is not None]
    if not chosen:
        raise CliError(f"no variable a signal can read below {listing.start.path} to depth "
                       f"{max((e.depth for e in listing.entries), default=0)}; try a larger "
                       f"--depth or another start node", EX_DATAERR)
    names = signal_names(chosen)
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    lines = [
        "# yaml-language-server: $schema=./mapping.schema.json",
        f"# Written on {today} by:",
        f"#   {invocation} --skeleton FILE",
        f"# ({target.config.endpoint}): one signal per variable below {listing.start.path},",
        "# typed by its OPC UA data type. Check the subject, the names and the types, delete what",
        "# is not needed, and replace the example event with the asset's events (docs/mapping.md);",
        "# `digispine-gateway validate` checks the file.",
        "version: 1",
        "",
        "asset:",
        f"  subject: {json.dumps(subject or derive_subject(listing, target))}",
        "",
        "signals:",
    ]
    for name, e in zip(names, chosen, strict=True):
        lines += [
            f"  {name}:  # {e.path} ({e.data_type}, {e.access or '?'})",
            f"    connection: {target.name}",
            f"    opcua: {{node: {json.dumps(e.node_id, ensure_ascii=False)}}}",
            f"    type: {e.signal_type}",
        ]
        if e.enum:
            codes = ", ".join(f"{code}: {json.dumps(label, ensure_ascii=False)}"
                              for code, label in sorted(e.enum.items()))
            lines.append(f"    enum: {{{codes}}}")
    if left:
        lines.append("  # not mapped:")
        lines += [f"  #   {e.path} ({e.data_type or '?'}): {why}" for e, why in left]
    first = names[0]
    lines += [
        "",
        "events:",
        f"  # An example to start from: an event whenever {first} changes. Give it the event",
        "  # type (<domain>.<EventName>.v<major>) and data you need, or another trigger",
        "  # (transition, edge, counter, threshold, quality, periodic, window, condition).",
        f"  {first}_changed:",
        "    type: example.ValueChanged.v1",
        f"    trigger: {{kind: on_change, signal: {first}}}",
        "    data:",
        f"      {first}: {{signal: {first}}}",
        "",
    ]
    return "\n".join(lines)
