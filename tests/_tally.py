"""A tally on the host that code inside sandboxes reports to over TCP.

It listens on a host address that is not loopback (the Docker bridge's gateway), so
a bridged container, or a process sharing the host's network, reaches it, and a
sandbox without a network does not. Each line a connection sends is one count for
that key. The tests use it to count function executions on the worker side
("at-least-once": every call ran at least once, however often it was retried) and to
show that a probe does reach the host when the network allows it.

Code inside the sandbox reports with the standard library alone::

    import socket
    with socket.create_connection((host, port), 10) as s:
        s.sendall(b"key\\n")
"""

from __future__ import annotations

import socket
import socketserver
import threading
from collections import Counter

import psutil


def host_address() -> str:
    """An IPv4 address of this host that is not loopback: the Docker bridge's own."""
    for name in ("docker0",):
        for addr in psutil.net_if_addrs().get(name, []):
            if addr.family == socket.AF_INET:
                return str(addr.address)
    raise AssertionError("no docker0 address on this host: is the Docker engine running?")


class Tally:
    def __init__(self, host: str | None = None) -> None:
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.connections = 0
        tally = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                with tally._lock:
                    tally.connections += 1
                for line in self.rfile:
                    key = line.decode(errors="replace").strip()
                    with tally._lock:
                        tally._counts[key] += 1

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True
            request_queue_size = 512

        self._server = Server((host or host_address(), 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def counts(self) -> Counter[str]:
        with self._lock:
            return Counter(self._counts)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> Tally:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
