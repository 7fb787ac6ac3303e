"""How the CLI prints what it lists: a table sized to the terminal, aligned plain text
when piped (no box drawing: ``grep``/``awk``/``cut`` friendly), or JSON records."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from typing import IO, Any

from rich import box
from rich.console import Console
from rich.table import Table

from aviato._storage import Tunnel
from aviato.protocol import AgentInfo, ClusterStatusReply, SandboxInfo

__all__ = [
    "AGENT_COLUMNS",
    "SANDBOX_COLUMNS",
    "JsonArrayWriter",
    "PlainLines",
    "agent_row",
    "plain_table",
    "print_json",
    "print_table",
    "sandbox_record",
    "sandbox_row",
    "status_record",
]

SANDBOX_COLUMNS = (
    "sandbox", "status", "image", "command", "agent", "isolation", "tags", "exit", "reason",
    "ports",
)  # fmt: skip
VOLUME_COLUMNS = ("volume", "agent", "address")
AGENT_COLUMNS = (
    "agent", "address", "runtime", "isolation", "slots used", "slots free", "cpus used/free",
    "memory used/free", "gpus used/free", "spares", "alive", "heartbeat",
)  # fmt: skip


def tunnels_text(tunnels: Mapping[int, Tunnel]) -> str:
    """``8000->10.0.0.2:32768,...``; its ports as asked for when not known (not running)."""
    return ",".join(f"{p}->{t.host}:{t.port}" for p, t in sorted(tunnels.items()))


def sandbox_row(info: SandboxInfo, tunnels: Mapping[int, Tunnel] | None = None) -> list[str]:
    ports = tunnels_text(tunnels) if tunnels else ",".join(map(str, info.spec.ports))
    return [
        info.sandbox_id,
        info.status.value,
        info.spec.image,
        " ".join((info.spec.command, *info.spec.args)),
        info.agent_id or "-",
        info.isolation or "-",
        ",".join(info.spec.tags),
        "" if info.exit_code is None else str(info.exit_code),
        info.reason,
        ports,
    ]


def sandbox_record(
    info: SandboxInfo, tunnels: Mapping[int, Tunnel] | None = None
) -> dict[str, Any]:
    """One sandbox for ``--format json``: plain JSON types, stable keys."""
    return {
        "sandbox_id": info.sandbox_id,
        "status": info.status.value,
        "image": info.spec.image,
        "command": [info.spec.command, *info.spec.args],
        "tags": list(info.spec.tags),
        "session_id": info.spec.session_id,
        "agent_id": info.agent_id,
        "agent_address": info.agent_address,
        "runtime": info.runtime,
        "isolation": info.isolation,
        "exit_code": info.exit_code,
        "reason": info.reason,
        "ended_by": info.ended_by,
        "created_at": info.created_at,
        "deadline": info.deadline,
        "ports": list(info.spec.ports),
        "tunnels": {str(p): t.url for p, t in sorted((tunnels or {}).items())},
    }


def agent_row(agent: AgentInfo) -> list[str]:
    return [
        agent.agent_id,
        agent.address,
        agent.runtime,  # says "NOT isolated" itself when it is not
        # Offered levels, the default first; "(probed)" once a probe sandbox ran.
        ",".join(i + ("+userns" if agent.userns else "") for i in agent.isolations)
        + (" (probed)" if agent.probe else "")
        or "-",
        str(agent.used),
        str(agent.slots - agent.used),
        *resources_cells(agent),
        str(agent.spares),  # pre-started sandboxes, in free slots (python -m agent --warm)
        "yes" if agent.alive else "DEAD",
        f"{agent.seconds_since_heartbeat:.1f}s ago",
    ]


def _size(n: float) -> str:
    for unit, scale in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n / (1 << 20):.1f}M"


def resources_cells(agent: AgentInfo) -> list[str]:
    """Used/free per resource, as sandboxes asked for them ("-" free: not advertised,
    so not limited); GPUs by id, those in use first."""
    cpus = f"{agent.cpus_used:g}/" + (f"{agent.cpus - agent.cpus_used:g}" if agent.cpus else "-")
    memory = _size(agent.memory_used) + "/"
    memory += _size(agent.memory_bytes - agent.memory_used) if agent.memory_bytes else "-"
    free = [g for g in agent.gpus if g not in agent.gpus_used]
    gpus = f"{','.join(agent.gpus_used) or '-'}/{','.join(free) or '-'}" if agent.gpus else "-"
    return [cpus, memory, gpus]


def status_record(address: str, status: ClusterStatusReply) -> dict[str, Any]:
    return {
        "scheduler": address,
        "agents": [
            {
                "agent_id": a.agent_id,
                "address": a.address,
                "runtime": a.runtime,
                "isolations": list(a.isolations),
                "probe": a.probe,
                "userns": a.userns,
                "slots": a.slots,
                "used": a.used,
                "spares": a.spares,
                # Capacity (0 / []: not advertised) and what its sandboxes asked for.
                "cpus": a.cpus,
                "cpus_used": a.cpus_used,
                "memory_bytes": a.memory_bytes,
                "memory_used": a.memory_used,
                "gpus": list(a.gpus),
                "gpus_used": list(a.gpus_used),
                "alive": a.alive,
                "seconds_since_heartbeat": a.seconds_since_heartbeat,
            }
            for a in status.agents
        ],
        "sandbox_counts": dict(status.sandbox_counts),
        "sessions": status.sessions,
    }


def plain_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns aligned with spaces, headers in capitals (as ``docker ps``); nothing cut,
    the last column unpadded. Newlines in a cell become spaces: one row, one line."""
    cells = [[c.upper().replace(" ", "_") for c in columns]]
    cells += [[str(v).replace("\n", " ") for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = []
    for row in cells:
        padded = [v.ljust(w) for v, w in zip(row[:-1], widths[:-1], strict=True)]
        lines.append("   ".join([*padded, row[-1]]).rstrip())
    return "\n".join(lines) + "\n"


def print_table(
    columns: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    title: str | None = None,
    out: IO[str] | None = None,
) -> None:
    """A terminal gets a table as wide as it is (long cells folded, ids never); a pipe
    or file gets ``plain_table``."""
    out = out or sys.stdout
    if not out.isatty():
        if title:
            out.write(title + "\n")
        out.write(plain_table(columns, rows))
        return
    table = Table(title=title, box=box.SIMPLE_HEAD, expand=False)
    for i, col in enumerate(columns):
        # The first column is the id a user copies into the next command: never cut.
        table.add_column(col, no_wrap=i == 0, overflow="fold")
    for row in rows:
        table.add_row(*row)
    Console(file=out, highlight=False).print(table)


class PlainLines:
    """``plain_table`` for rows that arrive page by page (``aviato ps --all``): the
    columns are sized on the first page and each row printed as it comes (a later,
    longer cell widens its own line only; nothing is cut)."""

    def __init__(self, columns: Sequence[str], out: IO[str], first_page: int = 200) -> None:
        self._columns = columns
        self._out = out
        self._held: list[Sequence[str]] = []
        self._first_page = first_page
        self._widths: list[int] | None = None

    def add(self, row: Sequence[str]) -> None:
        if self._widths is None:
            self._held.append(row)
            if len(self._held) >= self._first_page:
                self._flush_first()
            return
        self._write(row)

    def _flush_first(self) -> None:
        table = plain_table(self._columns, self._held)
        self._out.write(table)
        head = [c.upper().replace(" ", "_") for c in self._columns]
        cells = [head, *([str(v).replace("\n", " ") for v in r] for r in self._held)]
        self._widths = [max(len(r[i]) for r in cells) for i in range(len(self._columns))]
        self._held = []
        self._out.flush()

    def _write(self, row: Sequence[str]) -> None:
        assert self._widths is not None
        cells = [str(v).replace("\n", " ") for v in row]
        padded = [v.ljust(w) for v, w in zip(cells[:-1], self._widths[:-1], strict=True)]
        self._out.write("   ".join([*padded, cells[-1]]).rstrip() + "\n")

    def close(self) -> None:
        if self._widths is None:
            self._flush_first()
        self._out.flush()


class JsonArrayWriter:
    """One JSON array written a record at a time (valid JSON at the end, whatever the
    count; each record on its own lines as ``print_json`` lays them out)."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._count = 0

    def add(self, record: object) -> None:
        text = json.dumps(record, indent=2).replace("\n", "\n  ")
        self._out.write(("[\n  " if self._count == 0 else ",\n  ") + text)
        self._count += 1

    def close(self) -> None:
        self._out.write("[]\n" if self._count == 0 else "\n]\n")
        self._out.flush()


def print_json(value: object, out: IO[str] | None = None) -> None:
    out = out or sys.stdout
    out.write(json.dumps(value, indent=2) + "\n")
