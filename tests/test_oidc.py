"""Single sign-on against a real OpenID Connect provider: `oidc-provider-mock` (PyPI) runs as a
server on 127.0.0.1, a real `studio serve` (embedded session service, one warm Spark worker) is
configured for it, and Playwright drives Debian's chromium through the provider's sign-in page.

The browser story: the sign-in page offers "Sign in with <provider>", the provider's page picks
the user (its predefined users are buttons), the browser comes back to /oauth/callback and lands
in the Studio signed in as that user, who creates a workspace, opens its JupyterLab and runs a
cell whose Spark session belongs to the user (`%%info`), and the sign-in is in the audit trail.

Over plain HTTP (httpx following the same redirects a browser does): a user outside the allowed
domain and groups is refused with a page saying why, a forged or mismatched ``state`` is refused,
the admin group gives the role admin, and settings with no rule keep `studio serve` from starting.
One provider and one `studio serve` serve the whole module.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from browser_helpers import artifacts, needs_chromium, shots_on_failure
from helpers import REPO
from workspace_helpers import StudioProcess, serving

playwright_api = pytest.importorskip("playwright.sync_api", reason="the test extra installs playwright")

CLIENT_ID = "spark-studio"
CLIENT_SECRET = "oidc-client-secret-of-the-test"  # noqa: S105 - the test provider accepts any
USERS = [
    # allowed by domain
    {"sub": "alice-sub", "email": "alice@example.com", "email_verified": True, "preferred_username": "alice", "groups": ["staff"]},
    # allowed by the admin group alone (another domain)
    {"sub": "carol-sub", "email": "carol@partner.test", "preferred_username": "carol", "groups": ["studio-admins"]},
    # allowed by an allowed group (another domain)
    {"sub": "dave-sub", "email": "dave@partner.test", "preferred_username": "dave", "groups": ["data-team"]},
    # neither
    {"sub": "mallory-sub", "email": "mallory@evil.test", "preferred_username": "mallory", "groups": ["other"]},
]

pytestmark = [
    needs_chromium,
    # found, not imported: it imports authlib.jose, which warns that it is deprecated
    pytest.mark.skipif(importlib.util.find_spec("oidc_provider_mock") is None, reason="the test extra installs oidc-provider-mock"),
]


class Provider:
    """`python -m oidc_provider_mock --port 0` with predefined users; its issuer is its URL (the
    mock names itself after the Host it is asked with)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.process: subprocess.Popen[bytes] | None = None
        self.issuer = ""

    @property
    def log_path(self) -> Path:
        return self.folder / "provider.log"

    def start(self, timeout: float = 60.0) -> "Provider":
        self.folder.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", "oidc_provider_mock", "--host", "127.0.0.1", "--port", "0", "--require-nonce"]
        for user in USERS:
            args += ["--user-claims", json.dumps(user)]
        env = {**os.environ, "NO_COLOR": "1", "PYTHONWARNINGS": "ignore::DeprecationWarning"}
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.folder, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", self.log_path.read_text(errors="replace"))
            if found:
                # Named "localhost", not 127.0.0.1 as the Studio is: another site for the browser, so
                # the provider sends it back to /oauth/callback cross-site, as a real provider does.
                self.issuer = found.group(1).replace("127.0.0.1", "localhost")
                return self
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"the OpenID provider did not start:\n{self.log_path.read_text(errors='replace')[-3000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(15)


def oidc_env(issuer: str, **extra: str) -> dict[str, str]:
    return {
        "STUDIO_OIDC_ISSUER": issuer,
        "STUDIO_OIDC_CLIENT_ID": CLIENT_ID,
        "STUDIO_OIDC_CLIENT_SECRET": CLIENT_SECRET,
        "STUDIO_OIDC_ALLOWED_DOMAINS": "example.com",
        "STUDIO_OIDC_ALLOWED_GROUPS": "data-team",
        "STUDIO_OIDC_ADMIN_GROUP": "studio-admins",
        "STUDIO_OIDC_PROVIDER_NAME": "Test IdP",
        **extra,
    }


@pytest.fixture(scope="module")
def provider(test_root):
    started = Provider(test_root / "oidc-provider").start()
    yield started
    started.stop()


@pytest.fixture(scope="module")
def studio(test_root, provider):
    env = {"STUDIO_POOL_WARMUP_SECONDS": "3", **oidc_env(provider.issuer)}
    with serving(test_root / "oidc-studio", env=env, pool=1) as server:
        yield server


@pytest.fixture(scope="module")
def shots():
    return artifacts("oidc-browser")


# -- the flow over HTTP ------------------------------------------------------------------------------


def begin(studio: StudioProcess, next_path: str = "/") -> tuple[httpx.Client, str]:
    """A 'browser' (an httpx client with a cookie jar) starts a sign-in: (it, the provider's authorize URL)."""
    browser = httpx.Client(base_url=studio.url, trust_env=False, timeout=30)
    response = browser.get("/login/oidc", params={"next": next_path})
    assert response.status_code == 303, response.text
    return browser, response.headers["location"]


def authorize(authorize_url: str, sub: str) -> str:
    """The provider's page, answered as its user would by clicking the user's button: the callback URL."""
    page = httpx.get(authorize_url, trust_env=False, timeout=30)
    assert page.status_code == 200 and sub in page.text, page.text[:500]
    response = httpx.post(authorize_url, data={"sub": sub}, trust_env=False, timeout=30)
    assert response.status_code == 302, response.text[:500]
    return response.headers["location"]


def sign_in(studio: StudioProcess, sub: str, next_path: str = "/") -> tuple[httpx.Client, httpx.Response]:
    browser, authorize_url = begin(studio, next_path)
    callback = authorize(authorize_url, sub)
    return browser, browser.get(callback)


def studio_cookie(browser: httpx.Client) -> str | None:
    return next((c.value for c in browser.cookies.jar if re.fullmatch(r"spark-studio-\d+", c.name)), None)


def alert(response: httpx.Response) -> str:
    found = re.search(r'role="alert">([^<]*)<', response.text)
    return found.group(1).replace("&#x27;", "'") if found else ""


def test_the_request_to_the_provider_carries_pkce_nonce_and_state(studio, provider):
    browser, authorize_url = begin(studio, "/api/workspaces")
    with contextlib.closing(browser):
        parts = urlsplit(authorize_url)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        assert f"{parts.scheme}://{parts.netloc}" == provider.issuer
        assert query["client_id"] == CLIENT_ID and query["response_type"] == "code"
        assert query["redirect_uri"] == f"{studio.url}/oauth/callback"
        assert query["scope"].split() == ["openid", "email", "profile"]
        assert query["code_challenge_method"] == "S256" and len(query["code_challenge"]) == 43
        assert len(query["state"]) >= 32 and len(query["nonce"]) >= 32
        assert CLIENT_SECRET not in authorize_url
        flow = next(c for c in browser.cookies.jar if c.name.startswith("spark-studio-oidc-"))
        assert flow.path == "/oauth/callback" and flow.has_nonstandard_attr("HttpOnly")
        assert CLIENT_SECRET not in flow.value


def test_an_allowed_user_is_signed_in_and_sent_on(studio):
    browser, response = sign_in(studio, "dave-sub", next_path="/api/workspaces")
    with contextlib.closing(browser):
        assert response.status_code == 200, response.text
        assert 'http-equiv="refresh" content="0;url=/api/workspaces"' in response.text
        assert studio_cookie(browser), "the Studio's own cookie is set"
        assert not any(c.name.startswith("spark-studio-oidc-") for c in browser.cookies.jar), "the flow cookie is dropped"
        me = browser.get("/api/whoami")
        assert me.status_code == 200 and me.json()["user"] == "dave", me.text
        assert browser.get("/api/workspaces").status_code == 200


def test_a_user_outside_the_allowed_domain_and_groups_is_refused(studio):
    browser, response = sign_in(studio, "mallory-sub")
    with contextlib.closing(browser):
        assert response.status_code == 403
        assert "Sign-in refused" in response.text
        assert alert(response) == (
            "mallory (mallory@evil.test) is not allowed to use this Studio: it lets in an e-mail address in "
            "example.com or membership of data-team. Ask its administrator for access."
        )
        assert studio_cookie(browser) is None
        assert browser.get("/api/workspaces").status_code == 401
    assert "mallory" not in users_of(studio)
    # In the trail as a failed single sign-on (not under the name: the trail names only known users).
    refused = studio.get("/api/audit", params={"action": "sign-in", "outcome": "403"}).json()["records"]
    assert refused and refused[0]["auth"] == "oidc" and refused[0]["detail"]["result"] == "failed", refused


def test_a_forged_or_mismatched_state_is_refused(studio):
    # A code for alice, sent back with a state this browser never started.
    browser, authorize_url = begin(studio)
    with contextlib.closing(browser):
        callback = authorize(authorize_url, "alice-sub")
        forged = re.sub(r"state=[^&]+", "state=forged-state", callback)
        response = browser.get(forged)
        assert response.status_code == 400
        assert "its state does not match a sign-in started in this browser" in alert(response)
        assert studio_cookie(browser) is None
    # The right state but in another browser (no flow cookie): a callback URL planted on a victim.
    stranger = httpx.Client(base_url=studio.url, trust_env=False, timeout=30)
    with contextlib.closing(stranger):
        response = stranger.get(callback)
        assert response.status_code == 400 and studio_cookie(stranger) is None
    # Two sign-ins in one browser: the first one's callback no longer matches.
    browser, first = begin(studio)
    with contextlib.closing(browser):
        first_callback = authorize(first, "alice-sub")
        browser.get("/login/oidc")  # a second sign-in started since (a new state in the cookie)
        response = browser.get(first_callback)
        assert response.status_code == 400 and studio_cookie(browser) is None
    # Replayed: a callback that worked once does not work again.
    browser, authorize_url = begin(studio)
    with contextlib.closing(browser):
        callback = authorize(authorize_url, "alice-sub")
        assert browser.get(callback).status_code == 200
        browser.cookies.clear()
        assert browser.get(callback).status_code == 400


def test_the_admin_group_gives_the_role_admin(studio):
    browser, response = sign_in(studio, "carol-sub")
    with contextlib.closing(browser):
        assert response.status_code == 200, response.text
        assert browser.get("/api/whoami").json() == {"user": "carol", "role": "admin"}
    roles = users_of(studio)
    assert roles["carol"] == ("admin", "oidc", "carol@partner.test")
    assert roles["dave"][0] == "user"


def users_of(studio: StudioProcess) -> dict[str, tuple[str, str, str | None]]:
    from studio.auth.users import Directory

    with Directory(studio.state_dir) as directory:
        return {user.name: (user.role, user.source, user.email) for user in directory.list_users()}


def test_settings_without_a_rule_keep_studio_serve_from_starting(tmp_path, provider):
    env = {**os.environ, **oidc_env(provider.issuer, STUDIO_OIDC_ALLOWED_DOMAINS="", STUDIO_OIDC_ALLOWED_GROUPS="")}
    env.pop("STUDIO_OIDC_ADMIN_GROUP")
    result = subprocess.run(
        [sys.executable, "-m", "studio", "serve", "--port", "0", "--state-dir", str(tmp_path / "state"), "--root", str(tmp_path / "root")],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "studio: single sign-on: single sign-on would let in everyone the provider signs in: set "
        "STUDIO_OIDC_ALLOWED_DOMAINS and/or STUDIO_OIDC_ALLOWED_GROUPS, or STUDIO_OIDC_ALLOW_ANY_USER=true if that "
        "is what you mean."
    )
    assert CLIENT_SECRET not in result.stderr + result.stdout
    assert not (tmp_path / "state" / "studio.db").exists(), "nothing started"


# -- the browser ---------------------------------------------------------------------------------------


def test_a_user_signs_in_with_the_provider_and_runs_spark_as_themselves(studio, context, shots):
    with shots_on_failure(context, shots):
        browser_story(studio, context, shots)


def browser_story(studio: StudioProcess, context, shots: Path) -> None:
    expect = playwright_api.expect
    expect.set_options(timeout=20_000)
    page = context.new_page()
    page.goto(studio.url)
    expect(page).to_have_url(re.compile(r"/login\?next=%2F$"))
    sso = page.get_by_role("link", name="Sign in with Test IdP")
    expect(sso).to_be_visible()
    page.screenshot(path=shots / "01-sign-in-page.png")
    sso.click()
    # The provider's own page: its predefined users are buttons.
    expect(page.get_by_role("heading", name="Authorize Client")).to_be_visible()
    page.screenshot(path=shots / "02-provider.png")
    callbacks = []
    page.on("request", lambda request: callbacks.append(request) if "/oauth/callback" in request.url else None)
    page.get_by_role("button", name="alice-sub").click()
    expect(page.get_by_role("heading", name="Workspaces")).to_be_visible()
    # The provider (localhost) sent the browser back from another site; the flow cookie (Lax) came along.
    assert len(callbacks) == 1 and callbacks[0].all_headers().get("sec-fetch-site") == "cross-site"
    assert "spark-studio-oidc-" in (callbacks[0].all_headers().get("cookie") or "")
    assert page.url.rstrip("/") == studio.url.rstrip("/")
    expect(page.locator(".signout .who")).to_have_text("alice")
    page.screenshot(path=shots / "03-signed-in.png", full_page=True)

    page.get_by_role("button", name="New workspace").click()
    form = page.locator("#create-form")
    form.get_by_label("Name").fill("alice-ws")
    form.get_by_role("button", name="Create workspace").click()
    row = page.locator("tr.ws-row", has_text="alice-ws")
    expect(row.locator("[data-role=state]")).to_have_text("Attached", timeout=120_000)
    with context.expect_page() as opened:
        row.get_by_role("link", name="Open JupyterLab").click()
    lab = opened.value
    lab.set_viewport_size({"width": 1366, "height": 860})
    launcher_card = lab.locator('.jp-LauncherCard[data-category="Notebook"]:visible', has_text="PySpark")
    expect(launcher_card).to_be_visible(timeout=120_000)
    launcher_card.click()
    panel = lab.locator(".jp-NotebookPanel:visible")
    expect(panel.locator(".jp-Toolbar-kernelName")).to_contain_text("PySpark")
    studio.wait_warm_pool()
    panel.locator(".jp-Cell .cm-content").first.click()
    lab.keyboard.type("spark.sparkContext.sparkUser()")
    lab.keyboard.press("Shift+Enter")
    expect(panel.locator(".jp-OutputArea-output", has_text="'alice'")).to_have_count(1, timeout=180_000)
    panel.locator(".jp-Cell .cm-content").nth(1).click()
    lab.keyboard.type("%%info")
    lab.keyboard.press("Shift+Enter")
    info = panel.locator(".jp-CodeCell").nth(1).locator(".jp-OutputArea-output")
    expect(info.first).to_contain_text("Current session configs", timeout=60_000)
    # the sessions table of %%info: its User column is the session's owner
    expect(info.locator("table tr", has_text="pyspark")).to_contain_text("alice")
    lab.screenshot(path=shots / "04-info-shows-alice.png")

    # The session belongs to alice, and the sign-in is in the audit trail.
    sessions = studio.get("/api/computes/local").json()["sessions"]
    assert [s.get("owner") for s in sessions if s["state"] in ("idle", "busy")] == ["alice"], sessions
    records = studio.get("/api/audit", params={"user": "alice", "action": "sign-in"}).json()["records"]
    assert records and all(r["auth"] == "oidc" and r["outcome"] == "200" for r in records), records
    assert records[0]["target"] == "/oauth/callback" and records[0]["detail"] == {"result": "ok"}, records[0]
    assert "code=" not in json.dumps(records) and "state=" not in json.dumps(records)
