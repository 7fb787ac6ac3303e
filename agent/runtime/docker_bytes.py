"""The Docker runtime's byte work on files and logs, without the engine: a file cut
from its archive's chunks, an archive read under a size cap, and a log stream put
back in the order it was written."""

from __future__ import annotations

import contextlib
import struct
import threading
from typing import Any

from agent.runtime.base import OutputChunk, join_chunks
from aviato.exceptions import PayloadTooLargeError

__all__ = ["CHUNK", "cut", "order_log_entries", "read_capped", "too_large"]

CHUNK = 1 << 20  # file transfer piece size
_MUX_HEADER = struct.Struct(">BxxxL")  # stream (1 stdout, 2 stderr), length


def cut(chunks: list[bytes], start: int, end: int) -> bytes:
    """``b"".join(chunks)[start:end]`` without one big copy under the GIL: joining
    only ``bytes`` lets CPython release the GIL, slicing a big buffer does not."""
    pieces, pos = [], 0
    for c in chunks:
        a, b = max(start - pos, 0), min(end - pos, len(c))
        if a < b:
            pieces.append(c if a == 0 and b == len(c) else c[a:b])
        pos += len(c)
    return b"".join(pieces)


def order_log_entries(raw: bytes) -> list[OutputChunk]:
    """Docker's multiplexed log stream, each entry prefixed with its RFC 3339 timestamp,
    as chunks in the order written (adjacent ones of one stream joined)."""
    entries: list[tuple[tuple[str, int], int, bytes]] = []
    at = 0
    while at + _MUX_HEADER.size <= len(raw):
        fd, size = _MUX_HEADER.unpack_from(raw, at)
        at += _MUX_HEADER.size
        data, at = raw[at : at + size], at + size
        stamp, _, text = data.partition(b" ")
        entries.append((_stamp_key(stamp), 2 if fd == 2 else 1, text))
    entries.sort(key=lambda e: e[0])  # stable: the engine's order among equal stamps
    return join_chunks(OutputChunk(fd, text) for _, fd, text in entries)


def _stamp_key(stamp: bytes) -> tuple[str, int]:
    """A sortable key for "2026-11-30T20:16:00.2841Z" (trailing zeros are trimmed, so
    the fraction is compared as nanoseconds, not as text)."""
    text = stamp.decode(errors="replace").rstrip("Z")
    whole, _, fraction = text.partition(".")
    digits = "".join(c for c in fraction if c.isdigit())[:9]
    return whole, int(digits.ljust(9, "0") or 0)


def too_large(sandbox_id: str, path: str, limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"{path} in sandbox {sandbox_id} is larger than the {limit}-byte read limit: "
        "read less (pass a larger max_bytes, or split the file in the sandbox)",
        sandbox_id=sandbox_id,
    )


def read_capped(stream: Any, limit: int, cancelled: threading.Event) -> list[bytes] | None:
    """The archive's chunks, or None past ``limit`` bytes: read while counting, so a
    huge file is never held whole. Stops early (empty) once ``cancelled``."""
    chunks: list[bytes] = []
    total = 0
    try:
        for chunk in stream:
            if cancelled.is_set():
                return []
            total += len(chunk)
            if total > limit:
                return None
            chunks.append(chunk)
    finally:
        with contextlib.suppress(Exception):
            stream.close()  # the HTTP response goes with it, not read to its end
    return chunks
