"""The notice consumer: mails each failure notice, off the delivery path.

It consumes the notice topic (``DISPATCHER_NOTICE_TOPIC``) and sends each notice with
aiosmtplib; while SMTP is down it retries the same notice with backoff and commits
nothing, so no notice is lost and none is sent twice in normal operation.
"""

from __future__ import annotations

import asyncio

import aiosmtplib
import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition

from dispatcher.backoff import Backoff
from dispatcher.consumer import Consumer, Record
from dispatcher.deadletter import DeadLetters
from dispatcher.metrics import Metrics
from dispatcher.notices import Notice, render
from dispatcher.settings import Settings

log = structlog.get_logger(__name__)


MAX_DIGEST = 200  # notices in one digest mail at most


def _permanent(exc: BaseException) -> bool:
    """An SMTP answer that will be the same next time (5xx), unlike 4xx or a lost link."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        return all(r.code >= 500 for r in exc.recipients)
    return isinstance(exc, aiosmtplib.SMTPResponseException) and exc.code >= 500


class NoticeConsumer(Consumer):
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
        metrics: Metrics,
        dead_letters: DeadLetters | None = None,
        backoff_cap: float = 60.0,
    ) -> None:
        super().__init__(
            consumer,
            settings=settings,
            metrics=metrics,
            max_pending=1,
            dead_letters=dead_letters,
        )
        self._settings = settings
        self._backoff_cap = backoff_cap
        # webhook id -> (its partition, the notices of the open window, the task that
        # sends them when the window closes)
        self._digests: dict[str, tuple[TopicPartition, list[Notice], asyncio.Task[None]]] = {}

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
                    self._metrics.notices_rejected.inc()
                    log.error(
                        "notice_rejected",
                        notice_ids=[n.notice_id for n in notices],
                        to=notices[0].to,
                        error=str(exc),
                    )
                    return
                self._metrics.notices_failed.inc()
                delay = backoff.next()
                log.warning(
                    "notice_send_failed",
                    notice_ids=[n.notice_id for n in notices],
                    error=str(exc),
                    retry_in_s=delay,
                )
                await asyncio.sleep(delay)  # backoff while SMTP is down, not coordination
                continue
            self._metrics.notices_sent.inc()
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
