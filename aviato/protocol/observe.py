"""Seeing the cluster (issue 15; MsgType 180-199): the view the scheduler's dashboard
shows, asked for by a dashboard served in another process (``aviato dashboard``)."""

from __future__ import annotations

from dataclasses import dataclass

from aviato.protocol.records import Message, MsgType


@dataclass(frozen=True, slots=True)
class GetDashboardView(Message):
    """The cluster page's and sandboxes page's data; with ``sandbox_id``, also that
    sandbox's row (the detail page)."""

    TYPE = MsgType.GET_DASHBOARD_VIEW
    sandbox_id: str = ""


@dataclass(frozen=True, slots=True)
class DashboardViewReply(Message):
    """Its one payload: the view as JSON (``cluster``, ``sandboxes``, ``sandbox``, and
    ``totals``: creates and placements so far, for the other side's rate chart). JSON,
    as the page gets it: the schema is the page's, not the wire's."""

    TYPE = MsgType.DASHBOARD_VIEW_REPLY
