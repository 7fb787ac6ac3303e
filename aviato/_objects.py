"""Object refs (issue 14 part 3): big values kept in the cluster.

``ref = await session.put(value)`` pickles the value once and sends it to an agent (the
one the session's workers are on), which holds it as opaque bytes. A ref among a call's
arguments (nested in lists, dicts and tuples too) is sent as the ref alone: the agent
that runs the call hands the worker the object's bytes, once per worker, and the worker
unpickles the value. ``fn.ref(...)`` runs a call whose result stays on its worker's
agent; ``await ref.get()`` fetches a value. A ``fn.ref`` result whose agent died is made
again by running its call once more (its lineage); a lost ``put`` raises
:class:`ObjectLostError`. Objects are freed by ``ref.release()`` and with the session.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import logging
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aviato import _buffers
from aviato._auth import CurveKeys, client_keys
from aviato._buffers import Frames, _Reduce
from aviato._connection import Channel
from aviato._sandbox import scheduler_connection
from aviato.exceptions import (
    AviatoError,
    ClusterUnavailableError,
    FunctionSerializationError,
    ObjectLostError,
    SandboxFailedError,
)
from aviato.protocol import (
    ClusterStatus,
    ClusterStatusReply,
    GetObject,
    KeepResult,
    ObjectData,
    ObjectSource,
    ObjectStored,
    PutObject,
    ReleaseObjects,
    SandboxInfo,
)

if TYPE_CHECKING:
    from aviato._defaults import SandboxDefaults
    from aviato._function import FunctionResult, RemoteFunction
    from aviato._pool_state import Call
    from aviato._session import Session

__all__ = ["ObjectManager", "ObjectRef", "collecting", "curve_for"]

log = logging.getLogger("aviato.objects")

#: The worker's module that rebuilds a ref's value (agent/worker_objects.py, mounted in
#: every worker as this name).
WORKER_MODULE = "aviato_worker_objects"

_local = threading.local()
#: Whether this process ever made an ObjectRef: until it has, no call's arguments can
#: hold one, and a call skips collecting them (a cost on every call's path).
made_any = False
#: A lost ref's call is run again at most this many times (its worker may fail to
#: start while the scheduler still places on the dead agent).
_REMAKE_ATTEMPTS = 4


@contextlib.contextmanager
def collecting() -> Iterator[list[ObjectRef]]:
    """The refs pickled inside this block (a call's arguments), in order."""
    outer = getattr(_local, "refs", None)
    found: list[ObjectRef] = []
    _local.refs = found
    try:
        yield found
    finally:
        _local.refs = outer


class _Resolve:
    """Pickles as the worker's ``aviato_worker_objects.resolve`` (pickle wants a callable
    in a reduction; this one is only ever called in a worker, as that function)."""

    def __call__(self, object_id: str) -> Any:
        raise RuntimeError("an ObjectRef's value is rebuilt in a worker only")

    def __reduce_ex__(self, protocol: Any) -> Any:
        return getattr, (_Reduce(importlib.import_module, (WORKER_MODULE,)), "resolve")


_RESOLVE = _Resolve()


#: A call queued in its pool, and its call ids (one: until it is sent again).
_Queued = tuple["asyncio.Future[FunctionResult[Any]]", list[int]]


@dataclass(slots=True)
class _Lineage:
    """What made a ``fn.ref`` result: the call to run again if it is lost."""

    fn: RemoteFunction[Any]
    blob: bytes
    frames: Frames
    refs: tuple[ObjectRef, ...]


class ObjectRef:
    """A value held in the cluster (``session.put``, ``fn.ref``). Pass it to remote
    functions in place of the value; ``await ref.get()`` brings the value here;
    ``ref.release()`` frees it (the session's close frees the rest)."""

    __slots__ = ("_lineage", "_manager", "_ready", "_released", "object_id")

    def __init__(
        self,
        manager: ObjectManager,
        object_id: str,
        ready: asyncio.Future[ObjectSource],
        lineage: _Lineage | None = None,
    ) -> None:
        global made_any
        made_any = True
        self.object_id = object_id
        self._manager = manager
        #: Where it is held, once it is (a fn.ref's: once its call succeeded).
        self._ready = ready
        self._lineage = lineage
        self._released = False

    def __repr__(self) -> str:
        where = "pending"
        if self._ready.done() and not self._ready.cancelled() and not self._ready.exception():
            where = f"on {self._ready.result().agent_id}"
        state = "released" if self._released else where
        return f"<ObjectRef {self.object_id} {state}>"

    def __reduce_ex__(self, protocol: Any) -> Any:
        # Pickled among a call's arguments: the worker rebuilds the value from the
        # frames its agent handed it (nothing of the value travels from here).
        if self._released:
            raise FunctionSerializationError(
                f"ObjectRef {self.object_id} was released: it cannot be passed any more"
            )
        refs = getattr(_local, "refs", None)
        if refs is not None:
            refs.append(self)
        return _RESOLVE, (self.object_id,)

    @property
    def source(self) -> ObjectSource | None:
        """The agent holding it, once known."""
        ready = self._ready
        if ready.done() and not ready.cancelled() and ready.exception() is None:
            return ready.result()
        return None

    async def get(self, *, timeout: float | None = None) -> Any:
        """The value (a fn.ref's: once its call is done; its error if it failed)."""
        return await self._manager.get(self, timeout)

    def release(self) -> None:
        """Free the value where it is held (now, without waiting). Idempotent."""
        if not self._released:
            self._released = True
            self._manager.release(self)


def curve_for(defaults: SandboxDefaults, public_key: str) -> CurveKeys | None:
    """This client's CURVE keys for an agent of that public key (None: keys are off)."""
    directory = defaults.key_dir()
    if directory is None or not public_key:
        return None
    return client_keys(directory, defaults._client_key_name(), public_key)


class ObjectManager:
    """A session's refs: puts, gets, calls that pass or keep them, their release."""

    def __init__(self, session: Session) -> None:
        self.session = session
        #: Call id -> (objects it needs, where its result is kept): read by the pool.
        self.calls: dict[int, tuple[tuple[ObjectSource, ...], KeepResult | None]] = {}
        #: Agents that hold (or held) this session's objects, by address.
        self._agents: dict[str, ObjectSource] = {}
        self._tasks = session._tasks.child("object refs")

    # ------------------------------------------------------------------ where

    def channel(self, source: ObjectSource) -> Channel:
        defaults = self.session.defaults
        return self.session._connections.get(
            source.agent_address,
            defaults.cluster_token(),
            curve_for(defaults, source.agent_public_key),
            source.agent_lane if defaults.lane_enabled() else "",
        )

    def source_of(self, info: SandboxInfo, object_id: str) -> ObjectSource:
        session_id = self.session.session_id
        if info.agent_address is None or info.agent_id is None:
            raise ObjectLostError(f"object {object_id}: its worker has no agent any more")
        return ObjectSource(
            object_id,
            info.agent_id,
            info.agent_address,
            info.agent_public_key,
            info.agent_lane,
            session_id,
        )

    async def _put_agent(self, object_id: str) -> ObjectSource:
        """Where a put goes: the agent of one of the session's live workers, else the
        live agent with the most free slots (where workers will likely start)."""
        for pool in self.session._pools.values():
            for worker in pool.workers:
                info = worker.sandbox.info
                if worker.alive and info is not None and info.agent_address:
                    return self.source_of(info, object_id)
        defaults = self.session.defaults
        conn = await scheduler_connection(defaults, self.session._connections)
        reply = await conn.request(ClusterStatus(), timeout=defaults.request_timeout_seconds)
        assert isinstance(reply.msg, ClusterStatusReply)
        live = [a for a in reply.msg.agents if a.alive]
        if not live:
            raise ClusterUnavailableError("no live agent to hold the object: start one")
        agent = max(live, key=lambda a: a.slots - a.used)
        session_id = self.session.session_id
        return ObjectSource(
            object_id, agent.agent_id, agent.address, agent.public_key, agent.lane, session_id
        )

    # ------------------------------------------------------------------ put / get

    async def put(self, value: Any) -> ObjectRef:
        self.session._check_open()
        await self.session._ensure_open()
        try:
            with collecting() as inside:
                blob, frames = _buffers.dumps(_buffers.wrap_top(value))
        except Exception as exc:
            raise FunctionSerializationError(
                f"the value given to session.put ({type(value).__name__}) cannot be pickled: {exc}"
            ) from exc
        if inside:  # no agent would hand their objects to the worker with this one
            raise FunctionSerializationError(
                f"the value given to session.put holds {len(inside)} ObjectRef(s): pass "
                "refs to the calls themselves (in their arguments), not inside a put value"
            )
        object_id = uuid.uuid4().hex
        source = await self._put_agent(object_id)
        reply = await self.channel(source).request(
            PutObject(object_id, self.session.session_id, len(frames.views)),
            [blob, *frames.views],
            timeout=self.session.defaults.request_timeout_seconds,
        )
        assert isinstance(reply.msg, ObjectStored)
        self._agents[source.agent_address] = source
        ready: asyncio.Future[ObjectSource] = asyncio.get_running_loop().create_future()
        ready.set_result(source)
        return ObjectRef(self, object_id, ready)

    async def get(self, ref: ObjectRef, timeout: float | None) -> Any:
        if ref._released:
            raise ObjectLostError(f"ObjectRef {ref.object_id} was released: put it again")
        async with asyncio.timeout(timeout):
            for attempt in range(2):
                source = await asyncio.shield(ref._ready)
                try:
                    reply = await self.channel(source).request(
                        GetObject(ref.object_id),
                        timeout=self.session.defaults.request_timeout_seconds,
                    )
                except (ObjectLostError, ClusterUnavailableError) as exc:
                    if attempt or not self._rebuild(ref, exc):
                        raise _lost(ref, source, exc) from exc
                    continue
                assert isinstance(reply.msg, ObjectData)
                payloads = reply.payloads
                return _buffers.loads(payloads[0], payloads[1:])
        raise AssertionError("unreachable")

    def release(self, ref: ObjectRef) -> None:
        if self.session._closed:
            return  # its close freed everything
        if ref.source is None:  # still being made: freed once it is
            ref._ready.add_done_callback(lambda _: self._release_soon(ref.object_id))
        else:
            self._release_soon(ref.object_id)

    def _release_soon(self, object_id: str) -> None:
        with contextlib.suppress(RuntimeError):  # the session closed meanwhile
            self._tasks.spawn(self._release(object_id), on_error=_ignore)

    async def _release(self, object_id: str) -> None:
        """Where it is held, and where a worker's agent fetched a copy of it."""
        timeout = self.session.defaults.request_timeout_seconds
        for source in list(self._agents.values()):
            with contextlib.suppress(AviatoError):
                await self.channel(source).request(ReleaseObjects((object_id,)), timeout=timeout)

    async def close(self) -> None:
        """The session ends: every agent that holds its objects frees them."""
        await self._tasks.close()
        timeout = self.session.defaults.request_timeout_seconds
        for source in self._agents.values():
            try:
                await self.channel(source).request(
                    ReleaseObjects(session_id=self.session.session_id), timeout=timeout
                )
            except AviatoError as exc:  # a dead agent holds nothing any more
                log.info("session %s: releasing objects on %s: %s", self.session, source, exc)

    # ------------------------------------------------------------------ calls

    def for_batch(
        self, calls: Sequence[Call], worker: SandboxInfo | None
    ) -> tuple[tuple[ObjectSource, ...], tuple[KeepResult, ...]]:
        """What a RunCalls of these calls to ``worker`` names: their objects, and results
        to keep (its agent is then one to release them on)."""
        if worker is not None and worker.agent_address not in self._agents:
            with contextlib.suppress(ObjectLostError):
                self._agents[worker.agent_address or ""] = self.source_of(worker, "")
        objects: dict[str, ObjectSource] = {}
        keep: list[KeepResult] = []
        for call in calls:
            extra = self.calls.get(call.call_id)
            if extra is None:
                continue
            for source in extra[0]:
                objects.setdefault(source.object_id, source)
            if extra[1] is not None:
                keep.append(extra[1])
        return tuple(objects.values()), tuple(keep)

    def call(
        self,
        fn: RemoteFunction[Any],
        blob: bytes,
        frames: Frames,
        refs: Sequence[ObjectRef],
    ) -> asyncio.Future[FunctionResult[Any]]:
        """A call whose arguments hold refs: queued now when they are all ready (an
        actor's calls keep their order), else once they are."""
        first = None
        if all(ref.source is not None and not ref._released for ref in refs):
            first = self._submit(fn, blob, frames, tuple(ref.source for ref in refs), None)
        run = self._call(fn, blob, frames, tuple(refs), None, first)
        return self._tasks.spawn(run, on_error=_ignore)

    def call_ref(
        self,
        fn: RemoteFunction[Any],
        blob: bytes,
        frames: Frames,
        refs: Sequence[ObjectRef],
    ) -> ObjectRef:
        """``fn.ref(...)``: the call starts now; its result stays on its agent."""
        object_id = uuid.uuid4().hex
        lineage = _Lineage(fn, blob, frames, tuple(refs))
        ready = self._tasks.spawn(self._produce(object_id, lineage), on_error=_ignore)
        return ObjectRef(self, object_id, ready, lineage)

    async def _produce(
        self, object_id: str, lineage: _Lineage, again: bool = False
    ) -> ObjectSource:
        keep = KeepResult(0, object_id, self.session.session_id)
        for attempt in range(_REMAKE_ATTEMPTS if again else 1):
            try:
                result = await self._call(
                    lineage.fn, lineage.blob, lineage.frames, lineage.refs, keep
                )
                break
            except SandboxFailedError as exc:
                # Made again after an agent died: the scheduler may not know it yet and
                # place the new worker there (it fails at once); try once it may.
                if attempt == _REMAKE_ATTEMPTS - 1 or not again:
                    raise
                log.info("object %s: its call could not run again yet (%s)", object_id, exc)
                await asyncio.sleep(2.0 * (attempt + 1))
        pool = lineage.fn._pool()
        handle = pool._handles.get(result.sandbox_id)
        if handle is None or handle.sandbox.info is None:
            raise ObjectLostError(
                f"object {object_id}: worker {result.sandbox_id} that made it is gone"
            )
        source = self.source_of(handle.sandbox.info, object_id)
        self._agents[source.agent_address] = source
        return source

    async def _call(
        self,
        fn: RemoteFunction[Any],
        blob: bytes,
        frames: Frames,
        refs: tuple[ObjectRef, ...],
        keep: KeepResult | None,
        first: _Queued | None = None,
    ) -> FunctionResult[Any]:
        for attempt in range(2):
            if first is None or attempt:
                sources = []
                for ref in refs:
                    if ref._released:
                        raise ObjectLostError(f"ObjectRef {ref.object_id} was released")
                    sources.append(await asyncio.shield(ref._ready))
                first = self._submit(fn, blob, frames, tuple(sources), keep)
            future, ids = first
            try:
                return await future
            except ObjectLostError as exc:
                # An argument's agent died or restarted: make what lineage can, again.
                named = [r for r in refs if r.object_id in str(exc)] or list(refs)
                rebuilt = [self._rebuild(r, exc) for r in named]
                if attempt or not any(rebuilt):
                    raise
            finally:
                for call_id in ids:
                    self.calls.pop(call_id, None)
        raise AssertionError("unreachable")

    def _submit(
        self,
        fn: RemoteFunction[Any],
        blob: bytes,
        frames: Frames,
        sources: tuple[ObjectSource | None, ...],
        keep: KeepResult | None,
    ) -> _Queued:
        ids: list[int] = []
        known = tuple(s for s in sources if s is not None)
        note = functools.partial(self._note, ids, known, keep)
        return fn._pool().submit(fn, blob, frames, before=note), ids

    def _note(
        self,
        ids: list[int],
        sources: tuple[ObjectSource, ...],
        keep: KeepResult | None,
        call_id: int,
    ) -> None:
        """A call's id, before it can be sent: its batch must name these."""
        ids.append(call_id)
        mine = None if keep is None else KeepResult(call_id, keep.object_id, keep.session_id)
        self.calls[call_id] = (sources, mine)

    def _rebuild(self, ref: ObjectRef, why: BaseException) -> bool:
        """Run a lost ref's call again (True), if it came from one and is not already
        being made again."""
        if ref._lineage is None or not ref._ready.done():
            return False
        log.info("object %s is lost (%s): running its call again", ref.object_id, why)
        remake = self._produce(ref.object_id, ref._lineage, again=True)
        ref._ready = self._tasks.spawn(remake, on_error=_ignore)
        return True


def _lost(ref: ObjectRef, source: ObjectSource, exc: BaseException) -> ObjectLostError:
    if isinstance(exc, ObjectLostError):
        return exc
    return ObjectLostError(
        f"object {ref.object_id} is lost: its agent {source.agent_id} "
        f"({source.agent_address}) does not answer ({exc}); it came from session.put, "
        "so nothing can make it again: put the value again"
    )


def _ignore(exc: BaseException) -> None:
    """A ref's or call's failure goes to whoever awaits it."""
    if not isinstance(exc, Exception):
        raise exc
