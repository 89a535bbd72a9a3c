"""The ``dispatcher`` command: run the daemon, migrate the database, manage tokens."""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from collections.abc import Sequence

import structlog

from dispatcher import __version__, db, logs
from dispatcher.catalog import CatalogError
from dispatcher.settings import Settings, SettingsError, documentation
from dispatcher.store import Store


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dispatcher",
        description="Webhook dispatcher: Kafka entity events to signed HTTPS webhook POSTs. "
        "Configured by DISPATCHER_* environment variables (see 'dispatcher settings').",
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
    args = _parser().parse_args(argv)
    if args.command == "settings":
        for name, default, doc in documentation():
            print(f"{name}={default}\n    {doc}")
        return 0
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"dispatcher: configuration error: {exc}", file=sys.stderr)
        return 2
    logs.configure(level=settings.log_level, fmt=settings.log_format)
    try:
        if args.command == "run":
            from dispatcher import daemon

            return asyncio.run(daemon.run(settings, role=args.role))
        if args.command == "migrate":
            applied = asyncio.run(db.migrate_url(settings.database_url))
            structlog.get_logger().info("migrations_done", applied=applied)
            return 0
        if args.command == "token":
            return asyncio.run(_token(settings, args))
    except (db.DatabaseError, CatalogError) as exc:
        print(f"dispatcher: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception:  # already logged by the daemon with its traceback
        return 1
    raise AssertionError(f"unhandled command {args.command}")


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
            print(f"dispatcher: no live token with id {args.token_id}", file=sys.stderr)
            return 1
        for t in await store.list_tokens(args.environment_id):
            state = f"revoked {t.revoked_at.isoformat()}" if t.revoked_at else "live"
            print(f"{t.id}  {t.environment_id}  {t.client_id}  {t.created_at.isoformat()}  {state}")
        return 0
    finally:
        await pool.close()
