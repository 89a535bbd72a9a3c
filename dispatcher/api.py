"""The subscriptions HTTP API: a shop manages its webhooks with its static token.

Routes (the OpenAPI 3.1 document ``openapi.json`` of this package, linked from
``schemas/openapi.json``, describes them in full)::

    POST   /webhooks                     subscribe; kept only if the signed SUBSCRIBED test
                                         POST gets 200; the answer shows the signing secret
    GET    /webhooks                     the shop's webhooks (``pagination=true&...``)
    GET    /webhooks/{id}                one webhook, without its secret
    DELETE /webhooks/{id}                unsubscribe (204)
    PUT, PATCH /webhooks/{id}            405: delete the webhook and create it again
    GET    /webhooks/{id}/attempts       its delivery attempts, newest first (cursor paging)
    GET    /webhooks/{id}/attempts/{attempt_id}  one attempt, with its bodies
    GET    /webhooks/{id}/secret         the signing secret
    POST   /webhooks/{id}/secret/rotate  a new signing secret; the old one keeps signing
                                         too for ``DISPATCHER_SECRET_ROTATION_GRACE_SECONDS``
    GET    /openapi.json                 the OpenAPI document (no token needed)
    GET    /event-types                  every subscribable (entity, event) pair with the
                                         JSON Schema of its notification (no token needed)
    GET    /event-types/{entity_name}/{event_type}  one of them (no token needed)

Every answer with a body is JSON; every error is ``{"error": {"type", "code", "message"}}`` (plus
``field`` when one field of the request is at fault). The signing secret is in no answer but
the create's and the two ``/secret`` routes', and never in a log line. A shop never learns
whether another shop's webhook exists: it gets the same 404 as for a missing one. Running
dispatchers hear of changes through the ``webhooks`` table's NOTIFY trigger, nothing here.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import asyncpg
import orjson
import structlog
from aiohttp import hdrs, web
from aiohttp.typedefs import Handler
from yarl import URL

from dispatcher import event_types, notification, signing
from dispatcher.catalog import Catalog
from dispatcher.client import HttpClient, Outcome
from dispatcher.history import (
    UNKNOWN_HEALTH,
    AttemptQuery,
    AttemptRecord,
    Cursor,
    History,
    attempt_json,
)
from dispatcher.netguard import BlockedAddress, check_host, is_blocked
from dispatcher.notification import Notification, iso_millis
from dispatcher.recovery import Jobs
from dispatcher.settings import Settings
from dispatcher.store import DuplicateWebhook, Principal, Store, Webhook, new_secret

log = structlog.get_logger(__name__)

MAX_BODY = 64 * 1024  # bytes of a request body; a webhook needs well under 3 KiB
MAX_URL = 2048
MAX_EMAIL = 254
MAX_TOKEN = 512
MAX_PER_PAGE = 1000
DEFAULT_PER_PAGE = 100

FIELDS = ("url", "entity_name", "event_type", "email")
# Registered only to tell the caller that webhooks are never changed in place.
REFUSED_METHODS = frozenset({hdrs.METH_PUT, hdrs.METH_PATCH})

_TYPES = {
    400: "invalid_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
}
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"(?=.{{1,254}}\Z){_LABEL}(?:\.{_LABEL})*\.?")
_EMAIL = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
    r"[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
)
_NUMBER = re.compile(r"[0-9]{1,9}")


class ApiError(Exception):
    """A request the API refuses; becomes the JSON error answer with this status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str | None = None,
        field: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind or _TYPES.get(status, "error")
        self.message = message
        self.field = field
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        error: dict[str, object] = {"type": self.kind, "code": self.status, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        return _json({"error": error}, status=self.status, headers=self.headers)


@dataclass(frozen=True, slots=True)
class Subscription:
    """A validated ``POST /webhooks`` body; ``event_type`` is upper case."""

    url: str
    entity_name: str
    event_type: str
    email: str


@dataclass(frozen=True, slots=True)
class Page:
    """Which slice of a list was asked for: ``page`` counts from 0."""

    page: int
    per_page: int


def create_app(
    *,
    store: Store,
    catalog: Catalog,
    http: HttpClient,
    settings: Settings,
    jobs: Jobs,
    history: History | None = None,
) -> web.Application:
    """The API as an aiohttp application; the caller may add routes (health, metrics).
    ``jobs`` holds the recovery jobs; ``history`` is the delivery history (None when
    ``DISPATCHER_ATTEMPT_LOG`` is off)."""
    from dispatcher import recovery_api  # its handlers use this module's helpers

    app = web.Application(client_max_size=MAX_BODY, middlewares=[_errors])
    handlers = _Handlers(store, catalog, http, settings, openapi_document(catalog), history)
    router = app.router
    router.add_post("/webhooks", handlers.create_webhook)
    router.add_get("/webhooks", handlers.list_webhooks, allow_head=False)
    router.add_get("/webhooks/{id}", handlers.get_webhook, allow_head=False)
    router.add_delete("/webhooks/{id}", handlers.delete_webhook)
    for method in sorted(REFUSED_METHODS):
        router.add_route(method, "/webhooks/{id}", handlers.refuse_change)
    router.add_get("/webhooks/{id}/secret", handlers.get_secret, allow_head=False)
    router.add_get("/webhooks/{id}/attempts", handlers.list_attempts, allow_head=False)
    router.add_get("/webhooks/{id}/attempts/{attempt_id}", handlers.get_attempt, allow_head=False)
    router.add_post("/webhooks/{id}/secret/rotate", handlers.rotate_secret)
    recovery_api.add_routes(app, store=store, history=history, jobs=jobs, settings=settings)
    router.add_get("/openapi.json", handlers.openapi, allow_head=False)
    published = _EventTypes(catalog)
    router.add_get("/event-types", published.list_event_types, allow_head=False)
    router.add_get(
        "/event-types/{entity_name}/{event_type}", published.get_event_type, allow_head=False
    )
    return app


def openapi_document(catalog: Catalog | None = None) -> bytes:
    """The OpenAPI 3.1 document of this API, as served at ``/openapi.json``: the file of
    this package, whose ``webhooks`` describe the built-in catalog's notifications, or
    with those of ``catalog`` when an operator replaced it."""
    doc = resources.files("dispatcher").joinpath("openapi.json").read_bytes()
    if catalog is None:
        return doc
    parsed = orjson.loads(doc)
    served = event_types.with_openapi_parts(parsed, catalog)
    return doc if served == parsed else orjson.dumps(served)


class _EventTypes:
    """``GET /event-types`` and one of them: the answers are built once, from the catalog."""

    def __init__(self, catalog: Catalog) -> None:
        published = event_types.event_types(catalog)
        self._all = orjson.dumps([t.to_json() for t in published])
        self._one = {(t.entity_name, t.event_type): orjson.dumps(t.to_json()) for t in published}

    async def list_event_types(self, request: web.Request) -> web.Response:
        return web.Response(body=self._all, content_type="application/json")

    async def get_event_type(self, request: web.Request) -> web.Response:
        entity_name = request.match_info["entity_name"]
        event_type = request.match_info["event_type"]
        body = self._one.get((entity_name, event_type.upper()))
        if body is None:
            raise ApiError(
                404,
                f"no event type {entity_name[:100]!r} {event_type[:100]!r}; "
                "GET /event-types lists them",
            )
        return web.Response(body=body, content_type="application/json")


# --- handlers ---------------------------------------------------------------------------


class _Handlers:
    """The route handlers, sharing the store, catalog, HTTP client and settings."""

    def __init__(
        self,
        store: Store,
        catalog: Catalog,
        http: HttpClient,
        settings: Settings,
        doc: bytes,
        history: History | None,
    ) -> None:
        self._history = history
        self._store = store
        self._settings = settings
        self._doc = doc
        self._webhooks = Webhooks(store, catalog, http, settings, history)

    async def create_webhook(self, request: web.Request) -> web.Response:
        principal = await _authenticate(request, self._store)
        webhook = await self._webhooks.create(principal, await _read_json(request))
        location = f"/webhooks/{webhook.id}"
        return _json(webhook.with_secret(), status=201, headers={hdrs.LOCATION: location})

    async def list_webhooks(self, request: web.Request) -> web.Response:
        principal = await _authenticate(request, self._store)
        page = parse_pagination(request.query)
        env = principal.environment_id
        if page is None:
            webhooks = await self._store.list_webhooks(env)
            return _json([w.public() for w in webhooks])
        total = await self._store.count_webhooks(env)
        webhooks = await self._store.list_webhooks(
            env, limit=page.per_page, offset=page.page * page.per_page
        )
        return _json(
            {
                "page": page.page,
                "pages": math.ceil(total / page.per_page),
                "per_page": page.per_page,
                "results": [w.public() for w in webhooks],
            }
        )

    async def get_webhook(self, request: web.Request) -> web.Response:
        principal = await _authenticate(request, self._store)
        webhook = await self._own_webhook(request, principal)
        return _json(await webhook_json(webhook, self._history))

    async def list_attempts(self, request: web.Request) -> web.Response:
        principal = await _authenticate(request, self._store)
        webhook = await self._own_webhook(request, principal)
        page = await self._webhooks.attempts(webhook, request.query)
        return _json(
            {"results": [attempt_json(r) for r in page.results], "next_cursor": page.next_cursor}
        )

    async def get_attempt(self, request: web.Request) -> web.Response:
        principal = await _authenticate(request, self._store)
        webhook = await self._own_webhook(request, principal)
        row = await self._webhooks.attempt(webhook, request.match_info["attempt_id"])
        return _json(attempt_json(row, with_bodies=True))

    async def delete_webhook(self, request: web.Request) -> web.Response:
        principal = await _authenticate(request, self._store)
        webhook = await self._own_webhook(request, principal)
        await self._webhooks.delete(webhook, request.match_info["id"])
        return web.Response(status=204)

    async def get_secret(self, request: web.Request) -> web.Response:
        principal = await _authenticate(request, self._store)
        webhook = await self._own_webhook(request, principal)
        # Only the current secret and when the previous one stops signing: the previous
        # secret itself is never answered (the shop had it; after a leak it must not travel).
        return _json(webhook.secret_info(time.time()))

    async def rotate_secret(self, request: web.Request) -> web.Response:
        principal = await _authenticate(request, self._store)
        grace = self._settings.secret_rotation_grace_seconds
        webhook = await self._store.rotate_secret(
            principal.environment_id, _webhook_id(request), grace
        )
        if webhook is None:
            raise _not_found(request)
        log.info(
            "webhook_secret_rotated",
            webhook_id=str(webhook.id),
            environment_id=webhook.environment_id,
            grace_seconds=grace,
        )
        return _json(webhook.secret_info(time.time()))

    async def refuse_change(self, request: web.Request) -> web.Response:
        raise ApiError(
            405,
            "webhooks cannot be changed: delete this webhook (DELETE /webhooks/{id}) "
            "and create a new one (POST /webhooks)",
            headers={hdrs.ALLOW: "GET, DELETE"},
        )

    async def openapi(self, request: web.Request) -> web.Response:
        return web.Response(body=self._doc, content_type="application/json")

    async def _own_webhook(self, request: web.Request, principal: Principal) -> Webhook:
        """The webhook of the path if it is the principal's shop's, else 404."""
        return await self._webhooks.own(principal, request.match_info["id"])


class Webhooks:
    """What a shop does with its webhooks, for the API's handlers and the portal
    (:mod:`dispatcher.portal`) alike: each refusal is an :class:`ApiError`, whose status,
    message and ``field`` both show as they can."""

    def __init__(
        self,
        store: Store,
        catalog: Catalog,
        http: HttpClient,
        settings: Settings,
        history: History | None,
    ) -> None:
        self._store = store
        self._catalog = catalog
        self._http = http
        self._settings = settings
        self._history = history

    async def own(self, principal: Principal, raw_id: str) -> Webhook:
        """The webhook of this id (as written in a path) if it is the principal's shop's;
        404 otherwise, the same for a missing webhook and another shop's."""
        try:
            webhook_id = uuid.UUID(raw_id)
        except ValueError:
            raise _no_webhook(raw_id) from None
        webhook = await self._store.get_webhook(principal.environment_id, webhook_id)
        if webhook is None:
            raise _no_webhook(raw_id)
        return webhook

    async def create(self, principal: Principal, data: object) -> Webhook:
        """Validate a ``POST /webhooks`` body (decoded), check the URL's host, POST the
        signed SUBSCRIBED test and keep the webhook only if it got 200."""
        sub = parse_subscription(data, self._catalog)
        existing = await self._store.find_webhook(
            principal.environment_id, sub.entity_name, sub.event_type
        )
        if existing is not None:
            raise _duplicate(sub, existing.id)
        await check_reachable(URL(sub.url), self._settings)
        secret = new_secret()
        check = await self._check_endpoint(principal, sub, secret)
        try:
            webhook = await self._store.create_webhook(
                principal,
                url=sub.url,
                entity_name=sub.entity_name,
                event_type=sub.event_type,
                email=sub.email,
                secret=secret,
            )
        except DuplicateWebhook as exc:  # a concurrent create won the race
            raise _duplicate(sub, exc.existing_id) from None
        log.info(
            "webhook_created",
            webhook_id=str(webhook.id),
            environment_id=webhook.environment_id,
            entity_name=webhook.entity_name,
            event_type=webhook.event_type,
        )
        await self._record_check(webhook, check)
        return webhook

    async def delete(self, webhook: Webhook, raw_id: str) -> None:
        """Unsubscribe; 404 if a concurrent request deleted it first."""
        if not await self._store.delete_webhook(webhook.environment_id, webhook.id):
            raise _no_webhook(raw_id)
        log.info(
            "webhook_deleted", webhook_id=str(webhook.id), environment_id=webhook.environment_id
        )

    async def attempts(self, webhook: Webhook, query: Mapping[str, str]) -> AttemptsPage:
        """One page of the webhook's attempts, newest first, filtered by ``query`` (the
        parameters of ``GET /webhooks/{id}/attempts``; 400 naming a bad one)."""
        history = self._need_history()
        parsed = parse_attempt_query(query, webhook.id)
        rows = await history.attempts(parsed)
        more = len(rows) > parsed.limit - 1
        rows = rows[: parsed.limit - 1]
        last = rows[-1] if rows and more else None
        cursor = Cursor(last["attempted_at"], last["id"]).encode() if last else None
        return AttemptsPage(rows, cursor)

    async def attempt(self, webhook: Webhook, raw_id: str) -> asyncpg.Record:
        """One attempt of the webhook, with its bodies; 404 if it has none of this id."""
        history = self._need_history()
        try:
            attempt_id = uuid.UUID(raw_id)
        except ValueError:
            raise ApiError(404, f"no attempt with id {raw_id[:100]!r}") from None
        row = await history.attempt(webhook.id, attempt_id)
        if row is None:
            raise ApiError(404, f"no attempt with id {raw_id[:100]!r}")
        return row

    def _need_history(self) -> History:
        if self._history is None:
            raise ApiError(
                404, "the delivery history is off on this server (DISPATCHER_ATTEMPT_LOG=off)"
            )
        return self._history

    async def _record_check(self, webhook: Webhook, check: _Check) -> None:
        """The SUBSCRIBED test is an attempt of the webhook's history too."""
        if self._history is None:
            return
        notification = Notification(
            check.msg_id, webhook.id, "SUBSCRIBED", webhook.entity_name,
            webhook.environment_id, webhook.client_id, None, (),
        )  # fmt: skip
        record = AttemptRecord.of(
            notification, webhook.environment_id, 0,
            at=check.at, body=check.body, outcome=check.outcome, trigger="subscribe",
        )  # fmt: skip
        try:
            await self._history.write([record])
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning(
                "subscribe_attempt_not_recorded", webhook_id=str(webhook.id), error=repr(exc)
            )

    async def _check_endpoint(self, principal: Principal, sub: Subscription, secret: str) -> _Check:
        """POST the signed SUBSCRIBED test message; 422 saying why unless it got 200."""
        at = time.time()
        body = subscribed_body(principal, sub.entity_name, datetime.fromtimestamp(at, UTC))
        msg_id = str(uuid.uuid4())
        headers = signing.headers(signing.secret_key(secret), msg_id, int(at), body)
        outcome = await self._http.post(sub.url, body, headers)
        if outcome.ok:
            return _Check(msg_id, at, body, outcome)
        log.info(
            "webhook_check_failed",
            environment_id=principal.environment_id,
            host=URL(sub.url).host,
            outcome=outcome.label,
        )
        raise ApiError(
            422,
            f"url: the endpoint did not accept the SUBSCRIBED test message "
            f"({outcome.detail}); it must answer HTTP 200 within "
            f"{self._settings.delivery_timeout_seconds:g} s",
            kind="endpoint_check_failed",
            field="url",
        )


@dataclass(frozen=True, slots=True)
class AttemptsPage:
    """A page of attempts (history rows, newest first) and the cursor of the next one."""

    results: list[asyncpg.Record]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class _Check:
    """The SUBSCRIBED test POST that a create made."""

    msg_id: str
    at: float
    body: bytes
    outcome: Outcome


MAX_ATTEMPTS_PAGE = 250
DEFAULT_ATTEMPTS_PAGE = 50


def parse_attempt_query(query: Mapping[str, str], webhook_id: uuid.UUID) -> AttemptQuery:
    """The filters of ``GET /webhooks/{id}/attempts``; 400 naming the bad one. The limit
    returned is one more than asked, to tell whether another page follows."""
    outcome = query.get("outcome")
    if outcome not in (None, "delivered", "failed"):
        raise ApiError(400, "outcome: expected delivered or failed", field="outcome")
    limit = _number(query, "limit", DEFAULT_ATTEMPTS_PAGE, 1, MAX_ATTEMPTS_PAGE)
    notification = query.get("notification_uuid")
    entity_id = query.get("entity_id")
    if entity_id is not None and not 0 < len(entity_id) <= 200:
        raise ApiError(400, "entity_id: expected 1 to 200 characters", field="entity_id")
    cursor = query.get("cursor")
    try:
        parsed_cursor = Cursor.decode(cursor) if cursor is not None else None
    except ValueError:
        raise ApiError(400, "cursor: not a next_cursor of this API", field="cursor") from None
    return AttemptQuery(
        limit=limit + 1,
        webhook_id=webhook_id,
        failed=None if outcome is None else outcome == "failed",
        since=_moment(query, "since"),
        until=_moment(query, "until"),
        notification_uuid=_uuid(notification, "notification_uuid"),
        entity_id=entity_id,
        cursor=parsed_cursor,
    )


def _moment(query: Mapping[str, str], name: str) -> datetime | None:
    raw = query.get(name)
    if raw is None:
        return None
    try:
        moment: datetime | None = datetime.fromisoformat(raw)
        if moment is not None and moment.tzinfo is not None:
            moment = moment.astimezone(UTC)  # out of range at the year 1 or 9999: refused
    except (ValueError, OverflowError):
        moment = None
    if moment is None or moment.tzinfo is None:
        raise ApiError(
            400,
            f"{name}: expected an ISO 8601 time with a time zone, "
            f"e.g. 2026-01-01T10:00:00Z, got {raw[:40]!r}",
            field=name,
        )
    return moment


def _uuid(raw: str | None, name: str) -> uuid.UUID | None:
    if raw is None:
        return None
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise ApiError(400, f"{name}: expected a UUID, got {raw[:40]!r}", field=name) from None


def subscribed_body(principal: Principal, entity_name: str, now: datetime) -> bytes:
    """The documented test message of the principal's shop, ``time`` in UTC with milliseconds."""
    return notification.subscribed_body(
        entity_name, principal.environment_id, principal.client_id, now
    )


# --- authentication and request decoding ----------------------------------------------


async def _authenticate(request: web.Request, store: Store) -> Principal:
    """The principal of the request's token (``Bearer <token>`` or the bare token)."""
    raw = request.headers.get(hdrs.AUTHORIZATION, "").strip()
    scheme, _, rest = raw.partition(" ")
    token = rest.strip() if scheme.lower() == "bearer" else raw
    if not token:
        raise _unauthorized("missing token: send the header 'Authorization: Bearer <token>'")
    principal = None
    if len(token) <= MAX_TOKEN and token.isascii():
        principal = await store.authenticate(token)
    if principal is None:
        raise _unauthorized("unknown or revoked token")
    return principal


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, message, headers={hdrs.WWW_AUTHENTICATE: "Bearer"})


async def _read_json(request: web.Request) -> object:
    """The request's body decoded as JSON; 413, 415 or 400 when that is not possible."""
    charset = (request.charset or "utf-8").lower()
    if not _is_json(request.content_type) or charset not in ("utf-8", "utf8"):
        raise ApiError(
            415,
            "send the body as JSON with 'Content-Type: application/json' "
            f"(got {request.headers.get(hdrs.CONTENT_TYPE, 'none')!r})"[:300],
        )
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise _too_large()
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _too_large() from None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None


def _is_json(content_type: str) -> bool:
    return content_type == "application/json" or (
        content_type.startswith("application/") and content_type.endswith("+json")
    )


def _too_large() -> ApiError:
    return ApiError(413, f"the body is larger than the limit of {MAX_BODY} bytes")


# --- validation -------------------------------------------------------------------------


def parse_subscription(data: object, catalog: Catalog) -> Subscription:
    """Validate a decoded ``POST /webhooks`` body: 400 for its shape, 422 for its values."""
    if not isinstance(data, dict):
        raise ApiError(400, f"the body must be a JSON object, got {_json_type(data)}")
    unknown = sorted(str(k) for k in data if k not in FIELDS)
    if unknown:
        raise ApiError(
            400,
            f"unknown field(s): {', '.join(unknown)}; the fields are {', '.join(FIELDS)}"[:500],
            field=unknown[0][:100],
        )
    missing = [f for f in FIELDS if f not in data]
    if missing:
        raise ApiError(400, f"missing field(s): {', '.join(missing)}", field=missing[0])
    for name in FIELDS:
        if not isinstance(data[name], str):
            raise ApiError(
                400, f"{name}: expected a string, got {_json_type(data[name])}", field=name
            )
    entity_name, event_type = check_event(data["entity_name"], data["event_type"], catalog)
    return Subscription(
        url=check_url(data["url"]),
        entity_name=entity_name,
        event_type=event_type,
        email=check_email(data["email"]),
    )


def check_url(raw: str) -> str:
    """The URL if it is an absolute ``https://`` URL with a host and no credentials."""
    if len(raw) > MAX_URL:
        raise _bad_url(f"longer than {MAX_URL} characters")
    if any(c.isspace() or not c.isprintable() for c in raw):
        raise _bad_url("must not contain spaces or control characters")
    try:
        url = URL(raw)
        port = url.port
    except ValueError as exc:
        raise _bad_url(f"not a valid URL ({exc})") from None
    if url.scheme == "http":
        raise _bad_url("plain http is refused: use an https:// URL")
    if url.scheme != "https":
        raise _bad_url("must be an https:// URL")
    if not url.raw_host:
        raise _bad_url("must name a host, as in https://example.com/webhooks")
    if url.user is not None or url.password is not None or "@" in _authority(raw):
        raise _bad_url("must not carry a user name or password")
    if not port:
        raise _bad_url("port 0 is not a valid port")
    if url.fragment:
        raise _bad_url("must not have a #fragment")
    if not _valid_host(url.raw_host):
        raise _bad_url(f"{url.raw_host[:100]!r} is not a valid host name")
    return raw


def _authority(raw: str) -> str:
    """The ``user@host:port`` part of a URL as written (yarl drops an empty user)."""
    rest = raw.partition("://")[2]
    return re.split(r"[/?#]", rest, maxsplit=1)[0]


def _valid_host(host: str) -> bool:
    if _ip(host) is not None:
        return True
    return _HOSTNAME.fullmatch(host) is not None


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None


def _bad_url(reason: str) -> ApiError:
    return ApiError(422, f"url: {reason}", field="url")


async def check_reachable(url: URL, settings: Settings) -> None:
    """422 unless the URL's host resolves, and only to addresses webhooks may reach."""
    host = url.host or ""
    allowed = settings.allow_private_targets
    if _ip(host) is not None:
        if is_blocked(host, allowed):
            raise _bad_url(f"{host} is a private, loopback or link-local address")
        return
    try:
        async with asyncio.timeout(settings.delivery_timeout_seconds):
            await check_host(host, url.port or 443, allowed)
    except BlockedAddress as exc:
        raise _bad_url(str(exc)) from None
    except (OSError, TimeoutError):
        raise _bad_url(f"the host {host} does not resolve") from None


def check_event(entity_name: str, event_type: str, catalog: Catalog) -> tuple[str, str]:
    """(entity_name, EVENT_TYPE) if the catalog has the pair; 422 listing valid values."""
    described = catalog.describe()
    if entity_name not in described:
        raise ApiError(
            422,
            f"entity_name: unknown entity {entity_name[:100]!r}; "
            f"valid entities are {', '.join(described)}",
            field="entity_name",
        )
    upper = event_type.upper() if event_type.isascii() else event_type
    if not catalog.allows(entity_name, upper):
        raise ApiError(
            422,
            f"event_type: {event_type[:100]!r} is not an event of {entity_name}; "
            f"valid event types are {', '.join(described[entity_name])}",
            field="event_type",
        )
    return entity_name, upper


def check_email(raw: str) -> str:
    """The address if it looks deliverable: ``local@domain.tld``, within RFC lengths."""
    local, _, _ = raw.rpartition("@")
    if len(raw) > MAX_EMAIL or len(local) > 64 or not _EMAIL.fullmatch(raw):
        raise ApiError(
            422, "email: expected an email address such as dev@example.com", field="email"
        )
    return raw


def parse_pagination(query: Mapping[str, str]) -> Page | None:
    """The page asked for with ``pagination=true``, or None for the plain list."""
    flag = query.get("pagination", "false").lower()
    if flag not in ("true", "false", "1", "0"):
        raise ApiError(400, "pagination: expected true or false", field="pagination")
    per_page = _number(query, "per_page", DEFAULT_PER_PAGE, 1, MAX_PER_PAGE)
    page = _number(query, "page", 0, 0, 10**9 - 1)
    return Page(page, per_page) if flag in ("true", "1") else None


def _number(query: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    if not _NUMBER.fullmatch(raw) or not low <= int(raw) <= high:
        raise ApiError(
            400, f"{name}: expected an integer from {low} to {high}, got {raw[:20]!r}", field=name
        )
    return int(raw)


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _duplicate(sub: Subscription, existing_id: uuid.UUID | None) -> ApiError:
    which = f" ({existing_id})" if existing_id else ""
    return ApiError(
        409,
        f"this shop already has a webhook{which} for {sub.entity_name} {sub.event_type}; "
        "delete it to subscribe again",
    )


def _webhook_id(request: web.Request) -> uuid.UUID:
    """The webhook id of the path; 404 when it is not a UUID, like a missing webhook."""
    try:
        return uuid.UUID(request.match_info["id"])
    except ValueError:
        raise _not_found(request) from None


def _not_found(request: web.Request) -> ApiError:
    return _no_webhook(request.match_info.get("id", ""))


def _no_webhook(raw_id: str) -> ApiError:
    return ApiError(404, f"no webhook with id {raw_id[:100]!r}")


# --- responses and errors ---------------------------------------------------------------


def _json(
    data: object, *, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(data), status=status, headers=headers, content_type="application/json"
    )


# What the store raises when PostgreSQL is down or restarting.
_DATABASE_DOWN = (
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.InterfaceError,
    ConnectionError,
    TimeoutError,
)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error as a JSON error body; an unexpected one is logged and becomes a 500."""
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _from_http_exception(exc).response()
    except _DATABASE_DOWN as exc:
        log.warning("api_database_unavailable", path=request.path, error=repr(exc))
        return ApiError(
            503,
            "the subscriptions database is unavailable; try again shortly",
            kind="service_unavailable",
            headers={hdrs.RETRY_AFTER: "5"},
        ).response()
    except Exception:
        log.exception("api_unexpected_error", method=request.method, path=request.path)
        return ApiError(500, "internal error", kind="internal_error").response()


def _from_http_exception(exc: web.HTTPException) -> ApiError:
    """The JSON error of an exception aiohttp raised (no route, wrong method, too large)."""
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = sorted(exc.allowed_methods - REFUSED_METHODS)
        return ApiError(
            405,
            f"method {exc.method} is not allowed here; allowed: {', '.join(allowed)}",
            headers={hdrs.ALLOW: ", ".join(allowed)},
        )
    if isinstance(exc, web.HTTPNotFound):
        return ApiError(404, "no such route; the routes are described at /openapi.json")
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return _too_large()
    return ApiError(exc.status, exc.reason)


# --- shared with the recovery routes (dispatcher.recovery_api) -------------------------

authenticate = _authenticate
read_json = _read_json
moment = _moment
not_found = _not_found
json_response = _json


no_webhook = _no_webhook
DATABASE_DOWN = _DATABASE_DOWN


async def own_webhook(request: web.Request, principal: Principal, store: Store) -> Webhook:
    """The webhook of the path if it is the principal's shop's, else 404."""
    webhook = await store.get_webhook(principal.environment_id, _webhook_id(request))
    if webhook is None:
        raise _not_found(request)
    return webhook


async def webhook_json(webhook: Webhook, history: History | None) -> dict[str, Any]:
    """A webhook as ``GET /webhooks/{id}`` shows it: with its ``health``, whose ``state``
    is ``disabled`` while it is."""
    health = UNKNOWN_HEALTH if history is None else await history.health(webhook.id)
    shown: dict[str, Any] = health.to_json()
    if webhook.disabled_at is not None:
        shown["state"] = "disabled"
    shown["disabled_at"] = None if webhook.disabled_at is None else iso_millis(webhook.disabled_at)
    shown["disabled_reason"] = webhook.disabled_reason
    return {**webhook.public(), "health": shown}
