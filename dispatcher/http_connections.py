"""Keep-alive HTTP/1.1 connections to webhook endpoints, for the one request we make.

A webhook POST needs little of an HTTP client: a request written in one go, and of the
answer its status, one header (``Retry-After``) and the head of its body. aiohttp's
client does much more per request (cookies, redirects, tracing, payload objects,
streamed responses), which cost as much CPU as everything else a delivery does. This
module does the least a correct HTTP/1.1 client must, and nothing else:

- one request at a time per connection, no pipelining; responses parsed by httptools
  (llhttp, Node.js's parser), so chunked and close-delimited bodies, ``1xx`` answers and
  ``Connection: close`` are handled as the RFC says;
- a connection goes back to the pool only when its answer was read to the end (at most
  :data:`MAX_DRAIN` bytes of body) and the endpoint keeps it alive; idle ones are closed
  after :data:`KEEPALIVE_SECONDS`. A request that meets a kept-alive connection the
  endpoint had just closed (nothing came back at all) is sent once more on a new one;
- per-endpoint and total limits on connections in use; a request waits for a free one
  within its own deadline;
- one deadline per request, covering the wait for a connection, DNS, connect, TLS and
  the answer; a ``200``'s status is final once its headers are in, whatever its body does;
- DNS answers cached :data:`DNS_TTL_SECONDS` per host and port, through the caller's
  resolver (the address guard, :class:`~dispatcher.netguard.GuardedResolver`); a URL
  naming an IP address is not resolved.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import httptools
from aiohttp.abc import AbstractResolver
from yarl import URL

from dispatcher.netguard import BlockedAddress

KEEPALIVE_SECONDS = 15.0  # an idle connection is closed after this long (aiohttp's default)
DNS_TTL_SECONDS = 10.0
MAX_HEAD = 64 * 1024  # bytes of status line and headers accepted in an answer
MAX_DRAIN = 64 * 1024  # bytes of body read to keep a connection; more and it is closed


class ResponseError(OSError):
    """The endpoint answered something that is not an HTTP/1.1 response we can read."""


class Disconnected(OSError):
    """The endpoint closed the connection before its answer's status line."""


class CannotConnect(OSError):
    """No connection could be made to ``host``:``port``; ``cause`` says why."""

    def __init__(self, host: str, port: int, cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror or str(cause))
        self.host, self.port, self.cause = host, port, cause


@dataclass(frozen=True, slots=True)
class Response:
    """What an endpoint answered: its status and reason, its ``Retry-After`` header, and
    the first ``head_limit`` bytes of its body (none kept for a ``200``)."""

    status: int
    reason: str
    retry_after: str | None
    body_head: bytes


class _Stale(Exception):
    """A kept-alive connection was closed by the endpoint before anything came back."""


class _Connection(asyncio.Protocol):
    """One connection, one exchange at a time; the pool's own, never shared."""

    __slots__ = (
        "_body",
        "_complete",
        "_drained",
        "_head_bytes",
        "_head_limit",
        "_parser",
        "_pool",
        "_reason",
        "_received",
        "_retry_after",
        "_status",
        "_timer",
        "_waiter",
        "closed",
        "endpoint",
        "exchanges",
        "idle_since",
        "transport",
    )

    def __init__(self, pool: ConnectionPool, endpoint: _Endpoint) -> None:
        self._pool = pool
        self.endpoint = endpoint
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.exchanges = 0
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[Response] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._complete = True  # no exchange under way
        self._reset()

    def _reset(self) -> None:
        self._status = 0
        self._reason = b""
        self._retry_after: bytes | None = None
        self._body = bytearray()
        self._head_limit = 0
        self._head_bytes = 0
        self._drained = 0
        self._received = 0

    # --- the exchange ---------------------------------------------------------------

    def send(self, data: bytes, deadline: float, head_limit: int) -> asyncio.Future[Response]:
        """Write one request; the future gets the answer (or the reason there is none)."""
        assert self.transport is not None
        assert self._complete
        loop = self._pool.loop
        self._reset()
        self._head_limit = head_limit
        self._complete = False
        self.exchanges += 1
        waiter = self._waiter = loop.create_future()
        self._timer = loop.call_at(deadline, self._expired)
        self.transport.write(data)
        return waiter

    def _answer(self) -> None:
        """The caller learns the answer; the exchange itself may go on (draining)."""
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            reason = self._reason.decode("latin-1")
            retry_after = None if self._retry_after is None else self._retry_after.decode("latin-1")
            waiter.set_result(Response(self._status, reason, retry_after, bytes(self._body)))

    def _fail(self, exc: BaseException) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def _finish(self, *, reusable: bool) -> None:
        """The exchange is over: the connection goes back to the pool or is closed."""
        if self._complete:
            return
        self._complete = True
        if self._waiter is not None:  # none is left waiting
            self._fail(Disconnected("the exchange ended without an answer"))
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not reusable:
            self._close()
        self._pool._released(self, reusable=reusable and not self.closed)

    def _expired(self) -> None:
        self._timer = None
        if self._status >= 200:
            self._answer()  # the status is in: it stands, only the body was slow
        else:
            self._fail(TimeoutError())
        self._finish(reusable=False)

    def _close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    # --- asyncio.Protocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TLS transport is not an asyncio.Transport subclass, but is one in kind
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._complete:  # nothing was asked: an endpoint talking out of turn
            self._close()
            return
        self._received += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(ResponseError("the endpoint switched protocols"))
            self._finish(reusable=False)
            return
        except httptools.HttpParserError as exc:
            self._fail(ResponseError(f"malformed HTTP response: {exc}"))
            self._finish(reusable=False)
            return
        if self._head_bytes > MAX_HEAD or (self._status == 0 and self._received > MAX_HEAD):
            self._fail(ResponseError(f"response headers over {MAX_HEAD} bytes"))
            self._finish(reusable=False)

    def eof_received(self) -> bool | None:
        return None  # close: an HTTP/1.1 client has nothing more to say either

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        self._pool._lost(self)
        if self._complete:
            return
        if self._status >= 200:
            self._answer()  # a close-delimited body, or one cut short: the status stands
        elif self._received == 0 and self.exchanges > 1:
            self._fail(_Stale())
        elif isinstance(exc, ssl.SSLError):
            self._fail(exc)
        else:
            self._fail(Disconnected("the endpoint closed the connection before answering"))
        self._finish(reusable=False)

    # --- httptools callbacks --------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete:  # a second answer to one request: the stream cannot be trusted
            self._close()

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value)
        if len(name) == 11 and name.lower() == b"retry-after":
            self._retry_after = value

    def on_headers_complete(self) -> None:
        if self._head_bytes > MAX_HEAD:
            return  # refused once the chunk is parsed (data_received)
        status = self._parser.get_status_code()
        if status < 200:  # 1xx: an interim answer, the real one follows
            self._reason = b""
            self._retry_after = None
            return
        self._status = status
        if status == 200:
            self._answer()

    def on_body(self, body: bytes) -> None:
        if self._status < 200:
            return
        self._drained += len(body)
        if self._waiter is not None:  # not answered yet (a 200 is, at its headers)
            self._body += body[: self._head_limit - len(self._body)]
            if len(self._body) >= self._head_limit:
                self._answer()
        if self._drained > MAX_DRAIN:
            self._answer()
            self._finish(reusable=False)

    def on_message_complete(self) -> None:
        if self._status < 200:
            return
        self._answer()
        self._finish(reusable=self._parser.should_keep_alive())


@dataclass(slots=True)
class _Endpoint:
    """The connections of one (scheme, host, port): idle ones (newest last), and the
    count of those in use."""

    key: tuple[str, str, int]
    idle: collections.deque[_Connection]
    in_use: int = 0


class ConnectionPool:
    """Connections to webhook endpoints. Use as an async context; :meth:`post` is the one
    request it makes."""

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext,
        resolver: AbstractResolver,
        user_agent: str,
        limit: int = 256,
        limit_per_host: int = 8,
        keepalive: float = KEEPALIVE_SECONDS,
    ) -> None:
        self._ssl = ssl_context
        self._resolver = resolver
        self._user_agent = user_agent
        self._limit = max(1, limit)
        self._limit_per_host = max(1, limit_per_host)
        self._keepalive = keepalive
        self._endpoints: dict[tuple[str, str, int], _Endpoint] = {}
        self._open: set[_Connection] = set()  # every connection, idle or in use
        self._in_use = 0
        self._waiters: collections.deque[tuple[tuple[str, str, int], asyncio.Future[None]]] = (
            collections.deque()
        )
        self._dns: dict[tuple[str, int], tuple[float, list[dict[str, Any]]]] = {}
        self._dns_pending: dict[tuple[str, int], asyncio.Future[list[dict[str, Any]]]] = {}
        self._prefixes: dict[URL, tuple[tuple[str, str, int], bytes]] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False
        self.loop = asyncio.get_running_loop()

    async def __aenter__(self) -> ConnectionPool:
        self._sweeper = self.loop.call_later(self._keepalive, self._sweep)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every connection; requests waiting for one fail."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for _, waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(ConnectionError("the connection pool is closed"))
        self._waiters.clear()
        for lookup in list(self._dns_pending.values()):
            lookup.cancel()
        for conn in list(self._open):
            conn._close()
        for endpoint in self._endpoints.values():
            endpoint.idle.clear()
        await self._resolver.close()

    # --- the request ----------------------------------------------------------------

    async def post(
        self, url: URL, body: bytes, headers: Mapping[str, str], *, within: float, head_limit: int
    ) -> Response:
        """POST ``body`` (JSON) to ``url`` with ``headers`` (names and values of our own,
        never an endpoint's), answered ``within`` seconds; keep ``head_limit`` bytes of
        the body of an answer other than 200. The answer, or an exception: TimeoutError,
        CannotConnect, ssl.SSLError, BlockedAddress (from the resolver), Disconnected or
        ResponseError."""
        deadline = self.loop.time() + within
        key, prefix = self._prefix(url)
        lines = [f"Content-Length: {len(body)}"]
        lines.extend(f"{name}: {value}" for name, value in headers.items())
        lines.append("\r\n")
        request = prefix + "\r\n".join(lines).encode("latin-1") + body
        for fresh in (False, True):  # again, on a new connection, after a _Stale one
            conn = await self._acquire(key, deadline, fresh=fresh)
            waiter = conn.send(request, deadline, head_limit)
            try:
                return await waiter
            except _Stale:
                continue
            except asyncio.CancelledError:
                if conn._waiter is waiter:  # still our exchange (not answered and reused)
                    conn._close()
                    conn._finish(reusable=False)
                raise
        raise Disconnected("the endpoint closed two connections before answering")

    def _prefix(self, url: URL) -> tuple[tuple[str, str, int], bytes]:
        """The pool key and the request's fixed lines, once per URL."""
        cached = self._prefixes.get(url)
        if cached is not None:
            return cached
        scheme, host, port = url.scheme, url.raw_host or "", url.port
        if scheme not in ("http", "https") or not host or port is None:
            raise ResponseError(f"cannot POST to {url}: not an http(s) URL with a host")
        target = url.raw_path_qs or "/"
        host_header = url.host_port_subcomponent or host
        if not (_token(target) and _token(host_header)):
            raise ResponseError(f"cannot POST to {url}: control characters in the URL")
        prefix = (
            f"POST {target} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: {self._user_agent}\r\n"
            "Content-Type: application/json\r\n"
        ).encode("ascii")
        if len(self._prefixes) >= 65_536:  # bounded: URLs of deleted webhooks go away
            self._prefixes.clear()
        entry = self._prefixes[url] = ((scheme, host, port), prefix)
        return entry

    # --- connections ----------------------------------------------------------------

    async def _acquire(
        self, key: tuple[str, str, int], deadline: float, *, fresh: bool = False
    ) -> _Connection:
        """A connection of ``key`` (an idle one unless ``fresh``), counted in use."""
        if self._closed:
            raise ConnectionError("the connection pool is closed")
        endpoint = self._endpoint(key)
        if endpoint.in_use >= self._limit_per_host or self._in_use >= self._limit:
            await self._wait_for_room(key, deadline)  # returns with the room taken for us
            endpoint = self._endpoint(key)  # the same one: in use, so never swept
            if self._closed:
                self._give_back(endpoint)
                raise ConnectionError("the connection pool is closed")
        else:
            endpoint.in_use += 1
            self._in_use += 1
        now = self.loop.time()
        while endpoint.idle and not fresh:
            conn = endpoint.idle.pop()
            if not conn.closed and now - conn.idle_since < self._keepalive:
                return conn
            conn._close()
        try:
            async with asyncio.timeout_at(deadline):
                return await self._connect(endpoint)
        except BaseException:
            self._give_back(endpoint)
            raise

    def _endpoint(self, key: tuple[str, str, int]) -> _Endpoint:
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            endpoint = self._endpoints[key] = _Endpoint(key, collections.deque())
        return endpoint

    async def _wait_for_room(self, key: tuple[str, str, int], deadline: float) -> None:
        waiter: asyncio.Future[None] = self.loop.create_future()
        entry = (key, waiter)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout_at(deadline):
                await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._give_back(self._endpoint(key))  # woken, but leaving: pass it on
            raise
        finally:
            if not waiter.done():
                waiter.cancel()
            with contextlib.suppress(ValueError):
                self._waiters.remove(entry)

    async def _connect(self, endpoint: _Endpoint) -> _Connection:
        scheme, host, port = endpoint.key
        tls = self._ssl if scheme == "https" else None
        try:
            addresses = await self._resolve(host, port)
        except BlockedAddress:
            raise
        except OSError as exc:
            raise CannotConnect(host, port, exc) from exc
        last: OSError | None = None
        for address in addresses:
            try:
                _, conn = await self.loop.create_connection(
                    lambda: _Connection(self, endpoint),
                    address["host"],
                    address["port"],
                    family=address["family"],
                    proto=address.get("proto", 0),
                    # an address, never a name: nothing reaches DNS past the guard
                    flags=socket.AI_NUMERICHOST,
                    ssl=tls,
                    server_hostname=host if tls is not None else None,
                )
            except ssl.SSLError:
                raise
            except OSError as exc:
                last = exc
                continue
            self._open.add(conn)
            return conn
        assert last is not None
        raise CannotConnect(host, port, last)

    async def _resolve(self, host: str, port: int) -> list[dict[str, Any]]:
        if _is_ip(host):
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            return [{"host": host, "port": port, "family": family, "proto": 0}]
        key = (host, port)
        now = self.loop.time()
        cached = self._dns.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        lookup = self._dns_pending.get(key)
        if lookup is None:
            # A task of its own, shared by every request for the host meanwhile: one
            # request's deadline or cancellation must not end the others' lookup.
            lookup = self._dns_pending[key] = asyncio.ensure_future(self._lookup(host, port))
            lookup.add_done_callback(_retrieve)
        return await asyncio.shield(lookup)

    async def _lookup(self, host: str, port: int) -> list[dict[str, Any]]:
        key = (host, port)
        try:
            results = [dict(r) for r in await self._resolver.resolve(host, port, socket.AF_UNSPEC)]
        finally:
            del self._dns_pending[key]
        if len(self._dns) >= 4096:
            self._dns.clear()
        self._dns[key] = (self.loop.time() + DNS_TTL_SECONDS, results)
        return results

    def _released(self, conn: _Connection, *, reusable: bool) -> None:
        """From a connection whose exchange is over."""
        if reusable and not self._closed:
            conn.idle_since = self.loop.time()
            conn.endpoint.idle.append(conn)
        elif not conn.closed:
            conn._close()
        self._give_back(conn.endpoint)

    def _give_back(self, endpoint: _Endpoint) -> None:
        endpoint.in_use -= 1
        self._in_use -= 1
        self._wake()

    def _wake(self) -> None:
        """Hand free room to the first waiters who can use it, in the order they came:
        the room is taken for them here, so a request arriving meanwhile cannot take it."""
        for key, waiter in self._waiters:
            if self._in_use >= self._limit:
                return
            if waiter.done():
                continue
            endpoint = self._endpoint(key)
            if endpoint.in_use < self._limit_per_host:
                endpoint.in_use += 1
                self._in_use += 1
                waiter.set_result(None)

    def _lost(self, conn: _Connection) -> None:
        """A connection closed: forget it (an idle one leaves its endpoint's idle ones)."""
        self._open.discard(conn)
        if conn._complete:
            with contextlib.suppress(ValueError):
                conn.endpoint.idle.remove(conn)

    def _sweep(self) -> None:
        """Close idle connections past their keep-alive; forget unused endpoints."""
        now = self.loop.time()
        for key, endpoint in list(self._endpoints.items()):
            while endpoint.idle and now - endpoint.idle[0].idle_since >= self._keepalive:
                endpoint.idle.popleft()._close()
            if not endpoint.idle and endpoint.in_use == 0:
                del self._endpoints[key]
        self._dns = {k: v for k, v in self._dns.items() if v[0] > now}
        if not self._closed:
            self._sweeper = self.loop.call_later(self._keepalive, self._sweep)


def _retrieve(lookup: asyncio.Future[Any]) -> None:
    """Mark a shared lookup's exception seen (its requests may all have given up)."""
    if not lookup.cancelled():
        lookup.exception()


def _token(text: str) -> bool:
    """Printable ASCII without spaces: safe in a request line or a header."""
    return text.isascii() and text.isprintable() and " " not in text


def _is_ip(host: str) -> bool:
    """Whether ``host`` is an IP address (a zone suffix ``%...`` only on IPv6): such a
    host is connected to as is; anything else goes through the resolver (the guard)."""
    try:
        if ":" in host:
            socket.inet_pton(socket.AF_INET6, host.split("%", 1)[0])
        else:
            socket.inet_pton(socket.AF_INET, host)
    except OSError:
        return False
    return True
