"""JSON log lines for the host: one object per record, context fields kept, tracebacks in the log only."""
from __future__ import annotations

import logging
import sys
from typing import Any

import orjson

# Context fields the host and plugins attach with ``extra=``; copied into every line that has them.
FIELDS = ("pluginId", "tenantId", "requestId", "event", "job", "shardId")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] | None = getattr(record, "fields", None)
        if fields is not None:  # the access log: the line is exactly these fields
            out: dict[str, Any] = {"ts": round(record.created, 3), "logger": record.name, **fields}
        else:
            out = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name,
                   "msg": record.getMessage()}
            for key in FIELDS:
                value = getattr(record, key, None)
                if value is not None:
                    out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def configure(level: str) -> None:
    """Send every tenantfleet log record to stderr as one JSON line."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
