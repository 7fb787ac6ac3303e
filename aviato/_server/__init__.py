"""Code the daemons (``scheduler/``, ``agent/``) share, in one declared place; the
client never imports it (tests/test_layering.py reads the imports to check).

- :mod:`.auth`: the ZAP handler, the server keys it admits by, who may send what;
- :mod:`.sockets`: the ROUTER sockets, bound and sent on;
- :mod:`.daemon`: start-up and exit of a daemon process;
- :mod:`.errors`: the error reply for what a request raised;
- :mod:`.throttle`: the log throttle for warnings about peers.
"""

__all__: list[str] = []
