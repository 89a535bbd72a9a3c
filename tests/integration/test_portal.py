"""The integrators' portal in a real headless Chromium (Debian's ``chromium`` and
``chromium-driver``, driven by Selenium) against the daemon on the real stack.

The daemon runs in this test's event loop, so every browser call runs in a thread
(``Browser``), and every wait is a WebDriverWait with a deadline. With
``PORTAL_SCREENSHOTS=docs/portal`` (``make screenshots``) the tests save the screenshots
that docs/portal.md shows.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import orjson
import pytest
from aiohttp import web
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select, WebDriverWait

from dispatcher.portal import CSP
from tests.integration.support import ROOT, WAIT, Tls, World, free_port, make_event

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SHOTS = os.environ.get("PORTAL_SCREENSHOTS")
T = TypeVar("T")

# What an endpoint or an integrator might slip into a page: markup that would run or
# show if any page failed to escape it (each sets window.__pwned when it runs).
SCRIPT = "<script>window.__pwned='script'</script>"
IMG = "<img src=x onerror=\"window.__pwned='img'\">"
PATH_MARKUP = "<svg/onload=window.__pwned='path'>"


# --- the browser ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium() -> Iterator[WebDriver]:
    """One headless Chromium for the module, with a profile of its own (removed after)."""
    for path in (CHROMIUM, CHROMEDRIVER):
        assert Path(path).exists(), f"{path} is missing: apt-get install chromium chromium-driver"
    profile = tempfile.mkdtemp(prefix="portal-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", "--window-size=1280,900", f"--user-data-dir={profile}",
    ):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@dataclass
class Browser:
    """The Chromium of the module on one daemon's portal; each call runs in a thread, so
    the daemon (in this event loop) keeps answering."""

    driver: WebDriver
    base_url: str

    async def do(self, fn: Callable[[WebDriver], T]) -> T:
        return await asyncio.to_thread(fn, self.driver)

    async def get(self, path: str) -> None:
        await self.do(lambda d: d.get(self.base_url + path))

    async def path(self) -> str:
        url = await self.do(lambda d: d.current_url)
        return str(url).removeprefix(self.base_url)

    async def fill(self, element_id: str, text: str) -> None:
        def fill(d: WebDriver) -> None:
            field = d.find_element(By.ID, element_id)
            field.clear()
            field.send_keys(text)

        await self.do(fill)

    async def choose(self, element_id: str, value: str) -> None:
        await self.do(lambda d: Select(d.find_element(By.ID, element_id)).select_by_value(value))

    async def click(self, css: str) -> None:
        await self.do(lambda d: d.find_element(By.CSS_SELECTOR, css).click())

    async def text(self, css: str) -> str:
        return str(await self.do(lambda d: d.find_element(By.CSS_SELECTOR, css).text))

    async def page_text(self) -> str:
        return await self.text("body")

    async def wait(self, css: str, contains: str = "", *, refresh: bool = False) -> WebElement:
        """The element matching ``css`` (whose text holds ``contains``) once it is there;
        with ``refresh``, the page is reloaded until then. Fails after WAIT seconds."""

        def found(d: WebDriver) -> WebElement | bool:
            try:
                for element in d.find_elements(By.CSS_SELECTOR, css):
                    if contains in element.text:
                        return element
            except StaleElementReferenceException:
                return False
            if refresh:
                d.refresh()
            return False

        def wait(d: WebDriver) -> WebElement:
            result = WebDriverWait(d, WAIT, poll_frequency=0.2).until(
                found, f"no {css!r} holding {contains!r} on {d.current_url}"
            )
            assert isinstance(result, WebElement)
            return result

        return await self.do(wait)

    async def shot(self, name: str, width: int = 1280) -> None:
        """Save a screenshot of the whole page as ``<name>.png`` when asked to."""
        if not SHOTS:
            return

        def save(d: WebDriver) -> None:
            d.set_window_size(width, 900)
            height = d.execute_script("return document.documentElement.scrollHeight")
            d.set_window_size(width, min(max(int(height) + 100, 600), 3200))
            d.execute_script("document.activeElement && document.activeElement.blur()")
            d.execute_script("window.scrollTo(0, 0)")
            Path(ROOT / SHOTS).mkdir(parents=True, exist_ok=True)
            d.save_screenshot(str(ROOT / SHOTS / f"{name}.png"))
            d.set_window_size(1280, 900)

        await self.do(save)

    async def sign_in(self, token: str) -> None:
        await self.get("/portal/")
        await self.wait("#sign-in-form")
        await self.fill("token", token)
        await self.click("#sign-in-form button")
        await self.wait("h1", "Your webhooks")

    async def pwned(self) -> Any:
        return await self.do(lambda d: d.execute_script("return window.__pwned"))


@pytest.fixture
def browser_for(chromium: WebDriver) -> Callable[[str], Awaitable[Browser]]:
    """A Browser on a daemon's base URL, with no cookie of an earlier test."""

    async def make(base_url: str) -> Browser:
        def forget(d: WebDriver) -> None:
            d.get(base_url + "/portal/static/portal.css")  # a page of that host
            d.delete_all_cookies()

        browser = Browser(chromium, base_url)
        await browser.do(forget)
        return browser

    return make


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def switchable(state: dict[str, Any]) -> Any:
    """A responder answering ``state["status"]`` with ``state["body"]``, changeable while
    the test runs."""

    async def respond(_request: web.Request, _n: int) -> web.Response:
        return web.Response(status=state["status"], text=state.get("body", "ok"))

    return respond


# --- an integrator's day ----------------------------------------------------------------


async def test_an_integrator_signs_in_subscribes_watches_resends_recovers_and_signs_out(
    world: World, browser_for: Callable[[str], Awaitable[Browser]]
) -> None:
    """Signed in with its token, an integrator sees a refused create's error next to the
    URL, creates a webhook (its secret shown once), watches deliveries appear, opens a
    failed attempt and resends it, runs a replay and sees it finish live, disables and
    enables, signs out; another shop's token sees none of it."""
    running = await world.start(replace(world.settings, max_retries=0))
    state: dict[str, Any] = {"status": 200, "body": "ok"}
    receiver = await world.receivers(responder=switchable(state))
    refusing = await world.receivers(status=503)
    _, token = await world.store.issue_token(world.shop.environment_id, world.shop.client_id)
    b = await browser_for(running.base_url)
    since = datetime.now(UTC) - timedelta(seconds=5)

    await b.get("/portal/")
    await b.wait("#sign-in-form")
    await b.shot("sign-in")
    await b.sign_in(token)
    assert token not in await b.do(lambda d: d.page_source + d.current_url)
    await b.wait("#no-webhooks")

    # A refused create: the SUBSCRIBED test got 503; the error is next to the URL field.
    await b.fill("url", refusing.url)
    await b.choose("entity_name", "sales")
    await b.choose("event_type", "CLOSED")
    await b.fill("email", "dev@shop.test")
    await b.click("#create-button")
    error = await b.wait("#url-error", "SUBSCRIBED")
    assert "503" in error.text
    assert await b.do(lambda d: d.find_element(By.ID, "url").get_attribute("aria-invalid"))
    await b.shot("create-refused")

    await b.fill("url", receiver.url)
    await b.click("#create-button")
    secret = await b.wait("#secret", "whsec_")
    webhook = await world.store.find_webhook(world.shop.environment_id, "sales", "CLOSED")
    assert webhook is not None and secret.text == webhook.secret
    await b.shot("created")
    await b.click("#to-webhook")
    await b.wait("#attempts tr[data-trigger='subscribe']")  # the SUBSCRIBED test
    assert await b.path() == f"/portal/webhooks/{webhook.id}"
    assert "whsec_" not in await b.do(lambda d: d.page_source)  # shown once, only then

    # A delivery appears in the log; then a failure.
    await world.produce(make_event(world.shop, entity={"id": 41, "uuid": str(uuid.uuid4())}))
    await b.wait("#attempts tr[data-trigger='scheduled'][data-outcome='delivered']", refresh=True)
    state.update(status=500, body='{"error": "database is down"}')
    expected = len(receiver.requests) + 1
    await world.produce(make_event(world.shop, entity={"id": 42, "uuid": str(uuid.uuid4())}))
    await receiver.wait_for(expected)
    failed_row = await b.wait("#attempts tr[data-outcome='http']", "HTTP 500", refresh=True)
    await b.shot("delivery-log")
    await b.do(lambda d: failed_row.find_element(By.CSS_SELECTOR, "a.attempt-link").click())

    # The failed attempt: status, response excerpt, request body; resend it.
    await b.wait("#attempt-status", "500")
    assert "database is down" in await b.text("#response-body")
    request_body = orjson.loads(await b.text("#request-body"))
    assert request_body["entities"] == [{"id": 42, "uuid": request_body["entities"][0]["uuid"]}]
    await b.shot("attempt")
    state.update(status=200, body="ok")
    expected = len(receiver.requests) + 1
    await b.click("#resend")
    await b.wait("#done", "resend is queued")
    resent = await receiver.wait_for(expected)
    assert resent[-1].json()["notification_uuid"] == request_body["notification_uuid"]
    await b.click(".crumbs a[href^='/portal/webhooks/']")
    await b.wait("#attempts tr[data-trigger='manual'][data-outcome='delivered']", refresh=True)

    # A replay of the range: the job page follows it live (no reload) until it is done.
    await b.choose("mode", "replay")
    await b.fill("recover-since", iso(since))
    await b.click("#recover-button")
    await b.wait("#job-state", "Done")
    assert await b.text("[data-field='sent']") == "2"
    assert await b.text("[data-field='delivered']") == "2"
    assert await b.do(lambda d: d.find_elements(By.ID, "job-refresh")) == []
    await b.shot("recovery")

    # Disable, then enable.
    await b.click(f"a[href='/portal/webhooks/{webhook.id}']")
    await b.click("#disable")
    await b.wait("#health", "Disabled")
    await b.wait("#done", "disabled")
    await b.click("#enable")
    await b.wait("#done", "enabled again")
    assert "Disabled" not in await b.text("#health")

    await b.get("/portal/event-types")
    await b.wait("#type-sales\\.CLOSED details")

    def unfold(d: WebDriver) -> None:
        for summary in d.find_elements(By.CSS_SELECTOR, "#type-sales\\.CLOSED summary"):
            summary.click()

    await b.do(unfold)
    assert '"notification_uuid"' in await b.text("#type-sales\\.CLOSED")
    await b.shot("event-types")
    await b.get("/portal/")
    await b.wait("#webhooks .webhook-link", "sales CLOSED")
    local = await b.do(lambda d: d.find_element(By.CSS_SELECTOR, "#webhooks time.local"))
    assert str(await b.do(lambda d: local.get_attribute("title"))).endswith(" UTC")  # on hover
    await b.shot("webhooks")
    await b.shot("webhooks-phone", width=390)

    # Signing out ends the session: the pages ask to sign in again.
    cookie = await b.do(lambda d: d.get_cookie("dispatcher_portal"))
    assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert cookie["path"] == "/portal" and not cookie["secure"]  # http on loopback
    assert "Your webhooks" in await _page_with_cookie(running.base_url, cookie["value"])
    await b.click("#sign-out")
    await b.wait("#sign-in-form")
    await b.get(f"/portal/webhooks/{webhook.id}")
    await b.wait("#sign-in-form")
    assert "sign-in-form" in await _page_with_cookie(running.base_url, cookie["value"])

    # Another shop's token sees none of it.
    other = await world.new_shop("other")
    _, other_token = await world.store.issue_token(other.environment_id, other.client_id)
    await b.sign_in(other_token)
    await b.wait("#no-webhooks")
    attempt_path = await _first_attempt_path(running.base_url, token, webhook.id)
    for path in (f"/portal/webhooks/{webhook.id}", attempt_path):
        await b.get(path)
        await b.wait("#error-message", "no webhook with id")
        assert receiver.url not in await b.page_text()


async def _page_with_cookie(base_url: str, session_id: str) -> str:
    """/portal/ as a client sending this session cookie sees it."""
    headers = {"Cookie": f"dispatcher_portal={session_id}"}
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{base_url}/portal/", headers=headers, allow_redirects=False) as r,
    ):
        return await r.text()


async def _first_attempt_path(base_url: str, token: str, webhook_id: uuid.UUID) -> str:
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{base_url}/webhooks/{webhook_id}/attempts", headers=headers) as r,
    ):
        body = await r.json()
    return f"/portal/webhooks/{webhook_id}/attempts/{body['results'][0]['id']}"


# --- safety -----------------------------------------------------------------------------


async def _hostile_endpoint(tls: Tls) -> tuple[str, web.AppRunner]:
    """An HTTPS endpoint answering any path: 200 to the SUBSCRIBED test, then 500 with a
    body full of markup."""

    async def handle(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        if body["type"] == "SUBSCRIBED":
            return web.Response(text="ok")
        return web.Response(status=500, text=f"{SCRIPT}{IMG}</pre><h1>gotcha</h1>")

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls.server_context)
    await site.start()
    return f"https://localhost:{runner.addresses[0][1]}", runner


async def _attacker_site(target: str) -> tuple[str, web.AppRunner]:
    """Another site (http://localhost, not 127.0.0.1) whose page posts a form to
    ``target`` as soon as it loads."""
    page = (
        f'<html><body><form method="post" action="{target}">'
        '<input name="csrf" value="guess"></form>'
        "<script>document.forms[0].submit()</script></body></html>"
    )

    async def handle(_request: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "localhost", port).start()
    return f"http://localhost:{port}/", runner


async def test_markup_from_an_endpoint_or_a_url_is_inert_and_forged_posts_are_refused(
    world: World, tls: Tls, browser_for: Callable[[str], Awaitable[Browser]]
) -> None:
    """Markup in a receiver's response body, in a webhook URL's path and in an entity id
    shows as text and never runs; a form posted from another site, or without the
    session's CSRF token, changes nothing."""
    running = await world.start(replace(world.settings, max_retries=0))
    endpoint, endpoint_runner = await _hostile_endpoint(tls)
    _, token = await world.store.issue_token(world.shop.environment_id, world.shop.client_id)
    b = await browser_for(running.base_url)
    try:
        await b.sign_in(token)
        hostile_url = f"{endpoint}/hook/{PATH_MARKUP}"
        await b.fill("url", hostile_url)
        await b.choose("entity_name", "sales")
        await b.choose("event_type", "CLOSED")
        await b.fill("email", "dev@shop.test")
        await b.click("#create-button")
        await b.wait("#secret", "whsec_")
        webhook = await world.store.find_webhook(world.shop.environment_id, "sales", "CLOSED")
        assert webhook is not None and webhook.url == hostile_url
        await world.produce(make_event(world.shop, entity={"id": f"{IMG}", "uuid": "u"}))
        await b.get(f"/portal/webhooks/{webhook.id}")
        row = await b.wait("#attempts tr[data-outcome='http']", refresh=True)
        assert IMG in row.text  # the entity id, as text
        assert PATH_MARKUP in await b.text("#webhook-url")
        await _assert_inert(b)
        await b.do(lambda d: row.find_element(By.CSS_SELECTOR, "a.attempt-link").click())
        body = await b.wait("#response-body", SCRIPT)
        assert IMG in body.text and "</pre><h1>gotcha</h1>" in body.text
        await _assert_inert(b)
        await b.get("/portal/")
        await b.wait("#webhooks td.url", PATH_MARKUP)
        await _assert_inert(b)
    finally:
        await endpoint_runner.cleanup()

    # A form another site posts: refused, the webhook stays enabled.
    target = f"{running.base_url}/portal/webhooks/{webhook.id}/disable"
    attacker, attacker_runner = await _attacker_site(target)
    try:
        await b.do(lambda d: d.get(attacker))
        await b.wait("#error-message", "another site")
    finally:
        await attacker_runner.cleanup()
    again = await world.store.get_webhook(world.shop.environment_id, webhook.id)
    assert again is not None and again.disabled_at is None

    # The same post from a client that sends the session's cookie and the right Origin,
    # but not the session's CSRF token: refused; with it, done.
    origin = {"Origin": running.base_url}
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        async with http.post(
            f"{running.base_url}/portal/sign-in", data={"token": token}, headers=origin
        ) as r:
            assert r.status == 200 and r.history[0].status == 303
            page = await r.text()
            assert r.headers["Content-Security-Policy"] == CSP
        match = re.search(r'name="csrf" value="([0-9a-f]{64})"', page)
        assert match is not None
        for forged in ({}, {"csrf": "0" * 64}):
            async with http.post(target, data=forged, headers=origin) as r:
                assert r.status == 403, await r.text()
        async with http.post(target, data={"csrf": match[1]}, headers={}) as r:
            assert r.status == 403  # no Origin nor Referer: not from a page of the portal
        unchanged = await world.store.get_webhook(world.shop.environment_id, webhook.id)
        assert unchanged is not None and unchanged.disabled_at is None
        async with http.post(
            target, data={"csrf": match[1]}, headers=origin, allow_redirects=False
        ) as r:
            assert r.status == 303
            assert r.headers["Location"] == f"/portal/webhooks/{webhook.id}?done=disabled"
    disabled = await world.store.get_webhook(world.shop.environment_id, webhook.id)
    assert disabled is not None and disabled.disabled_at is not None


async def _assert_inert(b: Browser) -> None:
    """Nothing injected ran, and no element of the injected markup exists."""
    assert await b.pwned() is None
    found = await b.do(
        lambda d: [e.tag_name for e in d.find_elements(By.CSS_SELECTOR, "main svg, main img")]
    )
    assert found == []
    scripts = await b.do(lambda d: len(d.find_elements(By.TAG_NAME, "script")))
    assert scripts == 1  # the portal's own
    headings = await b.do(lambda d: [e.text for e in d.find_elements(By.TAG_NAME, "h1")])
    assert "gotcha" not in headings
