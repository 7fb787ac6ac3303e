"""Seccomp (issue 16): system calls a sandbox has no business with fail inside, on
Docker (its default profile) and on the local runtime (bubblewrap with the filter of
agent/runtime/seccomp_filter.py); what ordinary code needs still works."""

from __future__ import annotations

import json
import platform
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.runtime.seccomp_filter import DENIED, program
from aviato import Sandbox, SandboxDefaults
from tests.conftest import Cluster, docker_cluster
from tests.test_local_runtime import _local_cluster

#: Run inside: each hostile call's result and errno, and ordinary work (threads, a
#: subprocess, a fork) that must still succeed.
PROBE = r"""
import ctypes, errno, json, os, platform, subprocess, threading
libc = ctypes.CDLL(None, use_errno=True)
nr = {"x86_64": {"keyctl": 250, "unshare": 272, "mount": 165},
      "aarch64": {"keyctl": 219, "unshare": 97, "mount": 40}}[platform.machine()]
CLONE_NEWUSER, CLONE_NEWNS = 0x10000000, 0x00020000
def call(name, *args):
    ctypes.set_errno(0)
    rc = libc.syscall(nr[name], *args)
    return [rc, errno.errorcode.get(ctypes.get_errno(), "0")]
out = {
    "keyctl": call("keyctl", 1, None),  # KEYCTL_JOIN_SESSION_KEYRING
    "unshare_user": call("unshare", CLONE_NEWUSER),
    "unshare_mount": call("unshare", CLONE_NEWNS),
    "mount": call("mount", b"none", b"/tmp", b"tmpfs", 0, None),
}
t = threading.Thread(target=lambda: None); t.start(); t.join()
out["subprocess"] = subprocess.run(["true"]).returncode
pid = os.fork()
if pid == 0:
    os._exit(7)
out["fork"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
print(json.dumps(out))
"""

BLOCKED = ("keyctl", "unshare_user", "unshare_mount", "mount")


async def _probe(defaults: SandboxDefaults) -> dict[str, object]:
    async with Sandbox(command="sleep", args=["infinity"], defaults=defaults) as sb:
        out = await sb.exec(["python3", "-c", PROBE], check=True)
    result: dict[str, object] = json.loads(out.stdout)
    return result


def _check(found: dict[str, object]) -> None:
    for name in BLOCKED:
        rc, err = found[name]  # type: ignore[misc]
        assert rc == -1 and err in ("EPERM", "EACCES", "ENOSYS"), (name, found)
    assert found["subprocess"] == 0 and found["fork"] == 7, found


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from _local_cluster(tmp_path_factory.mktemp("seccomp-local"), agents=1)


@pytest.fixture(scope="module")
def docker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from docker_cluster(tmp_path_factory.mktemp("seccomp-docker"), agents=1)


async def test_denied_calls_fail_inside_a_local_sandbox(local: Cluster) -> None:
    defaults = SandboxDefaults(container_image="python:3.11", scheduler=local.address)
    found = await _probe(defaults)
    _check(found)
    # The filter answers (EPERM), not a lack of privilege alone: keyctl needs none.
    assert found["keyctl"] == [-1, "EPERM"] and found["unshare_user"] == [-1, "EPERM"]


async def test_denied_calls_fail_inside_a_docker_sandbox(docker: Cluster) -> None:
    defaults = SandboxDefaults(container_image="python:3.11", scheduler=docker.address)
    _check(await _probe(defaults))


def test_the_program() -> None:
    code = program("x86_64")
    assert code is not None and len(code) % 8 == 0
    assert len(code) // 8 < 4096  # the kernel's BPF_MAXINSNS
    assert program("riscv64") is None
    aarch64 = program("aarch64")
    assert aarch64 is not None and aarch64 != code
    assert {"keyctl", "unshare", "mount", "setns", "bpf"} <= set(DENIED)
    assert platform.machine() in ("x86_64", "aarch64")


def test_the_filter_file_lives_in_the_sandbox_dir(tmp_path: Path) -> None:
    from agent.runtime.seccomp_filter import FILTER_FD, with_seccomp

    argv = with_seccomp(["/usr/bin/bwrap", "--ro-bind", "/", "/"], tmp_path)
    assert argv[:2] == ["/bin/sh", "-c"] and argv[3] == str(tmp_path / "seccomp.bpf")
    assert argv[4:7] == ["/usr/bin/bwrap", "--seccomp", str(FILTER_FD)]
    assert (tmp_path / "seccomp.bpf").read_bytes() == program()
