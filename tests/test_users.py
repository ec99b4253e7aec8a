"""Users, personal tokens and sign-in through the real servers.

A `studio serve` with its embedded `studio livy` (no warm pool: no JVM) shares one users'
directory with it: users made by `studio users add` (its last line is the first token) and by the
API sign in to both with a password (form and HTTP Basic), with HTTP Basic and their personal
token, and with the token as a Bearer; a revoked token gets 401 at once, a removed user's browser
is signed out. In a real browser an admin adds a user on the Users page and a user makes and
revokes a token on the Tokens page. Then, on the shared warm session service: the `livy` client
from PyPI with ``auth=(user, token)``, sparkmagic's own HTTP client with its ``Basic_Access``
authenticator, and `studio run` with STUDIO_LIVY_USER/STUDIO_LIVY_TOKEN, each acting as the user.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import nbformat
import pytest
from livy import LivySession, SessionKind

from conftest import shared_service
from browser_helpers import chromium, needs_chromium
from helpers import REPO
from sparkmagic_notebook import sparkmagic_python
from workspace_helpers import serving

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
ROLE_USER = "user"


def studio_cli(*args: str, state_dir: Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "studio", *args, "--state-dir", str(state_dir)],
        input=stdin, capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip


def add_user(name: str, state_dir: Path, password: str | None = None, admin: bool = False) -> str:
    """`studio users add` (with or without a server running): the token on its last line."""
    args = ["users", "add", name, *(["--admin"] if admin else []), *(["--password-stdin"] if password else [])]
    result = studio_cli(*args, state_dir=state_dir, stdin=f"{password}\n" if password else None)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-1].startswith("sst_") and all(lines[-1] not in line for line in lines[:-1])
    assert password is None or password not in result.stdout
    return lines[-1]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def whoami(url: str, path: str, **kwargs) -> tuple[int, dict]:
    response = httpx.get(url + path, timeout=30, trust_env=False, **kwargs)
    return response.status_code, response.json()


@pytest.fixture(scope="module")
def studio(test_root):
    with serving(test_root / "users", pool=0) as server:
        yield server


@pytest.fixture(scope="module")
def livy_url(studio) -> str:
    """The embedded session service: it reads the same users' directory (STUDIO_IDENTITY_DIR)."""
    url = studio.get("/api/status").json()["embeddedSessionService"]
    assert url
    return url


def test_a_user_added_on_the_command_line_signs_in_every_way(studio, livy_url):
    token = add_user("ursula", studio.state_dir, password="ursula's password")  # while the server runs
    ursula = {"user": "ursula", "role": ROLE_USER}
    for url, path in ((studio.url, "/api/whoami"), (livy_url, "/studio/whoami")):
        assert whoami(url, path, headers=bearer(token)) == (200, ursula), url
        assert whoami(url, path, auth=("ursula", token)) == (200, ursula), url
        assert whoami(url, path, auth=("ursula", "ursula's password")) == (200, ursula), url
        assert whoami(url, path, auth=("admin", studio.token)) == (200, {"user": "admin", "role": "admin"}), url
        assert whoami(url, path, headers=bearer(studio.token))[1]["user"] == "admin"
        for wrong in (("ursula", "nope"), ("victor", token), ("admin", "ursula's password")):
            assert whoami(url, path, auth=wrong)[0] == 401, (url, wrong)
    # the browser: the form takes the user name and password, and the cookie is ursula's
    with httpx.Client(base_url=studio.url, timeout=30, trust_env=False) as browser:
        signed = browser.post(
            "/login", content="user=ursula&token=ursula%27s+password&next=/", headers={**FORM, "Origin": studio.url}
        )
        assert signed.status_code == 303 and signed.headers["location"] == "/"
        assert browser.get("/api/whoami").json() == ursula
        page = browser.get("/", headers={"Accept": "text/html"})
        assert page.status_code == 200 and 'href="/tokens"' in page.text and 'href="/users"' not in page.text
        assert browser.get("/api/users").status_code == 403  # not an admin


def test_users_and_tokens_over_the_api_revoked_and_removed_at_once(studio, livy_url):
    admin = bearer(studio.token)
    made = httpx.post(studio.url + "/api/users", json={"name": "victor", "password": "victor's password"}, headers=admin, timeout=60)
    assert made.status_code == 201, made.text
    first = made.json()["token"]["secret"]
    assert "argon2" not in made.text and "victor's password" not in made.text
    victor = {"user": "victor", "role": ROLE_USER}
    assert whoami(livy_url, "/studio/whoami", headers=bearer(first)) == (200, victor)

    # a token of his own, revoked on the command line while both servers run: 401 at once on both
    own = httpx.post(studio.url + "/api/tokens", json={"note": "ci", "expires_days": 7}, headers=bearer(first), timeout=30).json()
    for url, path in ((studio.url, "/api/whoami"), (livy_url, "/studio/whoami")):
        assert whoami(url, path, auth=("victor", own["secret"])) == (200, victor)
    listed = studio_cli("tokens", "list", "--user", "victor", state_dir=studio.state_dir)
    assert own["id"] in listed.stdout and own["secret"] not in listed.stdout and "ci" in listed.stdout
    revoked = studio_cli("tokens", "revoke", own["id"], state_dir=studio.state_dir)
    assert revoked.returncode == 0, revoked.stderr
    for url, path in ((studio.url, "/api/whoami"), (livy_url, "/studio/whoami")):
        assert whoami(url, path, headers=bearer(own["secret"]))[0] == 401
        assert whoami(url, path, auth=("victor", own["secret"]))[0] == 401

    # a role change applies to his signed-in browser at its next request; removing him signs it out
    with httpx.Client(base_url=studio.url, timeout=30, trust_env=False) as browser:
        signed = browser.post("/login", content="user=victor&token=victor%27s+password", headers={**FORM, "Origin": studio.url})
        assert signed.status_code == 303
        assert browser.get("/api/whoami").json() == victor
        assert studio_cli("users", "set-role", "victor", "admin", state_dir=studio.state_dir).returncode == 0
        assert browser.get("/api/whoami").json() == {"user": "victor", "role": "admin"}
        assert browser.get("/api/users").status_code == 200
        removed = httpx.delete(studio.url + "/api/users/victor", headers=admin, timeout=30)
        assert removed.json() == {"msg": "deleted", "name": "victor"}
        assert browser.get("/api/whoami").status_code == 401
        page = browser.get("/", headers={"Accept": "text/html", "Sec-Fetch-Mode": "navigate"})
        assert page.status_code == 303 and page.headers["location"].startswith("/login")
    assert whoami(livy_url, "/studio/whoami", headers=bearer(first))[0] == 401
    users = studio_cli("users", "list", state_dir=studio.state_dir).stdout
    assert "ursula" in users and "victor" not in users


# -- the pages in a real browser ---------------------------------------------------------------------


@needs_chromium
def test_the_users_and_tokens_pages_in_a_browser(studio):
    playwright_api = pytest.importorskip("playwright.sync_api", reason="the test extra installs playwright")
    expect = playwright_api.expect
    expect.set_options(timeout=20_000)
    with chromium() as browser:
        admin = browser.new_context()
        page = admin.new_page()
        page.goto(studio.url + "/users")
        page.get_by_label("Password or token").fill(studio.token)  # admin: no user name, the studio's token
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_role("heading", name="Users")).to_be_visible()
        page.get_by_role("button", name="Add user").click()
        form = page.locator("#user-form")
        form.get_by_label("Name").fill("../etc")
        form.get_by_role("button", name="Add user").click()
        expect(form.locator(".form-error")).to_contain_text("not a valid user name")
        form.get_by_label("Name").fill("wendy")
        form.get_by_label("Password").fill("wendy's password")
        form.get_by_role("button", name="Add user").click()
        expect(page.locator("#secret-panel")).to_be_visible()
        token = page.locator("#secret-value").input_value()
        assert token.startswith("sst_")
        assert whoami(studio.url, "/api/whoami", headers=bearer(token)) == (200, {"user": "wendy", "role": "user"})
        row = page.locator("#user-rows tr[data-name=wendy]")
        expect(row).to_contain_text("password or token")
        row.get_by_label("Role of wendy").select_option("admin")
        expect(page.locator("#flash")).to_contain_text("wendy is now an admin")
        assert whoami(studio.url, "/api/whoami", headers=bearer(token))[1]["role"] == "admin"
        page.locator("#user-rows tr[data-name=wendy]").get_by_role("button", name="Reset password").click()
        page.locator("#password-dialog").get_by_role("button", name="Set password").click()  # empty: generated
        expect(page.locator("#secret-panel [data-field=title]")).to_contain_text("New password of wendy")
        generated = page.locator("#secret-value").input_value()
        assert whoami(studio.url, "/api/whoami", auth=("wendy", generated))[0] == 200
        assert whoami(studio.url, "/api/whoami", auth=("wendy", "wendy's password"))[0] == 401

        # wendy signs in with that password and makes, then revokes, a token of her own
        own = browser.new_context()
        mine = own.new_page()
        mine.goto(studio.url + "/tokens")
        mine.get_by_label("User name").fill("wendy")
        mine.get_by_label("Password or token").fill(generated)
        mine.get_by_role("button", name="Sign in").click()
        expect(mine.get_by_role("heading", name="Your tokens")).to_be_visible()
        mine.get_by_role("button", name="New token").click()
        mine.locator("#token-form").get_by_label("Note").fill("<b>laptop</b>")
        mine.locator("#token-form").get_by_label("Expires after").fill("30")
        mine.locator("#token-form").get_by_role("button", name="Create token").click()
        expect(mine.locator("#secret-panel")).to_be_visible()
        secret = mine.locator("#secret-value").input_value()
        assert whoami(studio.url, "/api/whoami", auth=("wendy", secret))[0] == 200
        row = mine.locator("#token-rows tr", has_text="<b>laptop</b>")  # text, not markup
        expect(row).to_contain_text("in 30")
        mine.on("dialog", lambda dialog: dialog.accept())
        row.get_by_role("button", name="Revoke").click()
        expect(mine.locator("#flash")).to_contain_text("revoked")
        assert whoami(studio.url, "/api/whoami", auth=("wendy", secret))[0] == 401

        # the admin removes her: her browser is signed out at its next request
        page.on("dialog", lambda dialog: dialog.accept())
        page.locator("#user-rows tr[data-name=wendy]").get_by_role("button", name="Remove").click()
        expect(page.locator("#user-rows tr[data-name=wendy]")).to_have_count(0)
        mine.reload()
        expect(mine).to_have_url(re.compile(r"/login\?next=%2Ftokens$"))


# -- clients on the shared warm session service ------------------------------------------------------


@pytest.fixture(scope="module")
def service(warm_service):
    yield from shared_service(warm_service, ready=2)  # the livy client's session and the run's each take one


@pytest.fixture(scope="module")
def xavier(service) -> str:
    """A user of the shared session service, made in its state directory while it runs."""
    return add_user("xavier", service.state_dir, password="xavier's password")


SPARKMAGIC_BASIC = """
import json, sys, time
from sparkmagic.auth.basic import Basic
from sparkmagic.livyclientlib.endpoint import Endpoint
from sparkmagic.livyclientlib.exceptions import HttpClientException
from sparkmagic.livyclientlib.livyreliablehttpclient import LivyReliableHttpClient

url, user, token, session_id = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
def client(password):
    basic = Basic()  # what sparkmagic builds for "auth": "Basic_Access"
    basic.username, basic.password = user, password
    return LivyReliableHttpClient.from_endpoint(Endpoint(url, basic))
try:
    client("not-" + token).get_sessions()
    print("wrong ok")
except HttpClientException as exc:
    print("wrong refused", "401" in str(exc))
http = client(token)
statement = http.post_statement(session_id, {"code": "print('sparkmagic says', spark.range(4).count())"})
while True:
    result = http.get_statement(session_id, statement["id"])
    if result["state"] in ("available", "error", "cancelled"):
        break
    time.sleep(0.2)
print("statement", json.dumps(result["output"]))
"""


def test_the_livy_client_and_sparkmagic_act_as_the_user(service, xavier, tmp_path):
    with LivySession.create(service.url, auth=("xavier", xavier), kind=SessionKind.PYSPARK) as session:
        assert session.run("spark.range(3).count()").text == "3"
        record = httpx.get(f"{service.url}/sessions/{session.session_id}", headers=bearer(xavier), timeout=30).json()
        assert record["owner"] == "xavier"
        env = {**os.environ, "SPARKMAGIC_CONF_DIR": str(tmp_path)}
        env.pop("PYTHONPATH", None)
        result = subprocess.run(
            [str(sparkmagic_python()), "-c", SPARKMAGIC_BASIC, service.url, "xavier", xavier, str(session.session_id)],
            capture_output=True, text=True, timeout=300, env=env,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        lines = result.stdout.strip().splitlines()
        assert lines[0] == "wrong refused True", result.stdout
        output = json.loads(lines[1].split(" ", 1)[1])
        assert output["status"] == "ok" and "sparkmagic says 4" in output["data"]["text/plain"], output


def test_studio_run_acts_as_the_user_with_a_personal_token(service, xavier, tmp_path):
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell("print('rows', spark.range(6).count())"), nbformat.v4.new_code_cell("%%info")]
    notebook.metadata["kernelspec"] = {"name": "pyspark", "display_name": "PySpark", "language": "python"}
    path = tmp_path / "mine.ipynb"
    nbformat.write(notebook, path)

    def run(token: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "TMPDIR": str(tmp_path), "STUDIO_LIVY_USER": "xavier", "STUDIO_LIVY_TOKEN": token}
        env.pop("STUDIO_TOKEN", None)
        return subprocess.run(
            [sys.executable, "-m", "studio", "run", str(path), "--livy-url", service.url],
            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600,
        )  # fmt: skip

    result = run(xavier)
    assert result.returncode == 0, result.stderr[-3000:]
    executed = nbformat.read(tmp_path / "mine.output.ipynb", as_version=4)
    assert "rows 6" in "".join(str(o.get("text", "")) for o in executed.cells[0].outputs)
    info = "".join(str(o.get("data", {}).get("text/html", "")) for o in executed.cells[1].outputs)
    assert "<td>xavier</td>" in info, info  # the session's owner: the token's user
    made = add_user("yara", service.state_dir)
    refused = run(made)  # a token of someone else, with the name xavier: refused before any session starts
    assert refused.returncode != 0
    assert "Authentication failed" in refused.stderr or "401" in refused.stderr, refused.stderr[-2000:]
