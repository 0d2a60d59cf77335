"""Issue 7: the tenant page in real headless Chromium (Debian's /usr/bin/chromium via Playwright).

A failed tenant's page: paste the token, open Actions, click Retry; the timeline advances live
(polling, no reload) through two held steps, the tenant turns active, and the Admin Console link
opens the tenant's console page. Skipped only on a developer machine without Chromium; in CI
(``CI`` set) it must run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from sagas.messages import CommandType
from service.bootstrap import Container
from service.faults import FaultMode
from service.handlers import Request
from tests.support.api import API_TOKEN, ApiServer
from tests.support.events import EventTap, new_slug
from tests.support.processes import ServiceProcess
from tests.support.stack import wait_until

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
if not CHROMIUM.exists() and not os.environ.get("CI"):
    pytest.skip(
        "no /usr/bin/chromium (apt-get install -y chromium); required in CI",
        allow_module_level=True,
    )

from playwright.sync_api import Browser, Page, expect, sync_playwright  # noqa: E402
from playwright.sync_api import Error as PlaywrightError  # noqa: E402


@pytest.fixture(scope="module")
def api(workdir: Path) -> Iterator[ApiServer]:
    server = ApiServer(workdir, name="api-page")
    # The console link points at this server's own /console page.
    server.env["PROVISIONER_CONSOLE_URL"] = f"{server.url}/console/{{slug}}"
    server.start()
    server.wait_up()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1200, "height": 1000})
    tab = context.new_page()
    tab.set_default_timeout(20_000)
    yield tab
    context.close()


def failed_tenant(services: Container, tap: EventTap) -> str:
    slug = new_slug("page")
    plan = services.faults.add("issue_certificate", mode=FaultMode.ERROR, tenant=slug)
    try:
        outcome = services.handlers.create(Request(CommandType.PROVISION, slug), plan="pro")
        assert outcome.accepted, outcome
        tap.wait_for_type(slug, "tenant.provisioning.failed", timeout=45)
    finally:
        services.faults.clear(plan.id)
    return slug


def step_status(page: Page, attempt: int, step: str) -> str:
    return page.locator(
        f'.attempt[data-attempt="{attempt}"] tr[data-step="{step}"] td.status'
    ).inner_text()


def test_retry_from_the_tenant_page_until_active(
    services: Container,
    worker: ServiceProcess,
    tap: EventTap,
    api: ApiServer,
    page: Page,
    tmp_path: Path,
) -> None:
    slug = failed_tenant(services, tap)
    page.goto(f"{api.url}/tenants")
    page.get_by_role("link", name=slug).click()
    expect(page.locator("#state-badge")).to_have_text("failed")
    expect(page.locator("#failed-step")).to_have_text("issue_certificate")
    expect(page.locator("#failed-error")).to_contain_text("TransientUpstreamError")
    page.locator("#actions-menu summary").click()
    retry = page.locator("#action-retry")
    expect(retry).to_be_enabled()
    expect(page.locator("#why-retry")).to_contain_text("0 of 2 retries used")
    expect(page.locator("#action-reset")).to_be_disabled()
    expect(page.locator("#why-reset")).to_contain_text("nothing to reset")
    expect(page.locator("#action-decommission")).to_be_enabled()
    expect(page.locator("#action-retry_force")).to_have_count(0)  # only past the cap
    expect(page.locator("#console-link")).to_have_count(0)
    page.screenshot(path=str(tmp_path / "1-failed.png"), full_page=True)

    # Without the token the click is refused, and the page says why.
    retry.click()
    expect(page.locator("#action-result")).to_contain_text("refused (unauthorized)")
    page.fill("#token-input", API_TOKEN)
    page.click("#token-save")
    expect(page.locator("#token-status")).to_have_text("token set (this tab)")

    # Two held steps, so the page can be watched mid-run.
    held = {
        step: services.faults.add(step, mode=FaultMode.HANG, tenant=slug).id
        for step in ("configure_admin_console", "check_readiness")
    }
    try:
        retry.click()
        expect(page.locator("#action-result")).to_contain_text("accepted")
        expect(page.locator("#state-badge")).to_have_text("provisioning")
        expect(page.locator("#polling")).to_have_text("(live)")
        # The page reloaded to show the run (it polls only once reloaded); the answer stayed.
        expect(page.locator("#action-result")).to_contain_text("accepted")
        page.wait_for_function(
            """() => document.querySelector('.attempt[data-attempt="2"] '
                 + 'tr[data-step="configure_admin_console"] td.status')
                 ?.textContent.trim() === 'running'"""
        )
        assert "reused from #1" in step_status(page, 2, "provision_storage")
        assert step_status(page, 2, "issue_certificate") == "completed"
        assert step_status(page, 2, "activate") == "pending"
        page.locator("#actions-menu summary").click()
        expect(page.locator("#action-retry")).to_be_disabled()
        expect(page.locator("#why-retry")).to_have_text("tenant is provisioning: reset first")
        expect(page.locator("#action-reset")).to_be_enabled()
        expect(page.locator("#lock-body")).to_contain_text("attempt 2")
        # From here on the page must change without a reload: only the poll can do it.
        page.evaluate("window.__notReloaded = true")
        services.faults.clear(held.pop("configure_admin_console"))
        page.wait_for_function(
            """() => window.__notReloaded === true && document.querySelector(
                 '.attempt[data-attempt="2"] tr[data-step="check_readiness"] td.status'
               )?.textContent.trim() === 'running'"""
        )
        assert step_status(page, 2, "configure_admin_console") == "completed"
        page.screenshot(path=str(tmp_path / "2-provisioning.png"), full_page=True)
    finally:
        for plan_id in held.values():
            services.faults.clear(plan_id)

    # It settles: the poll draws "active", then the page reloads itself, with the console link.
    def reloaded_active() -> bool:
        try:
            return bool(
                page.evaluate(
                    "window.__notReloaded === undefined && "
                    "document.getElementById('state-badge')?.textContent === 'active'"
                )
            )
        except PlaywrightError:  # the reload is under way: this document is gone
            return False

    wait_until(reloaded_active, 30, "the page to reload itself, active")
    page.wait_for_load_state("load")
    assert step_status(page, 2, "activate") == "completed"
    expect(page.locator("#polling")).to_have_text("")
    # The answer was shown once, on the reload that followed it: not on every reload after.
    expect(page.locator("#action-result")).to_have_text("")
    page.locator("#actions-menu summary").click()
    expect(page.locator("#action-retry")).to_be_disabled()
    expect(page.locator("#why-retry")).to_have_text("tenant is active: nothing to retry")
    expect(page.locator("#lock-body")).to_have_text("free")
    page.screenshot(path=str(tmp_path / "3-active.png"), full_page=True)

    page.click("#console-link")
    page.wait_for_url(f"{api.url}/console/{slug}")
    config = page.locator("#console-config")
    expect(config.locator('td[data-key="slug"]')).to_have_text(slug)
    expect(config.locator('td[data-key="plan"]')).to_have_text("pro")
    tenant_id = config.locator('td[data-key="tenant_id"]').inner_text()
    assert len(tenant_id) == 36
    expect(config.locator('td[data-key="configured_at"]')).not_to_be_empty()
    page.screenshot(path=str(tmp_path / "4-console.png"), full_page=True)


def test_a_held_lock_on_a_failed_tenant_is_flagged(
    services: Container, tap: EventTap, api: ApiServer, page: Page
) -> None:
    from service.locks import LockToken

    slug = failed_tenant(services, tap)
    services.locks.acquire(slug, LockToken.new("stale-run", 99))
    try:
        page.goto(f"{api.url}/tenants/{slug}")
        expect(page.locator("#lock-warning")).to_contain_text("held but the tenant is failed")
        page.locator("#actions-menu summary").click()
        expect(page.locator("#action-retry")).to_be_disabled()
        expect(page.locator("#why-retry")).to_contain_text("reset first")
        expect(page.locator("#action-reset")).to_be_enabled()
    finally:
        services.locks.force_release(slug)


def test_unknown_tenant_page_is_a_404(api: ApiServer, page: Page) -> None:
    response = page.goto(f"{api.url}/tenants/{new_slug('nobody')}")
    assert response is not None
    assert response.status == 404
    expect(page.locator("#error-message")).to_contain_text("There is no tenant")
    home = page.goto(f"{api.url}/")
    assert home is not None
    assert page.url.endswith("/tenants")
