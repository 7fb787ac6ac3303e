#!/usr/bin/env python
"""Object refs: 100 calls on one 100 MB value passed by ref, against Ray's ``ray.put``
in the same run; and a chain ``f.ref -> g.ref -> h`` of 10 MB values.

    python benchmarks/objects.py [--calls 100] [--mib 100] [--chain-mib 10] [--chains 5]
                                 [--markdown FILE]

aviato: the embedded cluster (``$AVIATO_SCHEDULER`` is ignored), ``python:3.11``, the
client over the agent's local lane. A function with two warm workers; then, timed:
``ref = await session.put(value)`` and ``--calls`` concurrent calls ``nbytes(ref)``
(each worker rebuilds the value from the bytes its agent handed it once). The
by-value baseline: the same calls with the value itself as the argument. Ray:
``ray.init(num_cpus=2)``, warm tasks, then ``ref = ray.put(value)`` and
``ray.get([nbytes.remote(ref) for ...])``; skipped with a note when Ray is not
installed. The values are ``bytes`` (the image has no numpy). A Ray worker copies the
bytes out of its object store for each call; an aviato worker rebuilds a value of an
immutable type once and gives each call the same object (a list or dict is rebuilt
for every call, as a call may change it): that is most of the gap.

The chain: ``h(g.ref(f.ref(n)))``, ``f`` making ``--chain-mib`` MiB, ``g`` reversing
them, ``h`` returning their length; the client gets ``None`` for ``f`` and ``g`` and an
int from ``h`` (it never holds a value). Against the same chain by value (each result
back to the client and out again) and Ray's ``h.remote(g.remote(f.remote(n)))``.

The verdict: aviato's by-ref calls per second at least Ray's (issue 14).
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

TIMEOUT = 600.0


def nbytes(data: bytes) -> int:
    return len(data)


def make(n: int) -> bytes:
    return bytes(n)


def reverse(data: bytes) -> bytes:
    return data[::-1]


@dataclass
class Side:
    put_s: float = float("nan")
    calls_s: float = float("nan")

    @property
    def total_s(self) -> float:
        return self.put_s + self.calls_s


@dataclass
class Results:
    calls: int
    mib: int
    chain_mib: int
    chains: int
    aviato: Side = field(default_factory=Side)
    by_value: Side = field(default_factory=Side)
    ray: Side = field(default_factory=Side)
    chain_aviato: Stats = field(default_factory=lambda: Stats("aviato chain by ref"))
    chain_value: Stats = field(default_factory=lambda: Stats("aviato chain by value"))
    chain_ray: Stats = field(default_factory=lambda: Stats("ray chain"))
    ray_version: str = ""
    notes: list[str] = field(default_factory=list)


async def run_aviato(res: Results) -> None:
    os.environ.pop("AVIATO_SCHEDULER", None)
    value = os.urandom(res.mib << 20)
    n = res.chain_mib << 20
    # A long lease: the by-value baseline copies 100 MB into shared memory per batch on
    # the client's loop, which can starve the session's keepalive on a loaded machine.
    defaults = SandboxDefaults(container_image=IMAGE, lease_seconds=120)
    async with Sandbox.session(defaults) as session:
        size = session.function(max_workers=2)(nbytes)
        f = session.function(max_workers=2)(make)
        g = session.function(max_workers=2)(reverse)
        await asyncio.gather(*(size(b"warm") for _ in range(8)))
        await asyncio.gather(*(f(1) for _ in range(4)), *(g(b"x") for _ in range(4)))

        t0 = time.perf_counter()
        ref = await session.put(value)
        t1 = time.perf_counter()
        got = await asyncio.wait_for(
            asyncio.gather(*(size(ref) for _ in range(res.calls))), TIMEOUT
        )
        res.aviato = Side(t1 - t0, time.perf_counter() - t1)
        assert all(r.value == len(value) for r in got)
        ref.release()

        t0 = time.perf_counter()
        got = await asyncio.wait_for(
            asyncio.gather(*(size(value) for _ in range(res.calls))), TIMEOUT
        )
        res.by_value = Side(0.0, time.perf_counter() - t0)
        assert all(r.value == len(value) for r in got)

        for _ in range(res.chains):
            t0 = time.perf_counter()
            out = await asyncio.wait_for(size(g.ref(f.ref(n))), TIMEOUT)
            res.chain_aviato.add(time.perf_counter() - t0)
            assert out.value == n
            t0 = time.perf_counter()
            made = (await f(n)).value
            flipped = (await g(made)).value
            out = await asyncio.wait_for(size(flipped), TIMEOUT)
            res.chain_value.add(time.perf_counter() - t0)
            assert out.value == n


def run_ray(res: Results) -> None:
    if ray_missing(res.notes, "Ray is not installed: aviato alone (pip install -e '.[bench]')"):
        return
    value = os.urandom(res.mib << 20)
    n = res.chain_mib << 20
    with ray_started() as ray:
        res.ray_version = ray.__version__
        size: Any = ray.remote(nbytes)
        f: Any = ray.remote(make)
        g: Any = ray.remote(reverse)
        ray.get([size.remote(b"warm") for _ in range(8)], timeout=TIMEOUT)
        ray.get([f.remote(1) for _ in range(4)] + [g.remote(b"x") for _ in range(4)])
        t0 = time.perf_counter()
        ref = ray.put(value)
        t1 = time.perf_counter()
        got = ray.get([size.remote(ref) for _ in range(res.calls)], timeout=TIMEOUT)
        res.ray = Side(t1 - t0, time.perf_counter() - t1)
        assert all(x == len(value) for x in got)
        del ref
        for _ in range(res.chains):
            t0 = time.perf_counter()
            out = ray.get(size.remote(g.remote(f.remote(n))), timeout=TIMEOUT)
            res.chain_ray.add(time.perf_counter() - t0)
            assert out == n


def _rate(res: Results, side: Side) -> float:
    return res.calls / side.total_s if side.total_s == side.total_s else float("nan")


def report(res: Results) -> str:
    ours, theirs = _rate(res, res.aviato), _rate(res, res.ray)
    met = "-" if theirs != theirs else ("met" if ours >= theirs else "NOT met")
    lines = [
        f"One run, {os.cpu_count()} CPUs, {res.calls} calls on one {res.mib} MiB value; "
        f"{res.chains} chains of {res.chain_mib} MiB values"
        + (f"; ray {res.ray_version}" if res.ray_version else ""),
        "",
        f"| {res.calls} calls on one value | put (s) | calls (s) | calls/s (put included) | target "
        "| verdict |",
        "|---|---:|---:|---:|---|---|",
        f"| aviato, by ref (session.put) | {res.aviato.put_s:.2f} | {res.aviato.calls_s:.2f} "
        f"| {ours:.1f} | >= Ray | {met} |",
        f"| aviato, by value (baseline) | - | {res.by_value.calls_s:.2f} "
        f"| {_rate(res, res.by_value):.1f} | | reported |",
        f"| Ray, by ref (ray.put) | {res.ray.put_s:.2f} | {res.ray.calls_s:.2f} "
        f"| {theirs:.1f} | | |",
        "",
        "| chain f -> g -> h | p50 (ms) | max (ms) | client holds a value |",
        "|---|---:|---:|---|",
        f"| aviato, h(g.ref(f.ref(n))) | {ms(res.chain_aviato.p50)} | "
        f"{ms(max(res.chain_aviato.samples, default=float('nan')))} | no |",
        f"| aviato, by value | {ms(res.chain_value.p50)} | "
        f"{ms(max(res.chain_value.samples, default=float('nan')))} | yes (twice) |",
        f"| Ray, h.remote(g.remote(f.remote(n))) | {ms(res.chain_ray.p50)} | "
        f"{ms(max(res.chain_ray.samples, default=float('nan')))} | no |",
    ]
    lines += [f"- {note}" for note in res.notes]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--mib", type=int, default=100)
    parser.add_argument("--chain-mib", type=int, default=10)
    parser.add_argument("--chains", type=int, default=5)
    add_markdown_option(parser)
    args = parser.parse_args(argv)
    res = Results(args.calls, args.mib, args.chain_mib, args.chains)
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
