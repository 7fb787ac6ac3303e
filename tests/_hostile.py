"""Hostile programs run inside a sandbox, each found blocked or allowed (issue 16): the
rows of the README's "what a sandbox can and cannot do" table. Used by
tests/test_hostile.py (each cell asserted) and benchmarks/hostile.py (the table)."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field

from aviato import Sandbox, SandboxDefaults
from aviato.exceptions import AviatoError, SandboxTimeoutError

#: The probes run in one exec; argv[1] is JSON: host_pid, host_file, host, port,
#: scheduler_port. Prints {row: [blocked, what it saw]}.
PROBES = r"""
import ctypes, errno, json, os, platform, socket, sys
cfg = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
NR = {"x86_64": {"mount": 165, "ptrace": 101, "finit_module": 313},
      "aarch64": {"mount": 40, "ptrace": 117, "finit_module": 273}}[platform.machine()]
def call(name, *args):
    ctypes.set_errno(0)
    rc = libc.syscall(NR[name], *args)
    return rc, errno.errorcode.get(ctypes.get_errno(), "0")
def why(exc):
    return errno.errorcode.get(exc.errno, type(exc).__name__) if exc.errno else type(exc).__name__
out = {}
try:
    open("/proc/kcore", "rb").read(16)
    out["read /proc/kcore"] = [False, "read 16 bytes"]
except OSError as exc:
    out["read /proc/kcore"] = [True, why(exc)]
try:
    open(cfg["host_file"]).read()
    out["read a root-only host file"] = [False, "read it"]
except FileNotFoundError:
    out["read a root-only host file"] = [True, "not there"]
except OSError as exc:
    out["read a root-only host file"] = [True, why(exc)]
rc, err = call("mount", b"none", b"/tmp", b"tmpfs", 0, None)
out["mount a tmpfs"] = [rc != 0, err if rc else "mounted"]
rc, err = call("ptrace", 16, cfg["host_pid"], 0, 0)  # PTRACE_ATTACH
out["ptrace a host process"] = [rc != 0, err if rc else "attached"]
if rc == 0:
    call("ptrace", 17, cfg["host_pid"], 0, 0)  # PTRACE_DETACH
fd = os.open("/dev/null", os.O_RDONLY)
rc, err = call("finit_module", fd, b"", 0)
# Past the capability check the kernel would say why the module is bad (EINVAL...).
out["load a kernel module"] = [rc != 0 and err in ("EPERM", "ENOSYS", "EACCES"), err]
try:
    socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close()
    out["open a raw socket"] = [False, "opened"]
except OSError as exc:
    out["open a raw socket"] = [True, why(exc)]
path = "/proc/sys/kernel/printk_ratelimit"
try:
    value = open(path).read()
    with open(path, "w") as f:
        f.write(value)
    out["write /proc/sys"] = [False, "wrote " + path]
except OSError as exc:
    out["write /proc/sys"] = [True, why(exc)]
seen = "not there"
for sock in ("/var/run/docker.sock", "/run/docker.sock"):
    if os.path.exists(sock):
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(sock)
            seen = "connected"
            break
        except OSError as exc:
            seen = why(exc)
out["reach the Docker socket"] = [seen != "connected", seen]
def reach(host, port):
    try:
        socket.create_connection((host, port), 5).close()
        return "reached"
    except OSError as exc:
        return why(exc)
got = reach("127.0.0.1", cfg["scheduler_port"])
out["reach the scheduler's port"] = [got != "reached", got]
got = reach(cfg["host"], cfg["port"])
out["network egress (default network)"] = [got != "reached", got]
print(json.dumps(out))
"""

EGRESS = r"""
import json, socket, sys
host, port = json.loads(sys.argv[1])
try:
    socket.create_connection((host, port), 5).close()
    print(json.dumps([False, "reached"]))
except OSError as exc:
    print(json.dumps([True, type(exc).__name__]))
"""

#: A bomb that is refused is over in a second or two; under gVisor the limit takes the
#: sandbox's kernel down with it and the exec answers only at this deadline.
BOMB_SECONDS = 15
#: A hog is OOM-killed in a second or two under runc and bubblewrap; under gVisor the
#: sandbox's kernel stalls at its limit and the exec answers only at this deadline.
HOG_SECONDS = 20

BOMB = r"""
import os, signal, time
kids = []
why = "stopped at 5000 (no limit met)"
for i in range(5000):
    try:
        pid = os.fork()
    except OSError as exc:
        why = f"fork refused after {len(kids)}: {exc.strerror}"
        break
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    kids.append(pid)
for pid in kids:
    os.kill(pid, signal.SIGKILL)
for pid in kids:
    os.waitpid(pid, 0)
print(len(kids), why)
"""

HOG = r"""
b = bytearray(1024 * 1024 * 1024)
for i in range(0, len(b), 4096):
    b[i] = 1
print("held 1 GiB")
"""

ROWS = (
    "fork bomb",
    "memory hog",
    "read /proc/kcore",
    "read a root-only host file",
    "mount a tmpfs",
    "ptrace a host process",
    "load a kernel module",
    "open a raw socket",
    "write /proc/sys",
    "reach the Docker socket",
    "reach the scheduler's port",
    "network egress (default network)",
    "network egress (network='none')",
    "network egress (network_allow, not listed)",
)


@dataclass
class Target:
    """Where a level's sandboxes go, and the host things its probes aim at."""

    defaults: SandboxDefaults
    scheduler_port: int
    host: str
    port: int
    host_pid: int
    host_file: str
    cells: dict[str, tuple[bool | None, str]] = field(default_factory=dict)


async def probe_level(target: Target) -> dict[str, tuple[bool | None, str]]:
    cells: dict[str, tuple[bool | None, str]] = {}
    d = target.defaults
    cfg = json.dumps(
        {
            "host_pid": target.host_pid,
            "host_file": target.host_file,
            "host": target.host,
            "port": target.port,
            "scheduler_port": target.scheduler_port,
        }
    )
    async with Sandbox(command="sleep", args=["infinity"], defaults=d) as sb:
        r = await sb.exec(["python3", "-c", PROBES, cfg], timeout_seconds=120, check=True)
        for name, (blocked, seen) in json.loads(r.stdout).items():
            cells[name] = (blocked, seen)
    try:
        async with Sandbox(command="sleep", args=["infinity"], defaults=d) as sb:
            r = await sb.exec(["python3", "-c", BOMB], timeout_seconds=BOMB_SECONDS)
            count, _, seen = r.stdout.decode().strip().partition(" ")
            if count.isdigit():
                cells["fork bomb"] = (int(count) < 5000, seen)
            else:  # the limit took the sandbox down with it (gVisor's sentry): contained
                last = (r.stderr.decode().strip().splitlines() or [""])[-1]
                cells["fork bomb"] = (True, f"the sandbox died: {last[-60:]}")
    except SandboxTimeoutError as exc:  # no count printed: the limit took its kernel down
        got = exc.exec_result.stdout if exc.exec_result else b""
        cells["fork bomb"] = (not got, f"killed at its {BOMB_SECONDS} s deadline")
    except AviatoError as exc:  # the limit may take the sandbox down with the bomb
        cells["fork bomb"] = (True, f"sandbox ended: {str(exc)[:60]}")
    if subprocess.run(["true"], timeout=10).returncode != 0:
        cells["fork bomb"] = (False, "the host cannot start processes")
    try:
        async with Sandbox(
            command="sleep", args=["infinity"], memory_bytes=128 * 1024 * 1024, defaults=d
        ) as sb:
            r = await sb.exec(["python3", "-c", HOG], timeout_seconds=HOG_SECONDS)
            held = r.stdout == b"held 1 GiB\n"
            seen = "held 1 GiB" if held else (r.stderr.decode().strip().splitlines() or [""])[-1]
            cells["memory hog"] = (not held, seen or f"exit {r.returncode}")
    except SandboxTimeoutError as exc:  # it never held 1 GiB: stalled at its limit
        got = exc.exec_result.stdout if exc.exec_result else b""
        cells["memory hog"] = (b"held" not in got, f"killed at its {HOG_SECONDS} s deadline")
    except AviatoError as exc:
        cells["memory hog"] = (True, f"sandbox ended: {type(exc).__name__}")
    egress = json.dumps([target.host, target.port])
    for row, kwargs in (
        ("network egress (network='none')", {"network": "none"}),
        ("network egress (network_allow, not listed)", {"network_allow": [f"{target.host}:9"]}),
    ):
        try:
            async with Sandbox(
                command="sleep",
                args=["infinity"],
                defaults=d,
                **kwargs,  # type: ignore[arg-type]
            ) as sb:
                r = await sb.exec(["python3", "-c", EGRESS, egress], check=True)
                blocked, seen = json.loads(r.stdout)
                cells[row] = (blocked, seen)
        except AviatoError as exc:
            cells[row] = (None, f"refused: {str(exc).split(':')[0]}")
    return cells


#: What each level lets hostile code do, by design (every other row is blocked): the
#: local runtime shares the host's network and, without --userns-uid, its root reads
#: what the host's root reads (the host's / is bound read-only, hidden only where the
#: sandbox has its own /tmp and /run).
EGRESS_DEFAULT = "network egress (default network)"
EXPECTED_ALLOWED: dict[str, frozenset[str]] = {
    "runc": frozenset({EGRESS_DEFAULT}),
    "runc+userns": frozenset({EGRESS_DEFAULT}),
    "gvisor": frozenset({EGRESS_DEFAULT}),
    "bwrap": frozenset(
        {EGRESS_DEFAULT, "reach the scheduler's port", "read a root-only host file"}
    ),
    "bwrap+userns": frozenset({EGRESS_DEFAULT, "reach the scheduler's port"}),
}
#: Rows a level refuses to set up (its typed error), rather than blocking.
EXPECTED_REFUSED: dict[str, frozenset[str]] = {
    "runc": frozenset(),
    "runc+userns": frozenset(),
    "gvisor": frozenset(),
    "bwrap": frozenset({"network egress (network_allow, not listed)"}),
    "bwrap+userns": frozenset({"network egress (network_allow, not listed)"}),
}


def surprises(level: str, cells: dict[str, tuple[bool | None, str]]) -> list[str]:
    """Rows where ``level`` did not do what EXPECTED_* say (none: as designed)."""
    out = [f"{row}: missing" for row in ROWS if row not in cells]
    for row, (blocked, seen) in cells.items():
        want = (
            None
            if row in EXPECTED_REFUSED[level]
            else False
            if row in EXPECTED_ALLOWED[level]
            else True
        )
        if blocked is not want:
            word = {None: "refused", True: "blocked", False: "ALLOWED"}
            out.append(f"{row}: {word[blocked]} ({seen}), expected {word[want]}")
    return out
