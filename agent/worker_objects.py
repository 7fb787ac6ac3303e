"""Inside a function worker (stdlib only; mounted as ``aviato_worker_objects``): the
objects its calls' arguments refer to. The agent sends an object's frames once per
worker, before the first batch that needs it (``ObjectFrames`` on the link); a ref
among the arguments unpickles as ``resolve(object_id)``, which rebuilds the value from
them, out-of-band buffers read-only (one object serves many calls: none may change it
for the others)."""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs milliseconds at a worker's start-up
    from collections.abc import Sequence
    from typing import Any

#: Object id -> its frames: the pickle, then its out-of-band buffers.
HELD: dict[str, list[Any]] = {}
#: Object id -> its value, when no call can change it (see resolve).
_VALUES: dict[str, Any] = {}
#: Types a value of which no call can change: one rebuilt value serves every call.
_IMMUTABLE = (bytes, str, int, float, complex, bool, type(None))


def hold(object_id: str, frames: Sequence[Any]) -> None:
    HELD[object_id] = [memoryview(f).toreadonly() for f in frames]
    _VALUES.pop(object_id, None)


def drop(object_ids: Sequence[str]) -> None:
    for object_id in object_ids:
        HELD.pop(object_id, None)
        _VALUES.pop(object_id, None)


def resolve(object_id: str) -> Any:
    """The value of a ref among a call's arguments (called by the arguments' unpickler):
    rebuilt for each call (a call may change a list or a dict it is given), except a
    value of an immutable type, rebuilt once."""
    import pickle  # here: the worker starts without it

    if object_id in _VALUES:
        return _VALUES[object_id]
    frames = HELD.get(object_id)
    if not frames:
        raise LookupError(f"object {object_id} was not handed to this worker by its agent")
    value = pickle.loads(frames[0], buffers=frames[1:])
    if type(value) in _IMMUTABLE:  # (100 MB of bytes: not copied again for each call)
        _VALUES[object_id] = value
    return value


def on_header(header: Any, frames: Sequence[Any]) -> None:
    """An ObjectFrames or ObjectDrop from the agent (aviato/link.py)."""
    if header.OP == "object":
        hold(header.object_id, frames)
    else:
        drop(header.object_ids)
