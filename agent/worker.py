"""The function worker: runs INSIDE a sandbox, with the standard library and cloudpickle
only (the agent mounts this file and cloudpickle read-only at /opt/aviato).

It connects to the agent over a Unix socket mounted into the container (so a
sandbox with no network still works), says hello, then loops: read a batch of
calls, run them one after another, send the outcomes back. It exits when the
agent closes the socket.

Framing on the socket: ``u32 frame count``, then per frame ``u64 length`` + bytes.
Frame 0 is a JSON header; the rest are opaque blobs (pickled or JSON data).
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import struct
import sys
import time
import traceback
from typing import Any

_COUNT = struct.Struct("!I")
_LEN = struct.Struct("!Q")
#: Outcomes are sent at the latest this long after the first unsent one finished.
FLUSH_SECONDS = 0.002


def read_message(stream: Any) -> list[bytes] | None:
    """One message's frames, or None at a clean end of stream."""
    head = stream.read(_COUNT.size)
    if len(head) < _COUNT.size:
        return None
    (count,) = _COUNT.unpack(head)
    frames = []
    for _ in range(count):
        raw = stream.read(_LEN.size)
        if len(raw) < _LEN.size:
            return None
        (length,) = _LEN.unpack(raw)
        data = stream.read(length)
        if len(data) < length:
            return None
        frames.append(data)
    return frames


def pack_message(frames: list[bytes]) -> list[bytes]:
    """Frames with their length prefixes, ready for one sendmsg/sendall."""
    parts = [_COUNT.pack(len(frames))]
    for frame in frames:
        parts.append(_LEN.pack(len(frame)))
        parts.append(frame)
    return parts


def send_message(sock: socket.socket, frames: list[bytes]) -> None:
    parts = pack_message(frames)
    total = sum(len(p) for p in parts)
    if total < 1 << 20:
        sock.sendall(b"".join(parts))
    else:
        for part in parts:  # large blobs: no joined copy
            sock.sendall(part)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def error_record(exc: BaseException, dumps: Any) -> bytes:
    """What the client needs to rebuild ``exc``: the pickled exception when possible,
    and always its type name, message and formatted traceback."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    pickled = None
    if dumps is not None:
        try:
            pickled = dumps(exc)
        except Exception:
            pickled = None
    record = {
        "type": _qualname(type(exc)),
        "message": str(exc),
        "traceback": tb,
        "exception": pickled,
    }
    return pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL)


class Worker:
    def __init__(self, sock: socket.socket) -> None:
        import cloudpickle

        self.sock = sock
        self.cloudpickle = cloudpickle
        self.functions: dict[str, Any] = {}

    def run_batch(self, header: dict[str, Any], blobs: list[bytes]) -> None:
        outcomes: list[dict[str, Any]] = []
        payloads: list[bytes] = []
        first_unsent = 0.0
        index = 0
        for call in header["calls"]:
            fn_blob = None
            if call["fn"]:
                fn_blob = blobs[index]
                index += 1
            args_blob = blobs[index]
            index += 1
            outcome, payload = self.run_one(call, fn_blob, args_blob)
            outcomes.append(outcome)
            payloads.append(payload)
            now = time.monotonic()
            if not first_unsent:
                first_unsent = now
            if now - first_unsent >= FLUSH_SECONDS or outcome["secs"] >= FLUSH_SECONDS:
                self.send(outcomes, payloads)
                outcomes, payloads, first_unsent = [], [], 0.0
        if outcomes:
            self.send(outcomes, payloads)

    def run_one(
        self, call: dict[str, Any], fn_blob: bytes | None, args_blob: bytes
    ) -> tuple[dict[str, Any], bytes]:
        digest = call["digest"]
        use_json = call["ser"] == "json"
        started = time.perf_counter()
        try:
            if fn_blob is not None:
                self.functions[digest] = self.cloudpickle.loads(fn_blob)
            fn = self.functions.get(digest)
            if fn is None:
                raise LookupError(f"function {digest} was never shipped to this worker")
            if use_json:
                args, kwargs = json.loads(args_blob)
            else:
                args, kwargs = self.cloudpickle.loads(args_blob)
            value = fn(*args, **kwargs)
            try:
                blob = (
                    json.dumps(value).encode()
                    if use_json
                    else self.cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
                )
            except Exception as exc:
                raise TypeError(
                    f"the return value ({type(value).__name__}) cannot be serialized: {exc}"
                ) from exc
            status = "ok"
        except BaseException as exc:  # user code may raise anything, SystemExit included
            blob = error_record(exc, None if use_json else self.cloudpickle.dumps)
            status = "error"
        secs = time.perf_counter() - started
        return {"id": call["id"], "status": status, "secs": secs}, blob

    def send(self, outcomes: list[dict[str, Any]], payloads: list[bytes]) -> None:
        header = json.dumps({"op": "results", "outcomes": outcomes}).encode()
        send_message(self.sock, [header, *payloads])

    def serve(self) -> None:
        stream = self.sock.makefile("rb", buffering=1 << 16)
        while True:
            frames = read_message(stream)
            if frames is None:
                return  # the agent went away: so do we
            header = json.loads(frames[0])
            if header.get("op") == "calls":
                self.run_batch(header, frames[1:])


def main() -> int:
    path = os.environ.get("AVIATO_WORKER_SOCKET", "/run/aviato/worker.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    deadline = time.monotonic() + 30
    while True:
        try:
            sock.connect(path)
            break
        except OSError:
            if time.monotonic() > deadline:
                print(f"aviato worker: cannot reach the agent at {path}", file=sys.stderr)
                return 2
            time.sleep(0.01)
    mine = f"{sys.version_info.major}.{sys.version_info.minor}"
    want = os.environ.get("AVIATO_CLIENT_PYTHON", mine)
    hello: dict[str, Any] = {"op": "hello", "python": sys.version.split()[0], "pid": os.getpid()}
    if want != mine:
        hello["error"] = (
            f"the image's Python is {mine} but the client's is {want}: functions are "
            f"pickled by the client, so both must match; use an image with Python {want}"
        )
    else:
        try:
            import cloudpickle  # noqa: F401
        except ImportError as exc:
            hello["error"] = f"the worker cannot import cloudpickle: {exc}"
    send_message(sock, [json.dumps(hello).encode()])
    if "error" in hello:
        return 3
    Worker(sock).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
