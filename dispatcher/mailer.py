"""SMTP sessions for failure notices: a small pool of connections, each used for many mails.

:meth:`Mailer.send` sends one message on a session of the pool: an idle one if there is
one, else a new connection (TLS and login as ``DISPATCHER_SMTP_*`` say), at most
``DISPATCHER_SMTP_CONNECTIONS`` at once. A session goes back to the pool after each
message; one that erred is dropped (closed) and the next send opens a new one, unless
the server answered with a refusal and kept the session (a 5xx or 4xx answer to the
message, after which aiosmtplib resets the envelope): such a session stays. A session
idle too long, or after :data:`MAX_MESSAGES_PER_SESSION` messages, is closed with QUIT and
replaced: servers close idle connections and cap the messages of one. A message that
fails because a reused session had been closed by the server meanwhile is sent again at
once on a new connection.

Exceptions are aiosmtplib's (and ``OSError``, ``TimeoutError``) for the mail itself, and
:class:`SessionFailed` when no session could be opened (connect, EHLO, STARTTLS or login
failed: the server or the settings, not the mail); the caller decides what to retry
(:mod:`dispatcher.notice_consumer`). The password is never logged.

    >>> from dispatcher.settings import Settings
    >>> Mailer(Settings.from_env({"DISPATCHER_SMTP_CONNECTIONS": "2"})).connections
    2
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiosmtplib
import structlog

from dispatcher.settings import Settings

log = structlog.get_logger(__name__)

MAX_MESSAGES_PER_SESSION = 100  # then QUIT and a new connection
MAX_IDLE_SECONDS = 30.0  # an idle session older than this is replaced rather than reused
SEND_TIMEOUT = 30.0  # seconds for each SMTP command (aiosmtplib's timeout)
QUIT_TIMEOUT = 2.0  # seconds allowed for a polite QUIT before the socket is just closed


class SessionFailed(aiosmtplib.SMTPException):
    """No SMTP session could be opened; the message says why (never the password)."""


@dataclass(frozen=True, slots=True)
class Mail:
    """A message ready to send: the envelope and the RFC 5322 bytes."""

    sender: str  # envelope sender (MAIL FROM)
    to: str  # envelope recipient (RCPT TO)
    data: bytes  # headers and body, CRLF line ends
    smtputf8: bool = False  # an address or header is not ASCII: ask for SMTPUTF8


@dataclass(slots=True)
class _Session:
    """One SMTP connection and what it did."""

    smtp: aiosmtplib.SMTP
    sent: int = 0  # messages accepted on it
    idle_since: float = 0.0  # monotonic time it went back to the pool


def _kept(exc: BaseException, session: _Session) -> bool:
    """Whether a session is still good after ``exc``: the server answered the message
    with a refusal (not 421, "closing") and the connection is still up."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        answered = all(r.code != 421 for r in exc.recipients)
    else:
        answered = isinstance(exc, aiosmtplib.SMTPResponseException) and exc.code != 421
    return answered and session.smtp.is_connected


def _closed_by_server(exc: BaseException) -> bool:
    """Whether ``exc`` says the server had closed the session (or closes it now: 421)."""
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return exc.code == 421
    return isinstance(
        exc, aiosmtplib.SMTPServerDisconnected | ConnectionResetError | BrokenPipeError
    )


def permanent(exc: BaseException) -> bool:
    """An SMTP answer to this mail that will be the same next time (5xx, or a server that
    lacks what the mail needs, e.g. SMTPUTF8), unlike 4xx, a lost link or a session that
    could not be opened (the server or our settings, fixed by an operator)."""
    if isinstance(exc, SessionFailed):
        return False
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        return all(r.code >= 500 for r in exc.recipients)
    if isinstance(exc, aiosmtplib.SMTPNotSupported):
        return True
    return isinstance(exc, aiosmtplib.SMTPResponseException) and exc.code >= 500


class Mailer:
    """A pool of at most ``DISPATCHER_SMTP_CONNECTIONS`` SMTP sessions; :meth:`close` it."""

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._settings = settings
        self._clock = clock
        self.connections = settings.smtp_connections
        self._slots = asyncio.Semaphore(self.connections)
        self._idle: list[_Session] = []  # most recently used last
        self.opened = 0  # connections opened so far (for tests and diagnosis)

    async def send(self, message: Mail) -> None:
        """Send ``message`` on a session of the pool; raises what the send raised."""
        async with self._slots:
            session, reused = await self._take()
            try:
                await self._send_on(session, message)
            except (aiosmtplib.SMTPException, OSError) as exc:
                if not (reused and _closed_by_server(exc)):
                    raise
                # The server closed it while it was idle: once more, on a new connection.
                log.debug("smtp_session_closed_by_server", sent=session.sent, error=str(exc))
                await self._send_on(await self._open(), message)

    async def close(self) -> None:
        """QUIT every idle session (sessions in use are closed by their senders)."""
        idle, self._idle = self._idle, []
        await asyncio.gather(*(self._quit(s) for s in idle))

    # --- internals ----------------------------------------------------------------------

    async def _send_on(self, session: _Session, message: Mail) -> None:
        """Send on ``session``, then put it back in the pool, or drop or retire it."""
        try:
            await session.smtp.sendmail(
                message.sender,
                [message.to],
                message.data,
                mail_options=["SMTPUTF8"] if message.smtputf8 else None,
                timeout=SEND_TIMEOUT,
            )
        except BaseException as exc:  # a cancellation too: the session's state is unknown
            if _kept(exc, session):
                self._give_back(session)
            else:
                session.smtp.close()
            raise
        session.sent += 1
        if session.sent >= MAX_MESSAGES_PER_SESSION:
            await self._quit(session)  # the next send opens a new one
        else:
            self._give_back(session)

    async def _take(self) -> tuple[_Session, bool]:
        """An idle session fit for reuse (and True), else a new one (and False)."""
        now = self._clock()
        while self._idle:
            session = self._idle.pop()
            if not session.smtp.is_connected:
                session.smtp.close()
            elif now - session.idle_since > MAX_IDLE_SECONDS:
                await self._quit(session)
            else:
                return session, True
        return await self._open(), False

    async def _open(self) -> _Session:
        s = self._settings
        smtp = aiosmtplib.SMTP(
            hostname=s.smtp_host,
            port=s.smtp_port,
            username=s.smtp_user or None,
            password=s.smtp_password or None,
            use_tls=s.smtp_tls == "tls",
            start_tls=s.smtp_tls == "starttls",
            timeout=SEND_TIMEOUT,
        )
        try:
            await smtp.connect()
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            smtp.close()
            raise SessionFailed(f"{type(exc).__name__}: {exc}") from exc
        except BaseException:
            smtp.close()
            raise
        self.opened += 1
        return _Session(smtp)

    def _give_back(self, session: _Session) -> None:
        if not session.smtp.is_connected:
            session.smtp.close()
            return
        session.idle_since = self._clock()
        self._idle.append(session)

    @staticmethod
    async def _quit(session: _Session) -> None:
        """A polite QUIT, bounded; the socket is closed whatever the server says."""
        with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
            await session.smtp.quit(timeout=QUIT_TIMEOUT)
        session.smtp.close()
