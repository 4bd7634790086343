"""Structured one-line logs (logfmt: key=value), readable by people and by log shippers."""

from __future__ import annotations

import logging
import time


def _quote(value: str) -> str:
    if value and not any(c in value for c in ' "=\n\t'):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        fields = [f"ts={ts}.{int(record.msecs):03d}Z", f"level={record.levelname.lower()}",
                  f"logger={record.name}", f"pid={record.process}",
                  f"msg={_quote(record.getMessage())}"]
        if record.exc_info:
            fields.append(f"error={_quote(self.formatException(record.exc_info))}")
        return " ".join(fields)


def setup(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(LogfmtFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
