"""Schema migrations on real PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from dispatcher import db
from tests.integration.support import PG_URL, WAIT, with_db


@pytest.fixture
async def empty_database() -> AsyncIterator[str]:
    """A database with no schema at all."""
    name = f"dispatcher_empty_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(PG_URL)
    await admin.execute(f'CREATE DATABASE "{name}"')
    yield with_db(PG_URL, name)
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.close()


async def test_migrations_apply_once_even_when_run_concurrently(empty_database: str) -> None:
    """Three migrators at once apply each file exactly once; a later run applies nothing."""
    results = await asyncio.gather(*(db.migrate_url(empty_database) for _ in range(3)))
    versions = [m.version for m in db.migrations()]
    assert sorted(v for r in results for v in r) == versions
    assert await db.migrate_url(empty_database) == []
    conn = await asyncpg.connect(empty_database)
    try:
        tables = {r["tablename"] for r in await conn.fetch("SELECT tablename FROM pg_tables")}
    finally:
        await conn.close()
    assert {"api_tokens", "webhooks", "schema_migrations"} <= tables


def test_migrate_command_is_idempotent(empty_database: str) -> None:
    """`dispatcher migrate` succeeds on an empty database and again on a migrated one."""
    env = {**os.environ, "DISPATCHER_DATABASE_URL": empty_database, "DISPATCHER_LOG_FORMAT": "json"}
    for _ in range(2):
        result = subprocess.run(
            [sys.executable, "-m", "dispatcher", "migrate"],
            env=env, capture_output=True, timeout=WAIT, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert b'"event":"migrations_done"' in result.stdout
