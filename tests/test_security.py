"""Closed by default: both servers, as `studio livy` and `studio serve` start them, refuse what a
drive-by web page, a DNS-rebinding page or a client without the token could do.

Every route of both apps is checked from their route tables, so a route added later without the
gate fails here. The checks run against real servers on loopback ports; the session service's
workers are a small program that never starts Spark (nothing here needs a JVM).
"""

from __future__ import annotations

import json
import os
import pty
import re
import shutil
import subprocess
import sys
import time

import httpx
import pytest

from conftest import start_service
from helpers import REPO, auth_headers
from workspace_helpers import StudioProcess

NEVER_READY = {
    "STUDIO_POOL_SIZE": "0",
    "STUDIO_WORKER_COMMAND": json.dumps([sys.executable, str(REPO / "tests" / "workers" / "misbehaving.py")]),
    "STUDIO_TEST_WORKER": "never-ready",
    "STUDIO_WORKER_START_TIMEOUT": "600",
    "STUDIO_STOP_TIMEOUT": "1",
    "STUDIO_ALLOWED_HOSTS": "studio.example.org",
}
EVIL = "https://evil.example"


@pytest.fixture(scope="module")
def livy(test_root):
    service = start_service(test_root, "security-livy", env=NEVER_READY)
    yield service
    assert service.stop() == 0


@pytest.fixture(scope="module")
def studio(test_root, livy):
    server = StudioProcess(test_root / "security-studio", env={"STUDIO_LIVY_TOKEN": livy.token}, livy_url=livy.url).start()
    yield server
    assert server.stop() == 0


def raw(method: str, url: str, **kwargs) -> httpx.Response:
    return httpx.request(method, url, timeout=30, trust_env=False, follow_redirects=False, **kwargs)


def sessions(livy) -> list[dict]:
    return livy.get("/sessions").json()["sessions"]


def fill(path: str) -> str:
    return re.sub(r"\{(\w+)(:\w+)?\}", lambda m: "html" if m.group(1) == "kind" else "1", path)


def routes_of(app_routes) -> list[tuple[str, str]]:
    from starlette.routing import Mount, Route

    found = []
    for route in app_routes:
        if isinstance(route, Route):
            found += [(method, fill(route.path)) for method in sorted(route.methods or ()) if method != "HEAD"]
        elif isinstance(route, Mount):
            found.append(("GET", route.path + "/studio.css"))
    return found


# -- authentication --------------------------------------------------------------------------------


def test_every_route_needs_the_token_except_version_health_and_login(livy, studio):
    from studio.livy.app import ALL_ROUTES as LIVY_ROUTES
    from studio.workspaces.app import ALL_ROUTES as STUDIO_ROUTES

    for base, table in ((livy.url, LIVY_ROUTES), (studio.url, STUDIO_ROUTES)):
        for method, path in routes_of(table):
            response = raw(method, base + path, headers={"Content-Type": "application/json"}, content=b"{}" if method != "GET" else None)
            if path in ("/version", "/health"):
                assert response.status_code == 200, (base, method, path, response.text)
                continue
            assert response.status_code == 401, (base, method, path, response.status_code, response.text)
            assert set(response.json()) == {"msg"} and "Authentication required" in response.json()["msg"]
            assert "Bearer" in response.headers["www-authenticate"]
    # The session service also invites HTTP Basic, as Livy's own LDAP mode does.
    challenges = raw("GET", livy.url + "/sessions").headers.get_list("www-authenticate")
    assert challenges[0].startswith('Basic realm="Spark Studio session service"') and challenges[1].startswith("Bearer")
    assert raw("GET", studio.url + "/login").status_code == 200


def test_livy_clients_authenticate_with_bearer_basic_or_curl(livy):
    url = livy.url + "/sessions"
    assert raw("GET", url, headers=auth_headers(livy.token)).status_code == 200
    assert raw("GET", url, headers={"Authorization": f"token {livy.token}"}).status_code == 200
    assert raw("GET", url, auth=("any-user-name", livy.token)).status_code == 200
    for bad in ({"Authorization": "Bearer nope"}, {"Authorization": "Basic !!!"}, {"Authorization": "Bearer"}):
        refused = raw("GET", url, headers=bad)
        assert refused.status_code == 401 and refused.json()["msg"].startswith("Authentication"), bad
    assert raw("GET", url, auth=("user", "wrong")).status_code == 401
    curl = shutil.which("curl")
    if curl:  # plain curl -u, as an operator would try it
        ok = subprocess.run([curl, "-s", "-u", f"me:{livy.token}", url], capture_output=True, text=True, timeout=30)
        assert json.loads(ok.stdout)["total"] >= 0
        no = subprocess.run([curl, "-s", "-o", "/dev/null", "-w", "%{http_code}", url], capture_output=True, text=True, timeout=30)
        assert no.stdout == "401"


def test_the_owner_comes_from_authentication_not_from_a_header(livy):
    with livy.http() as http:
        created = http.post("/sessions", json={"kind": "pyspark"}, headers={"X-Studio-User": "mallory"}).json()
        try:
            assert created["owner"] == "admin"
            assert http.get("/studio/whoami").json() == {"user": "admin", "role": "admin"}
        finally:
            http.delete(f"/sessions/{created['id']}")


# -- cross-site requests --------------------------------------------------------------------------


def test_simple_cross_site_requests_never_reach_the_session_service(livy):
    before = len(sessions(livy))
    body = json.dumps({"kind": "pyspark", "name": "drive-by"})
    # What a page can send without a preflight: text/plain or a form, with an Origin the browser sets.
    attempts = [
        ({"Content-Type": "text/plain", "Origin": EVIL}, 403),
        ({"Content-Type": "application/x-www-form-urlencoded", "Origin": EVIL}, 403),
        ({"Content-Type": "text/plain", "Origin": "null"}, 403),
        ({"Content-Type": "text/plain", "Sec-Fetch-Site": "cross-site"}, 403),
        ({"Content-Type": "text/plain", "Sec-Fetch-Site": "same-site"}, 403),  # another port of 127.0.0.1
        ({"Content-Type": "text/plain"}, 415),
        ({"Content-Type": "multipart/form-data; boundary=x"}, 415),
        ({}, 415),
    ]
    for headers, status in attempts:
        # Even with HTTP Basic credentials, which a browser remembers and sends by itself.
        response = raw("POST", livy.url + "/sessions", headers=headers, content=body, auth=("u", livy.token))
        assert response.status_code == status, (headers, response.status_code, response.text)
        assert response.json()["msg"]
    assert len(sessions(livy)) == before
    # Statements sent the same way are refused too (sessions are addressable by name).
    with livy.http() as http:
        session = http.post("/sessions", json={"kind": "pyspark", "name": "victim"}).json()
        try:
            statement = raw(
                "POST", f"{livy.url}/sessions/victim/statements", content='{"code": "1"}',
                headers={"Content-Type": "text/plain", "Origin": EVIL}, auth=("u", livy.token),
            )
            assert statement.status_code == 403
            # Livy's CSRF convention still works for clients that send it, and JSON with a same-origin Origin.
            assert raw("DELETE", f"{livy.url}/sessions/999", headers={"X-Requested-By": "ops"}, auth=("u", livy.token)).status_code == 404
            same = raw("POST", f"{livy.url}/sessions/victim/statements", json={"code": "1"},
                       headers={"Origin": livy.url}, auth=("u", livy.token))
            assert same.status_code == 409  # accepted by the gate; the session is still starting
        finally:
            http.delete(f"/sessions/{session['id']}")


def test_studio_refuses_cross_site_changes_even_with_its_cookie(studio):
    with httpx.Client(base_url=studio.url, trust_env=False, follow_redirects=False, timeout=30) as browser:
        signed_in = browser.get(f"/?token={studio.token}")
        assert signed_in.status_code == 303 and signed_in.headers["location"] == "/"
        cookie = signed_in.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
        assert browser.get("/api/workspaces").status_code == 200  # the cookie signs it in
        attempts = [
            ({"Content-Type": "application/json", "Origin": EVIL}, 403),
            ({"Content-Type": "application/json", "Origin": "null"}, 403),
            ({"Content-Type": "application/json", "Origin": "http://127.0.0.1:1"}, 403),  # same site, other origin
            ({"Content-Type": "application/json", "Sec-Fetch-Site": "same-site"}, 403),
            ({"Content-Type": "text/plain"}, 415),  # no Origin: still not JSON, still refused
            ({"Content-Type": "application/x-www-form-urlencoded", "Origin": studio.url}, 415),
        ]
        for headers, status in attempts:
            response = browser.post("/api/workspaces", content=json.dumps({"name": "drive-by"}), headers=headers)
            assert response.status_code == status, (headers, response.status_code, response.text)
        assert [w for w in browser.get("/api/workspaces").json()["workspaces"] if w["name"] == "drive-by"] == []
        # The Studio's own page: JSON, same origin.
        own = browser.post("/api/workspaces", json={"name": "own-page"}, headers={"Origin": studio.url, "Sec-Fetch-Site": "same-origin"})
        assert own.status_code == 201, own.text
        assert browser.delete(f"/api/workspaces/{own.json()['id']}", headers={"Origin": studio.url}).status_code == 200
        # Signing out ends the cookie.
        out = browser.post("/logout", headers={"Origin": studio.url})
        assert out.status_code == 303 and "Max-Age=0" in out.headers["set-cookie"]
        browser.cookies.clear()
        assert browser.get("/api/workspaces").status_code == 401


def test_a_foreign_host_is_refused_dns_rebinding(livy, studio):
    for base, headers in ((livy.url, auth_headers(livy.token)), (studio.url, auth_headers(studio.token))):
        for host in ("evil.example", "evil.example:80", "127.0.0.1.evil.example"):
            response = raw("GET", base + ("/sessions" if base == livy.url else "/api/workspaces"), headers={**headers, "Host": host})
            assert response.status_code == 403 and "not a name of this server" in response.json()["msg"], (base, host)
            assert "token" not in response.text.replace("STUDIO_ALLOWED_HOSTS", "")
    # Loopback names and names the operator allows are fine.
    for host in ("localhost", "127.0.0.1", "[::1]", "studio.example.org"):
        assert raw("GET", livy.url + "/sessions", headers={**auth_headers(livy.token), "Host": host}).status_code == 200, host


def test_browsers_sign_in_once_and_are_never_redirected_elsewhere(studio):
    page = raw("GET", studio.url + "/", headers={"Accept": "text/html", "Sec-Fetch-Mode": "navigate"})
    assert page.status_code == 303 and page.headers["location"] == "/login?next=%2F"
    form = raw("GET", studio.url + "/login?next=/api/status")
    assert form.status_code == 200 and 'name="token"' in form.text and 'value="/api/status"' in form.text
    login = {"Content-Type": "application/x-www-form-urlencoded", "Origin": studio.url}
    wrong = raw("POST", studio.url + "/login", headers=login, content="token=nope&next=/")
    assert wrong.status_code == 401 and "not valid" in wrong.text and "set-cookie" not in wrong.headers
    for target, expected in (("/api/status", "/api/status"), ("//evil.example/x", "/"), ("https://evil.example", "/"), ("/\\evil", "/")):
        body = httpx.QueryParams({"token": studio.token, "next": target})
        ok = raw("POST", studio.url + "/login", headers=login, content=str(body))
        assert ok.status_code == 303 and ok.headers["location"] == expected, target
    # A cross-site login form (login CSRF) is refused like any other cross-site change.
    assert raw("POST", studio.url + "/login", headers={**login, "Origin": EVIL}, content=f"token={studio.token}").status_code == 403
    # A tampered or foreign cookie signs nobody in.
    name = ok.headers["set-cookie"].split("=", 1)[0]
    value = ok.headers["set-cookie"].split("=", 1)[1].split(";")[0]
    payload, signature = value.split(".")
    for forged in (f"{payload}.{signature[:-2]}AA", f"{payload}x.{signature}", "garbage"):
        assert raw("GET", studio.url + "/api/status", headers={"Cookie": f"{name}={forged}"}).status_code == 401
    assert raw("GET", studio.url + "/api/status", headers={"Cookie": f"{name}={value}"}).status_code == 200
    # Responses carry no framing and no Referer (a ?token= URL must not leak into another site's logs).
    headers = raw("GET", studio.url + "/api/status", headers=auth_headers(studio.token)).headers
    assert headers["x-frame-options"] == "DENY" and headers["referrer-policy"] == "same-origin"


def test_the_token_is_private_and_printed_only_to_a_terminal(tmp_path):
    """`studio livy` generates its token once (0600); a terminal gets the ready-to-click URL, a log never does."""
    state = tmp_path / "state"
    command = [sys.executable, "-P", "-m", "studio", "livy", "--port", "0", "--pool", "0", "--state-dir", str(state)]
    env = {k: v for k, v in os.environ.items() if k != "STUDIO_TOKEN"}
    primary, secondary = pty.openpty()
    process = subprocess.Popen(command, stdout=secondary, stderr=subprocess.DEVNULL, env={**env, "STUDIO_CDS": "false"}, cwd=tmp_path)
    os.close(secondary)
    try:
        text = ""
        deadline = time.monotonic() + 60
        while "?token=" not in text and time.monotonic() < deadline:
            try:
                text += os.read(primary, 4096).decode(errors="replace")
            except OSError:
                break
        token = (state / "token").read_text().strip()
        assert len(token) >= 32 and (state / "token").stat().st_mode & 0o777 == 0o600
        assert f"?token={token}" in text, text
    finally:
        process.terminate()
        process.wait(60)
        os.close(primary)
    # Started again with its output going to a file: the same token, and the file says where it is, not what.
    # (Its ready file tells when it listens; the line it prints is for people.)
    ready = tmp_path / "ready.json"
    with open(tmp_path / "out.log", "w") as log:
        process = subprocess.Popen(
            [*command, "--ready-file", str(ready)], stdout=log, stderr=subprocess.STDOUT, env={**env, "STUDIO_CDS": "false"}, cwd=tmp_path
        )
        try:
            deadline = time.monotonic() + 60
            while not ready.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            info = json.loads(ready.read_text())
            assert info["pid"] == process.pid and info["url"].startswith("http://127.0.0.1:")
            assert ready.stat().st_mode & 0o777 == 0o600 and token not in ready.read_text()
        finally:
            process.terminate()
            process.wait(60)
    assert not ready.exists(), "a server that no longer listens leaves no ready file"
    logged = (tmp_path / "out.log").read_text()
    assert f"listening on {info['url']}" in logged and str(state / "token") in logged and token not in logged
    assert (state / "token").read_text().strip() == token


def test_authentication_can_be_turned_off_only_on_loopback(tmp_path):
    command = [sys.executable, "-P", "-m", "studio", "livy", "--insecure-no-auth", "--host", "0.0.0.0", "--port", "0", "--state-dir", str(tmp_path)]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert refused.returncode != 0 and "refusing to bind to 0.0.0.0 with --insecure-no-auth" in refused.stderr
    service = start_service(tmp_path, "open-livy", env={"STUDIO_POOL_SIZE": "0"}, args=["--insecure-no-auth"])
    try:
        assert raw("GET", service.url + "/sessions").status_code == 200  # no credentials needed, on loopback only
        # The cross-site walls stay up without authentication.
        blocked = raw("POST", service.url + "/sessions", content="{}", headers={"Content-Type": "text/plain", "Origin": EVIL})
        assert blocked.status_code == 403
        assert raw("GET", service.url + "/sessions", headers={"Host": "evil.example"}).status_code == 403
    finally:
        assert service.stop() == 0
