"""Structured logging: JSON lines on stdout (orjson), a console renderer on a TTY.

Follows structlog's production recipe: contextvars merged in, level filtering at the
bound-logger level, UTC ISO timestamps, bytes written straight to stdout.

An outage must not flood the log. What fails over and over is an :class:`Outage`: one
WARNING when it starts, a WARNING summary at most every :data:`SUMMARY_INTERVAL` seconds
while it lasts, one INFO when it ends. aiokafka logs each failed retry of its own
(connections, fetches, metadata, heartbeats: thousands of lines a minute while brokers
are lost); its lines are rate-limited here: each message template at most once every
:data:`LIBRARY_REPEAT_INTERVAL` seconds, the next one saying how many were suppressed.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import orjson
import structlog

SUMMARY_INTERVAL = 30.0  # seconds between two summaries of an outage that goes on
LIBRARY_REPEAT_INTERVAL = 60.0  # seconds: one line per aiokafka message template
RATE_LIMITED_LIBRARIES = ("aiokafka",)  # loggers (and their children) rate-limited
_MAX_TEMPLATES = 512  # templates remembered; beyond, the oldest is forgotten

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
    """Forwards stdlib log records (from libraries) to structlog, aiokafka's rate-limited."""

    def __init__(self) -> None:
        super().__init__()
        self._repeats = RepeatLimiter(LIBRARY_REPEAT_INTERVAL)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields: dict[str, Any] = {}
            if record.name.split(".", 1)[0] in RATE_LIMITED_LIBRARIES:
                suppressed = self._repeats.admit((record.name, str(record.msg)))
                if suppressed is None:
                    return
                if suppressed:
                    fields["suppressed_since_last"] = suppressed
            log = structlog.get_logger()
            log.log(
                record.levelno,
                record.getMessage(),
                logger=record.name,
                exc_info=record.exc_info or False,
                **fields,
            )
        except Exception:  # a log handler must never raise into the library calling it
            self.handleError(record)


class RepeatLimiter:
    """Lets each key through at most once every ``interval`` seconds.

    >>> now = [0.0]
    >>> limiter = RepeatLimiter(60, clock=lambda: now[0])
    >>> limiter.admit("a"), limiter.admit("a"), limiter.admit("a"), limiter.admit("b")
    (0, None, None, 0)
    >>> now[0] = 61.0
    >>> limiter.admit("a")  # through again, with the count of those suppressed
    2
    """

    def __init__(self, interval: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval
        self._clock = clock
        self._seen: OrderedDict[object, list[float]] = OrderedDict()  # key -> [at, suppressed]

    def admit(self, key: object) -> int | None:
        """None to drop this occurrence of ``key``; otherwise how many were dropped since
        the last one let through."""
        now = self._clock()
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self._interval:
            seen[1] += 1
            return None
        suppressed = int(seen[1]) if seen is not None else 0
        self._seen[key] = [now, 0]
        self._seen.move_to_end(key)
        while len(self._seen) > _MAX_TEMPLATES:
            self._seen.popitem(last=False)
        return suppressed


class Outage:
    """Something that fails again and again until it works (a commit, a produce, Kafka as
    a whole), logged as an operator wants it: ``started`` (WARNING) at the first failure,
    ``continues`` (WARNING) at most every ``interval`` seconds while failures go on, with
    how long and how many, ``ended`` (INFO) at the first success after them. The three
    event names are given, so each stays a greppable literal; ``fields`` go on every line.
    Its state (:attr:`since`, :attr:`error`, :attr:`failures`) is what ``/readyz`` reads.
    """

    def __init__(
        self,
        started: str,
        continues: str,
        ended: str,
        *,
        interval: float = SUMMARY_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        **fields: Any,
    ) -> None:
        self._started, self._continues, self._ended = started, continues, ended
        self._interval = interval
        self._clock = clock
        self._fields = fields
        self.since: float | None = None  # clock time of the first failure, None when fine
        self.error = ""  # the latest failure
        self.failures = 0
        self._summarised = 0.0

    @property
    def active(self) -> bool:
        return self.since is not None

    def failed(self, error: str) -> None:
        """One more failure: logs the start, or a summary when one is due."""
        now = self._clock()
        self.error = error
        self.failures += 1
        if self.since is None:
            self.since = self._summarised = now
            _log.warning(self._started, error=error, **self._fields)
        elif now - self._summarised >= self._interval:
            self._summarised = now
            _log.warning(
                self._continues,
                error=error,
                failing_s=round(now - self.since),
                failures=self.failures,
                **self._fields,
            )

    def recovered(self) -> None:
        """It works (again): logs the end of an outage under way."""
        if self.since is None:
            return
        _log.info(
            self._ended,
            lasted_s=round(self._clock() - self.since, 1),
            failures=self.failures,
            last_error=self.error,
            **self._fields,
        )
        self.since = None
        self.error = ""
        self.failures = 0


_log = structlog.get_logger(__name__)
