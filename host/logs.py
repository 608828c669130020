"""JSON log lines for the host: one object per record, context fields kept, tracebacks in the log only."""
from __future__ import annotations

import logging
import sys
import threading
from contextlib import contextmanager
from typing import Any, Iterator, TextIO

import orjson

# Context fields the host and plugins attach with ``extra=``; copied into every line that has them.
FIELDS = ("pluginId", "tenantId", "requestId", "event", "job", "shardId")


def access_json(logger: str, created: float, fields: dict[str, Any]) -> str:
    """An access line: exactly ``fields``, after the time and the logger's name."""
    return orjson.dumps({"ts": round(created, 3), "logger": logger, **fields}, default=str).decode()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] | None = getattr(record, "fields", None)
        if fields is not None and not record.exc_info and not record.exc_text:  # the access log
            return access_json(record.name, record.created, fields)
        if fields is not None:
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


class BatchingStreamHandler(logging.Handler):
    """Formats each record when it is logged and writes lines in batches.

    A write (and flush) per request line was the host's largest cost: ~90 us of CPU per
    request in bench/request_path.py, more than the rest of the middleware. Lines are
    written when `max_lines` are waiting, at once for WARNING and above, and at least
    every `interval_s` by a flusher thread; `close` writes what is left. A crash can lose
    at most that interval's lines.
    """

    def __init__(self, stream: TextIO, *, max_lines: int = 256, interval_s: float = 0.2) -> None:
        super().__init__()
        self.stream = stream
        self.max_lines = max_lines
        self._lines: list[str] = []
        self._stop = threading.Event()
        self._flusher = threading.Thread(target=self._flush_every, args=(interval_s,), name="log-flusher",
                                         daemon=True)
        self._flusher.start()

    def emit(self, record: logging.LogRecord) -> None:  # called with self.lock held
        try:
            self._lines.append(self.format(record))
        except Exception:  # the stdlib's contract: a bad record must not raise into the caller
            self.handleError(record)
            return
        if len(self._lines) >= self.max_lines or record.levelno >= logging.WARNING:
            self._write()

    def write_line(self, line: str) -> None:
        """Queue one line formatted by the caller (see `direct_handler`)."""
        with self.lock:  # type: ignore[union-attr]
            self._lines.append(line)
            if len(self._lines) >= self.max_lines:
                self._write()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._write()

    def _write(self) -> None:
        if not self._lines:
            return
        data, self._lines = "\n".join(self._lines) + "\n", []
        try:
            self.stream.write(data)
            self.stream.flush()
        except (OSError, ValueError):  # stream closed or full: logging must never take the host down
            pass

    def _flush_every(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self.flush()

    def close(self) -> None:
        self._stop.set()
        self._flusher.join(timeout=2)
        self.flush()
        super().close()


def direct_handler(logger: logging.Logger, level: int) -> BatchingStreamHandler | None:
    """The handler a ``level`` record of ``logger`` would reach, if it is the only one: a
    `BatchingStreamHandler` formatting with `JsonFormatter`, no filter on the way. Else None.

    Why: the access line through `Logger.info` (record, handler chain, formatter) cost
    ~12 us of CPU per request in bench/request_path.py, against ~1 us to format the same
    line and queue it here; the request path writes it directly when that's what logging
    would do anyway (`json_logging` in `serve` and `up`), and logs it normally otherwise
    (another handler, a filter, pytest's caplog). The caller checks the level first.
    """
    found: BatchingStreamHandler | None = None
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters:
            return None
        for h in current.handlers:
            if (found is not None or type(h) is not BatchingStreamHandler or h.filters
                    or type(h.formatter) is not JsonFormatter or level < h.level):
                return None
            found = h
        if not current.propagate:
            break
        current = current.parent
    return found


@contextmanager
def json_logging(level: str, stream: TextIO | None = None) -> Iterator[None]:
    """Every log record as one JSON line on ``stream`` (stderr), batched (see `BatchingStreamHandler`).

    Exiting writes what is buffered and restores the previous handlers and switches.
    """
    handler = BatchingStreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    # The logging HOWTO's "Optimization" switches: our lines carry no caller location,
    # thread or process names, and collecting them costs a stack walk per record.
    saved_flags = (logging._srcfile, logging.logThreads, logging.logProcesses, logging.logMultiprocessing)
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    try:
        yield
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        handler.close()
        (logging._srcfile, logging.logThreads, logging.logProcesses, logging.logMultiprocessing) = saved_flags
