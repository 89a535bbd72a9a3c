"""The notice consumer: mails each failure notice, off the delivery path.

It consumes the notice topic (``DISPATCHER_NOTICE_TOPIC``) and mails the notices
concurrently over a pool of reused SMTP sessions (:mod:`dispatcher.mailer`,
``DISPATCHER_SMTP_CONNECTIONS``), a few per session in flight. An offset commits only
once the mail of its notice and of every notice before it on the partition was accepted
by the SMTP server (the :class:`~dispatcher.consumer.Consumer` base commits in order), so
a crash loses none. While SMTP is down every notice waits, with one shared backoff, and
nothing commits; none is sent twice in normal operation. A permanent refusal (5xx, e.g. no
such mailbox) drops that notice, logged and counted.
"""

from __future__ import annotations

import asyncio
import time

import aiosmtplib
import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition

from dispatcher.backoff import Backoff
from dispatcher.consumer import Consumer, Record
from dispatcher.deadletter import DeadLetters
from dispatcher.mailer import Mailer, SessionFailed, permanent
from dispatcher.metrics import Metrics
from dispatcher.notices import Notice, render
from dispatcher.settings import Settings

log = structlog.get_logger(__name__)


MAX_DIGEST = 200  # notices in one digest mail at most
IN_FLIGHT_PER_CONNECTION = 8  # notices taken per SMTP connection, so none idles


def _this_mail(exc: BaseException) -> bool:
    """A 4xx answer about this mail (greylisting, a full mailbox), other than 421: the
    server is up, so the other notices need not wait for this one's retries."""
    if isinstance(exc, SessionFailed):
        return False
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        return all(r.code != 421 for r in exc.recipients)
    return isinstance(exc, aiosmtplib.SMTPResponseException) and exc.code != 421


class _Outage:
    """One backoff shared by every notice while the SMTP server cannot be reached (or
    closes on us), so that a backlog waits together instead of each notice knocking on
    its own schedule."""

    def __init__(self, cap: float) -> None:
        self._backoff = Backoff(cap=cap)
        self._until = 0.0  # monotonic time before which no send is tried

    def failed(self) -> float:
        """A send failed: the seconds to wait (a new step of the backoff unless one is
        running already)."""
        now = time.monotonic()
        if self._until <= now:
            self._until = now + self._backoff.next()
        return self._until - now

    def ok(self) -> None:
        self._backoff.reset()
        self._until = 0.0

    async def wait(self) -> None:
        """Return once no backoff runs (at once, unless SMTP failed just now)."""
        left = self._until - time.monotonic()
        if left > 0:
            await asyncio.sleep(left)  # the shared backoff while SMTP is down


class NoticeConsumer(Consumer):
    """Mails notices concurrently over reused SMTP sessions; commits in order, loses none.

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
        mailer: Mailer | None = None,
    ) -> None:
        super().__init__(
            consumer,
            settings=settings,
            metrics=metrics,
            max_pending=settings.smtp_connections * IN_FLIGHT_PER_CONNECTION,
            dead_letters=dead_letters,
        )
        self._settings = settings
        self.mailer = Mailer(settings) if mailer is None else mailer
        self._backoff_cap = backoff_cap
        self._outage = _Outage(backoff_cap)
        # webhook id -> (its partition, the notices of the open window, the task that
        # sends them when the window closes)
        self._digests: dict[str, tuple[TopicPartition, list[Notice], asyncio.Task[None]]] = {}

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await super().run(stop)
        finally:
            await self.mailer.close()

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
        message = render(notices, self._settings.smtp_sender)
        own = Backoff(cap=self._backoff_cap)  # for refusals of this mail alone
        while True:
            await self._outage.wait()
            try:
                await self.mailer.send(message)
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                if permanent(exc):  # e.g. 550 no such mailbox: retrying cannot help
                    self._metrics.notices_rejected.inc()
                    log.error(
                        "notice_rejected",
                        notice_ids=[n.notice_id for n in notices],
                        to=notices[0].to,
                        error=str(exc),
                    )
                    return
                self._metrics.notices_failed.inc()
                delay = own.next() if _this_mail(exc) else self._outage.failed()
                log.warning(
                    "notice_send_failed",
                    notice_ids=[n.notice_id for n in notices],
                    error=str(exc),
                    retry_in_s=round(delay, 3),
                )
                if _this_mail(exc):
                    await asyncio.sleep(delay)  # this mail's backoff; the others go on
                continue
            self._outage.ok()
            self._metrics.notices_sent.inc()
            log.info(
                "notice_sent",
                notice_ids=[n.notice_id for n in notices],
                webhook_id=notices[0].webhook_id,
                final=any(n.final for n in notices),
            )
            return
