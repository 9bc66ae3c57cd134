"""Logging, configured once per process: level from RALMSPEC_LOG, format from RALMSPEC_LOG_FORMAT (else the caller's
defaults), and the current request's id (`tracing.py`) on every record.

`json`: one object per line, {"time", "level", "service", "replica", "logger", "message", "request_id" (when the
line is about a request), "exc" (a traceback)}: what a log collector parses, and what `jq 'select(.request_id ==
"...")'` follows across the services' files. `text`: "<time> <service> <LEVEL> <logger> [<request id>]: <message>".
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from services.common import env, tracing

FORMATS = ("json", "text")


class RequestIdFilter(logging.Filter):
    """Sets `record.request_id` (the current request's id, None outside one; an `extra={"request_id": ...}` wins) and
    `record.request_tag` (" [<id>]" or "", for the text format). On a handler: it runs in the logging thread."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = getattr(record, "request_id", None) or tracing.current()
        record.request_id = rid
        record.request_tag = f" [{rid}]" if rid else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in a message or traceback are escaped)."""

    def __init__(self, service: str = "", replica: str = "") -> None:
        super().__init__()
        self.service, self.replica = service, replica

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00",
                                                                                                           "Z"),
            "level": record.levelname}
        if self.service:
            out["service"] = self.service
        if self.replica:
            out["replica"] = self.replica
        out["logger"] = record.name
        out["message"] = record.getMessage()
        rid = getattr(record, "request_id", None)
        if rid:
            out["request_id"] = rid
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def text_formatter(service: str = "") -> logging.Formatter:
    prefix = f"{service} " if service else ""
    return logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s%(request_tag)s: %(message)s")


def configure(default_level: str, default_format: str = "text", service: str = "", replica: str = "") -> None:
    """`service` and `replica` name the process in every line (several log into one terminal or collector)."""
    level = (env.LOG.get() or default_level).upper()
    if level not in logging.getLevelNamesMapping():
        raise SystemExit(f"{env.LOG.name}={level!r}: use DEBUG, INFO, WARNING or ERROR")
    fmt = (env.LOG_FORMAT.get() or default_format).lower()
    if fmt not in FORMATS:
        raise SystemExit(f"{env.LOG_FORMAT.name}={fmt!r}: use {' or '.join(FORMATS)}")
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter(service, replica) if fmt == "json" else text_formatter(service))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.captureWarnings(True)  # Python's warnings become log records too (in the same format)
