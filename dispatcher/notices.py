"""Failure notices: what one failure email says, and how it reads.

A failed attempt produces a :class:`Notice` (:meth:`Notice.for_failure`, from the same
decision that scheduled the next attempt) on the notice topic (``DISPATCHER_NOTICE_TOPIC``)
before its source offset commits; :mod:`dispatcher.notice_consumer` mails it.
"""

from __future__ import annotations

import html
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import make_msgid

import orjson

from dispatcher.client import Outcome
from dispatcher.notification import Notification, iso_millis
from dispatcher.policy import Decision, GiveUp
from dispatcher.store import Webhook


@dataclass(frozen=True, slots=True)
class Notice:
    """Everything a failure email says; the record on the notice topic."""

    notice_id: str  # notification_uuid + attempt: one notice per failed attempt
    to: str
    webhook_id: str
    url: str
    entity_name: str
    event_type: str
    notification_uuid: str
    n_retry: int  # the attempt that failed: 0 is the first
    max_retries: int
    final: bool  # no attempt will follow
    failed_at: str
    error: str
    status: int | None
    response_head: str
    next_attempt_at: str | None
    request_body: str

    def encode(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def decode(cls, raw: bytes) -> Notice:
        data = orjson.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("a notice record must be a JSON object")
        return cls(**data)

    @staticmethod
    def make_id(notification_uuid: str, n_retry: int) -> str:
        return str(uuid.uuid5(uuid.UUID(notification_uuid), f"notice/{n_retry}"))

    @classmethod
    def for_failure(
        cls,
        webhook: Webhook,
        notification: Notification,
        failure: Failure,
        decision: Decision,
        *,
        max_retries: int,
    ) -> Notice:
        """The notice of a failed attempt, saying what the retry policy decided."""
        outcome = failure.outcome
        final = isinstance(decision, GiveUp)
        next_at = None if isinstance(decision, GiveUp) else _iso(decision.due)
        return cls(
            notice_id=cls.make_id(notification.notification_uuid, failure.n_retry),
            to=webhook.email,
            webhook_id=str(webhook.id),
            url=webhook.url,
            entity_name=webhook.entity_name,
            event_type=webhook.event_type,
            notification_uuid=notification.notification_uuid,
            n_retry=failure.n_retry,
            max_retries=max_retries,
            final=final,
            failed_at=_iso(failure.at),
            error=outcome.detail,
            status=outcome.status,
            response_head=outcome.body_head[:MAX_NOTICE_RESPONSE],
            next_attempt_at=next_at,
            request_body=_excerpt(failure.body),
        )


@dataclass(frozen=True, slots=True)
class Failure:
    """One failed attempt: which, when, what was sent and what came back."""

    n_retry: int
    at: float  # Unix seconds
    body: bytes
    outcome: Outcome


MAX_NOTICE_BODY = 64 * 1024  # bytes of a request body quoted in a notice
MAX_NOTICE_RESPONSE = 512  # characters of the response body quoted in a notice


def _excerpt(body: bytes) -> str:
    """The request body for a notice: whole, or its start when it is very large."""
    if len(body) <= MAX_NOTICE_BODY:
        return body.decode("utf-8", "replace")
    head = body[:MAX_NOTICE_BODY].decode("utf-8", "ignore")
    return f"{head}\n[... truncated: the request body has {len(body)} bytes]"


def _iso(unix: float) -> str:
    return iso_millis(datetime.fromtimestamp(unix, UTC))


def _facts(notice: Notice) -> list[tuple[str, str]]:
    """The facts of one failed attempt, as (label, value) rows."""
    attempt = f"{notice.n_retry + 1} of {notice.max_retries + 1} (nRetry {notice.n_retry})"
    rows = [
        ("Notification", notice.notification_uuid),
        ("Attempt", attempt),
        ("Failed at", notice.failed_at),
        ("What happened", notice.error),
        ("Response body (start)", notice.response_head),
    ]
    return [(k, v) for k, v in rows if v]


def _future(notice: Notice) -> str:
    if notice.final:
        return "This message reached the retry limit and will not be sent again."
    return f"The next attempt is due at {notice.next_attempt_at}."


def render(notices: Sequence[Notice], sender: str) -> EmailMessage:
    """One email for one failed attempt, or a digest of one webhook's failed attempts.

    Plain text and HTML alternatives; each failure lists its request body. Never the
    webhook's secret: a notice does not carry it.
    """
    first = notices[0]
    what = f"{first.entity_name} {first.event_type}"
    finals = sum(n.final for n in notices)
    if len(notices) == 1:
        attempt = f"attempt {first.n_retry + 1} of {first.max_retries + 1}"
        subject = (
            f"Webhook delivery failed, retry limit reached: {what} to {first.url}"
            if first.final
            else f"Webhook delivery failed ({attempt}): {what} to {first.url}"
        )
        intro = "A webhook request got an error."
    else:
        limit = f", retry limit reached for {finals}" if finals else ""
        subject = f"Webhook delivery failed {len(notices)} times{limit}: {what} to {first.url}"
        intro = f"{len(notices)} webhook requests got an error."
    header = [("Webhook", first.webhook_id), ("URL", first.url), ("Entity/event", what)]

    lines = [intro, ""] + [f"{k}: {v}" for k, v in header]
    for n in notices:
        lines += ["", "-" * 60]
        lines += [f"{k}: {v}" for k, v in _facts(n)]
        lines += ["", _future(n), "", "Request body:", n.request_body]
    text = "\n".join(lines) + "\n"

    def table(rows: list[tuple[str, str]]) -> str:
        cells = "".join(
            f"<tr><th align='left'>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
            for k, v in rows
        )
        return f"<table>{cells}</table>"

    sections = "".join(
        f"<hr>{table(_facts(n))}<p><strong>{html.escape(_future(n))}</strong></p>"
        f"<p>Request body:</p><pre>{html.escape(n.request_body)}</pre>"
        for n in notices
    )
    body_html = f"<html><body><p>{html.escape(intro)}</p>{table(header)}{sections}</body></html>"

    message = EmailMessage()
    message["From"] = sender
    message["To"] = first.to
    message["Subject"] = subject
    message["Message-ID"] = make_msgid(idstring=first.notice_id)
    message["X-Webhook-Notice-Id"] = ", ".join(n.notice_id for n in notices)
    message.set_content(text)
    message.add_alternative(body_html, subtype="html")
    return message
