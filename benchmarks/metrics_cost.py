"""What Prometheus metrics cost the function-call hot path (issue 15): the no-op call
throughput of two embedded clusters on this host, one with ``--metrics`` on both
daemons (scraped every second meanwhile, far more often than Prometheus would) and
one without, measured in alternating rounds in one run.

    python -m benchmarks.metrics_cost [--calls 10000] [--rounds 5] [--runtime docker]
        [--markdown FILE]

Prints (and with --markdown writes) calls/s per round, the medians, and the verdict
against the issue's bar: "on within 5% of off"."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import time
import urllib.request

from aviato import Sandbox, SandboxDefaults
from aviato._local import LocalCluster

from ._common import RUN_ID, add_markdown_option, write_markdown
from ._fn_common import noop

IMAGE = "python:3.11"


async def _scrape_every_second(url: str, stop: asyncio.Event) -> int:
    scrapes = 0

    def get() -> None:
        with urllib.request.urlopen(url, timeout=10) as r:
            r.read()

    while not stop.is_set():
        await asyncio.to_thread(get)
        scrapes += 1
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except TimeoutError:
            pass
    return scrapes


async def main_async(args: argparse.Namespace) -> None:
    metrics = {"scheduler": ["--metrics", "127.0.0.1:0"], "agent": ["--metrics", "127.0.0.1:0"]}
    clusters = {
        "off": LocalCluster(runtime=args.runtime, agent_id=f"bench-{RUN_ID}-moff"),
        "on": LocalCluster(
            runtime=args.runtime, agent_id=f"bench-{RUN_ID}-mon", daemon_args=metrics
        ),
    }
    rates: dict[str, list[float]] = {"off": [], "on": []}
    try:
        for cluster in clusters.values():
            cluster.start(timeout=120)
        url = clusters["on"].metrics_url("agent")
        assert url, "the agent with --metrics printed no metrics URL"
        async with (
            Sandbox.session(
                SandboxDefaults(container_image=IMAGE, scheduler=clusters["off"].address)
            ) as s_off,
            Sandbox.session(
                SandboxDefaults(container_image=IMAGE, scheduler=clusters["on"].address)
            ) as s_on,
        ):
            fns = {
                "off": s_off.function(max_workers=2)(noop),
                "on": s_on.function(max_workers=2)(noop),
            }
            for fn in fns.values():  # warm: both workers up, caches filled
                for _ in range(2):
                    await asyncio.gather(*(fn(i) for i in range(500)))
            stop = asyncio.Event()
            scraper = asyncio.create_task(_scrape_every_second(url, stop))
            for r in range(args.rounds):
                order = ("off", "on") if r % 2 == 0 else ("on", "off")
                for name in order:
                    gc.collect()
                    t0 = time.perf_counter()
                    out = await asyncio.gather(*(fns[name](i) for i in range(args.calls)))
                    rates[name].append(args.calls / (time.perf_counter() - t0))
                    assert out[-1].value == args.calls - 1
                    del out
            stop.set()
            scrapes = await scraper
    finally:
        for cluster in clusters.values():
            cluster.stop()
    text = report(rates, scrapes, args)
    print(text)
    if args.markdown is not None:
        write_markdown(args.markdown, text)


#: The issue's bar: throughput with metrics on within this fraction of it with them off.
BAR = 0.05


def report(rates: dict[str, list[float]], scrapes: int, args: argparse.Namespace) -> str:
    """The markdown table of the rounds, the medians, and the verdict against ``BAR``."""
    off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
    # Each round's pair ran back to back: their ratio cancels most of the host's drift.
    paired = statistics.median(a / b for a, b in zip(rates["on"], rates["off"], strict=True))
    lines = [
        f"{args.calls:,} no-op calls per round, {args.rounds} rounds (off/on alternating "
        f"first), runtime {args.runtime}; the agent with metrics scraped {scrapes} times "
        f"meanwhile; load average {os.getloadavg()[0]:.1f} at the end.",
        "",
        "| metrics | median calls/s | rounds |",
        "|---|---:|---|",
        *(
            f"| {name} | {statistics.median(rates[name]):,.0f} | "
            f"{', '.join(f'{x:,.0f}' for x in rates[name])} |"
            for name in ("off", "on")
        ),
        "",
        f"on/off: medians {on / off:.3f} ({(on / off - 1) * 100:+.1f}%), median of the "
        f"rounds' paired ratios {paired:.3f} ({(paired - 1) * 100:+.1f}%).",
        "",
        f"- {'met' if paired >= 1 - BAR else 'NOT met'}: throughput with metrics on within "
        f"{BAR:.0%} of off (median paired ratio {paired:.3f} >= {1 - BAR:.2f})",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.metrics_cost", description=__doc__)
    p.add_argument("--calls", type=int, default=10_000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--runtime", default="docker", choices=("docker", "local"))
    add_markdown_option(p)
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
