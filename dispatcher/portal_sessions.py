"""The portal's sessions and its defences against cross-site requests.

A shop signs in to the portal with its static token once; the portal answers a session
cookie holding a random id (256 bits) and keeps only its SHA-256 in PostgreSQL
(``portal_sessions``), so every process and instance serving the API knows every session,
signing out really revokes it, and a read of the table signs nobody in. A session speaks
for its token: a revoked token ends its sessions at once.

Cross-site requests are refused three ways, each enough on its own:

- the cookie is ``SameSite=Strict``: a browser sends it with no request another site
  starts;
- every form that changes something carries :func:`csrf_token`, an HMAC of the session id,
  which another site cannot read nor compute;
- every POST must come from the portal's own origin (:func:`same_origin`: ``Origin``, or
  ``Referer`` when a browser sends no ``Origin``); this guards the sign-in form too, which
  has no session yet (login CSRF).

Pure functions (cookies, tokens, origins) are unit-tested; :class:`Sessions` is the SQL.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import asyncpg
from yarl import URL

from dispatcher.store import Principal

COOKIE = "dispatcher_portal"
COOKIE_PATH = "/portal"
SESSION_BYTES = 32
MAX_SESSION_ID = 100  # characters of a cookie value worth looking up
_CSRF_CONTEXT = b"dispatcher-portal-csrf-v1"


def new_session_id() -> str:
    """A random session id (256 bits, URL-safe base64), the cookie's value."""
    return secrets.token_urlsafe(SESSION_BYTES)


def hash_session_id(session_id: str) -> bytes:
    """What ``portal_sessions`` keeps of a session id."""
    return hashlib.sha256(session_id.encode("utf-8")).digest()


def csrf_token(session_id: str) -> str:
    """The anti-CSRF token of a session: an HMAC keyed by the session id, so any process
    derives it with no shared key, and it tells nothing of the id.

    >>> csrf_token("abc") == csrf_token("abc") != csrf_token("abd")
    True
    """
    return hmac.new(session_id.encode("utf-8"), _CSRF_CONTEXT, hashlib.sha256).hexdigest()


def csrf_ok(session_id: str, sent: str | None) -> bool:
    """Whether ``sent`` (a form's hidden field) is the session's token; constant time."""
    if not sent or len(sent) > 200:
        return False
    return hmac.compare_digest(csrf_token(session_id), sent)


@dataclass(frozen=True, slots=True)
class Origin:
    """The portal's origin as the browser sees it: ``https`` or ``http``, and the host
    with its port as in the ``Host`` header."""

    scheme: str
    host: str

    @property
    def secure(self) -> bool:
        return self.scheme == "https"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}"


def request_origin(
    scheme: str, host: str, headers: Mapping[str, str], *, trust_proxy: bool
) -> Origin:
    """The origin a request was made to: its own scheme and ``Host``, or, when the
    operator trusts a reverse proxy (``DISPATCHER_PORTAL_TRUST_PROXY``), the first
    ``X-Forwarded-Proto`` and ``X-Forwarded-Host`` that proxy set.

    >>> str(request_origin("http", "a:8080", {"X-Forwarded-Proto": "https"}, trust_proxy=False))
    'http://a:8080'
    >>> str(request_origin("http", "a:8080", {"X-Forwarded-Proto": "https"}, trust_proxy=True))
    'https://a:8080'
    """
    if trust_proxy:
        proto = headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
        if proto in ("http", "https"):
            scheme = proto
        forwarded_host = headers.get("X-Forwarded-Host", "").split(",")[0].strip()
        if forwarded_host:
            host = forwarded_host
    return Origin(scheme.lower(), host.lower())


def same_origin(origin: Origin, headers: Mapping[str, str]) -> bool:
    """Whether a POST comes from a page of ``origin``: its ``Origin`` header (every
    current browser sends one with a form POST) or, lacking it, its ``Referer``. A
    request with neither is refused: the portal is for browsers.

    >>> here = Origin("http", "127.0.0.1:8080")
    >>> same_origin(here, {"Origin": "http://127.0.0.1:8080"})
    True
    >>> same_origin(here, {"Origin": "http://evil.example"})
    False
    >>> same_origin(here, {"Origin": "null"}), same_origin(here, {})
    (False, False)
    >>> same_origin(here, {"Referer": "http://127.0.0.1:8080/portal/"})
    True
    """
    sent = headers.get("Origin")
    if sent is None:
        referer = headers.get("Referer")
        if not referer:
            return False
        sent = referer
    try:
        url = URL(sent.strip())
        scheme, authority = url.scheme.lower(), url.raw_authority.lower()
    except (ValueError, TypeError):
        return False
    if not authority or scheme not in ("http", "https"):
        return False
    default = {"http": ":80", "https": ":443"}[scheme]
    expected = origin.host[: -len(default)] if origin.host.endswith(default) else origin.host
    authority = authority[: -len(default)] if authority.endswith(default) else authority
    return scheme == origin.scheme and authority == expected


def session_cookie(session_id: str, *, max_age: int, secure: bool) -> str:
    """The ``Set-Cookie`` value that signs a browser in: not readable by scripts, sent
    only to the portal's paths and by no request another site starts, expiring with the
    session, and over HTTPS only when the portal is served over HTTPS.

    >>> session_cookie("s1", max_age=60, secure=True)
    'dispatcher_portal=s1; Path=/portal; Max-Age=60; HttpOnly; SameSite=Strict; Secure'
    """
    parts = [f"{COOKIE}={session_id}", f"Path={COOKIE_PATH}", f"Max-Age={max_age}", "HttpOnly"]
    parts.append("SameSite=Strict")
    if secure:
        parts.append("Secure")
    return "; ".join(parts)


def cleared_cookie(*, secure: bool) -> str:
    """The ``Set-Cookie`` value that makes the browser forget the session cookie."""
    return session_cookie("", max_age=0, secure=secure)


def parse_cookie_value(raw: str | None) -> str | None:
    """The session id of a cookie value if it can be one (so junk costs no query)."""
    if not raw or len(raw) > MAX_SESSION_ID:
        return None
    if not raw.isascii() or not all(c.isalnum() or c in "-_" for c in raw):
        return None
    return raw


@dataclass(frozen=True, slots=True)
class Session:
    """A signed-in browser: the session id (from its cookie) and whom it speaks for."""

    id: str
    principal: Principal

    @property
    def csrf(self) -> str:
        return csrf_token(self.id)


class Sessions:
    """The ``portal_sessions`` table."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def create(self, principal: Principal, lifetime: timedelta) -> Session:
        """A new session for the principal's token; expired sessions are deleted too."""
        session_id = new_session_id()
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("DELETE FROM portal_sessions WHERE expires_at < now()")
            await conn.execute(
                """INSERT INTO portal_sessions (id_hash, token_id, expires_at)
                   VALUES ($1, $2, now() + make_interval(secs => $3::float8))""",
                hash_session_id(session_id),
                principal.token_id,
                lifetime.total_seconds(),
            )
        return Session(session_id, principal)

    async def get(self, session_id: str) -> Session | None:
        """The live session of this id, whose token is live too; None otherwise."""
        row = await self._pool.fetchrow(
            """SELECT t.id, t.environment_id, t.client_id
               FROM portal_sessions s JOIN api_tokens t ON t.id = s.token_id
               WHERE s.id_hash = $1 AND s.expires_at > now() AND t.revoked_at IS NULL""",
            hash_session_id(session_id),
        )
        if row is None:
            return None
        token_id: uuid.UUID = row["id"]
        return Session(session_id, Principal(token_id, row["environment_id"], row["client_id"]))

    async def delete(self, session_id: str) -> bool:
        """End the session (sign-out); False if it was not live."""
        result = await self._pool.execute(
            "DELETE FROM portal_sessions WHERE id_hash = $1", hash_session_id(session_id)
        )
        return bool(result == "DELETE 1")
