"""The integrators' portal: a shop's webhooks, deliveries, resends and recoveries in a
browser, served by the API role under ``/portal/``.

Server-rendered HTML (Jinja2, every value escaped), a stylesheet and a small script of its
own (``static/portal/``: dates in the browser's time zone, a recovery's live progress);
everything but the live progress works with JavaScript off. Addresses::

    GET  /portal/                                   the shop's webhooks, or the sign-in form
    POST /portal/sign-in                            form field ``token``; 303 to /portal/
    POST /portal/sign-out
    POST /portal/webhooks                           create (the API's checks, SUBSCRIBED test)
    GET  /portal/webhooks/{id}                      its delivery log (the API's filters, paging)
    GET  /portal/webhooks/{id}/delete               confirm; POST deletes
    POST /portal/webhooks/{id}/disable, .../enable
    POST /portal/webhooks/{id}/recover              303 to the job's page
    GET  /portal/webhooks/{id}/recoveries/{job_id}  a recovery job (…/progress: its JSON)
    POST /portal/webhooks/{id}/recoveries/{job_id}/cancel
    GET  /portal/webhooks/{id}/attempts/{attempt_id}         one attempt
    POST /portal/webhooks/{id}/attempts/{attempt_id}/resend
    GET  /portal/event-types                        the event catalog: schemas and examples

A page does what the shop's token does over the API, through the same functions
(:class:`dispatcher.api.Webhooks`, :class:`dispatcher.recovery_api.Recoveries`): the same
checks, the same 404 for another shop's webhook, the same body limit (the API
application's). Sessions and the cross-site defences are :mod:`dispatcher.portal_sessions`.
Every answer carries a strict Content-Security-Policy; redirects go only to addresses the
portal builds from ids, never to one a request names.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any

import asyncpg
import jinja2
import orjson
import structlog
from aiohttp import hdrs, web
from aiohttp.typedefs import Handler
from markupsafe import Markup
from multidict import MultiDictProxy
from yarl import URL

from dispatcher import api, event_types, portal_sessions
from dispatcher.api import ApiError, Webhooks
from dispatcher.catalog import Catalog
from dispatcher.client import HttpClient
from dispatcher.history import History, attempt_json
from dispatcher.portal_sessions import Origin, Session, Sessions
from dispatcher.recovery import Job, Jobs
from dispatcher.recovery_api import Recoveries
from dispatcher.settings import Settings
from dispatcher.store import Store, Webhook

log = structlog.get_logger(__name__)

PREFIX = "/portal"
CSP = (
    "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
STATIC_TYPES = {"portal.css": "text/css", "portal.js": "text/javascript"}
LOG_FILTERS = ("outcome", "since", "until", "notification_uuid", "entity_id", "limit")
CREATE_FIELDS = ("url", "entity_name", "event_type", "email")
DONE_MESSAGES = {  # ?done=... after a redirect: fixed texts, nothing from the request
    "deleted": "The webhook was deleted.",
    "disabled": "The webhook is disabled: no attempts are made until it is enabled.",
    "enabled": "The webhook is enabled again.",
    "resent": "The resend is queued: its attempt appears in the delivery log shortly.",
    "cancelled": "The recovery job was cancelled.",
}
OUTCOMES = {  # outcome -> (text, css class); the text says it without the colour
    "delivered": ("Delivered", "ok"),
    "http": ("Failed: HTTP status", "bad"),
    "timeout": ("Failed: timeout", "bad"),
    "connection": ("Failed: connection", "bad"),
    "tls": ("Failed: TLS", "bad"),
    "blocked": ("Failed: address refused", "bad"),
}
HEALTH = {
    "healthy": ("✓ Healthy", "ok"),
    "failing": ("✗ Failing", "bad"),
    "unknown": ("○ No attempts yet", "idle"),
    "disabled": ("⏸ Disabled", "off"),
}
JOB_STATES = {
    "queued": ("… Queued", "idle"),
    "running": ("↻ Running", "busy"),
    "done": ("✓ Done", "ok"),
    "failed": ("✗ Failed", "bad"),
    "cancelled": ("⏹ Cancelled", "off"),
}
SESSION_KEY = web.RequestKey("portal_session", Session)  # put there by the guard


# --- presentation helpers (pure; unit-tested) ---------------------------------------------


def time_tag(value: datetime | str | None) -> Markup:
    """A ``<time>`` element of a moment: UTC in its text and title, which the portal's
    script rewrites in the browser's time zone (the title keeps UTC, shown on hover).

    >>> print(time_tag("2026-12-01T10:00:00.123Z"))  # doctest: +NORMALIZE_WHITESPACE
    <time datetime="2026-12-01T10:00:00.123Z"
     title="2026-12-01 10:00:00 UTC">2026-12-01 10:00:00 UTC</time>
    >>> str(time_tag(None))
    '<span class="none">never</span>'
    """
    if value is None:
        return Markup('<span class="none">never</span>')
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    moment = moment.astimezone(UTC)
    iso = moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    shown = moment.strftime("%Y-%m-%d %H:%M:%S UTC")
    return Markup('<time datetime="{0}" title="{1}">{1}</time>').format(iso, shown)


def badge(text: str, css: str) -> Markup:
    """A status as text and colour (never colour alone)."""
    return Markup('<span class="badge {0}">{1}</span>').format(css, text)


def outcome_badge(outcome: str, status: int | None) -> Markup:
    text, css = OUTCOMES.get(outcome, (f"Failed: {outcome}", "bad"))
    if outcome == "http" and status is not None:
        text = f"Failed: HTTP {status}"
    return badge(text, css)


def health_badge(state: str) -> Markup:
    return badge(*HEALTH.get(state, (state, "idle")))


def job_badge(state: str) -> Markup:
    return badge(*JOB_STATES.get(state, (state, "idle")))


def pretty_body(text: str | None) -> str:
    """A request or response body for reading: indented if it is JSON, else as it is.

    >>> pretty_body('{"a":1}')
    '{\\n  "a": 1\\n}'
    >>> pretty_body("<b>not json</b>")
    '<b>not json</b>'
    """
    if text is None:
        return ""
    try:
        return orjson.dumps(orjson.loads(text), option=orjson.OPT_INDENT_2).decode()
    except orjson.JSONDecodeError:
        return text


def utc_if_naive(raw: str) -> str:
    """A time typed into a portal form: one without a time zone is UTC (the forms say
    so); anything else goes to the API's check as typed.

    >>> utc_if_naive("2026-12-01T10:00"), utc_if_naive("2026-12-01T10:00Z"), utc_if_naive("x")
    ('2026-12-01T10:00+00:00', '2026-12-01T10:00Z', 'x')
    """
    raw = raw.strip()
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        return raw
    return raw + "+00:00" if moment.tzinfo is None else raw


def form_fields(form: Mapping[str, Any], names: tuple[str, ...]) -> dict[str, str]:
    """The named fields of a form that were filled in (text only), stripped."""
    out = {}
    for name in names:
        value = form.get(name)
        if isinstance(value, str) and value.strip():
            out[name] = value.strip()
    return out


def iso_utc(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def templates(static_url: Callable[[str], str]) -> jinja2.Environment:
    """The portal's templates, escaping every value they are given (autoescape) and
    refusing a name they are not given (StrictUndefined)."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("dispatcher", "templates/portal"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        when=time_tag, outcome=outcome_badge, health=health_badge, job_state=job_badge,
        pretty=pretty_body,
    )  # fmt: skip
    env.globals["static"] = static_url
    return env


# --- the application ------------------------------------------------------------------------


def attach(
    app: web.Application,
    *,
    pool: asyncpg.Pool,
    store: Store,
    catalog: Catalog,
    http: HttpClient,
    settings: Settings,
    history: History | None,
) -> None:
    """Serve the portal under ``/portal/`` of the API application ``app``."""
    jobs = Jobs(pool)
    portal = Portal(
        store=store,
        sessions=Sessions(pool),
        webhooks=Webhooks(store, catalog, http, settings, history),
        recoveries=Recoveries(store, history, jobs, settings),
        catalog=catalog,
        settings=settings,
    )
    app.router.add_get(PREFIX, portal.to_index, allow_head=False)
    app.add_subapp(PREFIX + "/", portal.app())


@dataclass(frozen=True, slots=True)
class Page:
    """A template and what it shows; rendered by :meth:`Portal.render`."""

    template: str
    context: dict[str, Any]
    status: int = 200


class Portal:
    """The portal's handlers, over the same services as the API's."""

    def __init__(
        self,
        *,
        store: Store,
        sessions: Sessions,
        webhooks: Webhooks,
        recoveries: Recoveries,
        catalog: Catalog,
        settings: Settings,
    ) -> None:
        self._store = store
        self._sessions = sessions
        self._webhooks = webhooks
        self._recoveries = recoveries
        self._settings = settings
        self._catalog = [(t, event_types.example(t)) for t in event_types.event_types(catalog)]
        self._static = {
            name: resources.files("dispatcher").joinpath("static", "portal", name).read_bytes()
            for name in STATIC_TYPES
        }
        self._static_version = {
            name: hashlib.sha256(body).hexdigest()[:12] for name, body in self._static.items()
        }
        self._env = templates(self._static_url)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard])
        app.on_response_prepare.append(_security_headers)
        r = app.router
        r.add_get("/", self.index, allow_head=False)
        r.add_post("/sign-in", self.sign_in)
        r.add_post("/sign-out", self.sign_out)
        r.add_get("/event-types", self.catalog_page, allow_head=False)
        r.add_post("/webhooks", self.create)
        r.add_get("/webhooks/{id}", self.webhook, allow_head=False)
        r.add_get("/webhooks/{id}/delete", self.confirm_delete, allow_head=False)
        r.add_post("/webhooks/{id}/delete", self.delete)
        r.add_post("/webhooks/{id}/disable", self.disable)
        r.add_post("/webhooks/{id}/enable", self.enable)
        r.add_post("/webhooks/{id}/recover", self.recover)
        r.add_get("/webhooks/{id}/recoveries/{job_id}", self.job, allow_head=False)
        r.add_get("/webhooks/{id}/recoveries/{job_id}/progress", self.progress, allow_head=False)
        r.add_post("/webhooks/{id}/recoveries/{job_id}/cancel", self.cancel)
        r.add_get("/webhooks/{id}/attempts/{attempt_id}", self.attempt, allow_head=False)
        r.add_post("/webhooks/{id}/attempts/{attempt_id}/resend", self.resend)
        r.add_get("/static/{name}", self.static, allow_head=False)
        r.add_route("*", "/{tail:.*}", self.no_such_page)
        return app

    # --- the guard: origin, session, CSRF, errors as pages ---------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            if request.path.startswith(PREFIX + "/static/"):
                return await handler(request)
            if request.method == hdrs.METH_POST and not portal_sessions.same_origin(
                self._origin(request), request.headers
            ):
                log.info("portal_cross_site_refused", path=request.path)
                return self._error(request, 403, "This form came from another site: refused.")
            await self._load_session(request)
            return await handler(request)
        except ApiError as exc:
            return self._error(request, exc.status, exc.message)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            if isinstance(exc, web.HTTPRequestEntityTooLarge):
                return self._error(request, 413, f"The form is larger than {api.MAX_BODY} bytes.")
            return self._error(request, exc.status, exc.reason)
        except api.DATABASE_DOWN as exc:
            log.warning("portal_database_unavailable", path=request.path, error=repr(exc))
            return self._error(request, 503, "The database is unavailable; try again shortly.")
        except Exception:
            log.exception("portal_unexpected_error", method=request.method, path=request.path)
            return self._error(request, 500, "Something went wrong on our side.")

    async def _load_session(self, request: web.Request) -> None:
        raw = portal_sessions.parse_cookie_value(request.cookies.get(portal_sessions.COOKIE))
        session = await self._sessions.get(raw) if raw is not None else None
        if session is not None:
            request[SESSION_KEY] = session

    def _origin(self, request: web.Request) -> Origin:
        return portal_sessions.request_origin(
            request.scheme,
            request.host,
            request.headers,
            trust_proxy=self._settings.portal_trust_proxy,
        )

    async def _form(self, request: web.Request, session: Session) -> MultiDictProxy[Any]:
        """The posted form, once its CSRF token is the session's (403 otherwise)."""
        form = await request.post()
        sent = form.get("csrf")
        if not portal_sessions.csrf_ok(session.id, sent if isinstance(sent, str) else None):
            log.info("portal_csrf_refused", path=request.path)
            raise ApiError(403, "This form is out of date: reload the page and try again.")
        return form

    # --- rendering ------------------------------------------------------------------------

    def _static_url(self, name: str) -> str:
        return f"{PREFIX}/static/{name}?v={self._static_version[name]}"

    def render(self, request: web.Request, page: Page) -> web.Response:
        session = request.get(SESSION_KEY)
        context = {
            "session": session,
            "csrf": session.csrf if session is not None else "",
            "done": DONE_MESSAGES.get(request.query.get("done", "")),
            **page.context,
        }
        body = self._env.get_template(page.template).render(context)
        return web.Response(
            text=body,
            status=page.status,
            content_type="text/html",
            charset="utf-8",
            headers={hdrs.CACHE_CONTROL: "no-store"},
        )

    def _error(self, request: web.Request, status: int, message: str) -> web.Response:
        page = Page("error.html", {"title": f"Error {status}", "message": message}, status)
        return self.render(request, page)

    # --- sign-in ------------------------------------------------------------------------------

    async def to_index(self, request: web.Request) -> web.StreamResponse:
        return _see_other("/")

    async def index(self, request: web.Request) -> web.StreamResponse:
        session = request.get(SESSION_KEY)
        if session is None:
            return self.render(request, Page("sign_in.html", {"title": "Sign in", "error": None}))
        return await self._webhooks_page(request, session)

    async def sign_in(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        raw = form.get("token")
        token = raw.strip() if isinstance(raw, str) else ""
        principal = None
        if token and len(token) <= api.MAX_TOKEN and token.isascii():
            principal = await self._store.authenticate(token)
        if principal is None:
            log.info("portal_sign_in_refused")
            page = Page(
                "sign_in.html",
                {"title": "Sign in", "error": "Unknown or revoked token."},
                status=401,
            )
            return self.render(request, page)
        old = request.get(SESSION_KEY)
        if old is not None:
            await self._sessions.delete(old.id)
        lifetime = timedelta(hours=self._settings.portal_session_hours)
        session = await self._sessions.create(principal, lifetime)
        log.info(
            "portal_signed_in",
            environment_id=principal.environment_id,
            token_id=str(principal.token_id),
        )
        response = _see_other("/")
        response.headers[hdrs.SET_COOKIE] = portal_sessions.session_cookie(
            session.id,
            max_age=int(lifetime.total_seconds()),
            secure=self._origin(request).secure,
        )
        return response

    async def sign_out(self, request: web.Request) -> web.StreamResponse:
        session = request.get(SESSION_KEY)
        if session is not None:
            await self._form(request, session)
            await self._sessions.delete(session.id)
            log.info("portal_signed_out", environment_id=session.principal.environment_id)
        response = _see_other("/")
        response.headers[hdrs.SET_COOKIE] = portal_sessions.cleared_cookie(
            secure=self._origin(request).secure
        )
        return response

    def _session(self, request: web.Request) -> Session:
        if SESSION_KEY not in request:
            raise _SignedOut
        return request[SESSION_KEY]

    # --- webhooks -----------------------------------------------------------------------

    async def _webhooks_page(
        self,
        request: web.Request,
        session: Session,
        *,
        values: Mapping[str, str] | None = None,
        error: ApiError | None = None,
    ) -> web.Response:
        listed = await self._store.list_webhooks(session.principal.environment_id)
        shown = [await self._recoveries.webhook_json(w) for w in listed]
        errors, general = _field_errors(error, CREATE_FIELDS)
        context = {
            "title": "Webhooks",
            "webhooks": shown,
            "entities": list(self._entity_events()),
            "events": sorted({t.event_type for t, _ in self._catalog}),
            "values": dict(values or {}),
            "errors": errors,
            "general_error": general,
        }
        status = error.status if error is not None else 200
        return self.render(request, Page("webhooks.html", context, status))

    def _entity_events(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for t, _ in self._catalog:
            out.setdefault(t.entity_name, []).append(t.event_type)
        return out

    async def create(self, request: web.Request) -> web.StreamResponse:
        session = self._session(request)
        form = await self._form(request, session)
        data = {name: form.get(name, "") for name in CREATE_FIELDS}
        data = {k: v.strip() if isinstance(v, str) else "" for k, v in data.items()}
        try:
            webhook = await self._webhooks.create(session.principal, data)
        except ApiError as exc:
            return await self._webhooks_page(request, session, values=data, error=exc)
        context = {
            "title": "Webhook created",
            "webhook": webhook.public(),
            "secret": webhook.secret,
        }
        return self.render(request, Page("created.html", context, 201))

    async def _own(self, request: web.Request) -> tuple[Session, Webhook]:
        session = self._session(request)
        webhook = await self._webhooks.own(session.principal, request.match_info["id"])
        return session, webhook

    async def webhook(self, request: web.Request) -> web.StreamResponse:
        _, webhook = await self._own(request)
        return await self._webhook_page(request, webhook)

    async def _webhook_page(
        self,
        request: web.Request,
        webhook: Webhook,
        *,
        recover_values: Mapping[str, str] | None = None,
        recover_error: ApiError | None = None,
    ) -> web.Response:
        filters = {k: v for k, v in request.query.items() if k in LOG_FILTERS and v.strip()}
        query = {k: utc_if_naive(v) if k in ("since", "until") else v for k, v in filters.items()}
        if "cursor" in request.query:
            query["cursor"] = request.query["cursor"]
        attempts: list[dict[str, Any]] = []
        next_url = None
        filter_errors: dict[str, str] = {}
        filter_general = None
        status = 200
        try:
            page = await self._webhooks.attempts(webhook, query)
        except ApiError as exc:
            filter_errors, filter_general = _field_errors(exc, (*LOG_FILTERS, "cursor"))
            status = exc.status
        else:
            attempts = [attempt_json(r) for r in page.results]
            if page.next_cursor is not None:
                next_url = str(
                    URL.build(
                        path=f"{PREFIX}/webhooks/{webhook.id}",
                        query={**filters, "cursor": page.next_cursor},
                    )
                )
        jobs = [j.to_json() for j in (await self._recoveries.jobs(webhook))[:5]]
        errors, general = _field_errors(recover_error, ("mode", "since", "until"))
        if recover_error is not None:
            status = recover_error.status
        default_since = iso_utc(datetime.now(UTC) - timedelta(hours=1))
        context = {
            "title": f"{webhook.entity_name} {webhook.event_type}",
            "webhook": await self._recoveries.webhook_json(webhook),
            "attempts": attempts,
            "filters": filters,
            "paged": "cursor" in request.query,
            "next_url": next_url,
            "filter_errors": filter_errors,
            "filter_general": filter_general,
            "jobs": jobs,
            "recover": {"mode": "failed", "since": default_since, **(recover_values or {})},
            "recover_errors": errors,
            "recover_general": general,
            "max_days": self._settings.recovery_max_days,
        }
        return self.render(request, Page("webhook.html", context, status))

    async def confirm_delete(self, request: web.Request) -> web.StreamResponse:
        _, webhook = await self._own(request)
        context = {"title": "Delete webhook", "webhook": webhook.public()}
        return self.render(request, Page("delete.html", context))

    async def delete(self, request: web.Request) -> web.StreamResponse:
        session, webhook = await self._own(request)
        await self._form(request, session)
        await self._webhooks.delete(webhook, request.match_info["id"])
        return _see_other("/?done=deleted")

    async def disable(self, request: web.Request) -> web.StreamResponse:
        session, webhook = await self._own(request)
        await self._form(request, session)
        await self._recoveries.disable(webhook, request.match_info["id"])
        return _see_other(f"/webhooks/{webhook.id}?done=disabled")

    async def enable(self, request: web.Request) -> web.StreamResponse:
        session, webhook = await self._own(request)
        form = await self._form(request, session)
        data = form_fields(form, ("recover_since",))
        if "recover_since" in data:
            data["recover_since"] = utc_if_naive(data["recover_since"])
        _, job = await self._recoveries.enable(webhook, data, request.match_info["id"])
        if job is not None:
            return _see_other(f"/webhooks/{webhook.id}/recoveries/{job.id}")
        return _see_other(f"/webhooks/{webhook.id}?done=enabled")

    # --- recovery -----------------------------------------------------------------------

    async def recover(self, request: web.Request) -> web.StreamResponse:
        session, webhook = await self._own(request)
        form = await self._form(request, session)
        values = form_fields(form, ("mode", "since", "until"))
        data = {k: utc_if_naive(v) if k != "mode" else v for k, v in values.items()}
        try:
            job = await self._recoveries.recover(webhook, data)
        except ApiError as exc:
            if exc.status in (404, 403):
                raise
            return await self._webhook_page(
                request, webhook, recover_values=values, recover_error=exc
            )
        return _see_other(f"/webhooks/{webhook.id}/recoveries/{job.id}")

    async def job(self, request: web.Request) -> web.StreamResponse:
        _, webhook = await self._own(request)
        job = await self._recoveries.job(webhook, request.match_info["job_id"])
        context = {
            "title": f"Recovery {job.mode}",
            "webhook": webhook.public(),
            "job": job.to_json(),
            "active": job.active,
        }
        return self.render(request, Page("job.html", context))

    async def progress(self, request: web.Request) -> web.StreamResponse:
        """The job as JSON for the job page's script (the session's cookie, no token)."""
        if request.get(SESSION_KEY) is None:
            return web.json_response({"error": "signed out"}, status=401)
        _, webhook = await self._own(request)
        job = await self._recoveries.job(webhook, request.match_info["job_id"])
        return web.Response(
            body=orjson.dumps(_progress(job)),
            content_type="application/json",
            headers={hdrs.CACHE_CONTROL: "no-store"},
        )

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        session, webhook = await self._own(request)
        await self._form(request, session)
        job = await self._recoveries.cancel(webhook, request.match_info["job_id"])
        return _see_other(f"/webhooks/{webhook.id}/recoveries/{job.id}?done=cancelled")

    # --- attempts -----------------------------------------------------------------------

    async def attempt(self, request: web.Request) -> web.StreamResponse:
        _, webhook = await self._own(request)
        row = await self._webhooks.attempt(webhook, request.match_info["attempt_id"])
        shown = attempt_json(row, with_bodies=True)
        context = {"title": "Attempt", "webhook": webhook.public(), "attempt": shown}
        return self.render(request, Page("attempt.html", context))

    async def resend(self, request: web.Request) -> web.StreamResponse:
        session, webhook = await self._own(request)
        await self._form(request, session)
        attempt_id = request.match_info["attempt_id"]
        job = await self._recoveries.resend(webhook, attempt_id)
        return _see_other(f"/webhooks/{webhook.id}/attempts/{job.attempt_id}?done=resent")

    # --- the catalog, static files, the rest -------------------------------------------

    async def catalog_page(self, request: web.Request) -> web.StreamResponse:
        self._session(request)
        shown = [
            {
                **t.to_json(),
                "key": t.key,
                "schema_text": pretty_body(orjson.dumps(t.schema).decode()),
                "example_text": pretty_body(orjson.dumps(example).decode()),
            }
            for t, example in self._catalog
        ]
        context = {"title": "Event types", "types": shown}
        return self.render(request, Page("event_types.html", context))

    async def static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in self._static:
            raise web.HTTPNotFound()
        return web.Response(
            body=self._static[name],
            content_type=STATIC_TYPES[name],
            charset="utf-8",
            headers={hdrs.CACHE_CONTROL: "public, max-age=86400"},
        )

    async def no_such_page(self, request: web.Request) -> web.StreamResponse:
        return self._error(request, 404, "There is no such page.")


class _SignedOut(web.HTTPSeeOther):
    """A page that needs a session, asked for without one: to the sign-in form."""

    def __init__(self) -> None:
        super().__init__(location=PREFIX + "/")


def _see_other(path: str) -> web.Response:
    """303 to a portal address built here (from ids and fixed texts): never a request's."""
    return web.Response(status=303, headers={hdrs.LOCATION: PREFIX + path})


def _field_errors(
    error: ApiError | None, fields: tuple[str, ...]
) -> tuple[dict[str, str], str | None]:
    """An API refusal as the message next to its field, or a message for the whole form."""
    if error is None:
        return {}, None
    if error.field in fields:
        return {error.field: error.message}, None
    return {}, error.message


def _progress(job: Job) -> dict[str, Any]:
    shown = job.to_json()
    text, css = JOB_STATES.get(job.state, (job.state, "idle"))
    return {**shown, "active": job.active, "state_text": text, "state_class": css}


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
