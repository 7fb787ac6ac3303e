"""Which pre-started spare became which sandbox: a record beside the agent.

A spare's labels were fixed when it was created, before anyone wanted it, so they name
the spare, not the sandbox it became. The claim (sandbox id, session, spec, creation
time) is written here, one small file per claimed spare (written whole, then renamed
into place), before the sandbox's command starts: an agent restarted after ``kill -9``
lists its containers and rewrites a claimed spare's labels from this record, so the
scheduler's soft-state rebuild and the reaper see the sandbox, never the spare. An
unclaimed spare has no record: listed as it is (no spec), it is a leftover, removed.

The directory is the agent's own (under its state directory, keyed by its id), never
inside a sandbox: a sandbox cannot forge another session's claim.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path

from agent.runtime.labels import (
    LABEL_CREATED,
    LABEL_SANDBOX,
    LABEL_SESSION,
    LABEL_SPEC,
)
from aviato.protocol import SandboxSpec, to_wire


class SpareClaims:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()  # runtimes call from their pool threads too
        self._spare_of: dict[str, str] = {}  # sandbox id -> spare id

    def record(self, spare_id: str, sandbox_id: str, spec: SandboxSpec, created_at: float) -> None:
        labels = {
            LABEL_SANDBOX: sandbox_id,
            LABEL_SESSION: spec.session_id or "",
            LABEL_SPEC: json.dumps(to_wire(spec), separators=(",", ":")),
            LABEL_CREATED: repr(created_at),
        }
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self._path(spare_id)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(labels))
        os.replace(tmp, path)
        with self._lock:
            self._spare_of[sandbox_id] = spare_id

    def labels(self, spare_id: str) -> dict[str, str] | None:
        """The sandbox labels a claimed spare stands for (None: never claimed)."""
        try:
            labels: dict[str, str] = json.loads(self._path(spare_id).read_text())
        except (OSError, ValueError):
            return None
        with self._lock:
            self._spare_of[labels[LABEL_SANDBOX]] = spare_id
        return labels

    def release(self, sandbox_id: str) -> None:
        """The sandbox ended: its record goes (a no-op for a sandbox not from a spare)."""
        with self._lock:
            spare_id = self._spare_of.pop(sandbox_id, None)
        if spare_id is not None:
            with contextlib.suppress(FileNotFoundError):
                self._path(spare_id).unlink()

    def prune(self, live_spares: set[str]) -> None:
        """Drop the records of spares whose containers are gone (removed while no agent
        ran)."""
        with contextlib.suppress(FileNotFoundError):
            for path in self.directory.glob("*.json"):
                if path.stem not in live_spares:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()

    def _path(self, spare_id: str) -> Path:
        if not spare_id or "/" in spare_id or spare_id.startswith("."):
            raise ValueError(f"not a spare id: {spare_id!r}")
        return self.directory / f"{spare_id}.json"
