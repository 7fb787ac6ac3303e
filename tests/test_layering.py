"""The import rules of the three packages, read from the code (DESIGN.md, Layering).

::

    aviato            the client: public API, protocol, exceptions, its own internals
       ▲   ▲
       │   └── aviato/_server/   code the daemons share: ZAP and server keys, ROUTER
       │                         sockets, daemon start-up and exit, error replies
    scheduler/   agent/          the daemons

1. ``aviato/`` never imports ``scheduler`` or ``agent``, and outside ``aviato/_server/``
   never imports ``aviato._server``: the client carries no daemon code. The CLI and the
   embedded cluster start daemons as processes (``python -m scheduler``).
2. ``scheduler/`` and ``agent/`` take from ``aviato`` only ``aviato.protocol``,
   ``aviato.exceptions``, ``aviato._server`` and its modules, and the shared modules in
   :data:`SHARED` (each with why it is shared, and which names when not all of it).
   Anything else a daemon needs from the client moves into ``aviato/_server/``.
3. ``scheduler/`` and ``agent/`` never import each other.
4. ``aviato/_server/`` takes from the rest of ``aviato`` only the modules rule 2 lets a
   daemon have (any of their names: it is the daemons' side of them, e.g. the server
   keys beside the client's key files); never the client's connections, pool, API.

The rules hold at run time too: a daemon process loads none of the client's own modules
(``import aviato.protocol`` runs ``aviato/__init__.py``, which loads the API lazily).

Every import counts: inside functions, under ``TYPE_CHECKING``, ``from aviato import _x``
(read as the module ``aviato._x``), and for a module imported whole, each attribute the
file reads from it (``_zmq.dealer``) is a name it takes.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ("aviato", "scheduler", "agent")
DAEMONS = ("scheduler", "agent")
SERVER = "aviato._server"
#: What any daemon may take from aviato: the wire, the exception tree, the shared package.
OPEN_TO_DAEMONS = ("aviato.protocol", "aviato.exceptions", SERVER)

#: Client modules the daemons may use too: module -> (the names they may take, None
#: for any; why the module is shared rather than the client's own).
SHARED: dict[str, tuple[frozenset[str] | None, str]] = {
    "aviato.link": (None, "the worker link's schema and framing: stdlib-only, both ends"),
    "aviato._link_fast": (None, "the link's fast paths for a call's records: part of aviato.link"),
    "aviato.link_actors": (
        None,
        "the link's ops for actor handles used in sandboxes: part of aviato.link, in a "
        "module of its own",
    ),
    "aviato._options": (
        None,
        "the sandbox options record and its one problems() check: the protocol is built on"
        " it, so the scheduler refuses what the client would",
    ),
    "aviato._codec": (None, "the protocol's value codec: the protocol is built on it"),
    "aviato._egress": (
        None,
        "egress allow-list entries and their check (through SandboxOptions.problems); the"
        " agent turns the same parsed entries into rules",
    ),
    "aviato._storage": (
        None,
        "mounts, volumes and ports as a spec holds them, and their checks (through"
        " SandboxOptions.problems; the agent checks volume names with it too)",
    ),
    "aviato._lane": (None, "the local lane's framing and path: client and agent must agree"),
    "aviato._types": (
        frozenset({"OutputChunk", "FileInfo"}),
        "a piece of output, and a directory entry, is one value type from the container to "
        "the user",
    ),
    "aviato._spare": (None, "the shared-memory buffer that client, agent and worker map"),
    "aviato._flags": (None, "the command-line flags `aviato` and the daemons spell alike"),
    "aviato._zmq": (
        frozenset({"dealer", "BACKOFF_FIRST", "next_backoff"}),
        "the agent dials the scheduler as a client does: one DEALER, one reconnect schedule",
    ),
    "aviato._auth": (
        frozenset({"CurveKeys"}),
        "the keys the agent dials the scheduler with are a client's keys",
    ),
}


@dataclass(frozen=True)
class Import:
    """One name a file takes from a module ("*": the module itself, used opaquely)."""

    path: str  # relative to ROOT
    line: int
    module: str
    name: str

    def __str__(self) -> str:
        what = self.module if self.name == "*" else f"{self.module}.{self.name}"
        return f"{self.path}:{self.line}: {what}"


def _is_module(dotted: str, root: Path) -> bool:
    path = root.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _package_of(path: Path, root: Path) -> list[str]:
    return list(path.relative_to(root).parts[:-1])  # a module's or an __init__'s own


def imports_of(path: Path, root: Path = ROOT) -> Iterator[Import]:
    """Every (module, name) the file at ``path`` takes from the three packages."""
    tree = ast.parse(path.read_text(), str(path))
    rel = str(path.relative_to(root))
    whole: dict[str, tuple[str, int]] = {}  # local name -> module imported whole
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] not in PACKAGES:
                    continue
                if alias.asname:
                    whole[alias.asname] = (alias.name, node.lineno)
                else:
                    yield Import(rel, node.lineno, alias.name, "*")
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                package = _package_of(path, root)
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, *([module] if module else [])])
            if module.split(".")[0] not in PACKAGES:
                continue
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                if _is_module(sub, root):
                    whole[alias.asname or alias.name] = (sub, node.lineno)
                else:
                    yield Import(rel, node.lineno, module, alias.name)
    used: dict[str, set[str]] = {local: set() for local in whole}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in used
        ):
            used[node.value.id].add(node.attr)
    for local, (module, line) in whole.items():
        for name in sorted(used[local]) or ["*"]:
            yield Import(rel, line, module, name)


def all_imports(root: Path = ROOT) -> list[Import]:
    return [
        found
        for package in PACKAGES
        for path in sorted((root / package).rglob("*.py"))
        for found in imports_of(path, root)
    ]


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def violations(imports: list[Import]) -> list[str]:
    """Each import that breaks a rule of this module's docstring, with the rule."""
    found: list[str] = []
    for imp in imports:
        home = Path(imp.path).parts[0]
        target = imp.module.split(".")[0]
        in_server = Path(imp.path).parts[:2] == ("aviato", "_server")
        if home == "aviato":
            if target in DAEMONS:
                found.append(f"{imp}: rule 1, the client imports a daemon")
            elif _within(imp.module, SERVER) and not in_server:
                found.append(f"{imp}: rule 1, the client imports the daemons' shared code")
            elif in_server and not (
                any(_within(imp.module, m) for m in OPEN_TO_DAEMONS) or imp.module in SHARED
            ):
                found.append(f"{imp}: rule 4, the daemons' shared code uses the client's")
        elif target in DAEMONS and target != home:
            found.append(f"{imp}: rule 3, one daemon imports the other")
        elif target == "aviato" and not any(_within(imp.module, m) for m in OPEN_TO_DAEMONS):
            names, _why = SHARED.get(imp.module, (frozenset(), ""))
            if imp.module not in SHARED or (names is not None and imp.name not in names):
                found.append(
                    f"{imp}: rule 2, a daemon uses the client's code "
                    "(move it into aviato/_server/, or share it in SHARED with a reason)"
                )
    return found


def test_the_import_rules_hold() -> None:
    broken = violations(all_imports())
    assert not broken, "\n".join(broken)


#: Modules of the client alone, which no daemon process loads.
def _client_only() -> list[str]:
    """Every aviato module a daemon may not use: all of them but the open and shared."""
    found = []
    for path in sorted((ROOT / "aviato").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name == "aviato" or name.startswith(OPEN_TO_DAEMONS) or name in SHARED:
            continue
        found.append(name)
    return found


def test_a_daemon_process_loads_no_client_module() -> None:
    code = "import sys, scheduler.__main__, agent.__main__; print(*sorted(sys.modules))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    client_only = _client_only()
    assert "aviato._pool" in client_only and "aviato._server.auth" not in client_only
    assert sorted(set(done.stdout.split()) & set(client_only)) == []


def test_the_reader_sees_every_kind_of_import(tmp_path: Path) -> None:
    """The rules above are only as good as the reader: each form of import is seen."""
    (tmp_path / "aviato" / "_server").mkdir(parents=True)
    (tmp_path / "agent").mkdir()
    (tmp_path / "scheduler").mkdir()
    for package in ("aviato", "aviato/_server", "agent", "scheduler"):
        (tmp_path / package / "__init__.py").write_text("")
    for module in ("_zmq", "_pool", "protocol"):
        (tmp_path / "aviato" / f"{module}.py").write_text("")
    (tmp_path / "aviato" / "_server" / "keys.py").write_text("from aviato import _pool\n")
    (tmp_path / "aviato" / "cli.py").write_text(
        "def f():\n    from scheduler.__main__ import main\nfrom aviato._server.keys import x\n"
    )
    (tmp_path / "agent" / "a.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from aviato._pool import Pool\n"
        "from aviato import _zmq, protocol\n"
        "_zmq.dealer(); _zmq.router()\n"
        "import aviato._connection as conn\n"
        "from aviato import Sandbox\n"
        "from . import b\n"
        "import scheduler.state\n"
        "from aviato._server import keys\n"
    )
    (tmp_path / "agent" / "b.py").write_text("")
    broken = [b.split(": ", 1)[0] for b in violations(all_imports(tmp_path))]
    assert sorted(broken, key=lambda b: (b.split(":")[0], int(b.split(":")[1]))) == [
        "agent/a.py:3",  # TYPE_CHECKING: aviato._pool.Pool
        "agent/a.py:4",  # _zmq.router (dealer is shared)
        "agent/a.py:6",  # aviato._connection, imported whole under another name
        "agent/a.py:7",  # aviato.Sandbox: the public API is the client
        "agent/a.py:9",  # import scheduler.state
        "aviato/_server/keys.py:1",  # the shared daemon code takes the client's pool
        "aviato/cli.py:2",  # the CLI imports a daemon's __main__
        "aviato/cli.py:3",  # the client imports aviato._server
    ]
