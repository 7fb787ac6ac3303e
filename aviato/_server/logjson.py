"""``--log-format json``: one JSON object per log record, for log shippers (Loki,
Elasticsearch, Cloud Logging): the time (UTC, ISO 8601), level, logger and message,
and the traceback of an exception when the record has one."""

from __future__ import annotations

import datetime
import json
import logging

__all__ = ["JsonFormatter"]


class JsonFormatter(logging.Formatter):
    def __init__(self, process: str) -> None:
        super().__init__()
        #: Which daemon ("scheduler", "agent"): a shipper merges several streams.
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        out: dict[str, object] = {
            "ts": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "process": self.process,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False)
