"""The subscriptions API against real PostgreSQL and real HTTPS receivers.

Every answer these tests get is also checked against ``schemas/openapi.json``: its status
must be documented for the route and its body must validate against the documented schema.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from jsonschema import Draft202012Validator
from standardwebhooks.webhooks import Webhook as StandardWebhook
from standardwebhooks.webhooks import WebhookVerificationError

from dispatcher import catalog
from dispatcher.api import MAX_BODY, create_app
from dispatcher.client import HttpClient
from dispatcher.history import History
from dispatcher.recovery import Jobs
from dispatcher.settings import Settings
from dispatcher.store import Principal, Store
from tests.integration.support import (
    ROOT,
    WAIT,
    MakeReceiver,
    Receiver,
    World,
    free_port,
    make_event,
)

OPENAPI = ROOT / "schemas" / "openapi.json"
SALES = {"entity_name": "sales", "event_type": "CLOSED", "email": "dev@example.com"}
ISO_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")

SHOP_1 = Principal(uuid.uuid4(), "shop-1", "client-1")  # the shop of the ``token`` fixture


# --- the API under test, and the OpenAPI document checking its answers --------------


@dataclass(frozen=True)
class Reply:
    """One answer of the API."""

    status: int
    headers: Mapping[str, str]
    body: Any  # decoded JSON, None for an empty body

    @property
    def error(self) -> dict[str, Any]:
        error: dict[str, Any] = self.body["error"]
        return error


def load_openapi() -> dict[str, Any]:
    doc: dict[str, Any] = orjson.loads(OPENAPI.read_bytes())
    return doc


def schema_validator(doc: Mapping[str, Any], schema: Mapping[str, Any]) -> Draft202012Validator:
    """A validator of ``schema`` whose ``#/components/...`` references resolve in ``doc``."""
    root = {**schema, "components": doc["components"]}
    return Draft202012Validator(root, format_checker=Draft202012Validator.FORMAT_CHECKER)


def doc_template(doc: Mapping[str, Any], path: str) -> str | None:
    """The documented path template matching ``path``, e.g. ``/webhooks/{id}``."""
    bare = path.split("?", 1)[0]
    for template in doc["paths"]:
        pattern = re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template))
        if re.fullmatch(pattern, bare):
            return str(template)
    return None


def check_against_doc(doc: Mapping[str, Any], method: str, path: str, reply: Reply) -> None:
    """Fail unless the reply's status is documented for the route and its body validates."""
    template = doc_template(doc, path)
    operation = doc["paths"][template].get(method.lower()) if template else None
    if operation is None:  # undocumented route or method: it must be a JSON 404 or 405
        assert reply.status in (404, 405), (method, path, reply)
        schema_validator(doc, {"$ref": "#/components/schemas/Error"}).validate(reply.body)
        return
    documented = operation["responses"]
    assert str(reply.status) in documented, f"{method} {template}: undocumented {reply.status}"
    response = documented[str(reply.status)]
    if "$ref" in response:
        response = doc["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
    if "content" not in response:
        assert reply.body is None
        return
    schema = response["content"]["application/json"]["schema"]
    schema_validator(doc, schema).validate(reply.body)


class Api:
    """A test client of the API; every answer is checked against the OpenAPI document."""

    def __init__(self, client: TestClient[web.Request, web.Application], doc: dict[str, Any]):
        self.client = client
        self.doc = doc

    async def call(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        body: object = None,
        raw: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        sent = dict(headers or {})
        if token is not None:
            sent.setdefault("Authorization", f"Bearer {token}")
        data = raw
        if body is not None:
            data = orjson.dumps(body)
            sent.setdefault("Content-Type", "application/json")
        async with self.client.request(method, path, data=data, headers=sent) as response:
            content = await response.read()
            if response.status != 204:
                assert response.content_type == "application/json"
            reply = Reply(response.status, response.headers, orjson.loads(content or b"null"))
        check_against_doc(self.doc, method, path, reply)
        return reply

    async def create(self, token: str, url: str, **fields: str) -> Reply:
        return await self.call("POST", "/webhooks", token=token, body={"url": url, **fields})


ApiFactory = Callable[..., Awaitable[Api]]


@pytest.fixture(scope="session")
def openapi() -> dict[str, Any]:
    return load_openapi()


@pytest.fixture
async def api_factory(
    store: Store, pool: asyncpg.Pool, settings: Settings, openapi: dict[str, Any]
) -> AsyncIterator[ApiFactory]:
    """Builds the API on a real server; keyword arguments replace fields of ``settings``."""
    async with AsyncExitStack() as stack:

        async def make(**changes: Any) -> Api:
            configured = replace(settings, **changes)
            http = await stack.enter_async_context(HttpClient.from_settings(configured))
            app = create_app(
                store=store,
                catalog=catalog.load(),
                http=http,
                settings=configured,
                history=History(pool),
                jobs=Jobs(pool),
            )
            client = await stack.enter_async_context(TestClient(TestServer(app)))
            return Api(client, openapi)

        yield make


@pytest.fixture
async def api(api_factory: ApiFactory) -> Api:
    return await api_factory()


@pytest.fixture
async def token(store: Store) -> str:
    _, token = await store.issue_token("shop-1", "client-1")
    return token


@pytest.fixture
async def other_token(store: Store) -> str:
    _, token = await store.issue_token("shop-2", "client-2")
    return token


async def count_rows(pool: asyncpg.Pool) -> int:
    value = await pool.fetchval("SELECT count(*) FROM webhooks")
    return int(value)


def without_secret(webhook: Mapping[str, Any]) -> dict[str, Any]:
    """The webhook of a create's answer as reads and lists show it: without its secret."""
    return {k: v for k, v in webhook.items() if k != "secret"}


# --- creating -------------------------------------------------------------------------


async def test_create_answers_201_with_the_webhook(
    api: Api, token: str, receiver: Receiver
) -> None:
    """A valid subscription is saved and answered with the webhook, its secret included."""
    reply = await api.create(token, receiver.url, **SALES)
    assert reply.status == 201
    webhook = reply.body
    assert webhook["url"] == receiver.url
    assert (webhook["entity_name"], webhook["event_type"]) == ("sales", "CLOSED")
    assert (webhook["environment_id"], webhook["client_id"]) == ("shop-1", "client-1")
    assert webhook["email"] == "dev@example.com"
    assert webhook["secret"].startswith("whsec_")
    assert reply.headers["Location"] == f"/webhooks/{webhook['id']}"
    fetched = await api.call("GET", reply.headers["Location"], token=token)
    assert fetched.status == 200
    health = fetched.body.pop("health")
    assert fetched.body == without_secret(webhook)
    # The SUBSCRIBED test is the webhook's first recorded attempt: it answered 200.
    assert health["state"] == "healthy" and health["consecutive_failures"] == 0
    assert health["last_success_at"] == health["last_attempt_at"] is not None
    assert health["last_failure_at"] is None


async def test_subscribed_message_is_documented_shape_and_signed(
    api: Api, token: str, receiver: Receiver
) -> None:
    """The test POST carries exactly the documented SUBSCRIBED body, signed with the secret."""
    before = datetime.now(UTC)
    reply = await api.create(token, receiver.url, **SALES)
    after = datetime.now(UTC)
    assert reply.status == 201
    [received] = await receiver.wait_for(1)
    message = received.json()
    assert list(message) == ["type", "entity_name", "time", "environment_id", "client_id"]
    assert message["type"] == "SUBSCRIBED"
    assert message["entity_name"] == "sales"
    assert (message["environment_id"], message["client_id"]) == ("shop-1", "client-1")
    assert ISO_MS.fullmatch(message["time"])
    sent_at = datetime.fromisoformat(message["time"])
    assert before.replace(microsecond=before.microsecond // 1000 * 1000) <= sent_at <= after
    verified = StandardWebhook(reply.body["secret"]).verify(received.body, received.headers)
    assert verified == message
    assert uuid.UUID(received.headers["webhook-id"])
    assert received.headers["Content-Type"] == "application/json"
    schema = {"$ref": "#/components/schemas/SubscribedMessage"}
    schema_validator(api.doc, schema).validate(message)


async def test_event_type_accepted_in_any_case_and_stored_upper(
    api: Api, token: str, receiver: Receiver
) -> None:
    """A lower-case event type is accepted and stored upper case."""
    reply = await api.create(token, receiver.url, **{**SALES, "event_type": "cLoSeD"})
    assert reply.status == 201
    assert reply.body["event_type"] == "CLOSED"


async def test_api_writes_reach_listeners_of_webhooks_changed(
    api: Api, token: str, receiver: Receiver, database_url: str
) -> None:
    """Creating and deleting a webhook through the API notifies 'webhooks_changed'."""
    notices: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    conn = await asyncpg.connect(database_url)
    try:
        await conn.add_listener(
            "webhooks_changed",
            lambda _c, _p, _ch, payload: notices.put_nowait(orjson.loads(payload)),
        )
        created = await api.create(token, receiver.url, **SALES)
        await api.call("DELETE", f"/webhooks/{created.body['id']}", token=token)
        async with asyncio.timeout(WAIT):
            seen = [await notices.get(), await notices.get()]
    finally:
        await conn.close()
    assert seen == [
        {"op": "INSERT", "id": created.body["id"]},
        {"op": "DELETE", "id": created.body["id"]},
    ]


# --- authentication -----------------------------------------------------------------


UNAUTHORIZED = [
    ({}, "missing token"),
    ({"Authorization": ""}, "missing token"),
    ({"Authorization": "Bearer "}, "missing token"),
    ({"Authorization": "Bearer dsp_not-a-real-token"}, "unknown or revoked"),
    ({"Authorization": "dsp_not-a-real-token"}, "unknown or revoked"),
    ({"Authorization": "Basic dXNlcjpwdw=="}, "unknown or revoked"),
    ({"Authorization": "Bearer " + "x" * 5000}, "unknown or revoked"),
]


async def test_missing_or_unknown_token_is_401(api: Api, subtests: pytest.Subtests) -> None:
    """A request without a token, or with one the store does not know, answers 401."""
    requests = [
        ("GET", "/webhooks", None),
        ("GET", f"/webhooks/{uuid.uuid4()}", None),
        ("DELETE", f"/webhooks/{uuid.uuid4()}", None),
        ("POST", "/webhooks", {"url": "x"}),
        ("GET", f"/webhooks/{uuid.uuid4()}/secret", None),
        ("POST", f"/webhooks/{uuid.uuid4()}/secret/rotate", None),
    ]
    for headers, hint in UNAUTHORIZED:
        for method, path, body in requests:
            with subtests.test(headers=headers, method=method, path=path):
                reply = await api.call(method, path, headers=headers, body=body)
                assert reply.status == 401
                assert reply.error["type"] == "unauthorized"
                assert hint in reply.error["message"]
                assert reply.headers["WWW-Authenticate"] == "Bearer"


async def test_bare_token_is_accepted(api: Api, token: str) -> None:
    """The token alone, without 'Bearer', authenticates too."""
    reply = await api.call("GET", "/webhooks", headers={"Authorization": token})
    assert reply.status == 200
    assert reply.body == []


async def test_revoked_token_is_refused_at_once(api: Api, store: Store) -> None:
    """A token works until it is revoked, and answers 401 from the next request on."""
    info, token = await store.issue_token("shop-1", "client-1")
    assert (await api.call("GET", "/webhooks", token=token)).status == 200
    assert await store.revoke_token(info.id)
    reply = await api.call("GET", "/webhooks", token=token)
    assert reply.status == 401
    assert reply.error["message"] == "unknown or revoked token"


# --- refusals of the subscription's values --------------------------------------------


async def test_endpoint_not_answering_200_is_422_and_nothing_saved(
    api: Api,
    token: str,
    receiver_factory: MakeReceiver,
    pool: asyncpg.Pool,
    subtests: pytest.Subtests,
) -> None:
    """An endpoint answering anything but 200 to the test message refuses the webhook."""
    for status in [500, 503, 201, 204, 302, 404]:
        with subtests.test(status=status):
            receiver = await receiver_factory(status=status)
            reply = await api.create(token, receiver.url, **SALES)
            assert reply.status == 422
            assert reply.error["type"] == "endpoint_check_failed"
            assert reply.error["field"] == "url"
            assert f"HTTP {status}" in reply.error["message"]
            assert len(receiver.requests) == 1
    assert await count_rows(pool) == 0


async def test_endpoint_timeout_is_422(
    api_factory: ApiFactory, token: str, receiver_factory: MakeReceiver, pool: asyncpg.Pool
) -> None:
    """An endpoint that does not answer within the delivery timeout refuses the webhook."""
    never = asyncio.Event()

    async def hang(request: web.Request, count: int) -> web.StreamResponse:
        await never.wait()
        return web.Response(text="too late")

    receiver = await receiver_factory(responder=hang)
    api = await api_factory(delivery_timeout_seconds=0.3)
    try:
        reply = await api.create(token, receiver.url, **SALES)
    finally:
        never.set()
    assert reply.status == 422
    assert reply.error["type"] == "endpoint_check_failed"
    assert "no answer within 0.3 s" in reply.error["message"]
    assert await count_rows(pool) == 0


async def test_untrusted_certificate_is_422(
    api_factory: ApiFactory, token: str, receiver: Receiver, pool: asyncpg.Pool
) -> None:
    """An endpoint whose certificate is not trusted refuses the webhook with a TLS error."""
    api = await api_factory(tls_ca_file="")
    reply = await api.create(token, receiver.url, **SALES)
    assert reply.status == 422
    assert reply.error["type"] == "endpoint_check_failed"
    assert "certificate" in reply.error["message"]
    assert receiver.requests == []
    assert await count_rows(pool) == 0


async def test_connection_refused_is_422(api: Api, token: str, pool: asyncpg.Pool) -> None:
    """An endpoint nobody listens on refuses the webhook with a connection error."""
    reply = await api.create(token, f"https://127.0.0.1:{free_port()}/hook", **SALES)
    assert reply.status == 422
    assert reply.error["type"] == "endpoint_check_failed"
    assert "cannot connect" in reply.error["message"]
    assert await count_rows(pool) == 0


BAD_URLS = [
    ("http://example.com/hook", "plain http is refused"),
    ("ftp://example.com/hook", "https://"),
    ("example.com/hook", "https://"),
    ("https:///hook", "must name a host"),
    ("https://user:pw@example.com/hook", "user name or password"),
    ("https://@example.com/hook", "user name or password"),
    ("https://example.com/ho ok", "spaces"),
    ("https://example.com:99999/", "not a valid URL"),
    ("https://example.com/#x", "fragment"),
    ("https://exa$mple.com/", "not a valid host"),
    ("https://example.com/" + "a" * 2048, "longer than 2048"),
    ("https://10.1.2.3/hook", "private, loopback or link-local"),
    ("https://169.254.169.254/latest", "private, loopback or link-local"),
    ("https://[fe80::1]/hook", "private, loopback or link-local"),
    ("https://does-not-exist.invalid/hook", "does not resolve"),
]


async def test_bad_url_is_422_naming_url(
    api: Api, token: str, pool: asyncpg.Pool, subtests: pytest.Subtests
) -> None:
    """A URL that is not https, malformed, private or unresolvable is refused before any POST."""
    for url, hint in BAD_URLS:
        with subtests.test(url=url[:80]):
            reply = await api.create(token, url, **SALES)
            assert reply.status == 422
            assert reply.error["type"] == "invalid_request"
            assert reply.error["field"] == "url"
            assert reply.error["message"].startswith("url: ")
            assert hint in reply.error["message"]
    assert await count_rows(pool) == 0


@pytest.mark.parametrize("use_literal", [True, False])
async def test_private_address_is_422_unless_allowed(
    api_factory: ApiFactory, token: str, receiver: Receiver, use_literal: bool
) -> None:
    """Loopback (by IP literal or by a name resolving to it) is refused without an allowance."""
    api = await api_factory(allow_private_targets=())
    url = receiver.url.replace("localhost", "127.0.0.1") if use_literal else receiver.url
    reply = await api.create(token, url, **SALES)
    assert reply.status == 422
    assert reply.error["field"] == "url"
    assert "private, loopback or link-local" in reply.error["message"]
    assert receiver.requests == []


BAD_VALUES = [
    ({"entity_name": "invoices"}, "entity_name", "valid entities are bookings, categories"),
    ({"entity_name": "Sales"}, "entity_name", "unknown entity 'Sales'"),
    ({"event_type": "DELETED", "entity_name": "stock"}, "event_type", "are UPDATED"),
    ({"event_type": "closed ", "entity_name": "sales"}, "event_type", "CLOSED, CREATED"),
    ({"event_type": "clo\u017fed"}, "event_type", "not an event of sales"),
    ({"email": "not-an-email"}, "email", "email address"),
    ({"email": "dev@example"}, "email", "email address"),
    ({"email": "dev@example.com\nBcc: x@example.com"}, "email", "email address"),
    ({"email": "a..b@example.com"}, "email", "email address"),
    ({"email": "x" * 65 + "@example.com"}, "email", "email address"),
    ({"email": "dev@" + "a" * 250 + ".com"}, "email", "email address"),
]


async def test_bad_event_or_email_is_422_naming_field(
    api: Api, token: str, receiver: Receiver, subtests: pytest.Subtests
) -> None:
    """An unknown entity or event type, or a bad email, is refused naming the field."""
    for fields, field, hint in BAD_VALUES:
        with subtests.test(fields=fields):
            reply = await api.create(token, receiver.url, **{**SALES, **fields})
            assert reply.status == 422
            assert reply.error["field"] == field
            assert reply.error["message"].startswith(f"{field}: ")
            assert hint in reply.error["message"]
    assert receiver.requests == []


# --- malformed requests -------------------------------------------------------------


VALID = {"url": "https://localhost/hook", **SALES}


MALFORMED = [
    (b"{not json", "application/json", 400, "not valid JSON"),
    (b"", "application/json", 400, "not valid JSON"),
    (b"\xff\xfe", "application/json", 400, "not valid JSON"),
    (b"[1, 2]", "application/json", 400, "must be a JSON object, got an array"),
    (b"null", "application/json", 400, "must be a JSON object, got null"),
    (b'"text"', "application/json", 400, "must be a JSON object, got a string"),
    (orjson.dumps({**VALID, "extra": 1}), "application/json", 400, "unknown field(s): extra"),
    (orjson.dumps({"url": "https://x.example/"}), "application/json", 400, "missing field"),
    (orjson.dumps({**VALID, "email": 5}), "application/json", 400, "email: expected a string"),
    (orjson.dumps({**VALID, "url": None}), "application/json", 400, "url: expected a string"),
    (orjson.dumps(VALID), "text/plain", 415, "application/json"),
    (orjson.dumps(VALID), "application/x-www-form-urlencoded", 415, "application/json"),
    (orjson.dumps(VALID), "application/json; charset=latin-1", 415, "application/json"),
    (b"x" * (MAX_BODY + 1), "application/json", 413, f"limit of {MAX_BODY} bytes"),
]


async def test_malformed_create_is_a_clear_4xx(
    api: Api, token: str, pool: asyncpg.Pool, subtests: pytest.Subtests
) -> None:
    """Bodies that are not a well-typed JSON object of the known fields get a clear 4xx."""
    for raw, content_type, status, hint in MALFORMED:
        with subtests.test(body=raw[:60], content_type=content_type):
            headers = {"Content-Type": content_type}
            reply = await api.call("POST", "/webhooks", token=token, raw=raw, headers=headers)
            assert reply.status == status
            assert reply.error["code"] == status
            assert hint in reply.error["message"]
    assert await count_rows(pool) == 0


async def test_body_without_content_type_is_415(api: Api, token: str) -> None:
    """A body sent without Content-Type is refused with 415."""
    reply = await api.call("POST", "/webhooks", token=token, raw=orjson.dumps(VALID))
    assert reply.status == 415
    assert reply.error["type"] == "unsupported_media_type"


async def test_unknown_route_is_json_404(api: Api, token: str) -> None:
    """A path the API does not have answers a JSON 404."""
    for path in ["/nope", "/webhooks/a/b", "/"]:
        reply = await api.call("GET", path, token=token)
        assert reply.status == 404
        assert reply.error == {
            "type": "not_found",
            "code": 404,
            "message": "no such route; the routes are described at /openapi.json",
        }


async def test_put_and_patch_are_405_saying_delete_and_create(api: Api, token: str) -> None:
    """Changing a webhook in place answers 405 telling to delete and create it again."""
    for method in ["PUT", "PATCH"]:
        reply = await api.call(method, f"/webhooks/{uuid.uuid4()}", token=token, body=VALID)
        assert reply.status == 405
        assert reply.error["type"] == "method_not_allowed"
        assert "delete this webhook" in reply.error["message"]
        assert reply.headers["Allow"] == "GET, DELETE"


async def test_other_unsupported_methods_are_json_405(api: Api, token: str) -> None:
    """A method a route does not have answers a JSON 405 with the Allow header."""
    reply = await api.call("POST", f"/webhooks/{uuid.uuid4()}", token=token, body=VALID)
    assert reply.status == 405
    assert reply.headers["Allow"] == "DELETE, GET"
    reply = await api.call("DELETE", "/webhooks", token=token)
    assert reply.status == 405
    assert reply.headers["Allow"] == "GET, POST"


# --- one webhook per shop and event ---------------------------------------------------


async def test_second_webhook_for_same_event_is_409_naming_the_first(
    api: Api, token: str, receiver: Receiver, pool: asyncpg.Pool
) -> None:
    """A shop's second webhook for one (entity, event) is refused naming the existing one."""
    first = await api.create(token, receiver.url, **SALES)
    second = await api.create(token, receiver.url, **{**SALES, "event_type": "closed"})
    assert second.status == 409
    assert second.error["type"] == "conflict"
    assert first.body["id"] in second.error["message"]
    assert len(receiver.requests) == 1  # no test POST for the refused one
    assert await count_rows(pool) == 1


async def test_other_shops_may_subscribe_to_the_same_event(
    api: Api, token: str, other_token: str, receiver: Receiver
) -> None:
    """The one-webhook rule is per shop: another shop subscribes to the same event."""
    assert (await api.create(token, receiver.url, **SALES)).status == 201
    assert (await api.create(other_token, receiver.url, **SALES)).status == 201


async def test_concurrent_creates_leave_exactly_one(
    api: Api, token: str, receiver_factory: MakeReceiver, pool: asyncpg.Pool
) -> None:
    """Two simultaneous creates of one webhook end with one 201, one 409 and one row."""
    both_arrived = asyncio.Event()

    async def hold_until_both(request: web.Request, count: int) -> web.StreamResponse:
        if count >= 2:
            both_arrived.set()
        async with asyncio.timeout(WAIT):
            await both_arrived.wait()
        return web.Response(text="ok")

    receiver = await receiver_factory(responder=hold_until_both)
    replies = await asyncio.gather(
        api.create(token, receiver.url, **SALES), api.create(token, receiver.url, **SALES)
    )
    assert sorted(r.status for r in replies) == [201, 409]
    created = next(r for r in replies if r.status == 201)
    refused = next(r for r in replies if r.status == 409)
    assert created.body["id"] in refused.error["message"]
    assert len(receiver.requests) == 2
    assert await count_rows(pool) == 1


# --- reading and deleting -----------------------------------------------------------


async def test_delete_answers_204_and_the_webhook_is_gone(
    api: Api, token: str, receiver: Receiver
) -> None:
    """A deleted webhook is gone from reads and lists, and deleting it again is 404."""
    created = await api.create(token, receiver.url, **SALES)
    path = f"/webhooks/{created.body['id']}"
    deleted = await api.call("DELETE", path, token=token)
    assert deleted.status == 204
    assert deleted.body is None
    assert (await api.call("GET", path, token=token)).status == 404
    assert (await api.call("GET", "/webhooks", token=token)).body == []
    assert (await api.call("DELETE", path, token=token)).status == 404
    assert (await api.create(token, receiver.url, **SALES)).status == 201


async def test_malformed_or_missing_id_is_404(
    api: Api, token: str, subtests: pytest.Subtests
) -> None:
    """An id that is not a UUID, or no webhook's, answers 404 for reads, deletes and secrets."""
    routes = [("GET", ""), ("DELETE", ""), ("GET", "/secret"), ("POST", "/secret/rotate")]
    for raw_id in ["not-a-uuid", "123", "%00", "%2F", "0" * 200, str(uuid.uuid4())]:
        for method, suffix in routes:
            with subtests.test(method=method, id=raw_id, suffix=suffix):
                reply = await api.call(method, f"/webhooks/{raw_id}{suffix}", token=token)
                assert reply.status == 404
                assert reply.error["type"] == "not_found"


async def test_shop_cannot_see_or_delete_another_shops_webhook(
    api: Api, token: str, other_token: str, receiver: Receiver
) -> None:
    """Another shop's webhook answers exactly like a missing one and is left untouched."""
    created = await api.create(token, receiver.url, **SALES)
    path = f"/webhooks/{created.body['id']}"
    foreign_get = await api.call("GET", path, token=other_token)
    foreign_delete = await api.call("DELETE", path, token=other_token)
    assert (await api.call("GET", "/webhooks", token=other_token)).body == []
    assert (await api.call("GET", path, token=token)).status == 200
    assert (await api.call("DELETE", path, token=token)).status == 204
    missing_get = await api.call("GET", path, token=other_token)
    missing_delete = await api.call("DELETE", path, token=other_token)
    assert (foreign_get.status, foreign_get.body) == (missing_get.status, missing_get.body)
    assert (foreign_delete.status, foreign_delete.body) == (404, missing_delete.body)


async def test_another_token_of_the_same_shop_sees_its_webhooks(
    api: Api, token: str, store: Store, receiver: Receiver
) -> None:
    """Webhooks belong to the shop: every token of the shop lists them."""
    created = await api.create(token, receiver.url, **SALES)
    _, second = await store.issue_token("shop-1", "another-integration")
    listed = await api.call("GET", "/webhooks", token=second)
    assert listed.body == [without_secret(created.body)]


async def test_list_pages_from_zero(api: Api, token: str, receiver: Receiver) -> None:
    """With pagination=true the list answers page objects; without, a plain array."""
    ids = []
    for event in ["CREATED", "UPDATED", "DELETED"]:
        reply = await api.create(token, receiver.url, **{**SALES, "event_type": event})
        ids.append(reply.body["id"])
    plain = await api.call("GET", "/webhooks", token=token)
    assert [w["id"] for w in plain.body] == ids
    pages = []
    for page in range(3):
        query = f"/webhooks?pagination=true&per_page=2&page={page}"
        pages.append((await api.call("GET", query, token=token)).body)
    assert [p["page"] for p in pages] == [0, 1, 2]
    assert {(p["pages"], p["per_page"]) for p in pages} == {(2, 2)}
    assert [[w["id"] for w in p["results"]] for p in pages] == [ids[:2], ids[2:], []]
    default = await api.call("GET", "/webhooks?pagination=true", token=token)
    assert default.body == {"page": 0, "pages": 1, "per_page": 100, "results": plain.body}


async def test_empty_paginated_list_has_no_pages(api: Api, token: str) -> None:
    """A shop without webhooks gets page 0 of 0 pages."""
    reply = await api.call("GET", "/webhooks?pagination=true&per_page=5", token=token)
    assert reply.body == {"page": 0, "pages": 0, "per_page": 5, "results": []}


BAD_PAGES = [
    ("pagination=yes", "pagination"),
    ("pagination=true&per_page=0", "per_page"),
    ("pagination=true&per_page=1001", "per_page"),
    ("pagination=true&per_page=ten", "per_page"),
    ("pagination=true&per_page=", "per_page"),
    ("pagination=true&page=-1", "page"),
    ("pagination=true&page=1.5", "page"),
    ("pagination=true&page=99999999999999999999", "page"),
    ("pagination=true&page=%D9%A1", "page"),
]


async def test_bad_pagination_is_400_naming_the_parameter(
    api: Api, token: str, subtests: pytest.Subtests
) -> None:
    """Out-of-range or non-numeric paging parameters answer 400 naming the parameter."""
    for query, field in BAD_PAGES:
        with subtests.test(query=query):
            reply = await api.call("GET", f"/webhooks?{query}", token=token)
            assert reply.status == 400
            assert reply.error["field"] == field
            assert reply.error["message"].startswith(f"{field}: ")


# --- the signing secret -------------------------------------------------------------


async def test_reads_and_lists_never_show_the_secret(
    api: Api, token: str, receiver: Receiver
) -> None:
    """GET /webhooks/{id} and GET /webhooks, plain or paged, answer without the secret."""
    created = await api.create(token, receiver.url, **SALES)
    one = await api.call("GET", f"/webhooks/{created.body['id']}", token=token)
    plain = await api.call("GET", "/webhooks", token=token)
    paged = await api.call("GET", "/webhooks?pagination=true", token=token)
    assert one.body.pop("health")["state"] == "healthy"  # only the single view has it
    for webhook in [one.body, *plain.body, *paged.body["results"]]:
        assert webhook == without_secret(created.body)
    for reply in [one, plain, paged]:
        assert created.body["secret"] not in orjson.dumps(reply.body).decode()


async def test_secret_route_shows_the_secret(api: Api, token: str, receiver: Receiver) -> None:
    """GET /webhooks/{id}/secret answers the secret of the create, and no previous one."""
    created = await api.create(token, receiver.url, **SALES)
    reply = await api.call("GET", f"/webhooks/{created.body['id']}/secret", token=token)
    assert reply.status == 200
    assert reply.body == {"secret": created.body["secret"], "previous_secret_expires_at": None}


async def test_another_shop_cannot_read_or_rotate_the_secret(
    api: Api, token: str, other_token: str, receiver: Receiver
) -> None:
    """Another shop reading or rotating a webhook's secret gets the 404 of a missing one."""
    created = await api.create(token, receiver.url, **SALES)
    webhook_id = created.body["id"]
    path = f"/webhooks/{webhook_id}/secret"
    for method, route in [("GET", path), ("POST", f"{path}/rotate")]:
        reply = await api.call(method, route, token=other_token)
        assert reply.status == 404
        assert reply.error == {
            "type": "not_found",
            "code": 404,
            "message": f"no webhook with id {webhook_id!r}",
        }
    unchanged = await api.call("GET", path, token=token)
    assert unchanged.body == {"secret": created.body["secret"], "previous_secret_expires_at": None}


async def test_rotation_answers_a_new_secret_and_logs_no_secret(
    api_factory: ApiFactory, token: str, receiver: Receiver, store: Store
) -> None:
    """A rotation answers a new secret, the old one signing too until the grace period ends."""
    api = await api_factory(secret_rotation_grace_seconds=3600)
    created = await api.create(token, receiver.url, **SALES)
    webhook_id, old = created.body["id"], created.body["secret"]
    before = datetime.now(UTC)
    with structlog.testing.capture_logs() as logs:
        rotated = await api.call("POST", f"/webhooks/{webhook_id}/secret/rotate", token=token)
    after = datetime.now(UTC)
    assert rotated.status == 200
    new = rotated.body["secret"]
    assert new.startswith("whsec_") and new != old
    expires = datetime.fromisoformat(rotated.body["previous_secret_expires_at"])
    slack = timedelta(seconds=1)  # PostgreSQL's clock against this process's
    grace = timedelta(seconds=3600)
    assert before + grace - slack <= expires <= after + grace + slack
    shown = await api.call("GET", f"/webhooks/{webhook_id}/secret", token=token)
    assert shown.body == rotated.body
    stored = await store.get_webhook("shop-1", uuid.UUID(webhook_id))
    assert stored is not None and stored.signing_secrets(time.time()) == (new, old)
    [line] = [e for e in logs if e["event"] == "webhook_secret_rotated"]
    assert line["webhook_id"] == webhook_id
    assert not [e for e in logs if old in repr(e) or new in repr(e)]


async def test_rotating_twice_keeps_only_the_newest_previous_secret(
    api: Api, token: str, receiver: Receiver, store: Store
) -> None:
    """A second rotation within the grace period retires the first secret at once."""
    created = await api.create(token, receiver.url, **SALES)
    path = f"/webhooks/{created.body['id']}/secret/rotate"
    second = (await api.call("POST", path, token=token)).body["secret"]
    third = (await api.call("POST", path, token=token)).body["secret"]
    stored = await store.get_webhook("shop-1", uuid.UUID(created.body["id"]))
    assert stored is not None
    assert stored.signing_secrets(time.time()) == (third, second)


async def test_rotation_without_grace_retires_the_old_secret_at_once(
    api_factory: ApiFactory, token: str, receiver: Receiver, store: Store
) -> None:
    """With a grace period of 0 only the new secret signs from the rotation on."""
    api = await api_factory(secret_rotation_grace_seconds=0)
    created = await api.create(token, receiver.url, **SALES)
    path = f"/webhooks/{created.body['id']}/secret/rotate"
    rotated = await api.call("POST", path, token=token)
    assert rotated.body["previous_secret_expires_at"] is None
    stored = await store.get_webhook("shop-1", uuid.UUID(created.body["id"]))
    assert stored is not None
    assert stored.signing_secrets(time.time()) == (rotated.body["secret"],)


async def test_delivery_in_the_grace_period_verifies_with_both_secrets_then_only_the_new(
    api_factory: ApiFactory, world: World, token: str
) -> None:
    """A delivery in the grace period verifies with the old and new secret; after, only new."""
    grace = 60.0
    api = await api_factory(secret_rotation_grace_seconds=grace)
    skew = 0.0  # the daemon's clock runs this far ahead of the real one

    def clock() -> float:
        return time.time() + skew

    receiver = world.receiver
    running = await world.start(
        replace(world.settings, secret_rotation_grace_seconds=grace), clock=clock
    )
    created = await api.create(token, receiver.url, **SALES)
    old = created.body["secret"]
    rotated = await api.call("POST", f"/webhooks/{created.body['id']}/secret/rotate", token=token)
    new = rotated.body["secret"]
    webhook_id = uuid.UUID(created.body["id"])
    async with asyncio.timeout(WAIT):
        while (cached := running.daemon.cache.get(webhook_id)) is None or cached.secret != new:
            await asyncio.sleep(0.02)  # polling the cache with a deadline

    await world.produce(make_event(SHOP_1))
    during = (await receiver.wait_for(2))[1]  # the first request is the SUBSCRIBED test
    signatures = during.headers["webhook-signature"].split(" ")
    assert len(signatures) == 2
    for secret in (old, new):
        assert StandardWebhook(secret).verify(during.body, during.headers)["nRetry"] == 0
    first_only = {**during.headers, "webhook-signature": signatures[0]}
    assert StandardWebhook(new).verify(during.body, first_only)  # the new secret's is first

    # Past the grace period by the daemon's clock; still within the verifier's 5-minute
    # tolerance for the webhook-timestamp, so only the signatures decide.
    skew = grace + 60
    await world.produce(make_event(SHOP_1))
    after = (await receiver.wait_for(3))[2]
    assert " " not in after.headers["webhook-signature"]
    assert StandardWebhook(new).verify(after.body, after.headers)["nRetry"] == 0
    with pytest.raises(WebhookVerificationError):
        StandardWebhook(old).verify(after.body, after.headers)


# --- the OpenAPI document -----------------------------------------------------------


async def test_openapi_document_is_served_without_token(api: Api) -> None:
    """GET /openapi.json answers the document of schemas/openapi.json, no token needed."""
    reply = await api.call("GET", "/openapi.json")
    assert reply.status == 200
    assert reply.body == load_openapi()


async def test_app_routes_and_document_agree(api: Api) -> None:
    """Every route of the app is documented with the same methods, and nothing more."""
    app = api.client.app
    assert app is not None
    served: dict[str, set[str]] = {}
    for resource in app.router.resources():
        methods = {route.method.lower() for route in resource}
        served.setdefault(resource.canonical, set()).update(methods)
    documented = {
        path: {m for m in item if m in {"get", "post", "put", "patch", "delete", "head"}}
        for path, item in api.doc["paths"].items()
    }
    assert served == documented
