"""The root a bubblewrap sandbox sees, when host mounts or volumes are mounted in it.

bubblewrap binds the host's ``/`` read-only, so it cannot make a mount point the host
lacks (``/data``, ``/mnt/work``). For each such target, the deepest directory of its
path that the host has is shown instead as a fresh tmpfs holding that directory's
entries (read-only binds and symlinks), where the mount point can be made: the sandbox
sees the same files, plus the mount."""

from __future__ import annotations

import os
import posixpath
from collections.abc import Sequence

__all__ = ["root_args"]

#: Directories a sandbox has its own writable copy of: mount points are made there.
_OWN = ("/tmp", "/run")


def _deepest_existing(target: str) -> str | None:
    """The deepest directory on the host along ``target``'s path, when ``target`` itself
    is missing there (None: it exists, or it lies in a directory the sandbox owns)."""
    path = posixpath.normpath(target)
    if os.path.isdir(path):
        return None
    while not os.path.isdir(path):
        path = posixpath.dirname(path)
    if any(path == own or path.startswith(own + "/") for own in _OWN):
        return None
    return path


def _entries(directory: str) -> list[str]:
    args: list[str] = []
    for entry in sorted(os.listdir(directory)):
        path = posixpath.join(directory, entry)
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        else:
            args += ["--ro-bind", path, path]
    return args


def root_args(targets: Sequence[str]) -> list[str]:
    """bwrap's arguments for the sandbox's root, given its mount ``targets``."""
    parents = sorted({p for t in targets if (p := _deepest_existing(t)) is not None})
    if "/" in parents:
        args = _entries("/")  # bwrap's own root is a fresh tmpfs
        parents.remove("/")
    else:
        args = ["--ro-bind", "/", "/"]
    for parent in parents:  # sorted: a parent before a directory under it
        args += ["--tmpfs", parent, *_entries(parent)]
    return args
