#!/usr/bin/env python
"""Actors: an aviato actor's method round trip against a function call, and against a
Ray actor's, in one run.

    python benchmarks/actors.py [--calls 1000] [--markdown FILE]

aviato: the embedded cluster (``$AVIATO_SCHEDULER`` is ignored), ``python:3.11``, the
client on asyncio's default loop over the agent's local lane. One ``@session.cls()``
instance (its own worker container) and one ``@session.function()`` with one warm
worker; ``--calls`` sequential awaits of a no-op method / call each (after a warm-up),
p50 and p99. Also the time from making the instance to its first method's result
(``__init__`` included: a new worker container). Ray: ``ray.init(num_cpus=2)``, an
``@ray.remote`` class and ``ray.get(actor.method.remote())`` the same number of times;
skipped with a note when Ray is not installed (``pip install -e '.[bench]'``).
The verdict: aviato's actor round trip p50 at most Ray's (issue 14).
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import asyncio
import os
import time
from dataclasses import dataclass, field
from typing import Any

from aviato import Sandbox, SandboxDefaults
from benchmarks._common import IMAGE, add_markdown_option, console, write_markdown
from benchmarks._ray import ray_missing, ray_started
from benchmarks._stats import Stats, ms

TIMEOUT = 120.0


class Counter:
    def __init__(self) -> None:
        self.n = 0

    def noop(self) -> int:
        return self.n


def noop() -> int:
    return 0


@dataclass
class Results:
    calls: int
    aviato_actor: Stats = field(default_factory=lambda: Stats("aviato actor method"))
    aviato_function: Stats = field(default_factory=lambda: Stats("aviato function call"))
    aviato_first_s: float = float("nan")
    ray_actor: Stats = field(default_factory=lambda: Stats("ray actor method"))
    ray_version: str = ""
    notes: list[str] = field(default_factory=list)


async def run_aviato(res: Results) -> None:
    os.environ.pop("AVIATO_SCHEDULER", None)
    async with Sandbox.session(SandboxDefaults(container_image=IMAGE)) as session:
        actor_class = session.cls()(Counter)
        function = session.function(max_workers=1)(noop)
        await function()  # a warm worker
        t0 = time.perf_counter()
        actor = actor_class()
        await actor.noop()
        res.aviato_first_s = time.perf_counter() - t0
        for _ in range(50):  # warm-up
            await actor.noop()
            await function()
        for _ in range(res.calls):
            t0 = time.perf_counter()
            await asyncio.wait_for(actor.noop(), TIMEOUT)
            res.aviato_actor.add(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await asyncio.wait_for(function(), TIMEOUT)
            res.aviato_function.add(time.perf_counter() - t0)
        await actor.close()


def run_ray(res: Results) -> None:
    if ray_missing(res.notes, "Ray is not installed: pip install -e '.[bench]'"):
        return
    with ray_started(by_value=Counter.__module__) as ray:
        res.ray_version = ray.__version__
        actor: Any = ray.remote(Counter).remote()
        for _ in range(50):
            ray.get(actor.noop.remote(), timeout=TIMEOUT)
        for _ in range(res.calls):
            t0 = time.perf_counter()
            ray.get(actor.noop.remote(), timeout=TIMEOUT)
            res.ray_actor.add(time.perf_counter() - t0)


def report(res: Results) -> str:
    ours, theirs = res.aviato_actor.p50, res.ray_actor.p50
    met = "-" if theirs != theirs else ("met" if ours <= theirs else "NOT met")
    lines = [
        f"One run, {os.cpu_count()} CPUs, {res.calls} sequential awaits each"
        + (f", ray {res.ray_version}" if res.ray_version else ""),
        "",
        "| round trip | p50 (ms) | p99 (ms) | target | verdict |",
        "|---|---:|---:|---|---|",
        f"| aviato actor method | {ms(ours)} | {ms(res.aviato_actor.p99)} | "
        f"<= Ray actor p50 | {met} |",
        f"| aviato function call (warm worker) | {ms(res.aviato_function.p50)} | "
        f"{ms(res.aviato_function.p99)} | | reported |",
        f"| Ray actor method | {ms(theirs)} | {ms(res.ray_actor.p99)} | | |",
        f"| aviato: instance made -> first method result | {ms(res.aviato_first_s)} | | | "
        "reported |",
    ]
    lines += [f"- {note}" for note in res.notes]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000)
    add_markdown_option(parser)
    args = parser.parse_args(argv)
    res = Results(args.calls)
    with console.status("aviato"):
        asyncio.run(run_aviato(res))
    with console.status("ray"):
        run_ray(res)
    text = report(res)
    console.print(text)
    if args.markdown:
        write_markdown(args.markdown, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
