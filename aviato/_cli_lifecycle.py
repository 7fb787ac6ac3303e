"""``aviato pause|resume ID...``, ``aviato extend ID SECONDS`` and ``aviato snapshot
ID | ls | rm IMAGE...``: the lifecycle commands (see aviato/_lifecycle.py)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict
from typing import Any

from aviato._cli_output import print_json, print_table
from aviato._defaults import SandboxDefaults
from aviato._lifecycle import list_snapshots, remove_snapshot
from aviato._sandbox import Sandbox
from aviato.exceptions import AviatoError

__all__ = ["COMMANDS", "add_commands"]

Command = Callable[[argparse.ArgumentParser], None]
Handler = Callable[[argparse.Namespace, SandboxDefaults], Coroutine[Any, Any, int]]

SNAPSHOT_COLUMNS = ("image", "agent", "of sandbox", "base image", "size", "age")


def add_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add the lifecycle commands to ``aviato``'s parser (``command``: its maker)."""
    pause = command("pause", help="freeze sandboxes (processes stopped, memory kept)")
    pause.add_argument("ids", nargs="+")
    resume = command("resume", help="thaw paused sandboxes")
    resume.add_argument("ids", nargs="+")
    extend = command("extend", help="push a sandbox's max lifetime out: extend ID SECONDS")
    extend.add_argument("id")
    extend.add_argument("seconds", type=float)
    snap = command(
        "snapshot",
        help="snapshot ID (its files as a new image) | snapshot ls | snapshot rm IMAGE...",
    )
    snap.add_argument("what", help="a sandbox id, or ls, or rm")
    snap.add_argument("images", nargs="*", help="for rm: the snapshot images to remove")
    snap.add_argument("--format", choices=("table", "json"), default="table")


async def _each(ids: list[str], defaults: SandboxDefaults, verb: str) -> int:
    failed = 0
    for sid in ids:
        try:
            sb = await Sandbox.from_id(sid, defaults=defaults)
            await (sb.pause() if verb == "pause" else sb.resume())
            print(sid)
        except AviatoError as exc:
            print(f"aviato: {verb} {sid}: {exc}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


async def _pause(args: argparse.Namespace, defaults: SandboxDefaults) -> int:
    return await _each(args.ids, defaults, "pause")


async def _resume(args: argparse.Namespace, defaults: SandboxDefaults) -> int:
    return await _each(args.ids, defaults, "resume")


async def _extend(args: argparse.Namespace, defaults: SandboxDefaults) -> int:
    sb = await Sandbox.from_id(args.id, defaults=defaults)
    deadline = await sb.extend_lifetime(args.seconds)
    if deadline is None:
        print(f"{args.id} has no max lifetime: none set")
    else:
        print(f"{args.id} now ends at the latest in {deadline - time.time():.0f}s")
    return 0


async def _snapshot(args: argparse.Namespace, defaults: SandboxDefaults) -> int:
    if args.what == "ls":
        found = await list_snapshots(defaults)
        if args.format == "json":
            print_json([asdict(s) for s in found])
            return 0
        now = time.time()
        rows = [
            [
                s.image,
                s.agent_id,
                s.sandbox_id,
                s.base_image,
                f"{s.size_bytes / 1e6:.1f} MB",
                f"{max(0.0, now - s.created_at):.0f}s",
            ]
            for s in found
        ]
        print_table(SNAPSHOT_COLUMNS, rows)
        return 0
    if args.what == "rm":
        if not args.images:
            raise AviatoError("snapshot rm: name the images to remove (see `aviato snapshot ls`)")
        failed = 0
        for image in args.images:
            try:
                await remove_snapshot(image, defaults)
                print(image)
            except AviatoError as exc:
                print(f"aviato: snapshot rm {image}: {exc}", file=sys.stderr)
                failed += 1
        return 1 if failed else 0
    if args.images:
        raise AviatoError("snapshot ID takes no more arguments (rm IMAGE... removes images)")
    sb = await Sandbox.from_id(args.what, defaults=defaults)
    print(await sb.snapshot())
    return 0


COMMANDS: dict[str, Handler] = {
    "pause": _pause,
    "resume": _resume,
    "extend": _extend,
    "snapshot": _snapshot,
}
