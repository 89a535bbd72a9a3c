"""The portal's pure logic: session cookies, CSRF tokens, same-origin checks, and that
its templates escape what endpoints and integrators put in them."""

from __future__ import annotations

import re

from dispatcher import portal, portal_sessions
from dispatcher.portal_sessions import Origin

HOSTILE = "<script>alert(1)</script><img src=x onerror=alert(2)>\"'&"


def test_the_session_cookie_is_http_only_strict_expiring_and_secure_over_https() -> None:
    """The cookie cannot be read by scripts, is sent by no cross-site request, expires,
    and is Secure exactly when the portal is served over HTTPS."""
    plain = portal_sessions.session_cookie("abc", max_age=3600, secure=False)
    tls = portal_sessions.session_cookie("abc", max_age=3600, secure=True)
    for cookie in (plain, tls):
        parts = cookie.split("; ")
        assert parts[0] == "dispatcher_portal=abc"
        assert {"HttpOnly", "SameSite=Strict", "Max-Age=3600", "Path=/portal"} <= set(parts)
    assert "Secure" not in plain.split("; ")
    assert "Secure" in tls.split("; ")
    cleared = portal_sessions.cleared_cookie(secure=True)
    assert cleared.startswith("dispatcher_portal=;") and "Max-Age=0" in cleared


def test_https_is_seen_through_a_proxy_only_when_trusted() -> None:
    """X-Forwarded-Proto/Host count only with DISPATCHER_PORTAL_TRUST_PROXY; so does the
    Secure flag that follows from them."""
    headers = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "hooks.example.com"}
    ignored = portal_sessions.request_origin("http", "10.0.0.5:8080", headers, trust_proxy=False)
    trusted = portal_sessions.request_origin("http", "10.0.0.5:8080", headers, trust_proxy=True)
    assert ignored == Origin("http", "10.0.0.5:8080") and not ignored.secure
    assert trusted == Origin("https", "hooks.example.com") and trusted.secure


def test_csrf_tokens_belong_to_their_session_and_reveal_nothing_of_it() -> None:
    """A session's token is accepted for it alone; empty, foreign or huge tokens are not."""
    one, other = portal_sessions.new_session_id(), portal_sessions.new_session_id()
    token = portal_sessions.csrf_token(one)
    assert re.fullmatch(r"[0-9a-f]{64}", token) and one not in token
    assert portal_sessions.csrf_ok(one, token)
    assert not portal_sessions.csrf_ok(other, token)
    for bad in (None, "", token[:-1], token + "0", "x" * 10_000):
        assert not portal_sessions.csrf_ok(one, bad)


def test_only_posts_from_the_portals_own_origin_pass() -> None:
    """Origin (or Referer without it) must be the portal's scheme, host and port."""
    here = Origin("http", "127.0.0.1:8080")
    assert portal_sessions.same_origin(here, {"Origin": "http://127.0.0.1:8080"})
    assert portal_sessions.same_origin(here, {"Referer": "http://127.0.0.1:8080/portal/x"})
    for headers in (
        {},
        {"Origin": "null"},
        {"Origin": "http://127.0.0.1:8081"},
        {"Origin": "https://127.0.0.1:8080"},
        {"Origin": "http://localhost:8080"},
        {"Origin": "http://127.0.0.1:8080.evil.example"},
        {"Referer": "http://evil.example/?http://127.0.0.1:8080"},
        {"Origin": "http://evil.example", "Referer": "http://127.0.0.1:8080/portal/"},
    ):
        assert not portal_sessions.same_origin(here, headers), headers
    default_port = Origin("https", "hooks.example.com")
    assert portal_sessions.same_origin(default_port, {"Origin": "https://hooks.example.com:443"})


def test_cookie_values_that_cannot_be_a_session_cost_no_lookup() -> None:
    """Junk cookie values are dropped before any query."""
    good = portal_sessions.new_session_id()
    assert portal_sessions.parse_cookie_value(good) == good
    for bad in (None, "", "a;b", "x" * 101, "é"):
        assert portal_sessions.parse_cookie_value(bad) is None


def test_templates_escape_what_endpoints_and_integrators_send() -> None:
    """A hostile URL, response body, error text and entity id render as text."""
    env = portal.templates(lambda name: f"/portal/static/{name}")
    webhook = {
        "id": "w1", "url": f"https://x.example/{HOSTILE}", "entity_name": "sales",
        "event_type": "CLOSED", "email": "dev@example.com",
    }  # fmt: skip
    attempt = {
        "id": "a1", "notification_uuid": "n1", "nRetry": 0,
        "attempted_at": "2026-12-01T10:00:00.000Z", "duration_ms": 2.0, "outcome": "http",
        "status": 500, "error": HOSTILE, "entity_ids": [HOSTILE], "trigger": "scheduled",
        "request_body": HOSTILE, "response_body": HOSTILE,
    }  # fmt: skip
    html = env.get_template("attempt.html").render(
        session=None, csrf="", done=None, title=HOSTILE, webhook=webhook, attempt=attempt
    )
    assert "<script>alert" not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert html.count("<script") == 1  # the portal's own script tag


def test_status_is_told_in_text_not_only_colour() -> None:
    """Each outcome, health state and job state has words as well as a colour class."""
    assert ">Failed: HTTP 503<" in portal.outcome_badge("http", 503)
    assert ">Delivered<" in portal.outcome_badge("delivered", 200)
    for state in ("healthy", "failing", "unknown", "disabled"):
        assert re.search(r'class="badge \w+">\W*\w', str(portal.health_badge(state)))
    assert "Done" in portal.job_badge("done")


def test_times_are_utc_in_markup_with_the_zone_on_hover() -> None:
    """A <time> element carries the UTC instant; its title says UTC."""
    tag = str(portal.time_tag("2026-12-01T11:00:00+01:00"))
    assert 'datetime="2026-12-01T10:00:00.000Z"' in tag
    assert 'title="2026-12-01 10:00:00 UTC"' in tag
