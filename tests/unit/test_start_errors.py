"""The `dispatcher` process refuses to start with one clear line: a bad setting, a
database that does not answer. Nothing needs to run for these."""

from __future__ import annotations

import os
import subprocess
import sys

DISPATCHER = [sys.executable, "-m", "dispatcher"]
TIMEOUT = 30.0  # seconds for one run of the command


def test_bad_setting_exits_non_zero_with_one_clear_line() -> None:
    """DISPATCHER_HTTP_PORT=abc stops the process at start with one line naming it."""
    env = {**os.environ, "DISPATCHER_HTTP_PORT": "abc"}
    result = subprocess.run(  # noqa: S603 - our own command
        [*DISPATCHER, "run"], env=env, capture_output=True, timeout=TIMEOUT, check=False
    )
    assert result.returncode == 2
    assert result.stdout == b""
    assert result.stderr.decode().splitlines() == [
        "dispatcher: configuration error: DISPATCHER_HTTP_PORT: "
        "expected an integer from 1 to 65535, got 'abc'"
    ]


def test_unreachable_database_is_one_clear_line() -> None:
    """A database that does not answer gives one line saying where it tried."""
    env = {**os.environ, "DISPATCHER_DATABASE_URL": "postgresql://x@127.0.0.1:1/none"}
    result = subprocess.run(  # noqa: S603 - our own command
        [*DISPATCHER, "migrate"],
        env=env, capture_output=True, timeout=TIMEOUT, check=False,
    )  # fmt: skip
    assert result.returncode == 3  # the exit code of "database unavailable"
    assert result.stderr.decode().startswith(
        "dispatcher: database unavailable: cannot connect to PostgreSQL at 127.0.0.1:1/none"
    )
