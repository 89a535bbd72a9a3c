"""The ``dispatcher`` command as operators run it: every failure is one line and an exit
code; the token commands against a real, fresh PostgreSQL database of the local stack."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import asyncpg
import pytest

from dispatcher import db

PG_URL = os.environ.get(
    "DISPATCHER_TEST_DATABASE_URL", "postgresql://dispatcher@127.0.0.1:55432/dispatcher"
)
TIMEOUT = 30.0  # seconds for one run of the command
ISO = r"\d{4}-\d\d-\d\dT[0-9:.]+\+00:00"


@dataclass(frozen=True)
class Run:
    """What one run of the command did."""

    returncode: int
    stdout: str
    stderr: str


def dispatcher(*args: str, **env: str) -> Run:
    """Run ``python -m dispatcher ARGS`` with only the DISPATCHER_* variables of ``env``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    result = subprocess.run(  # noqa: S603 - our own command
        [sys.executable, "-m", "dispatcher", *args],
        env={**clean, "DISPATCHER_LOG_FORMAT": "json", **env},
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
    )
    return Run(result.returncode, result.stdout.decode(), result.stderr.decode())


def closed_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def database_url() -> Iterator[str]:
    """A fresh, migrated database for this test alone, dropped after it."""
    name = f"dispatcher_cli_{uuid.uuid4().hex[:12]}"
    url = f"{PG_URL.rpartition('/')[0]}/{name}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(PG_URL)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        asyncio.run(db.migrate_url(url))
        yield url
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.mark.parametrize("command", [["token", "list"], ["migrate"]])
def test_unreachable_database_is_one_line_naming_it_and_what_to_do(command: list[str]) -> None:
    """With nothing listening at the database URL, the command exits 3 with one line."""
    port = closed_port()
    run = dispatcher(*command, DISPATCHER_DATABASE_URL=f"postgresql://u:hunter2@127.0.0.1:{port}/x")
    assert run.returncode == 3
    assert run.stdout == ""
    assert run.stderr.splitlines() == [
        f"dispatcher: database unavailable: cannot connect to PostgreSQL at 127.0.0.1:{port}/x: "
        "connection refused; is PostgreSQL running? check DISPATCHER_DATABASE_URL"
    ]


def test_refused_login_is_one_line_saying_to_check_the_credentials() -> None:
    """A role the server does not know exits 3, pointing at the URL's user and password."""
    where = PG_URL.partition("://")[2].rpartition("@")[2]  # host:port/db
    run = dispatcher("token", "list", DISPATCHER_DATABASE_URL=f"postgresql://nobody:pw@{where}")
    assert run.returncode == 3
    assert run.stdout == ""
    [line] = run.stderr.splitlines()
    assert line.startswith(
        f"dispatcher: database unavailable: cannot connect to PostgreSQL at {where}"
    )
    assert line.endswith("check the user and password in DISPATCHER_DATABASE_URL")


def test_token_issue_list_revoke_print_what_the_help_documents(database_url: str) -> None:
    """'token issue', 'token list' and 'token revoke' exit 0 and print their documented lines."""
    issued = dispatcher(
        "token", "issue", "--environment-id", "shop-1", "--client-id", "app-1",
        DISPATCHER_DATABASE_URL=database_url,
    )  # fmt: skip
    assert (issued.returncode, issued.stderr) == (0, "")
    head, token = issued.stdout.splitlines()
    found = re.fullmatch(
        r"token id (\S+) for environment shop-1, client app-1; "
        r"keep the token below, it is shown only once:",
        head,
    )
    assert found, head
    token_id = found[1]
    assert token.startswith("dsp_")

    listed = dispatcher("token", "list", DISPATCHER_DATABASE_URL=database_url)
    assert (listed.returncode, listed.stderr) == (0, "")
    assert re.fullmatch(rf"{token_id}  shop-1  app-1  {ISO}  live\n", listed.stdout)
    assert token not in listed.stdout

    revoked = dispatcher("token", "revoke", token_id, DISPATCHER_DATABASE_URL=database_url)
    assert (revoked.returncode, revoked.stdout, revoked.stderr) == (0, f"revoked {token_id}\n", "")
    listed = dispatcher("token", "list", DISPATCHER_DATABASE_URL=database_url)
    assert re.fullmatch(rf"{token_id}  shop-1  app-1  {ISO}  revoked {ISO}\n", listed.stdout)


def test_revoking_an_unknown_token_is_one_line_and_exit_1(database_url: str) -> None:
    """'token revoke' of an id no live token has exits 1 with one line pointing at 'token list'."""
    token_id = uuid.uuid4()
    run = dispatcher("token", "revoke", str(token_id), DISPATCHER_DATABASE_URL=database_url)
    assert run.returncode == 1
    assert run.stdout == ""
    assert run.stderr.splitlines() == [
        f"dispatcher: cannot revoke: no live token with id {token_id} (unknown or already "
        "revoked; 'dispatcher token list' shows every token)"
    ]


def test_bad_setting_is_one_line_and_exit_2_for_any_command() -> None:
    """A bad DISPATCHER_* value stops 'token list' too, before any connection, with exit 2."""
    run = dispatcher("token", "list", DISPATCHER_MAX_RETRIES="-1")
    assert run.returncode == 2
    assert run.stdout == ""
    assert run.stderr.splitlines() == [
        "dispatcher: configuration error: DISPATCHER_MAX_RETRIES: expected an integer >= 0, "
        "got '-1'"
    ]


def test_unreadable_catalog_file_stops_run_with_one_line_and_exit_2() -> None:
    """'run' with a catalog file that does not exist exits 2 naming the file."""
    run = dispatcher(
        "run",
        DISPATCHER_CATALOG_FILE="/nonexistent/catalog.json",
        DISPATCHER_DATABASE_URL=f"postgresql://u@127.0.0.1:{closed_port()}/x",
    )
    assert run.returncode == 2
    assert run.stderr.splitlines() == [
        "dispatcher: configuration error: cannot read catalog file /nonexistent/catalog.json: "
        "No such file or directory"
    ]
