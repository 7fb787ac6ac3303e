"""What the Docker runtime does differently for a sandbox under gVisor (runsc).

- Files: the engine's archive API (``docker cp``) writes and reads the container's
  root filesystem beneath gVisor, which caches it (exclusive file access) and mounts
  a tmpfs of its own over /tmp: what one side writes the other may not see. Files go
  through the sandbox itself instead: an exec of ``sh``/``cat`` (any image with a
  shell; the supervisor, when there is one, serves files itself anyway).
- The supervisor link without shared memory: a descriptor passes from the host into
  gVisor, but not out (sendmsg with SCM_RIGHTS fails with EINVAL there), so a worker
  would fail to send a large result. Large frames go over the socket instead.
- Killing an exec's process tree: the exec's host pid is runsc's proxy, not the
  command (its processes live in gVisor's kernel). Each exec carries a tag in its env,
  and a kill is a second exec that kills every process inside carrying the tag.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from agent.runtime.base import ExecOutput
from agent.runtime.docker_bytes import too_large
from aviato.exceptions import SandboxFileError

__all__ = ["TAG_ENV", "kill_tagged", "link_env", "read_file", "tag_env", "write_file"]

#: Env var naming an exec, so that its processes can be found inside and killed.
TAG_ENV = "AVIATO_EXEC_TAG"

Exec = Callable[..., Awaitable[ExecOutput]]

_WRITE = 'mkdir -p -- "$(dirname -- "$1")" && cat > "$1" && chmod "$2" "$1"'
# 21: a directory; 22: missing; 23: not a regular file (after symlinks); else its size.
_SIZE = '[ -d "$1" ] && exit 21; [ -e "$1" ] || exit 22; [ -f "$1" ] || exit 23; wc -c < "$1"'
_KILL = (
    'for d in /proc/[0-9]*; do tr "\\0" "\\n" < "$d/environ" 2>/dev/null'
    ' | grep -qx "$1=$2" && kill -9 "${d#/proc/}" 2>/dev/null; done; true'
)


def link_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with the supervisor link's shared memory off (see above)."""
    return {**env, "AVIATO_WORKER_SHM": "0", "AVIATO_SHM_SPARE": "0"}


def tag_env(env: Mapping[str, str] | None) -> dict[str, str]:
    """``env`` with a fresh exec tag."""
    return {**(env or {}), TAG_ENV: uuid.uuid4().hex}


def kill_tagged(api: Any, target: str, env: Mapping[str, str] | None) -> None:
    """Kill, inside ``target``, the processes of the exec whose env was ``env`` (no-op
    without a tag). Blocking (SDK calls); best effort: the sandbox may be gone."""
    tag = (env or {}).get(TAG_ENV)
    if not tag:
        return
    try:
        made = api.exec_create(target, ["sh", "-c", _KILL, "sh", TAG_ENV, tag])
        api.exec_start(made["Id"])
    except Exception:  # the sandbox is gone, or stopping: nothing left to kill
        pass


async def write_file(
    exec_: Exec, sandbox_id: str, path: str, full: str, data: bytes | memoryview, mode: int
) -> None:
    out = await exec_(sandbox_id, ("sh", "-c", _WRITE, "sh", full, f"{mode:o}"), stdin=data)
    if out.returncode != 0:
        why = out.stderr.decode(errors="replace").strip() or f"exit {out.returncode}"
        raise SandboxFileError(
            f"cannot write {path} in sandbox {sandbox_id}: {why}",
            filepath=path,
            sandbox_id=sandbox_id,
        )


async def read_file(exec_: Exec, sandbox_id: str, path: str, full: str, max_bytes: int) -> bytes:
    def fail(msg: str) -> SandboxFileError:
        return SandboxFileError(
            f"{msg} (sandbox {sandbox_id})", filepath=path, sandbox_id=sandbox_id
        )

    size = await exec_(sandbox_id, ("sh", "-c", _SIZE, "sh", full))
    if size.returncode == 21:
        raise fail(f"{path} is a directory, not a file")
    if size.returncode == 22:
        raise fail(f"no such file: {path}")
    if size.returncode == 23:
        raise fail(f"{path} is not a regular file")
    if size.returncode != 0:
        raise fail(f"cannot read {path}: {size.stderr.decode(errors='replace').strip()}")
    if int(size.stdout.strip() or 0) > max_bytes:
        raise too_large(sandbox_id, path, max_bytes)
    out = await exec_(sandbox_id, ("cat", "--", full))
    if out.returncode != 0:
        raise fail(f"cannot read {path}: {out.stderr.decode(errors='replace').strip()}")
    if len(out.stdout) > max_bytes:  # it grew in between
        raise too_large(sandbox_id, path, max_bytes)
    return out.stdout
