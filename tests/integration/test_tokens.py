"""The ``dispatcher token`` commands, run as real subprocesses against a real database."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from dispatcher import catalog
from dispatcher.api import create_app
from dispatcher.client import HttpClient
from dispatcher.recovery import Jobs
from dispatcher.settings import Settings
from dispatcher.store import Store, hash_token
from tests.integration.support import WAIT


@dataclass(frozen=True)
class Run:
    """What one CLI run did."""

    returncode: int
    stdout: str
    stderr: str


async def cli(database_url: str, *args: str) -> Run:
    """Run ``python -m dispatcher ARGS`` with the test database; fail after WAIT seconds."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    env.update(DISPATCHER_DATABASE_URL=database_url, DISPATCHER_LOG_FORMAT="json")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dispatcher",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(WAIT):
        out, err = await process.communicate()
    assert process.returncode is not None
    return Run(process.returncode, out.decode(), err.decode())


async def issue(database_url: str, environment_id: str, client_id: str) -> tuple[Run, str]:
    """Issue a token through the CLI; return the run and the token (its last stdout line)."""
    run = await cli(
        database_url, "token", "issue", "--environment-id", environment_id,
        "--client-id", client_id,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    return run, run.stdout.strip().splitlines()[-1]


@pytest.fixture
async def client(
    pool: asyncpg.Pool, settings: Settings
) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    """A client of the API over the same database as the CLI."""
    async with HttpClient.from_settings(settings) as http:
        app = create_app(
            store=Store(pool),
            catalog=catalog.load(),
            http=http,
            settings=settings,
            jobs=Jobs(pool),
        )
        async with TestClient(TestServer(app)) as test_client:
            yield test_client


async def status_with(client: TestClient[web.Request, web.Application], token: str) -> int:
    async with client.get("/webhooks", headers={"Authorization": f"Bearer {token}"}) as reply:
        return reply.status


async def test_issued_token_works_and_revoke_stops_it_at_once(
    database_url: str, client: TestClient[web.Request, web.Application]
) -> None:
    """A token printed by 'token issue' authenticates until 'token revoke' stops it."""
    run, token = await issue(database_url, "shop-1", "client-1")
    assert token.startswith("dsp_")
    assert await status_with(client, token) == 200
    token_id = next(word for word in run.stdout.split() if _is_uuid(word))
    revoked = await cli(database_url, "token", "revoke", token_id)
    assert revoked.returncode == 0, revoked.stderr
    assert await status_with(client, token) == 401


async def test_issued_token_speaks_for_its_shop_and_client(
    database_url: str, pool: asyncpg.Pool
) -> None:
    """The issued token authenticates as the shop and integration it was issued for."""
    _, token = await issue(database_url, "shop-9", "client-9")
    principal = await Store(pool).authenticate(token)
    assert principal is not None
    assert (principal.environment_id, principal.client_id) == ("shop-9", "client-9")


async def test_only_the_hash_of_a_token_is_stored(database_url: str, pool: asyncpg.Pool) -> None:
    """The database holds the token's SHA-256, never the token."""
    _, token = await issue(database_url, "shop-1", "client-1")
    rows = await pool.fetch("SELECT * FROM api_tokens")
    assert [row["token_hash"] for row in rows] == [hash_token(token)]
    assert all(token not in str(value) for row in rows for value in row.values())


async def test_list_shows_tokens_without_revealing_them(database_url: str) -> None:
    """'token list' shows each token's id, shop, client and state, never the token."""
    run_a, token_a = await issue(database_url, "shop-a", "client-a")
    _, token_b = await issue(database_url, "shop-b", "client-b")
    id_a = next(word for word in run_a.stdout.split() if _is_uuid(word))
    assert (await cli(database_url, "token", "revoke", id_a)).returncode == 0
    listed = await cli(database_url, "token", "list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(id_a)
    assert "shop-a" in lines[0]
    assert "client-a" in lines[0]
    assert "revoked" in lines[0]
    assert lines[1].endswith("live")
    assert "shop-b" in lines[1]
    for text in (listed.stdout, listed.stderr):
        assert token_a not in text
        assert token_b not in text
        assert hash_token(token_a).hex() not in text
    only_b = await cli(database_url, "token", "list", "--environment-id", "shop-b")
    assert [line.split()[1] for line in only_b.stdout.strip().splitlines()] == ["shop-b"]


async def test_token_never_appears_in_logs(database_url: str) -> None:
    """'token issue' prints the token once on stdout and nowhere else."""
    run, token = await issue(database_url, "shop-1", "client-1")
    assert run.stdout.count(token) == 1
    assert token not in run.stderr


async def test_revoking_an_unknown_or_revoked_token_fails(database_url: str) -> None:
    """'token revoke' of an unknown id, or of a token already revoked, exits 1 saying so."""
    unknown = await cli(database_url, "token", "revoke", str(uuid.uuid4()))
    assert unknown.returncode == 1
    assert "no live token" in unknown.stderr
    run, _ = await issue(database_url, "shop-1", "client-1")
    token_id = next(word for word in run.stdout.split() if _is_uuid(word))
    assert (await cli(database_url, "token", "revoke", token_id)).returncode == 0
    again = await cli(database_url, "token", "revoke", token_id)
    assert again.returncode == 1
    assert "no live token" in again.stderr


def _is_uuid(word: str) -> bool:
    try:
        uuid.UUID(word)
    except ValueError:
        return False
    return True
