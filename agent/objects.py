"""The agent's side of object refs (issue 14 part 3): clients put, get and release
objects here (aviato/protocol/objects.py); a RunCalls naming objects has each handed to
its worker once, before the batch (``ObjectFrames`` on the link), and a call whose
result is to be kept (``fn.ref``) leaves it here, the client getting ``None`` in its
place. The bytes are never unpickled on the agent (agent/object_store.py holds them)."""

from __future__ import annotations

import logging
import marshal
import pickle
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.object_fetch import Fetcher
from agent.object_sessions import SessionWatch
from agent.object_store import ObjectStore, budgets_from_env, object_id_problem
from aviato import link as schema
from aviato._server.errors import error_reply
from aviato.exceptions import AviatoError, ObjectLostError, ObjectStoreFullError
from aviato.protocol import (
    CallOutcome,
    CallResults,
    CallStatus,
    Decoded,
    GetObject,
    KeepResult,
    Message,
    ObjectData,
    ObjectSource,
    ObjectsReleased,
    ObjectStats,
    ObjectStatsReply,
    ObjectStored,
    Payload,
    PutObject,
    ReleaseObjects,
    RunCalls,
)

if TYPE_CHECKING:
    from agent.data_plane import DataPlane

__all__ = ["KEPT", "ObjectService"]

log = logging.getLogger("aviato.agent")

#: What the client is sent for a kept result: ``None``, pickled (made here, never read).
KEPT = pickle.dumps(None, protocol=5)


@dataclass(slots=True)
class _Given:
    """The objects one worker holds (sent to it, not dropped since), oldest first."""

    sizes: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.sizes.values())


class ObjectService:
    def __init__(
        self,
        plane: DataPlane,
        start: Callable[[Coroutine[Any, Any, None]], object],
        store: ObjectStore | None = None,
    ) -> None:
        self.plane = plane
        self._start = start
        if store is None:
            memory, disk = budgets_from_env()
            store = ObjectStore(self._spill_dir, memory, disk)
        self.store = store
        self.fetcher = Fetcher(plane.agent_id, plane.token, start)
        self.served = self.handed = 0
        #: Frees the objects of sessions whose client died without closing them.
        self.sessions = SessionWatch(
            plane.agent_id, store, lambda: self.fetcher.ask_scheduler, self._free_session, start
        )
        #: Worker sandbox id -> what it holds; a worker holds at most the memory budget.
        self._given: dict[str, _Given] = {}

    def _spill_dir(self) -> Path:
        # In the agent's own directory (removed with it), beside the workers' (which
        # sandboxes mount one by one: this one none of them).
        hub = self.plane.hub
        assert hub is not None
        return hub.root / "objects"

    def handlers(self) -> dict[type[Message], Callable[[bytes, Decoded], Awaitable[None]]]:
        return {
            PutObject: self._on_put,
            GetObject: self._on_get,
            ReleaseObjects: self._on_release,
            ObjectStats: self._on_stats,
        }

    # ------------------------------------------------------------------ requests

    async def _on_put(self, identity: bytes, d: Decoded) -> None:
        msg = d.msg
        assert isinstance(msg, PutObject)
        if msg.buffers < 0 or len(d.payloads) != 1 + msg.buffers:
            raise ValueError(
                f"PutObject names {msg.buffers} buffers but carries {len(d.payloads)} frames"
            )
        entry = self.store.put(msg.object_id, msg.session_id, d.payloads)
        self.sessions.ensure()
        self._drop_everywhere([msg.object_id])  # a replaced object: workers forget the old
        reply = ObjectStored(
            msg.object_id, entry.size, self.plane.agent_id, in_memory=entry.frames is not None
        )
        self.plane.send_now(identity, d.request_id, reply)

    async def _on_get(self, identity: bytes, d: Decoded) -> None:
        msg = d.msg
        assert isinstance(msg, GetObject)
        frames = self.store.get(msg.object_id)
        self.served += 1
        reply = ObjectData(msg.object_id, len(frames) - 1)
        self.plane.send_now(identity, d.request_id, reply, tuple(frames))

    async def _on_release(self, identity: bytes, d: Decoded) -> None:
        msg = d.msg
        assert isinstance(msg, ReleaseObjects)
        freed = self.store.release(msg.object_ids, msg.session_id)
        self._drop_everywhere([e.object_id for e in freed])
        reply = ObjectsReleased(len(freed), sum(e.size for e in freed))
        self.plane.send_now(identity, d.request_id, reply)

    def _free_session(self, session_id: str) -> None:
        """A session ended without its client freeing its objects (it died): free them."""
        freed = self.store.release((), session_id)
        self._drop_everywhere([e.object_id for e in freed])
        if freed:
            log.info(
                "agent %s: freed %d object(s), %d bytes, of session %s (it ended: its "
                "client closed it or went away)",
                self.plane.agent_id,
                len(freed),
                sum(e.size for e in freed),
                session_id,
            )

    async def _on_stats(self, identity: bytes, d: Decoded) -> None:
        store = self.store
        reply = ObjectStatsReply(
            self.plane.agent_id,
            len(store.entries),
            store.memory_bytes,
            store.disk_bytes,
            store.memory_budget,
            store.disk_budget,
            self.fetcher.fetches,
            self.served,
            self.handed,
        )
        self.plane.send_now(identity, d.request_id, reply)

    # ------------------------------------------------------------------ calls

    def run_calls(
        self, identity: bytes, request_id: int, msg: RunCalls, payloads: tuple[Payload, ...]
    ) -> None:
        """A batch naming objects or keeping results: its objects go to the worker first
        (those it lacks); one that is not held here fails the batch's calls with
        ObjectLostError (the client rebuilds what it can and sends them again)."""
        hub = self.plane.hub
        assert hub is not None
        hub.keep = self.keep_result  # only batches through here keep results
        for keep in msg.keep:
            problem = object_id_problem(keep.object_id)
            if problem:
                raise ValueError(problem)
        missing = [s for s in msg.objects if s.object_id not in self.store]
        here = [s.object_id for s in missing if s.agent_id == self.plane.agent_id]
        if here:  # ours, and gone: released, or we restarted since
            self._fail(identity, request_id, msg, here)
        elif missing:  # another agent's: fetched once, then the batch goes on
            self._start(self._fetch_then_run(identity, request_id, msg, payloads, missing))
        else:
            self._run_calls(identity, request_id, msg, payloads)

    async def _fetch_then_run(
        self,
        identity: bytes,
        request_id: int,
        msg: RunCalls,
        payloads: tuple[Payload, ...],
        missing: list[ObjectSource],
    ) -> None:
        try:
            for source in missing:
                frames = await self.fetcher.fetch(source)
                if source.object_id not in self.store:  # (a concurrent fetch stored it)
                    self.store.put(source.object_id, source.session_id, frames)
                    self.sessions.ensure()
        except (ObjectLostError, ObjectStoreFullError) as exc:
            self._fail(identity, request_id, msg, [], exc)
            return
        try:
            self._run_calls(identity, request_id, msg, payloads)
        except Exception as exc:
            if not isinstance(exc, AviatoError):
                log.exception("agent: RunCalls failed")
            self.plane.send_now(identity, request_id, error_reply(exc))

    def _run_calls(
        self, identity: bytes, request_id: int, msg: RunCalls, payloads: tuple[Payload, ...]
    ) -> None:
        hub = self.plane.hub
        assert hub is not None
        self._forget_ended()
        given = self._given.setdefault(msg.sandbox_id, _Given())
        wanted = {s.object_id for s in msg.objects}
        for source in msg.objects:
            if source.object_id in given.sizes:
                continue
            frames = self.store.get(source.object_id)
            size = sum(memoryview(f).nbytes for f in frames)
            self._make_room(msg.sandbox_id, given, size, wanted)
            header = marshal.dumps(schema.encode(schema.ObjectFrames(source.object_id)))
            hub.send_to_worker(msg.sandbox_id, [header, *frames])
            given.sizes[source.object_id] = size
            self.handed += 1
        hub.run_calls(identity, request_id, msg, payloads)

    def keep_result(
        self, keep: KeepResult, outcome: CallOutcome, frames: Sequence[Payload]
    ) -> tuple[CallOutcome, Sequence[Payload]]:
        """A kept call's outcome: an "ok" result is stored, and the client told "ok" with
        ``None``; an error goes on as it is."""
        if outcome.status is not CallStatus.OK:
            return outcome, frames
        try:
            self.store.put(keep.object_id, keep.session_id, frames)
        except ObjectStoreFullError as exc:
            record = _error_record(exc)
            return CallOutcome(outcome.call_id, CallStatus.ERROR, outcome.seconds), [record]
        self.sessions.ensure()
        self._drop_everywhere([keep.object_id])
        return CallOutcome(outcome.call_id, CallStatus.OK, outcome.seconds), [KEPT]

    def _fail(
        self,
        identity: bytes,
        request_id: int,
        msg: RunCalls,
        missing: list[str],
        error: BaseException | None = None,
    ) -> None:
        """Every call of the batch fails with ``error`` (the worker is fine)."""
        if error is None:
            error = ObjectLostError(
                f"object {missing[0]} is not held by agent {self.plane.agent_id}: it was "
                "released, its session closed, or its agent restarted; put the value again"
            )
        record = _error_record(error)
        outcomes = tuple(CallOutcome(c.call_id, CallStatus.ERROR) for c in msg.calls)
        results = CallResults(msg.sandbox_id, outcomes)
        self.plane.send_now(identity, request_id, results, tuple(record for _ in outcomes))

    def _make_room(self, sandbox_id: str, given: _Given, size: int, wanted: set[str]) -> None:
        """A worker holds at most the memory budget's worth: it drops the oldest it
        holds (not needed by this batch) to take ``size`` more."""
        hub = self.plane.hub
        assert hub is not None
        drop = []
        total = given.total
        for object_id, held in list(given.sizes.items()):
            if total + size <= self.store.memory_budget:
                break
            if object_id not in wanted:
                drop.append(object_id)
                total -= held
                del given.sizes[object_id]
        if drop:
            header = marshal.dumps(schema.encode(schema.ObjectDrop(tuple(drop))))
            hub.send_to_worker(sandbox_id, [header])

    def _drop_everywhere(self, object_ids: Sequence[str]) -> None:
        hub = self.plane.hub
        if hub is None or not object_ids:
            return
        for sandbox_id, given in self._given.items():
            held = [i for i in object_ids if given.sizes.pop(i, None) is not None]
            if held:
                header = marshal.dumps(schema.encode(schema.ObjectDrop(tuple(held))))
                hub.send_to_worker(sandbox_id, [header])

    def _forget_ended(self) -> None:
        for sandbox_id in [s for s in self._given if s not in self.plane.sandboxes]:
            del self._given[sandbox_id]


def _error_record(exc: BaseException) -> bytes:
    """A call's error record (as a worker sends one, aviato/_function.rebuild_error) for
    an error of the agent's own: plain strings, pickled (made here, never read)."""
    name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    return pickle.dumps({"type": name, "message": str(exc), "traceback": ""}, protocol=5)
