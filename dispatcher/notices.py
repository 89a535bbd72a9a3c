"""Failure notices: one email per failed attempt, sent off the delivery path.

A failed attempt produces a notice record on the notice topic (``DISPATCHER_NOTICE_TOPIC``)
before its source offset commits. The :class:`NoticeWorker` consumes that topic and sends
each notice with aiosmtplib; while SMTP is down it retries the same notice with backoff
and commits nothing, so no notice is lost and none is sent twice in normal operation.
"""

from __future__ import annotations

import asyncio
import html
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from email.message import EmailMessage
from email.utils import make_msgid

import aiosmtplib
import orjson
import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition

from dispatcher.backoff import Backoff
from dispatcher.deadletter import DeadLetters
from dispatcher.settings import Settings
from dispatcher.worker import KafkaWorker, Record

log = structlog.get_logger(__name__)


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


MAX_DIGEST = 200  # notices in one digest mail at most


def _permanent(exc: BaseException) -> bool:
    """An SMTP answer that will be the same next time (5xx), unlike 4xx or a lost link."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        return all(r.code >= 500 for r in exc.recipients)
    return isinstance(exc, aiosmtplib.SMTPResponseException) and exc.code >= 500


class NoticeWorker(KafkaWorker):
    """Sends notices in order per partition; retries SMTP with backoff, loses none.

    With ``DISPATCHER_NOTICE_DIGEST_SECONDS`` > 0, one webhook's notices of that window
    go out as one digest mail; their offsets finish when the digest is sent.
    """

    name = "notices"

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        settings: Settings,
        *,
        dead_letters: DeadLetters | None = None,
        backoff_cap: float = 60.0,
    ) -> None:
        super().__init__(
            consumer,
            max_pending=1,
            drain_timeout=settings.drain_timeout_seconds,
            dead_letters=dead_letters,
        )
        self._settings = settings
        self._backoff_cap = backoff_cap
        # webhook id -> (its partition, the notices of the open window, the task that
        # sends them when the window closes)
        self._digests: dict[str, tuple[TopicPartition, list[Notice], asyncio.Task[None]]] = {}
        self.sent = 0
        self.failed = 0
        self.rejected = 0

    async def handle(self, tp: TopicPartition, record: Record) -> None:
        try:
            notice = Notice.decode(record.value)
        except (ValueError, TypeError) as exc:
            log.error("notice_malformed", error=str(exc), offset=record.offset)
            await self.track(tp, record, None)
            return
        if self._settings.notice_digest_seconds > 0:
            await self.track(tp, record, self._digest(tp, notice), bounded=False)
        else:
            await self.track(tp, record, self._send_until_done([notice]))

    def _digest(self, tp: TopicPartition, notice: Notice) -> asyncio.Task[None]:
        """The digest task this notice joins (started with the window's first notice).

        A window also closes at ``MAX_DIGEST`` notices, so memory stays bounded while
        SMTP is down.
        """
        entry = self._digests.get(notice.webhook_id)
        if entry is None or len(entry[1]) >= MAX_DIGEST:
            pending: list[Notice] = []
            task = asyncio.ensure_future(self._send_digest(notice.webhook_id, pending))
            entry = self._digests[notice.webhook_id] = (tp, pending, task)
        entry[1].append(notice)
        return entry[2]

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        # Open windows of revoked partitions are dropped, uncommitted: the partition's
        # next owner reads those notices again and sends them.
        for webhook_id, (tp, _, task) in list(self._digests.items()):
            if tp in revoked:
                task.cancel()
                del self._digests[webhook_id]
        await super().on_revoked(revoked)

    async def _send_digest(self, webhook_id: str, pending: list[Notice]) -> None:
        await asyncio.sleep(self._settings.notice_digest_seconds)  # the digest window
        entry = self._digests.get(webhook_id)
        if entry is not None and entry[1] is pending:
            del self._digests[webhook_id]
        await self._send_until_done(pending)

    async def _send_until_done(self, notices: list[Notice]) -> None:
        backoff = Backoff(cap=self._backoff_cap)
        while True:
            try:
                await self._send(notices)
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                if _permanent(exc):  # e.g. 550 no such mailbox: retrying cannot help
                    self.rejected += 1
                    log.error(
                        "notice_rejected",
                        notice_ids=[n.notice_id for n in notices],
                        to=notices[0].to,
                        error=str(exc),
                    )
                    return
                self.failed += 1
                delay = backoff.next()
                log.warning(
                    "notice_send_failed",
                    notice_ids=[n.notice_id for n in notices],
                    error=str(exc),
                    retry_in_s=delay,
                )
                await asyncio.sleep(delay)  # backoff while SMTP is down, not coordination
                continue
            self.sent += 1
            log.info(
                "notice_sent",
                notice_ids=[n.notice_id for n in notices],
                webhook_id=notices[0].webhook_id,
                final=any(n.final for n in notices),
            )
            return

    async def _send(self, notices: list[Notice]) -> None:
        s = self._settings
        await aiosmtplib.send(
            render(notices, s.smtp_sender),
            hostname=s.smtp_host,
            port=s.smtp_port,
            username=s.smtp_user or None,
            password=s.smtp_password or None,
            use_tls=s.smtp_tls == "tls",
            start_tls=s.smtp_tls == "starttls",
            timeout=30,
        )
