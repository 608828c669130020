"""JSON log lines for the host: one object per record, context fields kept, tracebacks in the log only."""
from __future__ import annotations

import logging
import logging.handlers
import queue
import sys
from contextlib import contextmanager
from typing import Any, Iterator, TextIO

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
        elif record.exc_text:
            out["exc"] = record.exc_text
        return orjson.dumps(out, default=str).decode()


@contextmanager
def json_logging(level: str, stream: TextIO | None = None) -> Iterator[None]:
    """Every log record as one JSON line on ``stream`` (stderr), written by a background thread.

    The request path only enqueues the record; formatting and the write syscall happen on
    the listener thread (a write+flush per request line cost ~8% of the route's time in
    bench/request_path.py's profile). Exiting drains the queue, then restores the handlers.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    # The logging HOWTO's "Optimization" switches: our lines carry no caller location,
    # thread or process names, and collecting them costs a stack walk per record.
    saved_flags = (logging._srcfile, logging.logThreads, logging.logProcesses, logging.logMultiprocessing)
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(records, handler, respect_handler_level=False)
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    root.handlers[:] = [_Enqueue(records)]
    root.setLevel(level.upper())
    listener.start()
    try:
        yield
    finally:
        listener.stop()
        (logging._srcfile, logging.logThreads, logging.logProcesses, logging.logMultiprocessing) = saved_flags
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


class _Enqueue(logging.handlers.QueueHandler):
    """Enqueue the record as is: the stdlib's `prepare` formats it on the caller's thread."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        if record.exc_info:  # tracebacks can't cross threads lazily; render them now
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        return record
