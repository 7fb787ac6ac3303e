"""A sandbox's output for the dashboard's detail page, asked of the agent that runs it
over the agent's data plane (GetLogs, as ``aviato logs`` does), and turned into what a
page appends: the new part since the last read, or the whole tail again."""

from __future__ import annotations

import itertools

import zmq
import zmq.asyncio

from aviato.protocol import ErrorReply, GetLogs, LogsReply, decode, encode

__all__ = ["MAX_LOG_BYTES", "LogSource", "delta"]

#: The tail of a sandbox's output the page holds at most.
MAX_LOG_BYTES = 256 * 1024
ASK_SECONDS = 5.0


def delta(before: str, now: str) -> tuple[bool, str]:
    """(reset, text): what to append to a page showing ``before`` to show ``now``;
    reset when ``now`` does not continue it (its tail moved past the start)."""
    if now.startswith(before):
        return False, now[len(before) :]
    return True, now


class LogSource:
    """Reads sandboxes' logs from their agents (a short-lived socket per read)."""

    def __init__(self, ctx: zmq.asyncio.Context, token: str | None, curve: bool) -> None:
        self.ctx = ctx
        self.token = token
        #: With CURVE keys, agents serve client keys only; the scheduler has none.
        self.curve = curve
        self._ids = itertools.count(1)

    async def read(self, agent_address: str, sandbox_id: str) -> str:
        """The tail of its output (stdout and stderr in the order written); raises
        RuntimeError with a message for the page when it cannot be read."""
        if self.curve:
            raise RuntimeError(
                "logs are not shown on a cluster with CURVE keys (agents serve client keys "
                "only): use `aviato logs SANDBOX`"
            )
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(agent_address)
            request_id = next(self._ids)
            await sock.send_multipart(encode(GetLogs(sandbox_id), request_id, token=self.token))
            if not await sock.poll(int(ASK_SECONDS * 1000)):
                raise RuntimeError(f"the agent at {agent_address} did not answer")
            decoded = decode(await sock.recv_multipart())
        finally:
            sock.close()
        msg = decoded.msg
        if isinstance(msg, ErrorReply):
            raise RuntimeError(msg.message)
        if not isinstance(msg, LogsReply):
            raise RuntimeError(f"unexpected answer {type(msg).__name__}")
        data = b"".join(bytes(p) for p in decoded.payloads)
        return data[-MAX_LOG_BYTES:].decode("utf-8", errors="replace")
