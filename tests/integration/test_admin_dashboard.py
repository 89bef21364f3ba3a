"""The dashboard in a real headless Chromium (Debian's ``chromium``, driven by Playwright).

Every wait is on a condition of the page (Playwright's ``expect`` polls it); the page itself
polls ``/api/status`` once a second, so each step takes about a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

from playwright.async_api import ConsoleMessage, Dialog, Page, async_playwright, expect

from pibl.server.app import ProxyApp
from tests.support import make_settings, request, running_backends, running_proxy

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TOKEN = "dash-T0ken"
STEP_TIMEOUT_MS = 10_000  # a step needs one or two polls (1 s each)
TEST_TIMEOUT = 60.0
expect.set_options(timeout=STEP_TIMEOUT_MS)


@contextlib.asynccontextmanager
async def browser_page(profile: Path) -> AsyncIterator[tuple[Page, list[str]]]:
    """A page in a fresh Chromium profile, and the list its console errors are collected in."""
    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 900},
        )
        try:
            page = context.pages[0] if context.pages else await context.new_page()
            page.set_default_timeout(STEP_TIMEOUT_MS)
            errors: list[str] = []

            def on_console(message: ConsoleMessage) -> None:
                if message.type == "error":
                    errors.append(message.text)

            page.on("console", on_console)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            yield page, errors
        finally:
            await context.close()


async def api_status(app: ProxyApp) -> dict[str, object]:
    address = app.admin_address
    assert address is not None
    response = await request(
        address,
        "GET",
        "/api/status",
        headers=[("Host", f"127.0.0.1:{address.port}"), ("Authorization", f"Bearer {TOKEN}")],
    )
    assert response.status == 200
    status: dict[str, object] = json.loads(response.body)
    return status


def server_drained(status: dict[str, object], index: int) -> bool:
    pools = status["pools"]
    assert isinstance(pools, list)
    return bool(pools[0]["servers"][index]["drained"])


async def test_dashboard_shows_servers_a_failure_and_drains(tmp_path: Path) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), running_backends(count=2) as backends:
        settings = make_settings(
            backends, admin={"listen": "127.0.0.1:0", "token": TOKEN}, cache={"enabled": True}
        )
        async with (
            running_proxy(settings) as app,
            browser_page(tmp_path / "profile") as (
                page,
                errors,
            ),
        ):
            address = app.admin_address
            assert address is not None
            first, second = (str(b.address) for b in backends)
            await page.goto(f"http://127.0.0.1:{address.port}/?token={TOKEN}")
            await expect(page.locator("#connection")).to_have_text("live")
            assert "token" not in page.url  # taken out of the address bar and history

            rows = {name: page.locator(f'tr[data-server="{name}"]') for name in (first, second)}
            for row in rows.values():
                await expect(row.locator(".state")).to_have_text("up")
                await expect(row.locator("button")).to_have_text("Drain")
            await expect(page.locator(".pool-name")).to_have_text("app")

            # Traffic shows up in the per-server counters and the chart.
            for _ in range(6):
                assert (await request(app.addresses[0])).status == 200
            for row in rows.values():
                await expect(row.locator(".requests")).to_have_text("3")
                await expect(row.locator(".p50")).to_contain_text("ms")
            await expect(page.locator("#cache-ratio")).to_have_text("0.0 %")
            await expect(page.locator("#chart-line")).to_have_attribute("d", re.compile(r"^M\S+"))

            # A server goes down: its backend stops and the balancer marks it unavailable.
            await backends[1].aclose()
            app.groups["app"].upstreams[1].is_available = False
            await expect(rows[second].locator(".state")).to_have_text("down")
            await expect(rows[first].locator(".state")).to_have_text("up")

            # The drain button drains through the API, and Enable undoes it.
            await rows[first].locator("button.drain").click()
            await expect(rows[first].locator(".state")).to_have_text("drained")
            await expect(rows[first].locator("button")).to_have_text("Enable")
            assert app.groups["app"].upstreams[0].drained
            assert server_drained(await api_status(app), 0)

            await rows[first].locator("button.enable").click()
            await expect(rows[first].locator(".state")).to_have_text("up")
            await expect(rows[first].locator("button")).to_have_text("Drain")
            assert not server_drained(await api_status(app), 0)
            await page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
            assert errors == []  # no script errors, no CSP violations


async def test_dashboard_asks_for_the_token_when_the_url_has_none(tmp_path: Path) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), running_backends(count=1) as backends:
        settings = make_settings(backends, admin={"listen": "127.0.0.1:0", "token": TOKEN})
        async with (
            running_proxy(settings) as app,
            browser_page(tmp_path / "profile") as (
                page,
                errors,
            ),
        ):
            address = app.admin_address
            assert address is not None
            prompts: list[str] = []

            async def answer(dialog: Dialog) -> None:
                prompts.append(dialog.message)
                await dialog.accept(TOKEN)

            page.on("dialog", answer)
            await page.goto(f"http://127.0.0.1:{address.port}/")
            await expect(page.locator("#connection")).to_have_text("live")
            row = page.locator(f'tr[data-server="{backends[0].address}"]')
            await expect(row.locator(".state")).to_have_text("up")
            assert prompts == ["Admin token for this PIBL:"]  # asked once, then remembered
            # The one 401 that made the page ask.
            assert errors == [
                "Failed to load resource: the server responded with a status of 401 (Unauthorized)"
            ]


async def test_dashboard_without_token_shows_the_cache_is_off(tmp_path: Path) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), running_backends(count=1) as backends:
        settings = make_settings(backends, admin={"listen": "127.0.0.1:0"})
        async with (
            running_proxy(settings) as app,
            browser_page(tmp_path / "profile") as (
                page,
                errors,
            ),
        ):
            address = app.admin_address
            assert address is not None
            await page.goto(f"http://localhost:{address.port}/")
            await expect(page.locator("#connection")).to_have_text("live")
            await expect(page.locator("#cache-ratio")).to_have_text("off")
            await expect(page.locator("#cache")).to_be_hidden()
            await expect(page.locator("#version")).to_contain_text("v")
            assert errors == []
