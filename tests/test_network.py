"""Networks a sandbox can be given (issue 16): ``network="internal"`` (the session's
sandboxes reach each other and nothing else) and egress allow-lists
(``network_allow``: the listed destinations and nothing else, DNS included), with real
listeners on a host address that is not loopback; the local runtime refuses both,
saying why."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
from collections.abc import Callable, Iterator

import psutil
import pytest

from agent.runtime.docker_network import egress_rules, internal_name
from aviato import ConfigurationError, Sandbox, SandboxDefaults, SandboxFailedError
from tests._gvisor_engine import GvisorEngine, gvisor_cluster
from tests._tally import Tally, host_address
from tests.conftest import Cluster, docker_cluster, wait_until
from tests.test_local_runtime import _local_cluster

#: Connects to each (host, port) given as JSON in argv[1]; prints what each got.
CONNECT = r"""
import json, socket, sys
out = []
for host, port in json.loads(sys.argv[1]):
    try:
        socket.create_connection((host, port), 5).sendall(b"probe\n")
        out.append("reached")
    except OSError as exc:
        out.append(type(exc).__name__)
print(json.dumps(out))
"""

#: Code inside trying to change the rules: no CAP_NET_RAW for iptables-legacy's socket,
#: and nf_tables answers a batch with EPERM (no CAP_NET_ADMIN).
FLUSH = r"""
import json, socket, struct
out = {}
try:
    socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    out["raw"] = "opened"
except OSError as exc:
    out["raw"] = type(exc).__name__
try:
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)  # NETLINK_NETFILTER
    begin = struct.pack("=IHHII", 20, 0x10, 0x1 | 0x4, 1, 0) + struct.pack("!BBH", 0, 0, 10)
    s.sendall(begin)  # NFNL_MSG_BATCH_BEGIN for nf_tables, ack asked
    reply = s.recv(4096)
    out["nft"] = struct.unpack("=i", reply[16:20])[0]  # the ack's error: 0 is allowed
except OSError as exc:  # gVisor has no netfilter netlink at all
    out["nft"] = type(exc).__name__
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def docker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from docker_cluster(tmp_path_factory.mktemp("network-docker"), agents=1)


@pytest.fixture(scope="module")
def gcluster(
    tmp_path_factory: pytest.TempPathFactory, gvisor_engine: GvisorEngine
) -> Iterator[Cluster]:
    """One agent on the tests' gVisor engine (tests/_gvisor_engine.py)."""
    yield from gvisor_cluster(tmp_path_factory.mktemp("network-gvisor"), gvisor_engine)


def _forward_within(engine: str, networks: list[str]) -> list[list[str]]:
    rules = []
    for net in networks:
        out = subprocess.run(
            ["docker", "-H", engine, "network", "inspect", "-f", "{{.Id}}", net],
            capture_output=True,
            text=True,
            check=True,
        )
        bridge = f"br-{out.stdout.strip()[:12]}"
        rule = ["DOCKER-USER", "-i", bridge, "-o", bridge, "-j", "ACCEPT"]
        subprocess.run(["iptables", "-I", *rule], check=True)
        rules.append(rule)
    return rules


def _bridge_address(bridge: str) -> str:
    for addr in psutil.net_if_addrs().get(bridge, []):
        if addr.family == socket.AF_INET:
            return str(addr.address)
    raise AssertionError(f"bridge {bridge} has no IPv4 address")


def _networks_of(agent_id: str, engine: str | None = None) -> list[str]:
    out = subprocess.run(
        [
            "docker",
            *(["-H", engine] if engine else []),
            "network",
            "ls",
            "-q",
            "--filter",
            f"label=aviato.agent={agent_id}",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.split()


async def _connect(sb: Sandbox, targets: list[tuple[str, int]]) -> list[str]:
    r = await sb.exec(["python3", "-c", CONNECT, json.dumps(targets)], timeout_seconds=60)
    assert r.returncode == 0, r
    got: list[str] = json.loads(r.stdout)
    return got


async def _until_reached(sb: Sandbox, target: tuple[str, int], timeout: float = 30) -> None:
    """Poll until ``target`` answers from inside (a server starting up), with a deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (got := await _connect(sb, [target])) != ["reached"]:
        assert loop.time() < deadline, f"{target} never answered: {got}"
        await asyncio.sleep(0.2)


async def _address(sb: Sandbox) -> str:
    r = await sb.exec(
        ["python3", "-c", "import socket; print(socket.gethostbyname(socket.gethostname()))"]
    )
    return r.stdout.decode().strip()


async def test_internal_sandboxes_reach_each_other_and_nothing_else(docker: Cluster) -> None:
    defaults = SandboxDefaults(scheduler=docker.address, lease_seconds=5)
    await _internal_checks(defaults, host_address(), lambda: _networks_of(docker.agent_ids[0]))


async def test_allow_list_reaches_what_it_names_and_nothing_else(docker: Cluster) -> None:
    await _allow_checks(SandboxDefaults(scheduler=docker.address, lease_seconds=5), host_address())


async def test_both_under_gvisor(gcluster: Cluster, gvisor_engine: GvisorEngine) -> None:
    defaults = SandboxDefaults(scheduler=gcluster.address, lease_seconds=5, isolation="gvisor")
    host = _bridge_address(gvisor_engine.bridge)
    agent = gcluster.agent_ids[0]
    await _internal_checks(
        defaults, host, lambda: _networks_of(agent, gvisor_engine.host), gvisor_engine.host
    )
    await _allow_checks(defaults, host)


async def _internal_checks(
    defaults: SandboxDefaults,
    host_ip: str,
    networks: Callable[[], list[str]],
    test_engine: str | None = None,
) -> None:
    server = ["python3", "-m", "http.server", "8000"]
    forward: list[list[str]] = []
    # Tallies on the engine bridge's address and on every address (as an agent on
    # 0.0.0.0 is).
    with Tally(host_ip) as tally, Tally("0.0.0.0") as anywhere:
        host, port = tally.address
        try:
            async with Sandbox.session(defaults) as session, Sandbox.session(defaults) as other:
                a = session.create(command=server[0], args=server[1:], network="internal")
                b = session.create(command="sleep", args=["infinity"], network="internal")
                c = other.create(command="sleep", args=["infinity"], network="internal")
                await asyncio.gather(a.start(), b.start(), c.start())
                a_ip = await _address(a)
                if test_engine is not None:
                    # The tests' second engine runs with --iptables=false, so the host's
                    # FORWARD policy (DROP, set by the main engine) drops bridged traffic
                    # that engine would have let through: let the session's bridge through,
                    # as it would (and only for this test).
                    forward.extend(_forward_within(test_engine, networks()))
                gateway = a_ip.rsplit(".", 1)[0] + ".1"  # the bridge's address, if it had one
                await _until_reached(b, (a_ip, 8000))
                # Its peer yes; the host (its bridge, and the network's would-be gateway) no.
                targets = [(host, port), (gateway, anywhere.address[1])]
                got = await _connect(b, [(a_ip, 8000), *targets])
                assert got[0] == "reached" and "reached" not in got[1:], got
                # Another session's internal sandbox is on another network.
                assert (await _connect(c, [(a_ip, 8000)])) != ["reached"]
                assert len(networks()) == 2
        finally:
            for rule in forward:
                subprocess.run(["iptables", "-D", *rule], check=True)
        assert tally.connections == anywhere.connections == 0, "internal reached the host"
    # The sessions' networks go with their last sandbox.
    await asyncio.to_thread(
        wait_until, lambda: not networks(), 30, 0.2, "the internal networks to go"
    )


async def _allow_checks(defaults: SandboxDefaults, host_ip: str) -> None:
    with Tally(host_ip) as allowed, Tally(host_ip) as denied:
        host, port = allowed.address
        _, other_port = denied.address
        defaults = defaults.replace(network_allow=[f"{host}:{port}"])
        async with Sandbox(command="sleep", args=["infinity"], defaults=defaults) as sb:
            assert await _connect(sb, [(host, port), (host, other_port)]) == [
                "reached",
                "ConnectionRefusedError",
            ]
            # DNS is dropped too: the resolver is not on the list.
            dns = (
                "import socket\n"
                "conf = open('/etc/resolv.conf').read().split()\n"
                "ns = [conf[i + 1] for i, w in enumerate(conf) if w == 'nameserver']\n"
                "try:\n"
                "    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', (ns[0], 53))\n"
                "    print('sent')\n"
                "except OSError as exc:\n"
                "    print(type(exc).__name__)\n"
            )
            r = await sb.exec(["python3", "-c", dns])
            assert r.stdout == b"PermissionError\n", r
            # Code inside cannot change the rules, and they hold after it tried.
            r = await sb.exec(["python3", "-c", FLUSH], check=True)
            tried = json.loads(r.stdout)
            assert tried["raw"] != "opened" and tried["nft"] != 0, r
            assert await _connect(sb, [(host, other_port), (host, port)]) == [
                "ConnectionRefusedError",
                "reached",
            ]
        # A whole network by CIDR, every port.
        wide = defaults.replace(network_allow=[f"{host}/32"])
        async with Sandbox(command="sleep", args=["infinity"], defaults=wide) as sb:
            assert await _connect(sb, [(host, other_port)]) == ["reached"]
        await asyncio.to_thread(
            wait_until, lambda: allowed.counts()["probe"] == 2, 10, 0.05, "the probes to land"
        )
        assert denied.connections == 1  # the CIDR sandbox's, never the port-listed one's


async def test_allow_list_host_names_resolve_on_the_agent(docker: Cluster) -> None:
    with Tally() as tally:
        _, port = tally.address
        defaults = SandboxDefaults(
            scheduler=docker.address, lease_seconds=5, network_allow=["localhost:9"]
        )
        # "localhost" resolves to loopback: allowed, and the tally on docker0 is not.
        async with Sandbox(command="sleep", args=["infinity"], defaults=defaults) as sb:
            got = await _connect(sb, [(tally.address[0], port)])
            assert got == ["ConnectionRefusedError"]
        bad = defaults.replace(network_allow=["no-such-host.invalid:443"])
        with pytest.raises(SandboxFailedError, match="does not resolve"):
            async with Sandbox(command="sleep", args=["infinity"], defaults=bad):
                pass


async def test_local_internal_sandboxes_share_a_loopback_only_namespace(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The local runtime: a session's internal sandboxes share one namespace (127.0.0.1
    reaches each other's servers), with no route out; another session's is another."""
    for local in _local_cluster(tmp_path_factory.mktemp("network-local"), agents=1):
        defaults = SandboxDefaults(scheduler=local.address, lease_seconds=5)
        server = ["-m", "http.server", "8000", "--bind", "127.0.0.1"]
        with Tally() as tally:
            async with Sandbox.session(defaults) as one, Sandbox.session(defaults) as two:
                a = one.create(command="python3", args=server, network="internal")
                b = one.create(command="sleep", args=["infinity"], network="internal")
                c = two.create(command="sleep", args=["infinity"], network="internal")
                await asyncio.gather(a.start(), b.start(), c.start())  # at once: one namespace
                await _until_reached(b, ("127.0.0.1", 8000))
                assert await _connect(b, [tally.address]) == ["OSError"]  # unreachable
                assert await _connect(c, [("127.0.0.1", 8000)]) == ["ConnectionRefusedError"]
            assert tally.connections == 0
        # An allow-list it cannot give: refused, saying why.
        with pytest.raises(SandboxFailedError, match=r"runtime cannot honour network_allow"):
            async with Sandbox(
                command="sleep", args=["infinity"], defaults=defaults, network_allow=["10.0.0.0/8"]
            ):
                pass


def test_bad_allow_lists_are_refused_before_sending() -> None:
    for bad, why in [
        (["::1"], "only IPv4"),
        (["a b"], "neither"),
        (["10.0.0.1:0"], "1-65535"),
        ("10.0.0.1", "the string"),
    ]:
        with pytest.raises(ConfigurationError, match=why):
            Sandbox(command="x", network_allow=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="network='none' has none"):
        Sandbox(command="x", network="none", network_allow=["10.0.0.1"])
    with pytest.raises(ConfigurationError, match="'internal'"):
        Sandbox(command="x", network="elsewhere")


def test_the_rules() -> None:
    rules = egress_rules([("10.1.2.0/24", None), ("192.0.2.7/32", 53)])
    assert "-A OUTPUT -d 10.1.2.0/24 -j ACCEPT" in rules
    assert "-A OUTPUT -d 192.0.2.7/32 -p udp --dport 53 -j ACCEPT" in rules
    assert ":OUTPUT DROP [0:0]" in rules and rules.endswith("COMMIT\n")
    assert internal_name("a/b", "s 1") == "aviato-int-a_b-s_1"


def test_a_sessions_internal_sandboxes_are_placed_together() -> None:
    """Internal networks do not span agents, so the scheduler keeps a session's
    internal sandboxes on the agent that has one (waiting for its room), and places
    other sandboxes as before."""
    from aviato.protocol import SandboxSpec
    from tests.test_isolation import _placed_on, _register, _state

    state = _state()
    _register(state, "a", ("runc",), slots=2)
    _register(state, "b", ("runc",), slots=3)  # the most free slots: spread's choice
    now = 10.0

    def spec(session: str, network: str | None = "internal") -> SandboxSpec:
        return SandboxSpec(
            image="python:3.11", command="sleep", session_id=session, network=network
        )

    state.sessions.update({"s1": 1e9, "s2": 1e9})
    assert _placed_on(state.request_create("k1", spec("s1"), 30, now)) == [("b", "runc")]
    # Spread would take "a" now (3 free there, 2 here): the session's next stays.
    assert _placed_on(state.request_create("k2", spec("s1"), 30, now)) == [("b", "runc")]
    # Not internal: placed by spread, as before.
    assert _placed_on(state.request_create("k3", spec("s1", None), 30, now)) == [("a", "runc")]
    # Another session's internal ones: anywhere (a tie of free slots: the smaller id).
    assert _placed_on(state.request_create("k4", spec("s2"), 30, now)) == [("a", "runc")]
    assert _placed_on(state.request_create("k5", spec("s1"), 30, now)) == [("b", "runc")]
    # "b" is full: the session's next internal one waits for it rather than going to "a".
    assert _placed_on(state.request_create("k6", spec("s1"), 30, now)) == []
    assert len(state.pending) == 1
