"""PostgreSQL access: connection pools and versioned schema migrations.

Migrations are the SQL files ``migrations/NNNN_name.sql`` of this package, applied in
order, each in its own transaction, under an advisory lock so that several daemons
starting at once apply each file exactly once.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from importlib import resources

import asyncpg
import structlog

from dispatcher.errors import ConfigurationError, DatabaseUnavailable, DispatcherError

log = structlog.get_logger(__name__)

# Any constant will do: it only has to be the same for every dispatcher of a database.
_MIGRATION_LOCK = 0x77_65_62_68_6F_6F_6B  # "webhook"
_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

_CONNECT_TIMEOUT = 10.0
# What asyncpg raises when it cannot connect: the network (OSError, TimeoutError), the
# server (refused login, no such database, starting up), or a URL it cannot use.
_CONNECT_FAILURES = (OSError, ValueError, asyncpg.PostgresError, asyncpg.InterfaceError)


@dataclass(frozen=True, slots=True)
class Migration:
    """One versioned SQL file."""

    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """The package's migrations, in version order."""
    found = []
    for entry in resources.files("dispatcher.migrations").iterdir():
        match = _FILE.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        # A packaging bug, not an outage: it must surface with its traceback.
        raise RuntimeError(f"two migration files share a version: {versions}")
    return found


async def migrate(conn: asyncpg.Connection) -> list[int]:
    """Apply the migrations this database lacks; return the versions applied now."""
    await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version    integer PRIMARY KEY,
                   name       text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        applied = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        done = []
        for migration in migrations():
            if migration.version in applied:
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
            log.info("migration_applied", version=migration.version, name=migration.name)
            done.append(migration.version)
        return done
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)


async def connect(url: str, *, connect_timeout: float = _CONNECT_TIMEOUT) -> asyncpg.Connection:
    """One connection; :class:`DatabaseUnavailable` says where it tried and what to do."""
    try:
        return await asyncpg.connect(url, timeout=connect_timeout)
    except _CONNECT_FAILURES as exc:
        raise _connect_error(url, exc, connect_timeout) from exc


async def create_pool(
    url: str, *, min_size: int = 1, max_size: int = 10, command_timeout: float | None = None
) -> asyncpg.Pool:
    """A connection pool; :class:`DatabaseUnavailable` says where it tried and what to do.

    ``command_timeout`` bounds every statement (asyncpg's own timeout: the statement is
    cancelled and its connection dropped). Cancelling a statement from outside instead
    (``asyncio.timeout``) would wait, as the connection goes back to the pool, for a
    server that does not answer: forever."""
    try:
        pool = await asyncpg.create_pool(
            url,
            min_size=min_size,
            max_size=max_size,
            timeout=_CONNECT_TIMEOUT,
            command_timeout=command_timeout or None,
        )
    except _CONNECT_FAILURES as exc:
        raise _connect_error(url, exc, _CONNECT_TIMEOUT) from exc
    assert pool is not None  # create_pool returns None only when used in a bare await of init
    return pool


async def migrate_url(url: str) -> list[int]:
    """Connect, migrate, disconnect."""
    conn = await connect(url)
    try:
        return await migrate(conn)
    finally:
        await conn.close()


def _connect_error(url: str, exc: Exception, timeout: float) -> DispatcherError:
    """The one-line error, saying what to do, for a failed connection attempt to ``url``."""
    where = f"cannot connect to PostgreSQL at {_where(url)}"
    if isinstance(
        exc, asyncpg.InvalidPasswordError | asyncpg.InvalidAuthorizationSpecificationError
    ):
        return DatabaseUnavailable(
            f"{where}: {_one_line(exc)}; check the user and password in DISPATCHER_DATABASE_URL"
        )
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return DatabaseUnavailable(
            f"{where}: {_one_line(exc)}; create it or fix the database name in "
            "DISPATCHER_DATABASE_URL"
        )
    if isinstance(exc, ValueError):  # asyncpg's ClientConfigurationError is one too
        return ConfigurationError(f"DISPATCHER_DATABASE_URL: not a usable URL: {_one_line(exc)}")
    if isinstance(exc, TimeoutError):  # an OSError too: test it first
        reason = f"no answer within {timeout:g} s"
    elif isinstance(exc, ConnectionRefusedError):
        reason = "connection refused"
    elif isinstance(exc, socket.gaierror):
        reason = f"cannot resolve the host name ({exc.strerror})"
    else:
        reason = _one_line(exc)
    return DatabaseUnavailable(
        f"{where}: {reason}; is PostgreSQL running? check DISPATCHER_DATABASE_URL"
    )


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _where(url: str) -> str:
    """host:port/db of a URL, without credentials or query parameters (which may hold one)."""
    rest = url.partition("://")[2].partition("?")[0]
    return rest.rpartition("@")[2] or "the default host"
