"""Disabling a webhook whose every attempt has failed for days, and the one email saying so.

After each write of the delivery history the recorder tells the :class:`Disabler` which
webhooks had failed attempts in it. A webhook is disabled when it has at least
``MIN_FAILURES`` attempts since its last success (and since it was last enabled again),
all failed, the first of them at least ``DISPATCHER_DISABLE_AFTER_HOURS`` ago (0 disables
nothing). A disabled webhook gets no attempts: its events are counted
(``webhook_events_skipped{reason="webhook_disabled"}``) and not sent. Its owner gets one
email, saying how to enable it again (``POST /webhooks/{id}/enable``, with
``recover_since`` to get what was missed): the disable and "mail pending" are one UPDATE,
and the flag is cleared once SMTP accepted the mail, so a crash in between sends it again
rather than never.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import uuid
from collections.abc import Mapping
from email.message import EmailMessage
from email.utils import make_msgid
from typing import Any

import aiosmtplib
import asyncpg
import structlog

from dispatcher.backoff import Backoff
from dispatcher.mailer import permanent
from dispatcher.notification import iso_millis
from dispatcher.recorder import DATABASE_ERRORS
from dispatcher.settings import Settings

log = structlog.get_logger(__name__)

MIN_FAILURES = 10  # failed attempts in a row before a webhook may be disabled
CHECK_SECONDS = 1.0  # noted webhooks are checked this often
MAIL_SWEEP_SECONDS = 60.0  # pending mails (of a crashed process) are looked for this often

# The failures counted start after the last success, or after the webhook was last
# enabled again if that is later (see migration 0006): at least MIN_FAILURES of them, the
# first at least the threshold ago. consecutive_failures (a count since the last success,
# at least as large) filters first; the count that decides is bounded by the LIMIT (a
# webhook failing for days has many), the one the reason gives runs once, at the disable
# (capped at a million).
_SINCE = (
    """GREATEST(coalesce(h.last_success_at, '-infinity'), coalesce(w.enabled_at, '-infinity'))"""
)
_DISABLE = f"""
UPDATE webhooks w
SET disabled_at = now(),
    disabled_reason = format(
        'every attempt failed for %s hours (%s attempts in a row)', $2::float8,
        (SELECT count(*) FROM (SELECT 1 FROM webhook_attempts a
                               WHERE a.webhook_id = w.id AND a.attempted_at > {_SINCE}
                               LIMIT 1000000) AS counted)),
    disabled_mail_pending = true,
    disabled_mail_claimed_until = NULL
FROM webhook_health h
WHERE w.id = h.webhook_id AND w.id = ANY($1::uuid[]) AND w.disabled_at IS NULL
  AND h.consecutive_failures >= $3
  AND coalesce(h.last_success_at, '-infinity') < h.last_failure_at
  AND (SELECT count(*) FROM (
           SELECT 1 FROM webhook_attempts a
           WHERE a.webhook_id = w.id AND a.attempted_at > {_SINCE}
           LIMIT $3) AS failures) >= $3
  AND (SELECT min(a.attempted_at) FROM webhook_attempts a
       WHERE a.webhook_id = w.id AND a.attempted_at > {_SINCE})
      <= now() - make_interval(secs => $2::float8 * 3600)
RETURNING w.id
"""  # noqa: S608 - constants

# A pending mail is claimed for CLAIM_SECONDS before it is sent (no lock is held while
# SMTP answers): another sweep skips it meanwhile, and takes it over after that if the
# claiming process died. Cleared (sent, or refused for good) only if the webhook was not
# enabled, or disabled anew, in between (disabled_at unchanged).
CLAIM_SECONDS = 600.0
_PENDING = """
SELECT id FROM webhooks WHERE disabled_mail_pending
  AND coalesce(disabled_mail_claimed_until, '-infinity') < now()
"""
_CLAIM_MAIL = """
UPDATE webhooks SET disabled_mail_claimed_until = now() + make_interval(secs => $2)
WHERE id = $1 AND disabled_mail_pending
  AND coalesce(disabled_mail_claimed_until, '-infinity') < now()
RETURNING id, environment_id, entity_name, event_type, url, email, disabled_at,
          disabled_reason
"""
_MAILED = """
UPDATE webhooks SET disabled_mail_pending = false, disabled_mail_claimed_until = NULL
WHERE id = $1 AND disabled_at = $2
"""
_UNCLAIM = """
UPDATE webhooks SET disabled_mail_claimed_until = NULL WHERE id = $1 AND disabled_at = $2
"""


class Disabler:
    """Disables webhooks that fail for too long, and mails their owners once."""

    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        self._pool = pool
        self._settings = settings
        self._hours = settings.disable_after_hours
        self._noted: set[uuid.UUID] = set()
        self._wake = asyncio.Event()
        self._wake.set()  # mails pending from before a restart go out at start

    @property
    def enabled(self) -> bool:
        return self._hours > 0

    def note(self, webhook_ids: set[uuid.UUID]) -> None:
        """These webhooks had failed attempts in a batch just written."""
        if self.enabled and webhook_ids:
            self._noted |= webhook_ids

    async def check(self, webhook_ids: set[uuid.UUID]) -> list[uuid.UUID]:
        """Disable those of ``webhook_ids`` that failed for too long; the ones disabled."""
        if not self.enabled or not webhook_ids:
            return []
        rows = await self._pool.fetch(_DISABLE, list(webhook_ids), self._hours, MIN_FAILURES)
        disabled = [r["id"] for r in rows]
        for webhook_id in disabled:
            log.warning("webhook_disabled", webhook_id=str(webhook_id), hours=self._hours)
        if disabled:
            self._wake.set()
        return disabled

    async def run(self) -> None:
        """Check the noted webhooks every ``CHECK_SECONDS``; mail what is pending; a
        long-lived task."""
        backoff = Backoff(first=1.0, cap=60.0)
        since_sweep = MAIL_SWEEP_SECONDS
        while True:
            try:
                if self._noted:
                    noted, self._noted = self._noted, set()
                    try:
                        await self.check(noted)
                    except BaseException:
                        self._noted |= noted
                        raise
                if self._wake.is_set() or since_sweep >= MAIL_SWEEP_SECONDS:
                    self._wake.clear()
                    since_sweep = 0.0
                    await self.mail_pending()
            except (*DATABASE_ERRORS, aiosmtplib.SMTPException) as exc:
                delay = backoff.next()
                log.warning("webhook_disable_check_failed", error=repr(exc), retry_in_s=delay)
                await asyncio.sleep(delay)  # backoff while PostgreSQL or SMTP is down
                self._wake.set()
                continue
            backoff.reset()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CHECK_SECONDS):  # a timer: the check's period
                    await self._wake.wait()
            since_sweep += CHECK_SECONDS

    async def mail_pending(self) -> int:
        """Send the email of every webhook disabled and not yet mailed; the mails handled
        (sent, or refused for good).

        Every process of every instance runs a disabler, and all sweep at start: each
        mail is claimed first (:data:`CLAIM_SECONDS`), so two sweeps never send the same
        one. A failure of the server gives the claim back (the sweep backs off and tries
        again); a crash while sending leaves it to run out: the mail is sent again then,
        not lost."""
        pending = await self._pool.fetch(_PENDING)
        handled = 0
        for (webhook_id,) in pending:
            row = await self._pool.fetchrow(_CLAIM_MAIL, webhook_id, CLAIM_SECONDS)
            if row is None:  # another sweep has it, or it went out, or was enabled
                continue
            try:
                await self._send(render(dict(row.items()), self._settings.smtp_sender))
            except aiosmtplib.SMTPException as exc:
                if not permanent(exc):
                    await self._pool.execute(_UNCLAIM, webhook_id, row["disabled_at"])
                    raise  # the server or the settings: the whole sweep backs off
                # e.g. 550 no such mailbox: the same next time, and the others must go out
                log.error(
                    "webhook_disabled_mail_rejected", webhook_id=str(webhook_id), error=str(exc)
                )
            else:
                log.info("webhook_disabled_mail_sent", webhook_id=str(webhook_id))
            await self._pool.execute(_MAILED, webhook_id, row["disabled_at"])
            handled += 1
        return handled

    async def _send(self, message: EmailMessage) -> None:
        s = self._settings
        await aiosmtplib.send(
            message,
            hostname=s.smtp_host,
            port=s.smtp_port,
            username=s.smtp_user or None,
            password=s.smtp_password or None,
            use_tls=s.smtp_tls == "tls",
            start_tls=s.smtp_tls == "starttls",
            timeout=30,
        )


def render(row: Mapping[str, Any], sender: str) -> EmailMessage:
    """The email telling a webhook's owner it was disabled, and how to enable it."""
    webhook_id = str(row["id"])
    what = f"{row['entity_name']} {row['event_type']}"
    when = iso_millis(row["disabled_at"])
    facts = [
        ("Webhook", webhook_id),
        ("URL", str(row["url"])),
        ("Entity/event", what),
        ("Disabled at", when),
        ("Why", str(row["disabled_reason"] or "")),
    ]
    how = (
        f"Nothing is sent to it until it is enabled again: POST /webhooks/{webhook_id}/enable "
        'with your token. To also receive what was missed, send {"recover_since": '
        '"<ISO 8601 time>"} in that request: every event since then is sent again.'
    )
    intro = "Your webhook was disabled: every delivery attempt to it failed."
    text = "\n".join([intro, "", *(f"{k}: {v}" for k, v in facts), "", how]) + "\n"
    cells = "".join(
        f"<tr><th align='left'>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
        for k, v in facts
    )
    body_html = (
        f"<html><body><p>{html.escape(intro)}</p><table>{cells}</table>"
        f"<p>{html.escape(how)}</p></body></html>"
    )
    message = EmailMessage()
    message["From"] = sender
    message["To"] = str(row["email"])
    message["Subject"] = f"Webhook disabled: {what} to {row['url']}"
    message["Message-ID"] = make_msgid(idstring=f"disabled.{webhook_id}")
    message["X-Webhook-Disabled"] = webhook_id
    message.set_content(text)
    message.add_alternative(body_html, subtype="html")
    return message
