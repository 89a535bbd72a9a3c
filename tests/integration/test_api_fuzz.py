"""Property tests: whatever a client sends, the API answers it without a server error.

Hypothesis throws random methods, paths, query strings, headers, content types and bodies
(random bytes, JSON of any shape, subscription-like objects with wrong types or values)
at a real API backed by real PostgreSQL and a real HTTPS receiver.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

import asyncpg
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dispatcher import catalog
from dispatcher.api import FIELDS, MAX_BODY, create_app
from dispatcher.client import HttpClient
from dispatcher.recovery import Jobs
from dispatcher.settings import Settings
from dispatcher.store import Store
from tests.integration.support import Receiver, free_port

T = TypeVar("T")
RECEIVER = "{receiver}"  # replaced by the receiver's URL when the request is sent
TOKEN = "{token}"  # replaced by a live token
ERROR_TYPES = {
    "invalid_request",
    "unauthorized",
    "not_found",
    "conflict",
    "endpoint_check_failed",
    "method_not_allowed",
    "payload_too_large",
    "unsupported_media_type",
}


def mostly(usual: st.SearchStrategy[T], other: st.SearchStrategy[T]) -> st.SearchStrategy[T]:
    """``usual`` four times in five, else ``other`` (``|`` would weigh each branch alike)."""
    return st.sampled_from((True, True, True, True, False)).flatmap(
        lambda usual_one: usual if usual_one else other
    )


ascii_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
urls = mostly(
    st.sampled_from(
        [
            RECEIVER,
            RECEIVER,
            "http://localhost/hook",
            f"https://127.0.0.1:{free_port()}/hook",
            "https://10.0.0.1/hook",
            "https://does-not-exist.invalid/hook",
            "https://user@localhost/hook",
            "https://[::1]:1/hook",
            "https://",
        ]
    ),
    st.text(max_size=60),
)
entity_names = mostly(st.sampled_from(sorted(catalog.load().describe())), st.text(max_size=20))
event_types = mostly(
    st.sampled_from(["CREATED", "updated", "Closed", "DELETED", ""]), st.text(max_size=20)
)
emails = mostly(st.sampled_from(["dev@example.com", "dev@", "a@b.c"]), st.text(max_size=40))
subscriptions = st.fixed_dictionaries(
    {"url": urls, "entity_name": entity_names, "event_type": event_types, "email": emails}
)


@st.composite
def subscription_like(draw: st.DrawFn) -> object:
    """A subscription body, sometimes with fields dropped, added or of the wrong type."""
    body: dict[str, Any] = draw(subscriptions)
    for name in FIELDS:
        choice = draw(mostly(st.just("keep"), st.sampled_from(["drop", "retype"])))
        if choice == "drop":
            del body[name]
        elif choice == "retype":
            body[name] = draw(json_values)
    body.update(draw(mostly(st.just({}), st.dictionaries(st.text(max_size=10), json_values))))
    return body


@dataclass(frozen=True)
class Body:
    """What to send: raw bytes, or a JSON value to encode."""

    raw: bytes | None = None
    value: object = None
    is_json: bool = False


bodies = st.one_of(
    st.just(Body()),
    st.binary(max_size=200).map(lambda b: Body(raw=b)),
    st.just(Body(raw=b"[" * 10_000)),
    st.just(Body(raw=b'{"url": "' + b"a" * MAX_BODY + b'"}')),
    json_values.map(lambda v: Body(value=v, is_json=True)),
    subscription_like().map(lambda v: Body(value=v, is_json=True)),
)
# Only methods HTTP/1.1 parsers know: aiohttp's parser answers others with a plain 400
# before any application code runs.
methods = st.sampled_from(
    ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD", "TRACE", "PROPFIND", "PURGE"]
)
segments = st.text(max_size=40).map(lambda s: quote(s, safe=""))
paths = st.one_of(
    st.sampled_from(["/webhooks", "/webhooks/", "/openapi.json", "/", "/healthz"]),
    segments.map(lambda s: f"/webhooks/{s}"),
    st.uuids().map(lambda u: f"/webhooks/{u}"),
    st.text(max_size=40).map(lambda s: "/" + quote(s, safe="/")),
)
queries = st.dictionaries(
    st.sampled_from(["pagination", "per_page", "page"]) | st.text(max_size=8),
    st.sampled_from(["true", "false", "0", "1", "-1", "1001", "1e3"]) | st.text(max_size=12),
    max_size=3,
)
authorizations = st.one_of(
    st.none(),
    st.just(f"Bearer {TOKEN}"),
    st.just(TOKEN),
    st.just(f"bearer   {TOKEN}  "),
    ascii_text,
)
content_types = st.one_of(
    st.none(),
    st.sampled_from(
        [
            "application/json",
            "application/json; charset=utf-8",
            "application/json; charset=latin-1",
            "application/merge-patch+json",
            "text/plain",
            "multipart/form-data; boundary=x",
            "application/x-www-form-urlencoded",
        ]
    ),
    ascii_text,
)
extra_headers = st.dictionaries(
    st.from_regex(r"X-[A-Za-z0-9-]{1,12}", fullmatch=True), ascii_text, max_size=2
)


@dataclass(frozen=True)
class Fuzzed:
    """The API under test, a live token and a receiver that answers 200."""

    client: TestClient[web.Request, web.Application]
    token: str
    receiver: Receiver


@pytest.fixture
async def fuzzed(
    pool: asyncpg.Pool, settings: Settings, receiver: Receiver
) -> AsyncIterator[Fuzzed]:
    store = Store(pool)
    _, token = await store.issue_token("fuzz-shop", "fuzz-client")
    async with HttpClient.from_settings(settings) as http:
        app = create_app(
            store=store, catalog=catalog.load(), http=http, settings=settings, jobs=Jobs(pool)
        )
        async with TestClient(TestServer(app)) as client:
            yield Fuzzed(client, token, receiver)


def _fill(text: str, api: Fuzzed) -> str:
    return text.replace(RECEIVER, api.receiver.url).replace(TOKEN, api.token)


def _encode(body: Body, api: Fuzzed) -> bytes | None:
    if not body.is_json:
        return body.raw
    return _fill(json.dumps(body.value), api).encode()


FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


async def send_and_check(
    api: Fuzzed, method: str, target: str, headers: dict[str, str], body: Body
) -> None:
    """Send one request; fail on a 5xx, or on an answer that is not JSON (or a JSON error)."""
    async with api.client.request(
        method, target, data=_encode(body, api), headers=headers
    ) as response:
        content = await response.read()
    event(f"{method} answered {response.status}")
    assert response.status < 500, (response.status, content[:300])
    if method == "HEAD" or response.status == 204:
        return
    assert response.content_type == "application/json"
    decoded = orjson.loads(content)
    if response.status >= 400:
        error = decoded["error"]
        assert set(error) <= {"type", "code", "message", "field"}
        assert error["type"] in ERROR_TYPES
        assert error["code"] == response.status
        assert isinstance(error["message"], str)
        assert error["message"]


def _headers(
    api: Fuzzed, authorization: str | None, content_type: str | None, extra: dict[str, str]
) -> dict[str, str]:
    sent = dict(extra)
    if authorization is not None:
        sent["Authorization"] = _fill(authorization, api)
    if content_type is not None:
        sent["Content-Type"] = content_type
    return sent


@FUZZ
@given(
    method=methods,
    path=paths,
    query=queries,
    authorization=authorizations,
    content_type=content_types,
    extra=extra_headers,
    body=bodies,
)
async def test_random_requests_never_get_a_server_error(
    fuzzed: Fuzzed,
    method: str,
    path: str,
    query: dict[str, str],
    authorization: str | None,
    content_type: str | None,
    extra: dict[str, str],
    body: Body,
) -> None:
    """Any method, path, query, headers and body get a 2xx or a JSON 4xx, never a 5xx."""
    target = f"{path}?{urlencode(query)}" if query else path
    headers = _headers(fuzzed, authorization, content_type, extra)
    await send_and_check(fuzzed, method, target, headers, body)


@FUZZ
@given(
    authorization=mostly(st.sampled_from([f"Bearer {TOKEN}", TOKEN]), authorizations),
    content_type=mostly(st.just("application/json"), content_types),
    body=mostly(subscription_like().map(lambda v: Body(value=v, is_json=True)), bodies),
)
async def test_random_subscriptions_never_get_a_server_error(
    fuzzed: Fuzzed, authorization: str | None, content_type: str | None, body: Body
) -> None:
    """Creating webhooks from random bodies gets a 201 or a JSON 4xx, never a 5xx."""
    headers = _headers(fuzzed, authorization, content_type, {})
    await send_and_check(fuzzed, "POST", "/webhooks", headers, body)


@FUZZ
@given(query=queries, authorization=mostly(st.just(f"Bearer {TOKEN}"), authorizations))
async def test_random_list_queries_never_get_a_server_error(
    fuzzed: Fuzzed, query: dict[str, str], authorization: str | None
) -> None:
    """Listing webhooks with random query parameters gets a 200 or a JSON 4xx, never a 5xx."""
    headers = _headers(fuzzed, authorization, None, {})
    await send_and_check(fuzzed, "GET", f"/webhooks?{urlencode(query)}", headers, Body())
