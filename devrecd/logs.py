"""Structured logging: one line per event, ``key=value`` text or JSON lines."""

from __future__ import annotations

import json
import logging
import sys
import time

_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class _Formatter(logging.Formatter):
    def __init__(self, fmt: str) -> None:
        super().__init__()
        self.json = fmt == "json"

    def format(self, record: logging.LogRecord) -> str:
        extra = {k: v for k, v in vars(record).items() if k not in _RESERVED}
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        if self.json:
            # the core fields win over any ``extra`` key of the same name
            doc = {**extra, "ts": ts, "level": record.levelname.lower(), "logger": record.name, "event": record.getMessage()}
            if record.exc_info:
                doc["exc"] = self.formatException(record.exc_info)
            return json.dumps(doc, default=str)
        msg = record.getMessage()
        parts = [ts, record.levelname.lower(), record.name, printable(msg)]
        parts += [f"{k}={_quote(v)}" for k, v in extra.items()]
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def printable(v: object) -> str:
    """``v`` as text safe to print on one line of a terminal or a log: as is when every character is
    printable, else JSON-quoted and escaped (a newline cannot forge a line, an escape sequence cannot
    retitle a window or move the cursor). The one escaping of every human-readable output."""
    s = str(v)
    return s if s.isprintable() else _json_quoted(s)


def _json_quoted(s: str) -> str:
    """``s`` as a JSON string that holds only printable characters (JSON leaves C1 controls such as
    the 8-bit CSI ``\\x9b``, and line or paragraph separators, as they are: escaped here too)."""
    q = json.dumps(s, ensure_ascii=False)
    return q if q.isprintable() else "".join(c if c.isprintable() else f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF
                                             else c.encode("unicode_escape").decode("ascii") for c in q)


def _quote(v: object) -> str:
    """A value as one token: quoted and escaped (JSON string rules) when it holds a space, ``=``,
    a quote, a backslash or any non-printable character, so that a file name with a newline
    cannot start a forged log line."""
    s = str(v)
    if not s or any(c in s for c in ' ="\\'):
        return _json_quoted(s)
    return printable(s)


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Configure the ``devrecd`` logger (stderr). Safe to call again to change level/format."""
    logger = logging.getLogger("devrecd")
    for h in list(logger.handlers):
        if getattr(h, "_devrecd", False):
            logger.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler._devrecd = True  # type: ignore[attr-defined]
    handler.setFormatter(_Formatter(fmt))
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
