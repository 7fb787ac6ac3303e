"""Inside a function worker (stdlib and cloudpickle only; mounted as
``aviato_worker_actors``): actor handles passed to a function or an actor, as Ray's
can be. A handle pickled among a call's arguments (aviato/_actor.py) unpickles here as
an :class:`ActorStub`; ``stub.method(*args)`` blocks until the method has run in its
actor's worker and returns a :class:`Result` (``.value``), or raises the method's own
error, as ``aviato.sync``'s handles do.

The call goes to this worker's agent (``ActorCall`` on the supervisor's link, ops in
aviato/link_actors.py), which relays it to the client that owns this worker, and so
to the actor's own handle there: the calls from here and from the client keep one
order, one instance, one restart policy. Nothing else of the cluster is reachable this
way: only the actors of this worker's session, by the keys their handles carry.
"""

from __future__ import annotations

import _thread
import itertools

if __package__:
    from aviato.link_actors import ActorCall
else:  # inside a sandbox, copied beside the supervisor
    from aviato_link_actors import ActorCall  # type: ignore[import-not-found,no-redef]

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any

#: The supervisor's ``send(header, blobs)`` (thread-safe), set as it starts.
SEND: Callable[[Any, Sequence[Any]], None] | None = None
_rids = itertools.count(1)
#: rid -> [a lock released at its reply, the reply's header and frames]
_pending: dict[int, list[Any]] = {}


class ActorError(Exception):
    """An actor call from inside a sandbox that could not run (its actor is closed,
    or not of this worker's session), as the client said."""


class ActorLostError(ActorError):
    """The actor's worker was lost (aviato.ActorLostError in the client)."""


class Result:
    """A method's outcome, as ``aviato.FunctionResult``: ``value``, and where and how
    long it ran."""

    __slots__ = ("attempts", "sandbox_id", "seconds", "value")

    def __init__(self, value: Any, sandbox_id: str, seconds: float) -> None:
        self.value = value
        self.sandbox_id = sandbox_id
        self.attempts = 1
        self.seconds = seconds

    def __repr__(self) -> str:
        return f"Result(value={self.value!r}, sandbox_id={self.sandbox_id!r})"


class ActorStub:
    """An actor's handle inside a sandbox: its methods block and return a Result."""

    __slots__ = ("_json", "_key", "_methods", "_name")

    def __init__(self, key: str, name: str, methods: tuple[str, ...], json: bool = False) -> None:
        self._key = key
        self._name = name
        self._methods = tuple(methods)
        self._json = json

    @property
    def actor_id(self) -> str:
        return self._key

    def __repr__(self) -> str:
        return f"<ActorHandle {self._key} (in a sandbox)>"

    def __reduce__(self) -> Any:  # passed on again: to another function or actor
        return ActorStub, (self._key, self._name, self._methods, self._json)

    def __getattr__(self, method: str) -> Callable[..., Result]:
        if method.startswith("__") or method not in self._methods:
            raise AttributeError(f"{self._name} has no method {method!r}")

        def call(*args: Any, **kwargs: Any) -> Result:
            return _call(self, method, args, kwargs)

        call.__name__ = method
        return call


def _call(stub: ActorStub, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Result:
    if SEND is None:
        raise ActorError(
            f"actor {stub._key}: a handle in a sandbox calls its actor from a function "
            "worker only (this process is not one)"
        )
    if stub._json:
        import json

        blob = json.dumps([[method, *args], kwargs]).encode()
    else:
        import cloudpickle

        blob = cloudpickle.dumps(((method, *args), kwargs), protocol=5)
    rid = next(_rids)
    slot: list[Any] = [_thread.allocate_lock(), None]
    slot[0].acquire()
    _pending[rid] = slot
    try:
        SEND(ActorCall(rid, stub._key, method), [blob])
        slot[0].acquire()  # released by on_reply; the process ends if the agent goes
    finally:
        _pending.pop(rid, None)
    header, frames = slot[1]
    if header.status == "ok":
        if stub._json:
            import json

            value = json.loads(bytes(frames[0]))
        else:
            import pickle

            value = pickle.loads(frames[0], buffers=frames[1:])
        return Result(value, header.sandbox_id, header.seconds)
    if header.status == "error":
        raise _rebuilt(frames[0] if frames else b"")
    kind = ActorLostError if header.error_type == "ActorLostError" else ActorError
    raise kind(f"{header.error_type}: {header.detail}" if header.error_type else header.detail)


def _rebuilt(blob: Any) -> BaseException:
    """The method's error from its record (agent/supervisor_link.py's error_record):
    the exception itself when it unpickles, else an ActorError with its text."""
    import pickle

    try:
        record = pickle.loads(blob)
        if record.get("exception") is not None:
            import cloudpickle

            exc = cloudpickle.loads(record["exception"])
            if isinstance(exc, BaseException):
                exc.add_note(f"\nRemote traceback (the actor's):\n{record.get('traceback', '')}")
                return exc
        return ActorError(
            f"{record.get('type', 'Exception')}: {record.get('message', '')}\n"
            f"{record.get('traceback', '')}"
        )
    except Exception as exc:
        return ActorError(f"the actor's error could not be read: {exc!r}")


def on_reply(header: Any, frames: Sequence[Any]) -> None:
    """An ActorReply from the agent (the supervisor's reader thread)."""
    slot = _pending.get(header.rid)
    if slot is not None and slot[1] is None:
        slot[1] = (header, [bytes(f) for f in frames])
        slot[0].release()
