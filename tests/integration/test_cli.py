"""The ``dispatcher`` command as operators run it: every failure is one line and an exit
code; the token commands against a real, fresh PostgreSQL database of the local stack."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
import orjson
import pytest

from dispatcher import db
from dispatcher.client import Outcome
from dispatcher.history import AttemptRecord, History
from dispatcher.notification import Notification

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


def write_attempts(url: str, records: list[AttemptRecord]) -> None:
    async def write() -> None:
        pool = await db.create_pool(url, max_size=1)
        try:
            await History(pool).write(records)
        finally:
            await pool.close()

    asyncio.run(write())


def attempt(
    webhook_id: uuid.UUID, shop: str, at: float, entities: list[int], *, ok: bool, n_retry: int = 0
) -> AttemptRecord:
    notification = Notification(
        str(uuid.uuid4()), webhook_id, "CLOSED", "sales", shop, "app", None,
        tuple({"id": i} for i in entities),
    )  # fmt: skip
    outcome = (
        Outcome(200, None, "HTTP 200", 8.0)
        if ok
        else Outcome(500, "http", "HTTP 500: database on fire", 8.0, body_head="on fire")
    )
    return AttemptRecord.of(
        notification, shop, n_retry, at=at, body=b"{}", outcome=outcome,
        trigger="retry" if n_retry else "scheduled",
    )  # fmt: skip


def test_attempts_lists_a_webhooks_or_an_entitys_attempts_as_a_table_or_json(
    database_url: str,
) -> None:
    """'attempts --webhook' (with --failed, --since, --limit) and 'attempts --environment-id
    --entity-id' print the newest attempts first, as a table or the API's JSON objects."""
    hook, other_hook, foreign = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    now = time.time()
    first = attempt(hook, "shop-1", now - 30, [123], ok=False)
    retry = attempt(hook, "shop-1", now - 20, [123], ok=False, n_retry=1)
    ok = attempt(hook, "shop-1", now - 10, [7], ok=True)
    batch = attempt(other_hook, "shop-1", now - 5, list(range(200, 290)), ok=True)
    theirs = attempt(foreign, "shop-2", now, [123], ok=True)
    write_attempts(database_url, [first, retry, ok, batch, theirs])
    env = {"DISPATCHER_DATABASE_URL": database_url}

    table = dispatcher("attempts", "--webhook", str(hook), **env)
    assert (table.returncode, table.stderr) == (0, "")
    header, *rows = table.stdout.splitlines()
    assert header.split() == [
        "attempted_at", "outcome", "status", "nRetry", "trigger", "duration_ms",
        "notification_uuid", "entity_ids", "error",
    ]  # fmt: skip
    assert [row.split()[1:5] for row in rows] == [
        ["delivered", "200", "0", "scheduled"],
        ["http", "500", "1", "retry"],
        ["http", "500", "0", "scheduled"],
    ]
    assert rows[1].endswith("HTTP 500: database on fire")
    assert first.notification_uuid in rows[2]

    failed = dispatcher("attempts", "--webhook", str(hook), "--failed", "--json", **env)
    assert (failed.returncode, failed.stderr) == (0, "")
    listed = orjson.loads(failed.stdout)
    assert [a["id"] for a in listed] == [str(retry.id), str(first.id)]
    assert set(listed[0]) == {
        "id", "webhook_id", "notification_uuid", "nRetry", "attempted_at", "duration_ms",
        "outcome", "status", "error", "entity_ids", "trigger",
    }  # fmt: skip
    assert listed[0]["nRetry"] == 1 and listed[0]["entity_ids"] == ["123"]

    since = datetime.fromtimestamp(now - 25, UTC).isoformat()
    recent = dispatcher("attempts", "--webhook", str(hook), "--since", since, "--json", **env)
    assert [a["id"] for a in orjson.loads(recent.stdout)] == [str(ok.id), str(retry.id)]
    newest = dispatcher("attempts", "--webhook", str(hook), "--limit", "1", "--json", **env)
    assert [a["id"] for a in orjson.loads(newest.stdout)] == [str(ok.id)]

    by_entity = dispatcher(
        "attempts", "--environment-id", "shop-1", "--entity-id", "123", "--json", **env
    )
    assert (by_entity.returncode, by_entity.stderr) == (0, "")
    assert [a["id"] for a in orjson.loads(by_entity.stdout)] == [str(retry.id), str(first.id)]
    in_batch = dispatcher("attempts", "--environment-id", "shop-1", "--entity-id", "250", **env)
    (row,) = in_batch.stdout.splitlines()[1:]
    assert "200,201,202,203,204,... (90)" in row  # the table abbreviates; --json has them all
    none = dispatcher("attempts", "--environment-id", "shop-3", "--entity-id", "123", **env)
    assert (none.returncode, none.stdout) == (0, "no attempts match\n")
    empty = dispatcher("attempts", "--webhook", str(uuid.uuid4()), "--json", **env)
    assert (empty.returncode, empty.stdout) == (0, "[]\n")


@pytest.mark.parametrize(
    "args",
    [
        ["attempts"],
        ["attempts", "--environment-id", "shop-1"],
        ["attempts", "--webhook", "not-a-uuid"],
        ["attempts", "--webhook", str(uuid.UUID(int=1)), "--since", "yesterday"],
        ["attempts", "--webhook", str(uuid.UUID(int=1)), "--limit", "0"],
    ],
)
def test_attempts_with_a_bad_command_line_exits_2_before_connecting(args: list[str]) -> None:
    """A missing form or a bad value is a command-line error: exit 2, no connection tried."""
    run = dispatcher(*args, DISPATCHER_DATABASE_URL=f"postgresql://u@127.0.0.1:{closed_port()}/x")
    assert run.returncode == 2
    assert run.stdout == ""
    assert run.stderr.splitlines()[-1].startswith("dispatcher attempts: error: ")


def test_attempts_with_the_database_down_is_one_line_and_exit_3() -> None:
    """'attempts' reports an unreachable database like the other commands."""
    port = closed_port()
    run = dispatcher(
        "attempts", "--webhook", str(uuid.UUID(int=1)),
        DISPATCHER_DATABASE_URL=f"postgresql://u@127.0.0.1:{port}/x",
    )  # fmt: skip
    assert run.returncode == 3
    assert run.stderr.splitlines() == [
        f"dispatcher: database unavailable: cannot connect to PostgreSQL at 127.0.0.1:{port}/x: "
        "connection refused; is PostgreSQL running? check DISPATCHER_DATABASE_URL"
    ]
