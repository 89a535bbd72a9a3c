"""One HTTPS POST to a webhook endpoint, and what came of it.

Success is exactly HTTP 200. Every other answer, and every timeout, connection, TLS or
address-policy error, is a failed :class:`Outcome` that says what went wrong in words a
subscriber can act on.
"""

from __future__ import annotations

import email.utils
import functools
import ipaddress
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from yarl import URL

from dispatcher import __version__
from dispatcher.http_connections import CannotConnect, ConnectionPool
from dispatcher.netguard import BlockedAddress, GuardedResolver, is_blocked
from dispatcher.policy import clamp_retry_after
from dispatcher.settings import IPNetwork, Settings

USER_AGENT = f"webhook-dispatcher/{__version__}"
_BODY_HEAD = 4096  # bytes of a failed response kept (delivery history, notice)

ErrorKind = Literal["http", "timeout", "connection", "tls", "blocked"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one POST did. ``status`` is None when no HTTP answer came back."""

    status: int | None
    error_kind: ErrorKind | None
    detail: str
    duration_ms: float
    body_head: str = ""
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        return self.error_kind is None

    @property
    def kind(self) -> str:
        """delivered, http, timeout, connection, tls or blocked."""
        return self.error_kind or "delivered"

    @property
    def label(self) -> str:
        """A bounded label for metrics and logs: "200", "4xx", "timeout", ..."""
        if self.status is not None:
            return "200" if self.status == 200 else f"{self.status // 100}xx"
        return self.error_kind or "unknown"


def ssl_context(ca_file: str = "") -> ssl.SSLContext:
    """The system's trust store, plus ``ca_file`` when given."""
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    return context


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds asked for by a Retry-After header (delta-seconds or HTTP date), or None.

    The endpoint is not trusted: anything unparsable is ignored, and the answer is
    clamped by the retry policy (:func:`~dispatcher.policy.clamp_retry_after`), so a
    hostile value cannot overflow a date or delay a retry for years.
    """
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return clamp_retry_after(float(value[:12]))
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, OverflowError, IndexError):
        return None
    return clamp_retry_after(when - now)


@functools.lru_cache(maxsize=65_536)
def parse_url(url: str) -> URL:
    """A webhook URL, parsed once: the same few URLs are posted to again and again."""
    return URL(url)


def literal_blocked(url: URL, allowed: Sequence[IPNetwork]) -> bool:
    """Whether the URL names a forbidden IP address literally (no resolver involved)."""
    host = url.host or ""
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return is_blocked(host, allowed)


class HttpClient:
    """Webhook POSTs over pooled keep-alive connections
    (:mod:`dispatcher.http_connections`). Use as an async context."""

    def __init__(
        self,
        *,
        timeout: float,
        allowed: Sequence[IPNetwork] = (),
        ca_file: str = "",
        limit: int = 256,
        limit_per_host: int = 8,
    ) -> None:
        self._timeout = timeout
        self._allowed = tuple(allowed)
        self._ca_file = ca_file
        self._limit = limit
        self._limit_per_host = limit_per_host
        self._pool: ConnectionPool | None = None
        # URL -> whether it names a forbidden address literally: asked once per URL, not
        # per delivery (hashing the allowed networks alone is a few Python calls)
        self._blocked: dict[str, bool] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> HttpClient:
        return cls(
            timeout=settings.delivery_timeout_seconds,
            allowed=settings.allow_private_targets,
            ca_file=settings.tls_ca_file,
            limit=settings.max_in_flight,
            limit_per_host=settings.max_in_flight_per_endpoint,
        )

    async def __aenter__(self) -> HttpClient:
        self._pool = ConnectionPool(
            ssl_context=ssl_context(self._ca_file),
            resolver=GuardedResolver(self._allowed),
            user_agent=USER_AGENT,
            limit=self._limit,
            limit_per_host=self._limit_per_host,
        )
        await self._pool.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> Outcome:
        """POST ``body`` as JSON; never raises for network or HTTP trouble."""
        assert self._pool is not None, "HttpClient used outside 'async with'"
        start = time.perf_counter()

        def took() -> float:
            return round((time.perf_counter() - start) * 1000, 2)

        target = parse_url(url)
        blocked = self._blocked.get(url)
        if blocked is None:
            if len(self._blocked) >= 65_536:  # bounded: URLs of deleted webhooks go away
                self._blocked.clear()
            blocked = self._blocked[url] = literal_blocked(target, self._allowed)
        if blocked:
            return Outcome(
                None,
                "blocked",
                f"{target.host} is a private, loopback or link-local address",
                took(),
            )
        try:
            response = await self._pool.post(
                target, body, headers, within=self._timeout, head_limit=_BODY_HEAD
            )
        except TimeoutError:
            return Outcome(None, "timeout", f"no answer within {self._timeout:g} s", took())
        except BlockedAddress as exc:
            return Outcome(None, "blocked", str(exc), took())
        except ssl.SSLCertVerificationError as exc:
            return Outcome(None, "tls", f"TLS certificate error: {exc}", took())
        except ssl.SSLError as exc:
            return Outcome(None, "tls", f"TLS error: {exc}", took())
        except CannotConnect as exc:
            cause = exc.cause
            return Outcome(
                None,
                "connection",
                f"cannot connect to {exc.host}:{exc.port}: {cause.strerror or cause}",
                took(),
            )
        except OSError as exc:
            return Outcome(None, "connection", f"connection error: {_describe(exc)}", took())
        if response.status == 200:
            return Outcome(200, None, "200 OK", took())
        return Outcome(
            response.status,
            "http",
            f"HTTP {response.status} {response.reason}".strip(),
            took(),
            body_head=response.body_head.decode("utf-8", "replace"),
            retry_after=parse_retry_after(response.retry_after, time.time()),
        )


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
