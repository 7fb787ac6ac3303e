"""Listings in pages (issue 11, section 1): ``Sandbox.list`` gathers every page,
``Sandbox.page`` walks them from a cursor, ``Sandbox.iterate`` streams them; the
scheduler filters (tags, status, session, agent); ``aviato ps`` draws its first page
and ``--all`` streams every row as plain lines."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid

from aviato import Sandbox, SandboxDefaults, SandboxStatus
from tests.conftest import ROOT, Cluster


def _aviato(*args: str, address: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aviato.cli", *args, "--scheduler", address],
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_pages_cursors_filters_and_ps(cluster: Cluster, defaults: SandboxDefaults) -> None:
    tag = f"page-{uuid.uuid4().hex[:8]}"
    async with Sandbox.session(defaults) as session:
        sbs = [session.create(command="sleep", args=["infinity"], tags=[tag]) for _ in range(3)]
        await asyncio.gather(*(sb.start() for sb in sbs))
        ids = [sb.sandbox_id for sb in sbs]
        listed = [sb.sandbox_id for sb in await Sandbox.list(tags=[tag], defaults=defaults)]
        assert sorted(listed) == sorted(ids)
        assert len(await Sandbox.list(tags=[tag], limit=2, defaults=defaults)) == 2

        # One row a page: three pages, then no cursor; the same rows, in the same order.
        walked, cursor, pages = [], "", 0
        while True:
            page = await Sandbox.page(tags=[tag], limit=1, cursor=cursor, defaults=defaults)
            pages += 1
            walked += [sb.sandbox_id for sb in page.sandboxes]
            if not page.cursor:
                break
            cursor = page.cursor
        assert walked == listed and pages == 3
        streamed = [
            sb.sandbox_id
            async for sb in Sandbox.iterate(tags=[tag], page_size=1, defaults=defaults)
        ]
        assert streamed == listed

        # Filtered by the scheduler: session, agent.
        mine = await Sandbox.list(session_id=session.session_id, defaults=defaults)
        assert {sb.sandbox_id for sb in mine} == set(ids)
        agent = sbs[0].info.agent_id if sbs[0].info else None
        on_agent = await Sandbox.list(tags=[tag], agent_id=agent, defaults=defaults)
        assert on_agent and all(sb.info and sb.info.agent_id == agent for sb in on_agent)

        # ps draws its first page (here 1 row) and says how to see the rest.
        done = _aviato("ps", "--tag", tag, "--limit", "1", address=cluster.address)
        assert done.returncode == 0, done.stderr
        assert len(done.stdout.splitlines()) == 2  # header + 1 row
        assert "aviato ps --all" in done.stderr
        await sbs[0].stop()

        # --all streams every row (ended ones too) as plain lines; -q and json all of them.
        lines = _aviato("ps", "--all", "--tag", tag, address=cluster.address).stdout.splitlines()
        assert lines[0].split()[:2] == ["SANDBOX", "STATUS"] and len(lines) == 4
        assert sum("terminated" in line for line in lines) == 1
        quiet = _aviato("ps", "-q", "--tag", tag, address=cluster.address).stdout.split()
        assert sorted(quiet) == sorted(ids[1:])
        records = json.loads(
            _aviato("ps", "--all", "--format", "json", "--tag", tag, address=cluster.address).stdout
        )
        assert sorted(r["sandbox_id"] for r in records) == sorted(ids)
        ended = await Sandbox.list(tags=[tag], status=[SandboxStatus.TERMINATED], defaults=defaults)
        assert [sb.sandbox_id for sb in ended] == [ids[0]]
