"""A failure mail as bytes: what any mail reader parses out of it, whatever the notice holds."""

from __future__ import annotations

import email
import email.policy
import uuid
from dataclasses import replace
from email.message import EmailMessage

from dispatcher.notices import Notice, render


def notice(**changes: object) -> Notice:
    notification = str(uuid.uuid4())
    base = Notice(
        notice_id=Notice.make_id(notification, 1),
        to="dev@shop.test",
        webhook_id=str(uuid.uuid4()),
        url="https://hooks.shop.test/hook",
        entity_name="sales",
        event_type="CLOSED",
        notification_uuid=notification,
        n_retry=1,
        max_retries=3,
        final=False,
        failed_at="2026-01-01T10:00:00.000Z",
        error="HTTP 500",
        status=500,
        response_head="database on fire",
        next_attempt_at="2026-01-01T10:15:00.000Z",
        request_body='{"type": "CLOSED", "entities": [{"id": 1}]}',
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def parsed(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    assert not message.defects
    return message


def parts(message: EmailMessage) -> tuple[str, str]:
    text = message.get_body(("plain",))
    page = message.get_body(("html",))
    assert text is not None and page is not None
    return str(text.get_content()), str(page.get_content())


def test_one_notice_makes_a_plain_and_an_html_part_with_every_fact() -> None:
    """Headers, the attempt, the error, the response and the request body, in both parts."""
    n = notice()
    mail = render([n], "Webhooks <webhooks@example.com>")
    message = parsed(mail.data)
    assert (mail.sender, mail.to, mail.smtputf8) == ("webhooks@example.com", n.to, False)
    assert message["To"] == n.to
    assert message["Subject"] == (
        "Webhook delivery failed (attempt 2 of 4): sales CLOSED to https://hooks.shop.test/hook"
    )
    assert message["X-Webhook-Notice-Id"] == n.notice_id
    assert message["Message-ID"] == f"<{n.notice_id}@example.com>"
    assert message["Date"]
    text, page = parts(message)
    assert "Attempt: 2 of 4 (nRetry 1)" in text
    assert "What happened: HTTP 500" in text and "database on fire" in text
    assert n.request_body in text
    assert "The next attempt is due at 2026-01-01T10:15:00.000Z." in text
    assert "&quot;type&quot;: &quot;CLOSED&quot;" in page


def test_the_same_notices_make_the_same_message_id() -> None:
    """A mail sent again (after a crash) carries the Message-ID of the first one."""
    n = notice()
    first, again = parsed(render([n], "w@x.test").data), parsed(render([n], "w@x.test").data)
    assert first["Message-ID"] == again["Message-ID"]
    digest = [notice(), notice()]
    one, two = (parsed(render(digest, "w@x.test").data) for _ in range(2))
    assert one["Message-ID"] == two["Message-ID"] != first["Message-ID"]


def test_text_that_is_not_ascii_long_lines_and_dots_survive() -> None:
    """UTF-8 error text, a 5,000-character body line and a line of a lone dot."""
    body = "{" + "x" * 5000 + "}\n.\n" + "é€😀"
    n = notice(error="Zeitüberschreitung: 10 s", request_body=body, url="https://bücher.test/h")
    message = parsed(render([n], "w@x.test").data)
    text, _ = parts(message)
    assert "What happened: Zeitüberschreitung: 10 s" in text
    assert body in text.replace("\r\n", "\n")
    assert message["Subject"].endswith("to https://bücher.test/h")  # RFC 2047, decoded


def test_a_large_digest_keeps_every_notice_id_and_header_lines_stay_short() -> None:
    """200 notice ids are folded over header lines under 998 characters."""
    digest = [notice(final=i == 199) for i in range(200)]
    mail = render(digest, "w@x.test")
    head = mail.data.split(b"\r\n\r\n", 1)[0]
    assert max(len(line) for line in head.split(b"\r\n")) < 998
    message = parsed(mail.data)
    ids = [i.strip() for i in str(message["X-Webhook-Notice-Id"]).split(",")]
    assert ids == [n.notice_id for n in digest]
    assert "failed 200 times, retry limit reached for 1" in message["Subject"]


def test_a_line_break_in_a_field_cannot_add_a_header() -> None:
    """A URL carrying CR/LF does not inject a header."""
    n = notice(url="https://a.test/h\r\nBcc: victim@else.test")
    message = parsed(render([n], "w@x.test").data)
    assert message["Bcc"] is None


def test_a_non_ascii_address_asks_for_smtputf8() -> None:
    """An internationalised mailbox is sent raw, with SMTPUTF8."""
    mail = render([notice(to="jürgen@bücher.test")], "w@x.test")
    assert mail.smtputf8 and mail.to == "jürgen@bücher.test"
    assert parsed(mail.data)["To"] == "jürgen@bücher.test"
