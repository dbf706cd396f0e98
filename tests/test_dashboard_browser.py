"""The web dashboard in a real headless Chromium (Debian's ``chromium``, driven by
Playwright; no browser download), against a stack started the way a user starts it:
``shipyard up``, with auth.  One stack and one browser for the module.

Without Chromium or Playwright the tests skip on a developer's machine and fail in CI
(``CI=true``), where ``.ci/run`` installs both."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nodes.runtime.calls import Caller
from nodes.runtime.connection import close, connect
from nodes.runtime.jetstream import ensure_kv
from nodes.runtime.settings import NatsSettings
from protocol import subjects
from protocol.base import encode
from protocol.bundles import BundleInfo, bundle_key
from protocol.deploy import DeployBundle, DeploymentView, ListDeployments
from protocol.errors import OperationError
from protocol.registry import ListNodes, NodeInfo
from tests.helpers import Background, shipyard, shipyard_argv, wait_until

CHROMIUM = os.environ.get("SHIPYARD_CHROMIUM", "/usr/bin/chromium")
HB = "0.5"
TIMEOUT_MS = 10_000
VIEWER_TOKEN = "viewer-token-0123456789"


def _browser_or_skip() -> Any:
    """Playwright's sync API, or a skip (a failure in CI: the test must not go green)."""
    problem = ""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        problem = "playwright is not installed (pip install -e '.[dev]')"
    if not problem and not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        problem = f"no chromium at {CHROMIUM} (apt-get install chromium)"
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"browser tests cannot run in CI: {problem}")
        pytest.skip(problem)
    return sync_playwright


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Stack:
    home: Path
    login: str  # the login URL ``up`` printed
    url: str  # stack.json's dashboard_url
    settings: NatsSettings  # the admin's, as stack.json names them
    env: dict[str, str]
    deployer_killed: bool = False  # from then on the page's feed fails to load, as it should

    def call(self, cmd: Any) -> Any:
        async def main() -> Any:
            nc = await connect(self.settings, name="test")
            try:
                return await Caller(nc, sender="test").call(cmd, timeout=10)
            finally:
                await close(nc)

        # In a thread: Playwright's sync API runs its own loop in this one.
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, main()).result()

    def deployment(self) -> DeploymentView:
        reply = self.call(ListDeployments(project="churn", infra="automation"))
        return reply.deployments[0]  # type: ignore[no-any-return]

    def node(self, name: str) -> NodeInfo:
        return next(n for n in self.call(ListNodes()).nodes if n.name == name)  # type: ignore[no-any-return]


async def _publish_bundles(settings: NatsSettings) -> None:
    nc = await connect(settings, name="test")
    try:
        kv = await ensure_kv(nc.jetstream(), subjects.BUNDLE_BUCKET)
        for b in ("v1", "v2"):
            await kv.put(bundle_key("churn", b), encode(BundleInfo(
                id=b, project="churn", created_at=time.time(), created_by="design")))
    finally:
        await close(nc)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """``shipyard up`` with auth (the default), one Automation node, the dashboard on any
    free port: the login URL it prints and the URL stack.json records."""
    root = tmp_path_factory.mktemp("dashboard")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHIPYARD_")}
    env["SHIPYARD_LOG_FORMAT"] = "json"
    _browser_or_skip()  # before the stack: a skip (or failure) should cost nothing
    http_port = _free_port()
    # A login added to the token file ``up`` keeps: someone who may look, not act.
    (root / ".shipyard").mkdir()
    tokens = root / ".shipyard" / "dashboard.token"
    tokens.write_text(f"admin:{'a' * 32}\nvera:{VIEWER_TOKEN}:viewer\n")
    tokens.chmod(0o600)
    up = Background(shipyard_argv(
        "up", "--nats-port", "-1", "--monitor-port", "-1", "--http-port", str(http_port),
        "--api-nodes", "0", "--automation-nodes", "1", "--heartbeat-interval", HB,
        "--dashboard-port", "-1"), env=env, cwd=root)
    try:
        line = up.wait_line("dashboard   http", timeout=60)
        up.wait_line("ready:", timeout=30)
        login = re.search(r"log in: (\S+);", line)
        assert login is not None, line
        info = json.loads((root / ".shipyard" / "stack.json").read_text())
        settings = NatsSettings(servers=(info["nats_url"],), creds_file=info["credentials"])
        s = Stack(home=root, login=login.group(1), url=info["dashboard_url"],
                  settings=settings, env=env)
        assert s.login.startswith(s.url + "/login?token=")
        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, _publish_bundles(settings)).result()
        for b in ("v1", "v2"):
            s.call(DeployBundle(project="churn", bundle_id=b, infra="automation", by="alice"))
        yield s
    finally:
        code = up.stop(signal.SIGINT, timeout=40)
        assert code == 0, up.output()


@pytest.fixture(scope="module")
def page(stack: Stack) -> Iterator[Any]:
    sync_playwright = _browser_or_skip()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            tab = browser.new_page()
            tab.set_default_timeout(TIMEOUT_MS)
            errors: list[str] = []
            tab.on("pageerror", lambda exc: errors.append(str(exc)))
            tab.on("console", lambda m: errors.append(m.text) if m.type == "error" and not (
                stack.deployer_killed and m.text.startswith("Failed to load resource"))
                else None)
            tab.goto(stack.login)
            tab.wait_for_selector("#live[data-state=live]")
            tab.evaluate("window.__sameDocument = true")
            yield tab
            assert errors == [], errors  # no script error, no CSP refusal
        finally:
            browser.close()


def test_the_page_renders_the_fleet_and_the_deployment(page: Any, stack: Stack) -> None:
    page.wait_for_selector('tr[data-node="automation-1"][data-status="online"]')
    page.wait_for_selector('tr[data-node="deployer"][data-status="online"]')
    assert page.inner_text('tr[data-node="automation-1"] td:nth-child(3)') == "automation"
    card = page.wait_for_selector('[data-deployment="bundle:automation:churn"]')
    assert card.inner_text().count("v2") >= 1
    assert page.inner_text("#who").startswith("admin (acts as dashboard)")


def test_a_rollback_clicked_on_the_page_changes_the_deployment(page: Any,
                                                               stack: Stack) -> None:
    assert stack.deployment().desired == "v2"
    page.click('[data-deployment="bundle:automation:churn"] button[data-action=rollback]')
    view = wait_until(lambda: (v := stack.deployment()).desired == "v1" and v,
                      timeout=10, message="the rollback to reach the Deployer")
    assert view.updated_by == "dashboard:admin"
    # The page shows it too, pushed by the Deployer.
    page.wait_for_function(
        "() => document.querySelector('[data-deployment=\"bundle:automation:churn\"] "
        ".desired')?.textContent === 'v1'")
    # Audited: the verified identity the dashboard signs with, and who clicked.
    entries = json.loads(shipyard("audit", "--json", env=stack.env, cwd=stack.home,
                                  check=True).stdout)
    rollback = [e for e in entries if e["command"] == "deploy.rollback"]
    assert len(rollback) == 1, entries
    assert rollback[0]["identity"] == "dashboard" and rollback[0]["verified"] is True
    assert rollback[0]["args"]["by"] == "dashboard:admin"


def test_a_node_killed_with_sigkill_turns_lost_on_the_page_without_a_reload(
        page: Any, stack: Stack) -> None:
    page.wait_for_selector('tr[data-node="automation-1"][data-status="online"]')
    os.kill(stack.node("automation-1").pid, signal.SIGKILL)
    # ``up`` restarts it a moment later: the page must show the loss in between.
    page.wait_for_selector('tr[data-node="automation-1"][data-status="lost"]')
    assert page.evaluate("window.__sameDocument") is True  # no reload happened
    assert "lost" in page.inner_text('tr[data-node="automation-1"] .status')


def test_a_viewer_login_sees_why_the_page_is_read_only_and_cannot_roll_back(
        page: Any, stack: Stack) -> None:
    before = stack.deployment()
    tab = page.context.browser.new_context().new_page()  # its own cookies
    try:
        tab.set_default_timeout(TIMEOUT_MS)
        tab.goto(f"{stack.url}/login?token={VIEWER_TOKEN}")
        tab.wait_for_selector("#live[data-state=live]")
        assert tab.inner_text("#who").startswith("vera")
        assert tab.inner_text("#notice") == (
            "you are logged in as vera, a viewer: rollback and redeploy need role "
            "deployer; the page is read-only")
        button = tab.wait_for_selector(
            '[data-deployment="bundle:automation:churn"] button[data-action=rollback]')
        assert button.is_disabled()
        assert "vera, a viewer" in (button.get_attribute("title") or "")
        # A request made anyway, as a script in the page could: refused, nothing changed.
        status, message = tab.evaluate("""async () => {
            const s = await (await fetch("/api/session")).json();
            const r = await fetch("/api/actions", {method: "POST",
                headers: {"Content-Type": "application/json", "X-CSRF-Token": s.csrf},
                body: JSON.stringify({action: "rollback", kind: "bundle",
                                      infra: "automation", name: "churn"})});
            return [r.status, (await r.json()).error.message];
        }""")
        assert (status, message) == (403, "vera is a viewer on this dashboard: rollback "
                                          "needs role deployer")
        after = stack.deployment()
        assert (after.desired, after.revision) == (before.desired, before.revision)
    finally:
        tab.context.close()


def test_after_a_deployer_restart_the_page_goes_live_again_with_no_new_login(
        page: Any, stack: Stack) -> None:
    page.wait_for_selector("#live[data-state=live]")
    csrf = page.evaluate('async () => (await (await fetch("/api/session")).json()).csrf')
    old = stack.node("deployer").pid
    stack.deployer_killed = True
    os.kill(old, signal.SIGKILL)
    # ``up`` restarts it.  The session cookie is signed, not stored in the old process:
    # the new one accepts it, and the page reconnects by itself.
    page.wait_for_selector("#live[data-state=reconnecting]")
    page.wait_for_selector("#live[data-state=live]", timeout=30_000)
    page.wait_for_selector('tr[data-node="deployer"][data-status="online"]')
    assert stack.node("deployer").pid != old  # the page is served by the new Deployer
    assert page.evaluate("window.__sameDocument") is True and "/login" not in page.url
    # Clicks carry the same CSRF token as before.
    assert page.evaluate(
        'async () => (await (await fetch("/api/session")).json()).csrf') == csrf
    # A session that did end (here: the cookie is gone) sends the page to the login form,
    # which says why.
    page.context.clear_cookies()
    page.evaluate("resume()")
    page.wait_for_url("**/login?ended=1")
    assert "Your session has ended" in page.inner_text("body")
    page.goto(stack.login)
    page.wait_for_selector("#live[data-state=live]")


def test_after_the_nats_server_restarts_the_page_stays_live_without_a_reload(
        page: Any, stack: Stack) -> None:
    """The Deployer keeps its sessions through a NATS outage: the page reconnects its
    feed by itself and shows what happens after it."""
    page.wait_for_selector("#live[data-state=live]")
    page.evaluate("window.__sameDocument = true")
    stack_file = stack.home / ".shipyard" / "stack.json"
    old = json.loads(stack_file.read_text())["nats_pid"]
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: json.loads(stack_file.read_text())["nats_pid"] != old, timeout=30,
               message="up to restart its NATS server")

    def online() -> NodeInfo | None:
        try:  # the Deployer answers again once it has reconnected
            n = stack.node("automation-1")
        except OperationError:
            return None
        return n if n.status == "online" else None

    node = wait_until(online, timeout=30, message="automation-1 back online")
    page.wait_for_selector('tr[data-node="automation-1"][data-status="online"]')
    os.kill(node.pid, signal.SIGKILL)
    page.wait_for_selector('tr[data-node="automation-1"][data-status="lost"]')
    assert page.evaluate("window.__sameDocument") is True  # no reload, no new login
    assert "login" not in page.url
