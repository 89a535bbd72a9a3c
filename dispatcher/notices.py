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
from dataclasses import asdict, dataclass
from email.message import EmailMessage
from email.utils import make_msgid
from typing import Any

import aiosmtplib
import orjson
import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

from dispatcher.settings import Settings
from dispatcher.worker import KafkaWorker

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


def render(notice: Notice, sender: str) -> EmailMessage:
    """The email of a notice: plain text and HTML alternatives."""
    attempt = f"attempt {notice.n_retry + 1} of {notice.max_retries + 1}"
    what = f"{notice.entity_name} {notice.event_type}"
    if notice.final:
        subject = f"Webhook delivery failed, retry limit reached: {what} to {notice.url}"
        future = "This message reached the retry limit and will not be sent again."
    else:
        subject = f"Webhook delivery failed ({attempt}): {what} to {notice.url}"
        future = f"The next attempt is due at {notice.next_attempt_at}."
    lines = [
        "A webhook request got an error.",
        "",
        f"Webhook:      {notice.webhook_id}",
        f"URL:          {notice.url}",
        f"Entity/event: {what}",
        f"Notification: {notice.notification_uuid}",
        f"Attempt:      {attempt} (nRetry {notice.n_retry})",
        f"Failed at:    {notice.failed_at}",
        f"What happened: {notice.error}",
    ]
    if notice.response_head:
        lines.append(f"Response body (start): {notice.response_head}")
    lines += ["", future, "", "Request body:", notice.request_body, ""]
    text = "\n".join(lines)

    rows = "".join(
        f"<tr><th align='left'>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
        for k, v in (
            ("Webhook", notice.webhook_id),
            ("URL", notice.url),
            ("Entity/event", what),
            ("Notification", notice.notification_uuid),
            ("Attempt", f"{attempt} (nRetry {notice.n_retry})"),
            ("Failed at", notice.failed_at),
            ("What happened", notice.error),
            ("Response body (start)", notice.response_head),
        )
        if v
    )
    body_html = (
        f"<html><body><p>A webhook request got an error.</p><table>{rows}</table>"
        f"<p><strong>{html.escape(future)}</strong></p><p>Request body:</p>"
        f"<pre>{html.escape(notice.request_body)}</pre></body></html>"
    )
    message = EmailMessage()
    message["From"] = sender
    message["To"] = notice.to
    message["Subject"] = subject
    message["Message-ID"] = make_msgid(idstring=notice.notice_id)
    message["X-Webhook-Notice-Id"] = notice.notice_id
    message.set_content(text)
    message.add_alternative(body_html, subtype="html")
    return message


class NoticeWorker(KafkaWorker):
    """Sends notices in order per partition; retries SMTP with backoff, loses none."""

    name = "notices"

    def __init__(
        self, consumer: AIOKafkaConsumer, settings: Settings, *, backoff_max: float = 60.0
    ) -> None:
        super().__init__(consumer, max_pending=1, drain_timeout=settings.drain_timeout_seconds)
        self._settings = settings
        self._backoff_max = backoff_max
        self.sent = 0
        self.failed = 0

    async def process(self, tp: TopicPartition, records: list[ConsumerRecord[Any, Any]]) -> None:
        for record in records:
            try:
                notice = Notice.decode(record.value)
            except (ValueError, TypeError) as exc:
                log.error("notice_malformed", error=str(exc), offset=record.offset)
                await self.track(tp, record.offset, None)
                continue
            await self.track(tp, record.offset, self._send_until_done(notice))

    async def _send_until_done(self, notice: Notice) -> None:
        backoff = 0.5
        while True:
            try:
                await self._send(notice)
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                self.failed += 1
                log.warning(
                    "notice_send_failed",
                    notice_id=notice.notice_id,
                    error=str(exc),
                    retry_in_s=backoff,
                )
                await asyncio.sleep(backoff)  # backoff while SMTP is down, not coordination
                backoff = min(backoff * 2, self._backoff_max)
                continue
            self.sent += 1
            log.info(
                "notice_sent",
                notice_id=notice.notice_id,
                webhook_id=notice.webhook_id,
                n_retry=notice.n_retry,
                final=notice.final,
            )
            return

    async def _send(self, notice: Notice) -> None:
        s = self._settings
        await aiosmtplib.send(
            render(notice, s.smtp_sender),
            hostname=s.smtp_host,
            port=s.smtp_port,
            username=s.smtp_user or None,
            password=s.smtp_password or None,
            use_tls=s.smtp_tls == "tls",
            start_tls=s.smtp_tls == "starttls",
            timeout=30,
        )
