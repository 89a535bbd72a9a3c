"""Failure notices: what one failure email says, and how it reads.

A failed attempt produces a :class:`Notice` (:meth:`Notice.for_failure`, from the same
decision that scheduled the next attempt) on the notice topic (``DISPATCHER_NOTICE_TOPIC``)
before its source offset commits; :mod:`dispatcher.notice_consumer` mails it.
"""

from __future__ import annotations

import binascii
import functools
import html
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from email.header import Header
from email.utils import formatdate, parseaddr

import orjson

from dispatcher.client import Outcome
from dispatcher.mailer import Mail
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


def render(notices: Sequence[Notice], sender: str) -> Mail:
    """One email for one failed attempt, or a digest of one webhook's failed attempts.

    Plain text and HTML alternatives; each failure lists its request body. Never the
    webhook's secret: a notice does not carry it. The same notices always make the same
    ``Message-ID``, so a mail sent again after a crash can be recognised as a duplicate.
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

    ids = [n.notice_id for n in notices]
    message_id = ids[0] if len(ids) == 1 else str(uuid.uuid5(_DIGEST_IDS, ",".join(ids)))
    domain = _address(sender).rpartition("@")[2] or "localhost"
    headers = [
        ("From", sender),
        ("To", first.to),
        ("Subject", subject),
        ("Date", formatdate(usegmt=True)),
        ("Message-ID", f"<{message_id}@{domain}>"),
        ("X-Webhook-Notice-Id", ", ".join(ids)),
    ]
    return _mime(headers, text, body_html, sender=sender, to=first.to)


_DIGEST_IDS = uuid.UUID("5f0c64f2-8e8e-4d55-9a53-3c1f9d0b3f6e")  # uuid5 namespace of digests
MAX_HEADER_LINE = 900  # characters; RFC 5322 allows 998, folding starts before


def _mime(
    headers: list[tuple[str, str]], text: str, body_html: str, *, sender: str, to: str
) -> Mail:
    """The message as bytes: a multipart/alternative of the text and the HTML, each
    UTF-8 and quoted-printable. Built by hand: the ``email`` package's header policy
    costs milliseconds per mail, which at hundreds of mails a second is the bottleneck."""
    boundary = f"=_{uuid.uuid4().hex}"
    lines = [_header(name, value) for name, value in headers]
    lines += ["MIME-Version: 1.0", f'Content-Type: multipart/alternative; boundary="{boundary}"']
    head = "\r\n".join(lines).encode("utf-8")
    parts = b"".join(
        f'\r\n--{boundary}\r\nContent-Type: text/{kind}; charset="utf-8"\r\n'
        "Content-Transfer-Encoding: quoted-printable\r\n\r\n".encode("ascii")
        + _qp(body)
        for kind, body in (("plain", text), ("html", body_html))
    )
    data = head + b"\r\n" + parts + f"\r\n--{boundary}--\r\n".encode("ascii")
    envelope_from, envelope_to = _address(sender), _address(to)
    utf8 = not (envelope_from.isascii() and envelope_to.isascii() and head.isascii())
    return Mail(sender=envelope_from, to=envelope_to, data=data, smtputf8=utf8)


@functools.lru_cache(maxsize=256)
def _address(value: str) -> str:
    """The bare address of ``value`` ("Name <a@b>" -> "a@b"); a bare one as it is."""
    if "<" not in value and " " not in value and "," not in value:
        return value
    return parseaddr(value)[1] or value


def _header(name: str, value: str) -> str:
    """One header line: as it is when it is short ASCII, else RFC 2047 encoded and
    folded (an address header stays raw: non-ASCII addresses need SMTPUTF8)."""
    value = value.replace("\r", " ").replace("\n", " ")  # no header injection
    if name in ("From", "To"):
        return f"{name}: {value}"
    if value.isascii() and len(name) + len(value) <= MAX_HEADER_LINE:
        return f"{name}: {value}"
    if value.isascii() and name == "X-Webhook-Notice-Id":  # a long digest: fold at commas
        return f"{name}: " + ",\r\n ".join(value.split(", "))
    folded = Header(value, "utf-8", header_name=name).encode(linesep="\r\n")
    return f"{name}: {folded}"


def _qp(body: str) -> bytes:
    """``body`` as UTF-8, CRLF line ends, quoted-printable (soft breaks at 76)."""
    crlf = body.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\r\n")
    return binascii.b2a_qp(crlf.encode("utf-8"), istext=True)
