"""Notification ids and signatures: stable ids, Standard Webhooks signatures, and the
previous secret signing too during a rotation's grace period."""

from __future__ import annotations

import uuid

import pytest
from standardwebhooks.webhooks import Webhook as StandardWebhook
from standardwebhooks.webhooks import WebhookVerificationError

from dispatcher import signing
from dispatcher.notification import notification_uuid
from dispatcher.store import Webhook, new_secret


def test_notification_uuid_is_stable_per_event_and_webhook() -> None:
    """The same (event, webhook) always gives the same id; another webhook another id."""
    event_id, a, b = str(uuid.uuid4()), uuid.uuid4(), uuid.uuid4()
    assert notification_uuid(event_id, a) == notification_uuid(event_id.upper(), a)
    assert notification_uuid(event_id, a) != notification_uuid(event_id, b)


def test_signature_verifies_with_the_standard_webhooks_library() -> None:
    """Our headers verify with an independent Standard Webhooks implementation."""
    import time

    secret = new_secret()
    body = b'{"hello":"world"}'
    now = int(time.time())
    headers = signing.headers(signing.secret_key(secret), "msg_1", now, body)
    assert StandardWebhook(secret).verify(body, headers) == {"hello": "world"}


def test_signing_with_two_keys_verifies_with_either_secret() -> None:
    """Two keys give two space-separated signatures, the first key's first; either verifies."""
    import time

    new, old, other = new_secret(), new_secret(), new_secret()
    body = b'{"hello":"world"}'
    now = int(time.time())
    keys = [signing.secret_key(new), signing.secret_key(old)]
    headers = signing.headers(keys, "msg_1", now, body)
    first, second = headers["webhook-signature"].split(" ")
    assert first == signing.sign(keys[0], "msg_1", now, body)
    assert second == signing.sign(keys[1], "msg_1", now, body)
    for secret in (new, old):
        assert StandardWebhook(secret).verify(body, headers) == {"hello": "world"}
    with pytest.raises(WebhookVerificationError):
        StandardWebhook(other).verify(body, headers)


def test_previous_secret_signs_only_until_it_expires() -> None:
    """A rotated webhook signs with the new and the previous secret until the expiry only."""
    from datetime import UTC, datetime

    until = datetime(2026, 1, 1, tzinfo=UTC)
    rotated = Webhook(
        uuid.uuid4(), "shop", "app", "sales", "CLOSED", "https://example.com/h", "a@b.test",
        "whsec_new", until, previous_secret="whsec_old", previous_secret_until=until,
    )  # fmt: skip
    assert rotated.signing_secrets(until.timestamp() - 1) == ("whsec_new", "whsec_old")
    assert rotated.signing_secrets(until.timestamp()) == ("whsec_new",)
    never = Webhook(
        uuid.uuid4(), "shop", "app", "sales", "CLOSED", "https://example.com/h", "a@b.test",
        "whsec_new", until,
    )  # fmt: skip
    assert never.signing_secrets(0) == ("whsec_new",)
    assert never.secret_info(0) == {"secret": "whsec_new", "previous_secret_expires_at": None}
    assert rotated.secret_info(0)["previous_secret_expires_at"] == "2026-01-01T00:00:00Z"
    assert rotated.secret_info(until.timestamp())["previous_secret_expires_at"] is None
