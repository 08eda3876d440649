"""Log records as JSON lines (``STREAMREC_LOG_FORMAT=json``), for log shippers: one object per
line with time, level, logger, message, process, and the exception when there is one."""

from __future__ import annotations

import json
import logging
import re
from datetime import datetime, timezone
from typing import Any

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name,
            "message": _ANSI.sub("", record.getMessage()), "pid": record.process,
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def logging_config(level: str, fmt: str) -> dict:
    """A ``logging.config.dictConfig`` for the worker (and Faust's own loggers, which it passes
    on): plain text or JSON lines on stderr."""
    formatter = ({"()": JsonFormatter} if fmt == "json" else
                 {"format": "[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s"})
    return {"version": 1, "disable_existing_loggers": False,
            "formatters": {"streamrec": formatter},
            "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "streamrec",
                                    "stream": "ext://sys.stderr"}},
            "root": {"level": level.upper(), "handlers": ["stderr"]}}
