"""Structured one-line logs (logfmt: key=value), readable by people and by log shippers."""

from __future__ import annotations

import logging
import time
from typing import Any

from cafs.terminal import shown


def _quote(value: str) -> str:
    if value and not any(c in value for c in ' "=\n\t'):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        fields = [f"ts={ts}.{int(record.msecs):03d}Z", f"level={record.levelname.lower()}",
                  f"logger={record.name}", f"pid={record.process}",
                  f"msg={_quote(shown(record.getMessage()))}"]
        if record.exc_info:
            fields.append(f"error={_quote(self.formatException(record.exc_info))}")
        return " ".join(fields)


class ShownFormatter(logging.Formatter):
    """A plain formatter for a terminal: the message, and each line of a traceback, with
    control characters escaped (a message may quote an image's names)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = shown(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:
        return "\n".join(shown(line) for line in super().formatException(ei).split("\n"))


# Their debug records carry what signs a request: botocore logs its headers (Authorization,
# X-Amz-Security-Token), urllib3 each URL, and a mount's presigned URLs hold the signature and
# session token in their query. Debug logging of cafs must not write credentials to a log.
SIGNING_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3")


def quiet_signing_loggers() -> None:
    """Their records at INFO or above, and none below what the root logger shows."""
    floor = max(logging.INFO, logging.getLogger().level)
    for name in SIGNING_LOGGERS:
        logging.getLogger(name).setLevel(floor)


def setup(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(LogfmtFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    quiet_signing_loggers()
