"""An outage is one warning, a summary now and then, one info; aiokafka's repeats are cut."""

from __future__ import annotations

import logging

import structlog

from dispatcher import logs
from dispatcher.logs import Outage, RepeatLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_an_outage_logs_its_start_a_summary_per_interval_and_its_end() -> None:
    """A thousand failures over 70 s make one warning, two summaries and one info."""
    clock = Clock()
    outage = Outage("thing_failed", "thing_still_failing", "thing_recovered", clock=clock, a=1)
    with structlog.testing.capture_logs() as lines:
        for i in range(1000):
            clock.now = i * 0.07
            outage.failed(f"error {i}")
        assert outage.active and outage.failures == 1000
        outage.recovered()
        outage.recovered()  # nothing more: it is over
    assert [(line["event"], line["log_level"]) for line in lines] == [
        ("thing_failed", "warning"),
        ("thing_still_failing", "warning"),
        ("thing_still_failing", "warning"),
        ("thing_recovered", "info"),
    ]
    assert lines[0] == {"event": "thing_failed", "log_level": "warning", "error": "error 0", "a": 1}
    assert lines[1]["failing_s"] == 30 and lines[2]["failing_s"] == 60
    assert lines[3]["failures"] == 1000 and lines[3]["last_error"] == "error 999"
    assert not outage.active and outage.since is None


def test_repeats_of_one_template_are_let_through_once_per_interval() -> None:
    """The limiter drops a key's repeats within the interval and counts them."""
    clock = Clock()
    limiter = RepeatLimiter(60, clock=clock)
    assert [limiter.admit("x") for _ in range(5)] == [0, None, None, None, None]
    clock.now = 59.9
    assert limiter.admit("x") is None
    clock.now = 60.0
    assert limiter.admit("x") == 5
    assert limiter.admit("y") == 0


def test_aiokafka_lines_are_rate_limited_and_other_libraries_are_not() -> None:
    """Through the stdlib bridge, 500 identical aiokafka errors (different arguments, one
    template) give one line; another library's 3 lines all pass."""
    handler = logs._StdlibToStructlog()
    chatter = logging.getLogger("aiokafka.consumer.fetcher")
    other = logging.getLogger("asyncio")

    def record(logger: logging.Logger, msg: str, *args: object) -> logging.LogRecord:
        return logger.makeRecord(logger.name, logging.ERROR, __file__, 1, msg, args, None)

    with structlog.testing.capture_logs() as lines:
        for i in range(500):
            handler.emit(record(chatter, "Failed fetch messages from %s: %s", i % 3, "down"))
        for i in range(3):
            handler.emit(record(other, "Task exception was never retrieved %s", i))
    assert [line["event"] for line in lines] == [
        "Failed fetch messages from 0: down",
        "Task exception was never retrieved 0",
        "Task exception was never retrieved 1",
        "Task exception was never retrieved 2",
    ]
    assert lines[0]["logger"] == "aiokafka.consumer.fetcher"
