"""The local runtime's seccomp filter: a classic BPF program that bubblewrap installs
(``--seccomp FD``) just before it runs the sandbox's command.

Its intent is Docker's default profile's, as a deny list: the system calls that reach
kernel surfaces a sandbox has no business with (namespaces, keyrings, mounts, modules,
kexec, BPF, perf, clocks, swap, reboot) fail with EPERM, as do clone()s that
ask for new namespaces; clone3 fails with ENOSYS (its flags are out of a filter's
reach, so the C library falls back to clone). A call of another architecture (x32,
i386 on x86_64) kills the process: the numbers below would not mean the same there.

Built here, without libseccomp: a few dozen instructions of a fixed shape, whose
numbers are the kernel's for x86_64 and aarch64 (the architectures this agent runs
on; elsewhere ``program`` returns None and sandboxes run without it). ptrace stays
allowed, as Docker allows it on kernels from 4.8: a sandbox's own processes are all
it can reach (its own pid namespace), and debuggers work.
"""

from __future__ import annotations

import errno
import os
import platform
import struct
from pathlib import Path

__all__ = ["DENIED", "FILTER_FD", "program", "with_seccomp"]

#: Denied system calls, by name: number on x86_64, number on aarch64 (None: absent).
DENIED: dict[str, tuple[int | None, int | None]] = {
    "acct": (163, 89),
    "add_key": (248, 217),
    "bpf": (321, 280),
    "delete_module": (176, 106),
    "finit_module": (313, 273),
    "init_module": (175, 105),
    "iopl": (172, None),
    "ioperm": (173, None),
    "kexec_file_load": (320, 294),
    "kexec_load": (246, 104),
    "keyctl": (250, 219),
    "lookup_dcookie": (212, 18),
    "mount": (165, 40),
    "move_mount": (429, 429),
    "fsopen": (430, 430),
    "fsmount": (432, 432),
    "open_tree": (428, 428),
    "name_to_handle_at": (303, 264),
    "open_by_handle_at": (304, 265),
    "perf_event_open": (298, 241),
    "pivot_root": (155, 41),
    "quotactl": (179, 60),
    "reboot": (169, 142),
    "request_key": (249, 218),
    "setns": (308, 268),
    "settimeofday": (164, 170),
    "clock_settime": (227, 112),
    "clock_adjtime": (305, 266),
    "adjtimex": (159, 171),
    "swapon": (167, 224),
    "swapoff": (168, 225),
    "syslog": (103, 116),
    "umount2": (166, 39),
    "unshare": (272, 97),
    "userfaultfd": (323, 282),
    "vhangup": (153, 58),
}
_CLONE = (56, 220)
_CLONE3 = (435, 435)
#: clone() flags asking for a namespace: CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC,
#: NEWUSER, NEWPID, NEWNET.
_NS_FLAGS = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000
_NS_FLAGS |= 0x20000000 | 0x40000000
_ARCHES = {"x86_64": (0, 0xC000003E), "aarch64": (1, 0xC00000B7)}
_X32_BIT = 0x40000000

# BPF opcodes (linux/filter.h) and seccomp return values (linux/seccomp.h).
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06
_ALLOW = 0x7FFF0000
_KILL_PROCESS = 0x80000000
_ERRNO = 0x00050000
# Offsets in struct seccomp_data: nr, arch, then args[0]'s low word (little-endian).
_NR, _ARCH, _ARG0_LO = 0, 4, 16


def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def program(machine: str | None = None) -> bytes | None:
    """The filter as ``struct sock_filter[]`` bytes, for ``machine`` (default: this
    one's); None on an architecture it has no numbers for."""
    found = _ARCHES.get(machine or platform.machine())
    if found is None:
        return None
    column, audit_arch = found
    denied = sorted({nr for pair in DENIED.values() if (nr := pair[column]) is not None})
    eperm, enosys = _ERRNO | errno.EPERM, _ERRNO | errno.ENOSYS
    out = [
        _insn(_LD_W_ABS, _ARCH),
        _insn(_JEQ_K, audit_arch, jt=1),
        _insn(_RET_K, _KILL_PROCESS),
        _insn(_LD_W_ABS, _NR),
    ]
    if column == 0:  # x32 system calls carry a bit of their own
        out += [_insn(_JGE_K, _X32_BIT, jf=1), _insn(_RET_K, _KILL_PROCESS)]
    for nr in denied:
        out += [_insn(_JEQ_K, nr, jf=1), _insn(_RET_K, eperm)]
    out += [_insn(_JEQ_K, _CLONE3[column], jf=1), _insn(_RET_K, enosys)]
    out += [
        _insn(_JEQ_K, _CLONE[column], jf=3),
        _insn(_LD_W_ABS, _ARG0_LO),
        _insn(_JSET_K, _NS_FLAGS, jf=1),
        _insn(_RET_K, eperm),
        _insn(_RET_K, _ALLOW),
    ]
    return b"".join(out)


#: Where the shell that starts bubblewrap opens the filter (inherited by bwrap).
FILTER_FD = 9


def with_seccomp(bwrap_argv: list[str], home: Path) -> list[str]:
    """``bwrap_argv`` run with the filter: written to ``home`` (the sandbox's own
    directory, removed with it) and opened on ``FILTER_FD`` by a shell that then execs
    bubblewrap. A shell rather than an inherited descriptor: every way the local
    runtime starts a process (posix_spawn, a parked process) runs an argv alone.
    Unchanged (no filter) on an architecture ``program`` has no numbers for; set
    AVIATO_LOCAL_SECCOMP=0 to turn it off."""
    code = program()
    if code is None or os.environ.get("AVIATO_LOCAL_SECCOMP") == "0":
        return bwrap_argv
    path = home / "seccomp.bpf"
    path.write_bytes(code)
    opener = f'exec {FILTER_FD}<"$0" && exec "$@"'
    return [
        "/bin/sh",
        "-c",
        opener,
        str(path),
        bwrap_argv[0],
        "--seccomp",
        str(FILTER_FD),
        *bwrap_argv[1:],
    ]
