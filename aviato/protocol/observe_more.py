"""What a dashboard asks an agent (issue 15; MsgType 280-289): its sandboxes' tunnels
and processes (the Sandboxes page's rows), and one sandbox's last exec results (the
detail page). Asked on demand, while a page shows them: nothing rides on creates or
heartbeats. The replies carry JSON, as the page gets it (the schema is the page's,
as ``DashboardViewReply``'s is)."""

from __future__ import annotations

from dataclasses import dataclass

from aviato.protocol.records import Message, MsgType


@dataclass(frozen=True, slots=True)
class GetAgentSandboxes(Message):
    """Dashboard -> agent: each of its running sandboxes' tunnels and processes
    (bounded: see agent/dashboard_view.py)."""

    TYPE = MsgType.GET_AGENT_SANDBOXES


@dataclass(frozen=True, slots=True)
class AgentSandboxesReply(Message):
    """Its one payload: ``{sandbox_id: {"tunnels": [...], "processes": {...}}}``."""

    TYPE = MsgType.AGENT_SANDBOXES_REPLY


@dataclass(frozen=True, slots=True)
class GetExecResults(Message):
    """Dashboard -> agent: the last execs in ``sandbox``. Not named ``sandbox_id``: a
    look is no activity (it must not keep an idle sandbox alive), and a paused
    sandbox's history is still shown."""

    TYPE = MsgType.GET_EXEC_RESULTS
    sandbox: str


@dataclass(frozen=True, slots=True)
class ExecResultsReply(Message):
    """Its one payload: a JSON list, the latest exec last."""

    TYPE = MsgType.EXEC_RESULTS_REPLY
