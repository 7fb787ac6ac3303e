"""Hand-built readers and writers of the link's records that are on every call's path,
on the host (aviato/link.py imports this module last, as it reads the records).

- a call's header (:class:`~aviato.link.CallHeader`) and outcome
  (:class:`~aviato.link.CallOutcome`) travel in every RunCalls and CallResults between
  client and agent: aviato.protocol's codec reads and writes them with these
  (:func:`aviato._codec.fast_path`);
- a worker's :class:`~aviato.link.Results` is read by the agent with :func:`results`.

Each reads only the one shape its sender makes, every field there and of its exact
type, and hands any other value to the generic checked decoder (None here), which
accepts or refuses it as before: the answer is the same either way, only cheaper
(tests/test_link_fast_paths.py checks that for any value). The sandbox build's own fast
path (the agent's CallBatch, trusted) is in aviato/link.py, as it must be stdlib-only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aviato import link
from aviato._codec import Convert, fast_path
from aviato.link import CallHeader, CallOutcome, Results

__all__ = ["call_header", "encode_call", "encode_outcome", "outcome", "results"]


def results(value: dict[str, Any]) -> Results | None:
    """A worker's Results header (``"op"`` included), or None for any other shape."""
    outcomes = value.get("outcomes")
    if len(value) != 2 or type(outcomes) is not list:
        return None
    out = []
    for o in outcomes:
        found = outcome(o)
        if found is None:
            return None
        out.append(found)
    return Results(tuple(out))


def outcome(o: Any) -> CallOutcome | None:
    """A CallOutcome with every field there and of its exact type, else None."""
    if type(o) is not dict or len(o) != 5:
        return None
    status_text = o.get("status")
    if type(status_text) is not str:  # (a list would not even hash)
        return None
    call_id, status = o.get("call_id"), link._STATUSES.get(status_text)
    seconds, detail, buffers = o.get("seconds"), o.get("detail"), o.get("buffers")
    if (
        type(call_id) is not int
        or status is None
        or type(seconds) is not float
        or type(detail) is not str
        or type(buffers) is not int
    ):
        return None
    return CallOutcome(call_id, status, seconds, detail, buffers)


def call_header(c: Any) -> CallHeader | None:
    """A CallHeader with every field there and of its exact type, else None."""
    if type(c) is not dict or len(c) != 6:
        return None
    call_id, digest, ship = c.get("call_id"), c.get("digest"), c.get("ship_function")
    text, limit, buffers = c.get("serialization"), c.get("max_result_bytes"), c.get("buffers")
    if (
        type(call_id) is not int
        or type(digest) is not str
        or type(ship) is not bool
        or type(text) is not str
        or type(limit) is not int
        or (type(buffers) is not list and type(buffers) is not tuple)
    ):
        return None
    serialization = link._SERIALIZATIONS.get(text)
    if serialization is None:
        return None
    for index in buffers:
        if type(index) is not int:
            return None
    return CallHeader(call_id, digest, ship, serialization, limit, tuple(buffers))


def encode_call(c: CallHeader) -> dict[str, Any]:
    return {
        "call_id": c.call_id,
        "digest": c.digest,
        "ship_function": c.ship_function,
        "serialization": str.__str__(c.serialization),
        "max_result_bytes": c.max_result_bytes,
        "buffers": list(c.buffers),
    }


def encode_outcome(o: CallOutcome) -> dict[str, Any]:
    return {
        "call_id": o.call_id,
        "status": str.__str__(o.status),
        "seconds": o.seconds,
        "detail": o.detail,
        "buffers": o.buffers,
    }


def _or_checked(exact: Callable[[Any], Any]) -> Callable[[Convert], Convert]:
    """A codec decoder: ``exact``'s record, else the generic decoder's answer."""

    def wrap(checked: Convert) -> Convert:
        def decode_fast(value: Any) -> Any:
            found = exact(value)
            return checked(value) if found is None else found

        return decode_fast

    return wrap


fast_path(CallHeader, decode=_or_checked(call_header), encode=encode_call)
fast_path(CallOutcome, decode=_or_checked(outcome), encode=encode_outcome)
