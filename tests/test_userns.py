"""User namespaces (issue 16) on the local runtime: with ``--userns-uid``, root inside a
sandbox is an unprivileged uid on the host. A file it makes on a host mount is owned by
that uid; a root-only host file is closed to it; exec, files and functions still work.

(Docker's counterpart is the engine's ``userns-remap``, a daemon setting: see README.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.runtime.local_userns import SPAN, confine, parse_base, sandbox_uid
from aviato import Mount, Sandbox, SandboxDefaults
from tests.conftest import Cluster
from tests.test_local_runtime import _local_cluster

BASE = 300_000


@pytest.fixture(scope="module")
def shared() -> Iterator[Path]:
    # Not under pytest's 0700 directory: the sandbox's uid must reach its mounts.
    root = Path(tempfile.mkdtemp(prefix="aviato-userns-"))
    root.chmod(0o755)
    (root / "rw").mkdir(mode=0o777)
    (root / "rw").chmod(0o777)  # any uid may write: the owner of what appears shows who
    (root / "secret").mkdir(mode=0o755)
    (root / "secret" / "key").write_text("root only\n")
    (root / "secret" / "key").chmod(0o600)
    yield root
    shutil.rmtree(root)


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory, shared: Path) -> Iterator[Cluster]:
    args = ["--userns-uid", str(BASE), "--allow-mount", str(shared)]
    yield from _local_cluster(tmp_path_factory.mktemp("userns"), agents=1, agent_args=args)


async def test_root_inside_is_not_root_outside(local: Cluster, shared: Path) -> None:
    defaults = SandboxDefaults(
        scheduler=local.address,
        lease_seconds=5,
        mounts=(Mount(str(shared / "rw"), "/out"), Mount(str(shared / "secret"), "/secret")),
    )
    async with Sandbox(command="sleep", args=["infinity"], defaults=defaults) as sb:
        assert sb.isolation == "bwrap+userns"
        r = await sb.exec(["sh", "-c", "id -u; cat /proc/self/uid_map"], check=True)
        uid_inside, mapping = r.stdout.decode().split("\n", 1)
        assert uid_inside == "0"
        inside, outside, count = (int(x) for x in mapping.split())
        assert (inside, count) == (0, 1) and BASE <= outside < BASE + SPAN, mapping
        assert outside == sandbox_uid(BASE, sb.sandbox_id)
        # Made on a host mount: owned on the host by the unprivileged uid.
        await sb.exec(["sh", "-c", "echo hi > /out/made-inside"], check=True)
        st = os.stat(shared / "rw" / "made-inside")
        assert (st.st_uid, st.st_gid) == (outside, outside)
        # A root-only host file: closed (root inside owns nothing outside).
        r = await sb.exec(["cat", "/secret/key"])
        assert r.returncode != 0 and b"Permission denied" in r.stderr, r
        # Its processes, seen from the host, run as that uid too.
        r = await sb.exec(["sh", "-c", "echo $$; sleep 0"], check=True)
        host_uids = subprocess.run(
            ["ps", "-o", "uid=", "-u", str(outside)], capture_output=True, text=True
        ).stdout.split()
        assert host_uids and set(host_uids) == {str(outside)}
        # What the sandbox is for still works: files and exec.
        await sb.write_file("/tmp/x.txt", b"payload")
        assert await sb.read_file("/tmp/x.txt") == b"payload"
    (shared / "rw" / "made-inside").unlink()


async def test_functions_run_under_it(local: Cluster) -> None:
    defaults = SandboxDefaults(scheduler=local.address, lease_seconds=5)
    async with Sandbox.session(defaults) as session:

        @session.function(max_workers=1)
        def whoami() -> tuple[int, str]:
            return os.getuid(), open("/proc/self/uid_map").read().split()[1]

        uid, outside = (await whoami()).value
        assert uid == 0 and int(outside) >= BASE


def test_the_options() -> None:
    assert parse_base(None) is None and parse_base("") is None
    assert parse_base(str(BASE)) == BASE
    for bad in ("1000", "x", str(2**32)):
        with pytest.raises(ValueError, match="--userns-uid"):
            parse_base(bad)
    cmd = confine(
        ["/bin/sh", "-c", "x", "f", "/usr/bin/bwrap", "--seccomp", "3"], "/usr/bin/bwrap", 7
    )
    assert cmd[:5] == ["setpriv", "--reuid=7", "--regid=7", "--clear-groups", "--"]
    assert cmd[9:15] == ["/usr/bin/bwrap", "--unshare-user", "--uid", "0", "--gid", "0"]
    assert sys.platform == "linux"
