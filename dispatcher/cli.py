"""The ``dispatcher`` command: run the daemon, migrate the database, manage tokens."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import traceback
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
import structlog

from dispatcher import __version__, catalog, db, event_types, logs
from dispatcher.errors import (
    ConfigurationError,
    DatabaseUnavailable,
    DispatcherError,
    KafkaUnavailable,
)
from dispatcher.history import AttemptQuery, History, attempt_json
from dispatcher.recovery import (
    MODES,
    ActiveJob,
    BadRange,
    Job,
    Jobs,
    check_log_holds,
    check_range,
)
from dispatcher.settings import Settings, documentation, parse_processes
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
    run.add_argument(
        "--processes",
        type=_processes,
        metavar="N|auto",
        help="consumer processes under one supervisor on the one HTTP port (default: "
        "DISPATCHER_PROCESSES, 1; auto: the CPUs this process may use)",
    )
    # Given by the supervisor to its children (dispatcher/supervisor.py), not by people.
    run.add_argument("--process-index", type=int, help=argparse.SUPPRESS)
    run.add_argument("--http-fd", type=int, help=argparse.SUPPRESS)
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
    listing_types = sub.add_parser(
        "catalog",
        help="list the event types webhooks can subscribe to",
        description="Print every (entity, event) pair of the catalog (DISPATCHER_CATALOG_FILE "
        "or the built-in one), what happens to its events in an import, and what it means: "
        "a table, or with --json the JSON array of GET /event-types, schemas included.",
    )
    listing_types.add_argument("--json", action="store_true", help="print a JSON array")

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
    _attempts_parser(sub)
    _recovery_parsers(sub)
    return parser


def _recovery_parsers(sub: Any) -> None:
    recover = sub.add_parser(
        "recover",
        help="queue a recovery job for a webhook (what POST /webhooks/{id}/recover does)",
        description="Queue a job that sends a webhook again what it missed in a time range: "
        "mode failed resends the notifications whose last attempt failed (from the delivery "
        "history), mode replay every matching event of the event topics. A running daemon "
        "runs it; 'dispatcher recoveries' shows how far it got.",
    )
    recover.add_argument("--webhook", type=uuid.UUID, required=True, metavar="ID")
    recover.add_argument("--since", type=_moment, required=True, metavar="ISO")
    recover.add_argument("--until", type=_moment, metavar="ISO", help="default: now")
    recover.add_argument("--mode", choices=MODES, default="failed", help="default: failed")
    recover.add_argument("--json", action="store_true", help="print the job as JSON")
    recoveries = sub.add_parser(
        "recoveries",
        help="list a webhook's recovery jobs",
        description="List a webhook's recovery jobs, newest first: state, counts and times.",
    )
    recoveries.add_argument("--webhook", type=uuid.UUID, required=True, metavar="ID")
    recoveries.add_argument("--json", action="store_true", help="print a JSON array")


ATTEMPTS_MAX_LIMIT = 10_000
ATTEMPTS_FORMS = "give --webhook ID, or --environment-id SHOP with --entity-id ID"


def _attempts_parser(sub: Any) -> None:
    attempts = sub.add_parser(
        "attempts",
        help="list recorded delivery attempts (the delivery history)",
        description="List the recorded attempts of one webhook (--webhook), or those of a "
        "shop that carried an entity (--environment-id with --entity-id), newest first: "
        "a table, or with --json a JSON array of the API's attempt objects.",
    )
    attempts.add_argument("--webhook", type=uuid.UUID, metavar="ID", help="the webhook's id")
    attempts.add_argument("--environment-id", metavar="SHOP", help="the shop's id")
    attempts.add_argument("--entity-id", metavar="ID", help="only attempts carrying this entity")
    attempts.add_argument("--failed", action="store_true", help="only failed attempts")
    attempts.add_argument("--since", type=_moment, metavar="ISO", help="attempted at or after")
    attempts.add_argument("--until", type=_moment, metavar="ISO", help="attempted before")
    attempts.add_argument(
        "--limit",
        type=_limit,
        default=50,
        metavar="N",
        help=f"the N newest attempts (default 50, at most {ATTEMPTS_MAX_LIMIT})",
    )
    attempts.add_argument("--json", action="store_true", help="print a JSON array")
    attempts.set_defaults(usage_error=attempts.error)


def _attempts_form(args: argparse.Namespace) -> bool:
    """One of the two forms: a webhook, or a shop with an entity."""
    return args.webhook is not None or None not in (args.environment_id, args.entity_id)


def _processes(text: str) -> int:
    try:
        return parse_processes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _moment(text: str) -> datetime:
    """An ISO 8601 time; one without a time zone is UTC."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an ISO 8601 time: {text!r} (e.g. 2026-01-01T10:00:00Z)"
        ) from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= ATTEMPTS_MAX_LIMIT:
        raise argparse.ArgumentTypeError(
            f"expected an integer from 1 to {ATTEMPTS_MAX_LIMIT}, got {text!r}"
        )
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command of ``argv``; every failure is one line on stderr and an exit code."""
    args = _parser().parse_args(argv)
    if args.command == "attempts" and not _attempts_form(args):
        args.usage_error(ATTEMPTS_FORMS)  # exits 2, like any bad command line
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
        from dispatcher import daemon, loops, supervisor

        if args.process_index is not None:  # a child of a supervisor
            return loops.run(supervisor.child(settings, args.role, args), settings)
        processes = settings.processes if args.processes is None else args.processes
        if processes > 1:
            # asyncio's loop: the supervisor serves the API and waits on children, no hot path
            return asyncio.run(supervisor.run(settings, role=args.role, processes=processes))
        return loops.run(daemon.run(settings, role=args.role), settings)
    if args.command == "migrate":
        applied = asyncio.run(db.migrate_url(settings.database_url))
        structlog.get_logger().info("migrations_done", applied=applied)
        return 0
    if args.command == "token":
        return asyncio.run(_token(settings, args))
    if args.command == "catalog":
        return _catalog(settings, args)
    if args.command == "attempts":
        return asyncio.run(_attempts(settings, args))
    if args.command == "recover":
        return asyncio.run(_recover(settings, args))
    if args.command == "recoveries":
        return asyncio.run(_recoveries(settings, args))
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


ATTEMPT_COLUMNS = (
    "attempted_at", "outcome", "status", "nRetry", "trigger", "duration_ms",
    "notification_uuid", "entity_ids", "error",
)  # fmt: skip
ENTITY_IDS_SHOWN = 5  # in the table; --json has them all


async def _attempts(settings: Settings, args: argparse.Namespace) -> int:
    """Read-only: no migration (its log lines would go to stdout, before the JSON)."""
    pool = await db.create_pool(settings.database_url, max_size=1)
    try:
        query = AttemptQuery(
            limit=args.limit,
            webhook_id=args.webhook,
            environment_id=args.environment_id,
            failed=True if args.failed else None,
            since=args.since,
            until=args.until,
            entity_id=args.entity_id,
        )
        try:
            rows = await History(pool).attempts(query)
        except asyncpg.UndefinedTableError:
            _fail(
                "cannot list attempts: the database has no delivery history table; "
                "run 'dispatcher migrate' first"
            )
            return 1
        found = [attempt_json(row) for row in rows]
    finally:
        await pool.close()
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(found, option=orjson.OPT_APPEND_NEWLINE))
        sys.stdout.flush()
    elif found:
        print(_table([[_cell(name, a[name]) for name in ATTEMPT_COLUMNS] for a in found]))
    else:
        print("no attempts match")
    return 0


def _cell(name: str, value: Any) -> str:
    if value is None:
        return "-"
    if name == "entity_ids":
        shown = ",".join(value[:ENTITY_IDS_SHOWN])
        return shown + (f",... ({len(value)})" if len(value) > ENTITY_IDS_SHOWN else "")
    if name == "error":
        return " ".join(str(value).split())
    return str(value)


def _table(rows: list[list[str]], columns: Sequence[str] = ATTEMPT_COLUMNS) -> str:
    """``rows`` under the column names, each column as wide as its widest cell."""
    lines = [list(columns), *rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


JOB_COLUMNS = (
    "id", "mode", "since", "until", "state", "scanned", "matched", "sent", "delivered",
    "failed", "created_at", "finished_at",
)  # fmt: skip


async def _recover(settings: Settings, args: argparse.Namespace) -> int:
    pool = await db.create_pool(settings.database_url, max_size=1)
    try:
        webhook = await Store(pool).webhook_by_id(args.webhook)
        if webhook is None:
            _fail(f"no webhook with id {args.webhook}")
            return 1
        try:
            since, until = check_range(
                args.since, args.until, now=datetime.now(UTC),
                max_days=settings.recovery_max_days, field="--since",
            )  # fmt: skip
            if args.mode == "replay":
                await check_log_holds(settings, since, field="--since")
        except BadRange as exc:
            _fail(exc.message)
            return 2
        if webhook.disabled:
            _fail(f"webhook {webhook.id} is disabled: it must be enabled first")
            return 1
        try:
            job = await Jobs(pool).create(webhook, args.mode, since, until)
        except ActiveJob as exc:
            _fail(f"{exc}; cancel it (DELETE /webhooks/{{id}}/recoveries/{{job_id}}) or wait")
            return 1
    finally:
        await pool.close()
    _print_jobs([job], as_json=args.json, one=True)
    return 0


async def _recoveries(settings: Settings, args: argparse.Namespace) -> int:
    pool = await db.create_pool(settings.database_url, max_size=1)
    try:
        jobs = await Jobs(pool).of_webhook(args.webhook)
    finally:
        await pool.close()
    _print_jobs(jobs, as_json=args.json)
    return 0


def _print_jobs(jobs: list[Job], *, as_json: bool, one: bool = False) -> None:
    shown = [j.to_json() for j in jobs]
    if as_json:
        data: Any = shown[0] if one else shown
        sys.stdout.buffer.write(orjson.dumps(data, option=orjson.OPT_APPEND_NEWLINE))
        sys.stdout.flush()
    elif shown:
        print(_table([[_cell(c, j[c]) for c in JOB_COLUMNS] for j in shown], JOB_COLUMNS))
    else:
        print("no recovery jobs")


CATALOG_COLUMNS = ("entity", "event", "import", "description")


def _catalog(settings: Settings, args: argparse.Namespace) -> int:
    """The event types of the catalog the daemon would load (no database, no Kafka)."""
    published = event_types.event_types(catalog.load(settings.catalog_file))
    if args.json:
        listed = [t.to_json() for t in published]
        sys.stdout.buffer.write(orjson.dumps(listed, option=orjson.OPT_APPEND_NEWLINE))
        sys.stdout.flush()
        return 0
    rows = [[t.entity_name, t.event_type, t.imports, t.description] for t in published]
    print(_table(rows, CATALOG_COLUMNS))
    return 0
