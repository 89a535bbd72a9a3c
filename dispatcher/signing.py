"""Standard Webhooks signatures (https://www.standardwebhooks.com).

Each POST carries ``webhook-id``, ``webhook-timestamp`` (Unix seconds) and
``webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">``, keyed by the
webhook's secret (``whsec_`` + base64 key), so any Standard Webhooks library verifies us.
During a secret rotation's grace period the header holds one signature per secret,
space-separated, the new secret's first (``v1,<new> v1,<old>``); Standard Webhooks
verifiers accept the message when any of them matches.
"""

from __future__ import annotations

import base64
import hmac
from collections.abc import Sequence

from dispatcher.store import SECRET_PREFIX

_SHA256 = "sha256"  # hmac.digest's one-shot C path (OpenSSL) takes the digest's name


def secret_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_`` secret."""
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


def sign(key: bytes | Sequence[bytes], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value for one request, signed with each key in turn.

    >>> sign(b"k", "msg_1", 1, b"{}") == sign([b"k"], "msg_1", 1, b"{}")
    True
    >>> len(sign([b"new", b"old"], "msg_1", 1, b"{}").split(" "))
    2
    """
    signed = b"%s.%d.%s" % (msg_id.encode("ascii"), timestamp, body)
    if isinstance(key, bytes):  # the usual case: one secret, no rotation under way
        return "v1," + base64.b64encode(hmac.digest(key, signed, _SHA256)).decode("ascii")
    return " ".join(
        "v1," + base64.b64encode(hmac.digest(k, signed, _SHA256)).decode("ascii") for k in key
    )


def headers(
    key: bytes | Sequence[bytes], msg_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    """The three Standard Webhooks headers; ``key`` is one HMAC key or several, the newest
    first (see :func:`sign`)."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(key, msg_id, timestamp, body),
    }
