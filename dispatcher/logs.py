"""Structured logging: JSON lines on stdout (orjson), a console renderer on a TTY.

Follows structlog's production recipe: contextvars merged in, level filtering at the
bound-logger level, UTC ISO timestamps, bytes written straight to stdout.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson
import structlog

_LEVELS = {
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARNING": logging.WARNING,
    "ERROR": logging.ERROR,
}


def configure(*, level: str = "INFO", fmt: str = "auto") -> None:
    """Configure structlog (and route the stdlib's warnings of libraries through it)."""
    numeric = _LEVELS[level.upper()]
    console = fmt == "console" or (fmt == "auto" and sys.stdout.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if console:
        structlog.configure(
            processors=[*shared, structlog.dev.ConsoleRenderer()],
            wrapper_class=structlog.make_filtering_bound_logger(numeric),
            logger_factory=structlog.PrintLoggerFactory(sys.stdout),
            cache_logger_on_first_use=True,
        )
    else:
        structlog.configure(
            processors=[
                *shared,
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(serializer=orjson.dumps),
            ],
            wrapper_class=structlog.make_filtering_bound_logger(numeric),
            logger_factory=structlog.BytesLoggerFactory(sys.stdout.buffer),
            cache_logger_on_first_use=True,
        )
    # Libraries (aiokafka, asyncio, aiohttp) log through the stdlib: send their records
    # through structlog too, so every line on stdout is one JSON object.
    root = logging.getLogger()
    root.handlers[:] = [_StdlibToStructlog()]
    root.setLevel(max(numeric, logging.WARNING))


class _StdlibToStructlog(logging.Handler):
    """Forwards stdlib log records (from libraries) to structlog."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            log = structlog.get_logger()
            log.log(
                record.levelno,
                record.getMessage(),
                logger=record.name,
                exc_info=record.exc_info or False,
            )
        except Exception:  # a log handler must never raise into the library calling it
            self.handleError(record)
