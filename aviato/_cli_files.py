"""``aviato cp`` (files in and out of a sandbox, like ``docker cp``) and ``aviato logs
-f`` (a sandbox's output as it is written): the CLI's streamed-file commands."""

from __future__ import annotations

import argparse
import os
import posixpath
import sys
from collections.abc import Callable

from aviato._defaults import SandboxDefaults
from aviato._sandbox import Sandbox
from aviato.exceptions import ConfigurationError, SandboxIsADirectoryError

__all__ = ["add_cp", "cp", "follow_logs", "sandbox_path"]

USAGE = "aviato cp LOCAL SANDBOX:/path   or   aviato cp SANDBOX:/path LOCAL (- : stdout)"


def sandbox_path(spec: str) -> tuple[str, str] | None:
    """``SANDBOX:/path`` as (sandbox id, path); None for a local path (one with a "/"
    before any ":", or no ":" at all, as ``docker cp`` reads them)."""
    head, colon, tail = spec.partition(":")
    if not colon or not head or "/" in head:
        return None
    return head, tail


def add_cp(command: Callable[..., argparse.ArgumentParser]) -> None:
    cp_ = command("cp", help=f"copy a file into or out of a sandbox: {USAGE}")
    cp_.add_argument("source")
    cp_.add_argument("dest")


def _upload_target(local: str, path: str) -> str:
    if local == "-" or not os.path.isfile(local):
        what = "stdin" if local == "-" else repr(local)
        raise ConfigurationError(f"cp uploads one regular file; {what} is not one")
    if path.endswith("/"):  # into that directory, under the file's own name
        path += os.path.basename(local)
    return path


def _download_target(local: str, path: str) -> str:
    """Into an existing local directory under the file's own name, as docker cp."""
    if os.path.isdir(local):
        return os.path.join(local, posixpath.basename(path.rstrip("/")))
    return local


async def cp(args: argparse.Namespace, defaults: SandboxDefaults) -> int:
    source, dest = sandbox_path(args.source), sandbox_path(args.dest)
    if (source is None) == (dest is None):
        raise ConfigurationError(f"cp copies between this machine and one sandbox: {USAGE}")
    if dest is not None:  # upload
        sandbox_id, path = dest
        path = _upload_target(args.source, path)
        sb = await Sandbox.from_id(sandbox_id, defaults=defaults)
        try:
            await sb.upload(args.source, path)
        except SandboxIsADirectoryError:  # an existing directory: into it, as docker cp
            await sb.upload(args.source, posixpath.join(path, os.path.basename(args.source)))
        return 0
    assert source is not None
    sandbox_id, path = source
    sb = await Sandbox.from_id(sandbox_id, defaults=defaults)
    if args.dest == "-":
        out = sys.stdout.buffer
        async for chunk in sb.read_file_stream(path):
            out.write(chunk)
        out.flush()
        return 0
    await sb.download(path, _download_target(args.dest, path))
    return 0


async def follow_logs(sb: Sandbox) -> int:
    """Its output so far, then as it is written, until it ends; each stream to its own."""
    async for chunk in sb.stream_logs(follow=True):
        out = sys.stdout.buffer if chunk.fd == 1 else sys.stderr.buffer
        out.write(chunk.data)
        out.flush()
    return 0
