"""The ``dispatcher`` command: run the daemon, migrate the database, manage tokens."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import traceback
import uuid
from collections.abc import Iterator, Sequence

import structlog

from dispatcher import __version__, db, logs
from dispatcher.errors import (
    ConfigurationError,
    DatabaseUnavailable,
    DispatcherError,
    KafkaUnavailable,
)
from dispatcher.settings import Settings, documentation
from dispatcher.store import Store

# What a failure prints after "dispatcher: ", and the exit code, by family (first match).
# argparse exits 2 for a bad command line too: both mean "fix what you gave me".
EXIT_CODES: tuple[tuple[type[DispatcherError], str, int], ...] = (
    (ConfigurationError, "configuration error", 2),
    (DatabaseUnavailable, "database unavailable", 3),
    (KafkaUnavailable, "Kafka unavailable", 4),
    (DispatcherError, "error", 1),
)
EXIT_UNEXPECTED = 1
EXIT_INTERRUPTED = 130

_EPILOG = """\
exit codes:
  0    success
  1    the command failed (e.g. no live token with that id) or an unexpected error
  2    a bad setting, catalog file or command line
  3    the database is unavailable (unreachable, refused the login, timed out)
  4    Kafka refused what the daemon needs (e.g. creating its topics); brokers that
       cannot be reached are waited for, with /readyz failing meanwhile
  130  interrupted (Ctrl-C)
Every failure prints one line on stderr: 'dispatcher: <what failed>: <why; what to do>'.
With DISPATCHER_LOG_LEVEL=debug an unexpected error also prints its traceback."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dispatcher",
        description="Webhook dispatcher: Kafka entity events to signed HTTPS webhook POSTs. "
        "Configured by DISPATCHER_* environment variables (see 'dispatcher settings').",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run the daemon (applies migrations first)",
        description="Run the daemon in the foreground until SIGTERM or Ctrl-C.",
    )
    run.add_argument(
        "--role",
        choices=("all", "api", "dispatch", "retry"),
        default="all",
        help="what this process does: the HTTP API, the event dispatcher, the retry "
        "consumer, or all of them (default: all)",
    )
    sub.add_parser(
        "migrate",
        help="apply database migrations and exit",
        description="Apply the schema migrations the database lacks; safe to run twice.",
    )
    sub.add_parser(
        "settings",
        help="list every setting with its default",
        description="Print each DISPATCHER_* variable, its default and what it does.",
    )

    token = sub.add_parser(
        "token", help="manage static API tokens", description="Manage static API tokens."
    )
    token_sub = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    issue = token_sub.add_parser(
        "issue",
        help="issue a token for a shop and an integration",
        description="Issue a static token; the token is the last line of stdout, shown once.",
    )
    issue.add_argument("--environment-id", required=True, help="the shop's id")
    issue.add_argument("--client-id", required=True, help="the integration's client id")
    revoke = token_sub.add_parser(
        "revoke", help="revoke a token by id", description="Revoke a token; it stops at once."
    )
    revoke.add_argument("token_id", type=uuid.UUID, help="the token's id (from 'token list')")
    listing = token_sub.add_parser(
        "list", help="list tokens (never shows them)", description="List tokens by id."
    )
    listing.add_argument("--environment-id", help="only this shop's tokens")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command of ``argv``; every failure is one line on stderr and an exit code."""
    args = _parser().parse_args(argv)
    try:
        return _command(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:
        return _report(exc)


def _command(args: argparse.Namespace) -> int:
    if args.command == "settings":
        for name, default, doc in documentation():
            print(f"{name}={default}\n    {doc}")
        return 0
    settings = Settings.from_env()
    logs.configure(level=settings.log_level, fmt=settings.log_format)
    if args.command == "run":
        from dispatcher import daemon

        return asyncio.run(daemon.run(settings, role=args.role))
    if args.command == "migrate":
        applied = asyncio.run(db.migrate_url(settings.database_url))
        structlog.get_logger().info("migrations_done", applied=applied)
        return 0
    if args.command == "token":
        return asyncio.run(_token(settings, args))
    raise AssertionError(f"unhandled command {args.command}")


def _report(exc: Exception) -> int:
    """Print the one line of a failure on stderr; return its exit code."""
    # An error of a task group (the daemon's loops) is reported by its first leaf: that
    # is the one that stopped the process, the others are usually its consequences.
    leaf = next(_leaves(exc))
    if isinstance(leaf, DispatcherError):
        for family, what, code in EXIT_CODES:
            if isinstance(leaf, family):
                _fail(f"{what}: {_one_line(leaf)}")
                return code
    if os.environ.get("DISPATCHER_LOG_LEVEL", "").strip().lower() == "debug":
        traceback.print_exception(exc, file=sys.stderr)
        hint = "the traceback is above"
    else:
        hint = "run with DISPATCHER_LOG_LEVEL=debug for the traceback"
    _fail(f"unexpected error: {type(leaf).__name__}: {_one_line(leaf)} ({hint})")
    return EXIT_UNEXPECTED


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or "(no message)"


def _fail(message: str) -> None:
    print(f"dispatcher: {message}", file=sys.stderr, flush=True)


async def _token(settings: Settings, args: argparse.Namespace) -> int:
    await db.migrate_url(settings.database_url)
    pool = await db.create_pool(settings.database_url, max_size=1)
    try:
        store = Store(pool)
        if args.token_command == "issue":
            info, token = await store.issue_token(args.environment_id, args.client_id)
            print(
                f"token id {info.id} for environment {info.environment_id}, "
                f"client {info.client_id}; keep the token below, it is shown only once:"
            )
            print(token)
            return 0
        if args.token_command == "revoke":
            if await store.revoke_token(args.token_id):
                print(f"revoked {args.token_id}")
                return 0
            _fail(
                f"cannot revoke: no live token with id {args.token_id} (unknown or already "
                "revoked; 'dispatcher token list' shows every token)"
            )
            return 1
        for t in await store.list_tokens(args.environment_id):
            state = f"revoked {t.revoked_at.isoformat()}" if t.revoked_at else "live"
            print(f"{t.id}  {t.environment_id}  {t.client_id}  {t.created_at.isoformat()}  {state}")
        return 0
    finally:
        await pool.close()
