"""Pickle protocol 5 with out-of-band buffers, for function arguments and results.

Large buffers leave the pickle stream and travel as frames of their own: numpy arrays,
Arrow buffers and :class:`pickle.PickleBuffer` (their own ``__reduce_ex__``), any
``memoryview``, and ``bytes`` / ``bytearray`` given as an argument or returned as the
result (Python pickles exact ``bytes`` without asking the pickler, so one nested in a
list stays in the stream). Nothing is copied to pickle them: a frame is a view of the
caller's own memory, sent when the call is (so an argument must not be changed until
its call has been sent: awaiting the call is enough).

The worker (agent/supervisor.py, stdlib only) mirrors this code for its results; the two
must rebuild what the other makes, so both use standard-library callables only.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Sequence
from typing import Any

import cloudpickle

__all__ = [
    "OOB_MIN_BYTES",
    "Frames",
    "dumps",
    "dumps_args",
    "loads",
    "reduce_memoryview",
    "wrap_top",
]

#: Buffers smaller than this stay in the pickle stream: a frame costs more than a copy.
OOB_MIN_BYTES = 64 * 1024


class _Reduce:
    """An object that pickles as ``func(*args)``: lets a reduction nest another."""

    __slots__ = ("args", "func")

    def __init__(self, func: Any, args: tuple[Any, ...]) -> None:
        self.func = func
        self.args = args

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, tuple[Any, ...]]:
        return self.func, self.args


def reduce_memoryview(mv: memoryview) -> Any:
    """A reduction rebuilding ``mv`` (format, shape, read-only flag) from one buffer that
    goes out of band when large; NotImplemented for a format ``cast`` cannot make."""
    try:
        memoryview(bytes(mv.itemsize)).cast(mv.format)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return NotImplemented
    flat = mv
    if not mv.c_contiguous:  # a copy, writable if the original was
        flat = memoryview(mv.tobytes() if mv.readonly else bytearray(mv.tobytes()))
    rebuilt: Any = _Reduce(memoryview, (pickle.PickleBuffer(flat),))
    if mv.format != "B" or mv.ndim != 1:
        rebuilt = _Reduce(memoryview.cast, (rebuilt, mv.format, list(mv.shape or ())))
    if mv.readonly:
        rebuilt = _Reduce(memoryview.toreadonly, (rebuilt,))
    return rebuilt.__reduce_ex__(5)


def wrap_top(value: Any) -> Any:
    """``value`` ready for the pickler: a large ``bytes`` or ``bytearray`` made to go
    out of band (the pickler is not asked about exact builtins)."""
    if type(value) in (bytes, bytearray) and len(value) >= OOB_MIN_BYTES:
        return _Reduce(type(value), (pickle.PickleBuffer(value),))
    return value


class _Pickler(cloudpickle.Pickler):  # type: ignore[misc]
    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is memoryview:
            return reduce_memoryview(obj)
        return super().reducer_override(obj)


class Frames:
    """The out-of-band buffers of one pickled value, with what identifies each one's
    memory (to send a buffer shared by several calls of a batch once)."""

    __slots__ = ("keys", "views")

    def __init__(self) -> None:
        self.views: list[memoryview] = []
        #: ``id`` of the object whose whole memory the view is, else None (not shared).
        self.keys: list[int | None] = []

    def take(self, buffer: pickle.PickleBuffer) -> bool:
        """The pickler's buffer_callback: True keeps a small buffer in the stream."""
        raw = buffer.raw()  # raises for a non-contiguous one: pickle it in band
        if raw.nbytes < OOB_MIN_BYTES:
            return True
        self.views.append(raw)
        owner = raw.obj
        whole = False
        try:
            with memoryview(owner) as full:
                whole = full.nbytes == raw.nbytes
        except TypeError:
            pass
        self.keys.append(id(owner) if whole else None)
        return False

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in self.views)


def dumps(value: Any) -> tuple[bytes, Frames]:
    """``value`` pickled (cloudpickle, protocol 5) with its large buffers out of band."""
    frames = Frames()
    out = io.BytesIO()
    _Pickler(out, protocol=5, buffer_callback=frames.take).dump(value)
    return out.getvalue(), frames


def dumps_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[bytes, Frames]:
    return dumps((tuple(wrap_top(a) for a in args), {k: wrap_top(v) for k, v in kwargs.items()}))


def loads(blob: bytes | memoryview, buffers: Sequence[memoryview | bytes] = ()) -> Any:
    return pickle.loads(blob, buffers=buffers)
