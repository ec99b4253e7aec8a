"""The gate in front of both servers (studio/auth): Host, cross-site and content-type checks,
authentication, cookies and the token file. Through the real session-service app where the
answer is HTTP, directly where it is a function."""

from __future__ import annotations

import base64
import os
import stat
import time

import pytest
from starlette.datastructures import Headers
from starlette.testclient import TestClient

from studio.auth.gate import Gate, GateSettings, _safe_next, content_type_problem, host_names
from studio.auth.tokens import CookieSigner, load_or_create_token, same_secret, token_path

from .conftest import LIVY_BASE, TOKEN


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


# -- authentication ------------------------------------------------------------------------------


def test_only_version_and_health_answer_without_credentials(anonymous):
    assert anonymous.get("/version").status_code == 200
    assert anonymous.get("/health").json() == {"status": "ok"}
    response = anonymous.get("/sessions")
    assert response.status_code == 401
    assert response.json() == {
        "msg": "Authentication required: send a personal token (or the studio's token) as 'Authorization: Bearer "
        "<token>', or a user name with its password or personal token as HTTP Basic."
    }
    # the session service invites Basic too, as Livy's LDAP mode does
    assert response.headers.get_list("www-authenticate") == [
        'Basic realm="Spark Studio session service", charset="UTF-8"',
        'Bearer realm="Spark Studio session service"',
    ]
    assert anonymous.post("/sessions", json={}).status_code == 401
    assert anonymous.delete("/sessions/0").status_code == 401


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": f"Bearer {TOKEN}"},
        {"Authorization": f"token {TOKEN}"},  # Jupyter's scheme
        basic("anyone", TOKEN),  # sparkmagic's Basic_Access, the livy client's auth=(user, token)
        basic("", TOKEN),
    ],
    ids=["bearer", "jupyter-token", "basic", "basic-no-user"],
)
def test_the_token_opens_every_way_it_is_sent(anonymous, headers):
    response = anonymous.get("/studio/whoami", headers=headers)
    assert response.status_code == 200 and response.json() == {"user": "admin", "role": "admin"}


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {TOKEN}x"},
        basic(TOKEN, "wrong"),  # the token as the user name is not the password
        {"Authorization": "Basic not-base64!"},
        {"Authorization": "Basic " + base64.b64encode(TOKEN.encode()).decode()},  # no colon
        {"Authorization": f"Digest {TOKEN}"},
    ],
)
def test_anything_else_is_refused(anonymous, headers):
    response = anonymous.get("/sessions", headers=headers)
    assert response.status_code == 401
    assert response.json() == {"msg": "Authentication failed: the credential is not valid for this server."}


def test_a_browser_is_sent_to_the_login_page_and_a_token_url_becomes_a_cookie(anonymous):
    response = anonymous.get("/sessions?from=2", headers={"Sec-Fetch-Mode": "navigate"}, follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/login?next=%2Fsessions%3Ffrom%3D2"

    response = anonymous.get(f"/sessions?token={TOKEN}&size=1", follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/sessions?size=1"  # the token leaves the URL
    cookie = response.headers["set-cookie"]
    assert cookie.startswith("spark-studio-8998=") and "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert anonymous.get("/studio/whoami").json() == {"user": "admin", "role": "admin"}  # the client keeps the cookie

    anonymous.cookies.clear()
    response = anonymous.get("/sessions?token=wrong", headers={"Accept": "text/html"}, follow_redirects=False)
    assert response.headers["location"].endswith("&failed=1")


def test_the_login_form(anonymous):
    page = anonymous.get("/login?next=/sessions")
    assert page.status_code == 200 and 'name="next" value="/sessions"' in page.text
    assert page.headers["cache-control"] == "no-store"
    form = {"Content-Type": "application/x-www-form-urlencoded", "Origin": LIVY_BASE}
    wrong = anonymous.post("/login", content="token=nope&next=/sessions", headers=form)
    assert wrong.status_code == 401 and "are not valid for this server" in wrong.text
    right = anonymous.post("/login", content=f"token={TOKEN}&next=//evil.example/x", headers=form, follow_redirects=False)
    assert right.status_code == 303 and right.headers["location"] == "/"  # no open redirect
    assert anonymous.get("/studio/whoami").status_code == 200
    out = anonymous.post("/logout", headers={"Origin": LIVY_BASE}, follow_redirects=False)
    assert out.status_code == 303 and 'spark-studio-8998=""' in out.headers["set-cookie"]


@pytest.mark.parametrize(
    "target, safe",
    [("/sessions?from=1", "/sessions?from=1"), ("//evil.example", "/"), ("https://evil.example/", "/"),
     ("/\\evil.example", "/"), ("sessions", "/"), ("javascript:alert(1)", "/")],
)  # fmt: skip
def test_login_only_returns_to_this_server(target, safe):
    assert _safe_next(target) == safe


# -- Host ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1:8998", "localhost", "LOCALHOST:1", "[::1]:8998", "127.1.2.3", "app.localhost"])
def test_loopback_hosts_pass(livy, host):
    assert livy.get("/studio/whoami", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8998", "127.0.0.1.evil.example", "10.0.0.1"])
def test_other_hosts_are_refused_before_anything_else(anonymous, host):
    response = anonymous.get("/version", headers={"Host": host})
    assert response.status_code == 403
    assert response.json()["msg"].startswith(f"Host '{host}' is not a name of this server")


def test_allowed_hosts_and_the_bound_address(tmp_path):
    gate_settings = GateSettings(token="t", realm="r", bound_host="192.0.2.7", allowed_hosts=["Proxy.Example "])
    gate = Gate(app=None, settings=gate_settings)  # type: ignore[arg-type]
    assert gate.host_problem("proxy.example:443") is None
    assert gate.host_problem("192.0.2.7:8998") is None
    assert gate.host_problem("") == "The request has no Host header."
    assert gate.host_problem("other.example") is not None
    assert host_names("127.0.0.1", ["*"]) == (set(), True)


# -- cross-site and content type -----------------------------------------------------------------


@pytest.mark.parametrize(
    "headers, message",
    [
        ({"Origin": "http://evil.example"}, "Cross-origin request from http://evil.example refused."),
        ({"Origin": "null"}, "Cross-origin request from null refused."),
        ({"Origin": "http://127.0.0.1:8890"}, "Cross-origin request from http://127.0.0.1:8890 refused."),  # another port
        ({"Sec-Fetch-Site": "cross-site"}, "Cross-site request refused (Sec-Fetch-Site: cross-site)."),
        ({"Sec-Fetch-Site": "same-site"}, "Cross-site request refused (Sec-Fetch-Site: same-site)."),
    ],
)
def test_cross_site_changes_are_refused_even_with_the_token(livy, headers, message):
    for response in (livy.post("/sessions", json={}, headers=headers), livy.delete("/sessions/0", headers=headers)):
        assert response.status_code == 403
        assert response.json() == {"msg": message}
    # reading is not a change
    assert livy.get("/sessions", headers=headers).status_code == 200


def test_same_origin_changes_pass(livy):
    headers = {"Origin": LIVY_BASE, "Sec-Fetch-Site": "same-origin"}
    assert livy.post("/studio/sessions/check", json={}, headers=headers).json() == {"msg": "ok"}


def test_without_a_bearer_token_a_body_must_be_json(anonymous):
    auth = basic("me", TOKEN)
    form = anonymous.post("/studio/sessions/check", content="kind=pyspark",
                          headers={**auth, "Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
    assert form.status_code == 415
    assert form.json() == {
        "msg": "POST requests must send Content-Type: application/json (an empty JSON object is fine), not "
        "application/x-www-form-urlencoded; Livy clients may send X-Requested-By instead."
    }
    plain = anonymous.post("/studio/sessions/check", content="{}", headers=auth)
    assert plain.status_code == 415
    # Livy's X-Requested-By, a +json type, and a Bearer token (no page can make a browser send one) all pass
    for headers in (
        {**auth, "X-Requested-By": "sparkmagic"},
        {**auth, "Content-Type": "application/vnd.livy+json"},
        {"Authorization": f"Bearer {TOKEN}"},
    ):
        assert anonymous.post("/studio/sessions/check", content="{}", headers=headers).json() == {"msg": "ok"}


def test_a_delete_needs_no_body_but_a_body_must_be_json():
    assert content_type_problem("DELETE", Headers({})) is None
    assert content_type_problem("DELETE", Headers({"content-length": "0"})) is None
    assert content_type_problem("DELETE", Headers({"content-length": "3", "content-type": "application/json"})) is None
    assert content_type_problem("DELETE", Headers({"content-length": "3", "content-type": "text/plain"})) == (
        "A DELETE body must be JSON (Content-Type: application/json), or send none."
    )
    assert content_type_problem("PUT", Headers({"content-type": "application/json; charset=utf-8"})) is None


def test_every_answer_has_the_security_headers(anonymous):
    for response in (anonymous.get("/version"), anonymous.get("/sessions"), anonymous.get("/x", headers={"Host": "e.x"})):
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "same-origin"


def test_without_authentication_the_other_checks_stay(tmp_path):
    from studio.livy.app import create_app

    from .conftest import make_settings

    settings = make_settings(tmp_path, token=None, insecure_no_auth=True)
    with TestClient(create_app(settings), base_url=LIVY_BASE) as client:
        assert client.get("/studio/whoami").json() == {"user": "admin", "role": "admin"}
        assert client.get("/sessions", headers={"Host": "evil.example"}).status_code == 403
        assert client.post("/studio/sessions/check", json={}, headers={"Origin": "null"}).status_code == 403
        assert client.post("/studio/sessions/check", content="{}").status_code == 415


# -- cookies and the token file ------------------------------------------------------------------


def test_cookies_are_signed_with_the_token_and_expire():
    signer = CookieSigner("token-one")
    cookie = signer.sign("admin", max_age=60)
    assert signer.verify(cookie) == "admin"
    assert CookieSigner("token-two").verify(cookie) is None  # a new token signs every browser out
    payload, _, signature = cookie.partition(".")
    forged = base64.urlsafe_b64encode(b'{"u":"root","exp":9999999999}').rstrip(b"=").decode()
    assert signer.verify(f"{forged}.{signature}") is None
    assert signer.verify(f"{payload}.{signature[:-2]}AA") is None
    for damaged in ("", ".", "abc", f"{payload}.", f".{signature}", "!!.!!"):
        assert signer.verify(damaged) is None
    assert signer.verify(signer.sign("admin", max_age=-1)) is None
    assert "admin" not in cookie and "token-one" not in cookie


def test_the_token_file_is_made_once_private_and_shared(tmp_path):
    state = tmp_path / "state"
    token = load_or_create_token(state)
    assert len(token) >= 40
    assert stat.S_IMODE(token_path(state).stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert load_or_create_token(state) == token  # `studio serve` and `studio livy` share it
    os.chmod(token_path(state), 0o644)
    assert load_or_create_token(state) == token
    assert stat.S_IMODE(token_path(state).stat().st_mode) == 0o600  # loose modes are tightened
    assert load_or_create_token(state, "configured") == "configured"  # STUDIO_TOKEN wins
    token_path(state).write_text("")
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="is empty; delete it and start again"):
        load_or_create_token(state)
    assert time.monotonic() - started < 5


def test_secrets_compare_in_constant_time_and_take_any_text():
    assert same_secret("abc", "abc") and not same_secret("abc", "abd") and not same_secret("", "abc")
    assert not same_secret("\udcff", "abc")  # a surrogate from a header decode does not raise
