"""Run a command under the unit's seccomp settings, without systemd (a check for developers and CI).

systemd cannot run here, so this applies the two settings of ``digispine-gateway.service`` that a
Python dependency can trip over at run time, the way systemd 252 implements them (libseccomp):

- ``MemoryDenyWriteExecute=yes``: ``mmap`` with PROT_WRITE|PROT_EXEC, ``mprotect`` and
  ``pkey_mprotect`` with PROT_EXEC, ``shmat`` with SHM_EXEC fail with EPERM (a cffi
  ``ffi.callback`` would, for instance; ctypes callbacks and the gateway's dependencies do not);
- ``SystemCallFilter=``: the allow-list built from the unit's lines (``@system-service`` minus
  ``~@privileged @resources``), groups expanded by ``systemd-analyze syscall-filter``. Anything
  else raises SIGSYS here (``--action trap``, the default), stricter than the unit's
  ``SystemCallErrorNumber=EPERM``, so that a forbidden call shows up as a crash, not a quirk.

Usage::

    python systemd/sandbox_exec.py [--unit systemd/digispine-gateway.service] -- CMD [ARG...]

Run it as a non-root user (or under ``unshare --user --map-user=65534 --map-group=65534``): the
service never runs as uid 0, and some libraries take other paths as root (SQLite calls
``fchown``, which ``~@privileged`` forbids, only as root). tests/test_systemd_unit.py runs the
gateway this way.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import subprocess
import sys
from pathlib import Path

UNIT = Path(__file__).with_name("digispine-gateway.service")

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_TRAP = 0x00030000
SCMP_ACT_ERRNO_EPERM = 0x00050000 | 1
SCMP_CMP_MASKED_EQ = 7
PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000
PR_SET_NO_NEW_PRIVS = 38


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


def unit_settings(unit: Path) -> tuple[list[str], bool]:
    """The ``SystemCallFilter=`` values in order and whether ``MemoryDenyWriteExecute=yes``."""
    filters: list[str] = []
    mdwe = False
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if line.startswith("SystemCallFilter="):
            value = line.partition("=")[2].strip()
            if value:
                filters.append(value)
            else:
                filters.clear()
        elif line.startswith("MemoryDenyWriteExecute="):
            mdwe = line.partition("=")[2].strip().lower() in ("yes", "true", "1", "on")
    return filters, mdwe


def syscall_groups() -> dict[str, list[str]]:
    """``@group`` -> its members (syscalls and nested groups), from systemd-analyze."""
    text = subprocess.run(["systemd-analyze", "syscall-filter"], check=True,
                          capture_output=True, text=True).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif current is not None and line.strip() and not line.strip().startswith("#"):
            current.append(line.strip())
    return groups


def allowed_syscalls(filters: list[str], groups: dict[str, list[str]]) -> set[str]:
    """The allow-list systemd builds: the first line allows (plus @default), ``~`` lines remove."""
    def expand(name: str) -> set[str]:
        if not name.startswith("@"):
            return {name}
        out: set[str] = set()
        for member in groups[name]:
            out |= expand(member)
        return out

    if not filters or filters[0].startswith("~"):
        raise SystemExit("sandbox_exec: the unit has no allow-list SystemCallFilter= line")
    allowed = expand("@default")
    for value in filters:
        deny = value.startswith("~")
        names = set().union(*(expand(n) for n in value.lstrip("~").split()))
        allowed = allowed - names if deny else allowed | names
    return allowed


def apply(filters: list[str], mdwe: bool, action: int) -> int:
    """Load the filters into this process (they stay across execve); returns the allow-list size."""
    lib = ctypes.CDLL(ctypes.util.find_library("seccomp") or "libseccomp.so.2")
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(_ArgCmp)]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]

    contexts = []
    if mdwe:
        ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
        for name, arg, mask in (("mmap", 2, PROT_WRITE | PROT_EXEC), ("mprotect", 2, PROT_EXEC),
                                ("pkey_mprotect", 2, PROT_EXEC), ("shmat", 2, SHM_EXEC)):
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            cmp = (_ArgCmp * 1)(_ArgCmp(arg, SCMP_CMP_MASKED_EQ, mask, mask))
            if nr >= 0 and lib.seccomp_rule_add_array(ctx, SCMP_ACT_ERRNO_EPERM, nr, 1, cmp):
                raise SystemExit(f"sandbox_exec: cannot add the {name} rule")
        contexts.append(ctx)
    allowed = allowed_syscalls(filters, syscall_groups()) if filters else set()
    count = 0
    if filters:
        ctx = lib.seccomp_init(action)
        for name in sorted(allowed):
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr < 0:
                continue  # not a syscall of this architecture
            if lib.seccomp_rule_add_array(ctx, SCMP_ACT_ALLOW, nr, 0, None):
                raise SystemExit(f"sandbox_exec: cannot allow {name}")
            count += 1
        contexts.append(ctx)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0):
        raise SystemExit("sandbox_exec: prctl(PR_SET_NO_NEW_PRIVS) failed")
    for ctx in contexts:
        if lib.seccomp_load(ctx):
            raise SystemExit("sandbox_exec: seccomp_load failed")
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--unit", type=Path, default=UNIT)
    parser.add_argument("--action", choices=("trap", "eperm"), default="trap",
                        help="what a call outside the allow-list gets (default: SIGSYS)")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command")
    filters, mdwe = unit_settings(args.unit)
    action = SCMP_ACT_TRAP if args.action == "trap" else SCMP_ACT_ERRNO_EPERM
    count = apply(filters, mdwe, action)
    print(f"sandbox_exec: MemoryDenyWriteExecute={'yes' if mdwe else 'no'}, "
          f"{count} syscalls allowed ({' '.join(filters)})", file=sys.stderr)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
