"""The webhook HTTP client against a real TLS server that answers byte by byte as told.

The server (:class:`Scripted`) is a plain asyncio TLS server: each test says what to
write back for each request, so answers that aiohttp's server would never send (chunked
200s, interim 100s, close-delimited bodies, garbage, answers that stop halfway) are
sent exactly. What is asserted is what a subscriber would see (the outcome) and what the
endpoint would see (how many connections, how many requests on each).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from dispatcher.client import HttpClient
from dispatcher.http_connections import ConnectionPool
from tests.integration.support import Tls

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)
BODY = b'{"hello": "world"}'
HEADERS = {"webhook-id": "msg_1", "webhook-timestamp": "1700000000", "webhook-signature": "v1,x"}

Answer = Callable[[int, int], Awaitable[bytes | None]]  # (connection, request) numbers


def ok(body: bytes = b"ok") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def chunked(status: bytes, body: bytes, *, extra: bytes = b"") -> bytes:
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + 1000]), body[i : i + 1000])
        for i in range(0, len(body), 1000)
    )
    return b"HTTP/1.1 %s\r\n%sTransfer-Encoding: chunked\r\n\r\n%s0\r\n\r\n" % (
        status,
        extra,
        chunks,
    )


@dataclass
class Scripted:
    """A TLS server answering each request with what ``answer`` returns for its
    connection's number and its own (both from 0 and 1 up, over all connections; None:
    close the connection without a word). An answer saying ``Connection: close`` is
    followed by closing the connection."""

    answer: Answer
    url: str = ""
    requests: list[tuple[int, bytes]] = field(default_factory=list)  # (connection, raw)
    connections: int = 0
    open_now: int = 0
    most_open: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                raw = head + await reader.readexactly(length)
                self.requests.append((number, raw))
                reply = await self.answer(number, len(self.requests) - 1)
                if reply is None:
                    return
                writer.write(reply)
                await writer.drain()
                if b"\r\nConnection: close\r\n" in reply.split(b"\r\n\r\n", 1)[0] + b"\r\n":
                    return  # as it said
        finally:
            self.open_now -= 1
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                writer.close()
                await writer.wait_closed()


@pytest.fixture
async def scripted(tls: Tls) -> AsyncIterator[Callable[[Answer], Awaitable[Scripted]]]:
    servers: list[asyncio.Server] = []

    async def start(answer: Answer) -> Scripted:
        script = Scripted(answer)
        server = await asyncio.start_server(script.handle, "127.0.0.1", 0, ssl=tls.server_context)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        script.url = f"https://localhost:{port}/hook"
        return script

    yield start
    for server in servers:
        server.close()


def client(tls: Tls, *, timeout: float = 5.0, limit_per_host: int = 8) -> HttpClient:
    return HttpClient(
        timeout=timeout, allowed=LOOPBACK, ca_file=tls.ca_file, limit_per_host=limit_per_host
    )


async def test_every_shape_of_a_200_is_delivered_on_one_kept_alive_connection(
    tls: Tls, scripted: Callable[[Answer], Awaitable[Scripted]]
) -> None:
    shapes = [
        ok(),
        chunked(b"200 OK", b"x" * 2500),
        b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"after an interim answer"),
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Extra: 1\r\n\r\n",
    ]

    async def answer(connection: int, index: int) -> bytes:
        return shapes[index % len(shapes)]

    server = await scripted(answer)
    async with client(tls) as http:
        outcomes = [await http.post(server.url, BODY, HEADERS) for _ in range(8)]
    assert [o.status for o in outcomes] == [200] * 8, [o.detail for o in outcomes]
    assert all(o.ok for o in outcomes)
    assert server.connections == 1  # every answer was read to its end, the connection kept
    first = server.requests[0][1]
    assert first.startswith(b"POST /hook HTTP/1.1\r\n")
    assert b"\r\nhost: localhost:" in first.lower()
    assert b"\r\ncontent-type: application/json\r\n" in first.lower()
    assert b"\r\nwebhook-id: msg_1\r\n" in first
    assert first.endswith(b"\r\n\r\n" + BODY)


async def test_a_failed_answer_keeps_its_status_retry_after_and_first_4_kib(
    tls: Tls, scripted: Callable[[Answer], Awaitable[Scripted]]
) -> None:
    text = ("é" * 3000).encode()  # 6,000 bytes, cut inside no character on decoding

    async def answer(connection: int, index: int) -> bytes:
        if index == 0:
            return chunked(b"503 Busy Now", text, extra=b"Retry-After: 120\r\n")
        if index == 2:
            return chunked(b"500 Oops", b"y" * 100_000)  # too long to read to the end
        return ok()

    server = await scripted(answer)
    async with client(tls) as http:
        busy = await http.post(server.url, BODY, HEADERS)
        after_busy = await http.post(server.url, BODY, HEADERS)
        huge = await http.post(server.url, BODY, HEADERS)
        after_huge = await http.post(server.url, BODY, HEADERS)
    assert (busy.status, busy.error_kind, busy.detail) == (503, "http", "HTTP 503 Busy Now")
    assert busy.retry_after is not None
    assert 110 <= busy.retry_after <= 120
    assert len(busy.body_head.encode()) <= 4096
    assert busy.body_head.startswith("é" * 2000)
    assert after_busy.ok
    assert (huge.status, huge.detail) == (500, "HTTP 500 Oops")
    assert huge.body_head == "y" * 4096
    assert after_huge.ok
    # the 503 was read to its end and its connection kept; the 100 kB one was not
    assert [c for c, _ in server.requests] == [1, 1, 1, 2]


async def test_connection_close_and_a_body_ended_by_closing_are_read(
    tls: Tls, scripted: Callable[[Answer], Awaitable[Scripted]]
) -> None:
    async def answer(connection: int, index: int) -> bytes:
        return b"HTTP/1.1 500 Broken\r\nConnection: close\r\n\r\nno length, ended by a close"

    server = await scripted(answer)
    async with client(tls) as http:
        first = await http.post(server.url, BODY, HEADERS)
        second = await http.post(server.url, BODY, HEADERS)
    for outcome in (first, second):
        assert (outcome.status, outcome.detail) == (500, "HTTP 500 Broken")
        assert outcome.body_head == "no length, ended by a close"
    assert server.connections == 2  # the endpoint said close: not kept


async def test_a_kept_alive_connection_the_endpoint_dropped_costs_no_failure(
    tls: Tls, scripted: Callable[[Answer], Awaitable[Scripted]]
) -> None:
    async def answer(connection: int, index: int) -> bytes | None:
        # the first connection answers once, then drops the next request unanswered:
        # the race of an endpoint closing an idle connection as a request goes out
        return None if (connection, index) == (1, 1) else ok()

    server = await scripted(answer)
    async with client(tls) as http:
        outcomes = [await http.post(server.url, BODY, HEADERS) for _ in range(3)]
    assert all(o.ok for o in outcomes), [o.detail for o in outcomes]
    assert [c for c, _ in server.requests] == [1, 1, 2, 2]


async def test_a_new_connection_dropped_unanswered_is_a_connection_failure(
    tls: Tls, scripted: Callable[[Answer], Awaitable[Scripted]]
) -> None:
    async def answer(connection: int, index: int) -> bytes | None:
        return None

    server = await scripted(answer)
    async with client(tls) as http:
        outcome = await http.post(server.url, BODY, HEADERS)
    assert outcome.error_kind == "connection"
    assert "closed the connection before answering" in outcome.detail
    assert len(server.requests) == 1  # not sent again: it may have been acted on


async def test_a_200_is_final_at_its_headers_and_silence_is_a_timeout(
    tls: Tls, scripted: Callable[[Answer], Awaitable[Scripted]]
) -> None:
    never = asyncio.Event()

    async def answer(connection: int, index: int) -> bytes | None:
        if index == 0:  # a 200 whose body stops after 2 of 1,000 bytes
            return b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nhi"
        await never.wait()  # no answer at all
        return None

    server = await scripted(answer)
    async with client(tls, timeout=3.0) as http:
        started = time.monotonic()
        stalled_body = await http.post(server.url, BODY, HEADERS)
        stalled_took = time.monotonic() - started
        silent = await http.post(server.url, BODY, HEADERS)
    assert stalled_body.ok
    assert stalled_took < 2.0  # did not wait for the body (the deadline is 3 s)
    assert (silent.error_kind, silent.detail) == ("timeout", "no answer within 3 s")
    assert [c for c, _ in server.requests] == [1, 2]  # the stalled one was not reused


async def test_garbage_and_endless_headers_are_connection_errors(
    tls: Tls, scripted: Callable[[Answer], Awaitable[Scripted]]
) -> None:
    async def answer(connection: int, index: int) -> bytes:
        if connection == 1:
            return b"SMTP/1.0 hello there\r\n\r\n"
        return b"HTTP/1.1 200 OK\r\n" + b"X-Filler: " + b"z" * 70_000 + b"\r\n\r\n"

    server = await scripted(answer)
    async with client(tls) as http:
        garbage = await http.post(server.url, BODY, HEADERS)
        endless = await http.post(server.url, BODY, HEADERS)
    assert garbage.error_kind == "connection"
    assert "malformed HTTP response" in garbage.detail
    assert endless.error_kind == "connection"
    assert "response headers over 65536 bytes" in endless.detail


async def test_the_per_endpoint_limit_caps_open_connections(
    tls: Tls, scripted: Callable[[Answer], Awaitable[Scripted]]
) -> None:
    release = asyncio.Event()
    waiting: list[int] = []

    async def answer(connection: int, index: int) -> bytes:
        waiting.append(connection)
        if len(waiting) == 2:
            release.set()
        await release.wait()
        return ok()

    server = await scripted(answer)
    async with client(tls, limit_per_host=2) as http:
        outcomes = await asyncio.gather(*(http.post(server.url, BODY, HEADERS) for _ in range(12)))
    assert all(o.ok for o in outcomes)
    assert server.most_open == 2
    assert len(server.requests) == 12


async def test_plain_http_on_the_https_port_is_a_tls_error(tls: Tls) -> None:
    async def plain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(ok())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(plain, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with client(tls) as http:
            outcome = await http.post(f"https://localhost:{port}/hook", BODY, HEADERS)
    finally:
        server.close()
    assert outcome.error_kind == "tls", outcome.detail
    assert outcome.detail.startswith("TLS error:")


async def test_the_deadline_covers_waiting_for_a_free_connection(
    tls: Tls, scripted: Callable[[Answer], Awaitable[Scripted]]
) -> None:
    never = asyncio.Event()

    async def answer(connection: int, index: int) -> bytes | None:
        await never.wait()  # the one connection allowed stays busy
        return None

    server = await scripted(answer)
    async with client(tls, timeout=1.0, limit_per_host=1) as http:
        outcomes = await asyncio.gather(*(http.post(server.url, BODY, HEADERS) for _ in range(3)))
    assert [o.error_kind for o in outcomes] == ["timeout"] * 3
    assert len(server.requests) == 1  # the two others never got a connection
    assert server.most_open == 1


class SlowResolver(AbstractResolver):
    """Resolves every name to 127.0.0.1 once ``release`` is set; counts lookups."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.lookups = 0

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.lookups += 1
        await self.release.wait()
        return [
            {"hostname": host, "host": "127.0.0.1", "port": port, "family": socket.AF_INET,
             "proto": 0, "flags": socket.AI_NUMERICHOST}
        ]  # fmt: skip

    async def close(self) -> None:
        return None


async def test_a_request_giving_up_on_a_shared_dns_lookup_leaves_it_to_the_others(
    tls: Tls, scripted: Callable[[Answer], Awaitable[Scripted]]
) -> None:
    async def answer(connection: int, index: int) -> bytes:
        return ok()

    server = await scripted(answer)
    port = URL(server.url).port
    resolver = SlowResolver()
    context = ssl.create_default_context(cafile=tls.ca_file)
    url = URL(f"https://localhost:{port}/hook")
    async with ConnectionPool(ssl_context=context, resolver=resolver, user_agent="t") as pool:
        hurried = asyncio.ensure_future(pool.post(url, BODY, HEADERS, within=0.3, head_limit=0))
        patient = asyncio.ensure_future(pool.post(url, BODY, HEADERS, within=10, head_limit=0))
        with pytest.raises(TimeoutError):
            await hurried  # its deadline passed during the lookup
        resolver.release.set()
        response = await patient  # not cancelled along with it: the lookup went on
    assert response.status == 200
    assert resolver.lookups == 1
