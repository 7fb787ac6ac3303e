"""A client for tests/test_multihost_files.py, run on the client's own host (network
namespace): the sandbox is on another host, reached over ZeroMQ.

    python tests/_mh_files_client.py SCHEDULER SIZE_MIB

Follows a sandbox's logs to its end, uploads and downloads a SIZE_MIB file, then prints
``summary {json}``: the logs seen (stream, text), whether the file came back whole,
and which kind of channel carried it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import tempfile

from aviato import Sandbox, SandboxDefaults

LOGS = "for i in 1 2 3; do echo out$i; sleep 0.2; echo err$i >&2; sleep 0.2; done"


def _sha(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


async def main(address: str, size_mib: int) -> None:
    defaults = SandboxDefaults(container_image="python:3.11", scheduler=address)
    summary: dict[str, object] = {}
    async with Sandbox(command="sh", args=["-c", LOGS], defaults=defaults) as sb:
        summary["logs"] = [[c.stream, c.data.decode()] async for c in sb.stream_logs(follow=True)]
    async with Sandbox(command="sleep", args=["infinity"], defaults=defaults) as sb:
        with tempfile.TemporaryDirectory() as tmp:
            src, back = os.path.join(tmp, "in.bin"), os.path.join(tmp, "out.bin")
            with open(src, "wb") as f:
                for _ in range(size_mib):
                    f.write(os.urandom(1 << 20))
            await sb.upload(src, "/tmp/model.bin")
            await sb.download("/tmp/model.bin", back)
            summary["whole"] = _sha(src) == _sha(back)
            summary["listed"] = [(e.name, e.size) for e in await sb.list_files("/tmp")]
        summary["channel"] = type(sb._agent()[1]).__name__
    print("summary " + json.dumps(summary), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
