"""Users through the gate and the users' API, in-process: the real apps of both servers (Starlette's
TestClient, real lifespan, real users.db) with the users made in their identity directory."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from studio.auth.gate import gate
from studio.auth.users import Directory
from studio.config import Settings

from .conftest import AUTH, LIVY_BASE, STUDIO_BASE, TOKEN, make_settings

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def people(settings: Settings) -> Iterator[dict[str, str]]:
    """alice (user, password), bob (admin, no password): their first tokens."""
    with Directory.for_settings(settings) as directory:
        _, alice = directory.add_user("alice", password="alice's password")
        _, bob = directory.add_user("bob", role="admin")
    yield {"alice": alice, "bob": bob}


@pytest.fixture
def livy_anonymous(settings: Settings, people) -> Iterator[TestClient]:
    from studio.livy.app import create_app

    with TestClient(create_app(settings), base_url=LIVY_BASE) as client:
        yield client


def whoami(client: TestClient, headers: dict[str, str] | None = None) -> tuple[int, object]:
    response = client.get("/studio/whoami", headers=headers or {})
    return response.status_code, response.json()


def test_every_way_a_user_authenticates_to_the_session_service(livy_anonymous, people, settings):
    client = livy_anonymous
    alice = {"user": "alice", "role": "user"}
    assert whoami(client, basic("alice", "alice's password")) == (200, alice)
    assert whoami(client, basic("Alice", "alice's password")) == (200, alice)  # names are lowercase
    assert whoami(client, basic("alice", people["alice"])) == (200, alice)
    assert whoami(client, bearer(people["alice"])) == (200, alice)
    assert whoami(client, bearer(people["bob"])) == (200, {"user": "bob", "role": "admin"})
    assert whoami(client, basic("admin", TOKEN)) == (200, {"user": "admin", "role": "admin"})
    refused = (
        basic("alice", "wrong"),
        basic("bob", people["alice"]),  # a token is the password of its own user only
        basic("", people["alice"]),
        basic("bob", ""),  # no password
        basic("admin", "alice's password"),
        basic("nobody", "alice's password"),
        bearer(people["alice"] + "x"),
        bearer("sst_" + "A" * 43),
    )
    for headers in refused:
        status, body = whoami(client, headers)
        assert status == 401 and body == {"msg": "Authentication failed: the credential is not valid for this server."}, headers

    with Directory.for_settings(settings) as directory:
        token_id = directory.list_tokens("alice")[0].id
        directory.revoke_token(token_id)
        assert whoami(client, bearer(people["alice"]))[0] == 401  # at once
        assert whoami(client, basic("alice", people["alice"]))[0] == 401
        directory.set_role("alice", "admin")
        assert whoami(client, basic("alice", "alice's password")) == (200, {"user": "alice", "role": "admin"})
        directory.remove_user("bob")
        assert whoami(client, bearer(people["bob"]))[0] == 401


def test_the_sign_in_form_takes_a_user_name_and_password(livy_anonymous, settings):
    client = livy_anonymous
    page = client.get("/login?next=/sessions")
    assert 'name="user"' in page.text and 'name="token"' in page.text and "<script" not in page.text
    headers = {**FORM, "Origin": LIVY_BASE}
    wrong = client.post("/login", content="user=alice&token=nope&next=/sessions", headers=headers)
    assert wrong.status_code == 401 and "not valid" in wrong.text and "set-cookie" not in wrong.headers
    # the studio's token signs in admin only, never as another name
    assert client.post("/login", content=f"user=alice&token={TOKEN}", headers=headers).status_code == 401
    right = client.post(
        "/login", content="user=Alice&token=alice%27s+password&next=//evil.example/x", headers=headers, follow_redirects=False
    )
    assert right.status_code == 303 and right.headers["location"] == "/"  # no open redirect
    assert whoami(client) == (200, {"user": "alice", "role": "user"})
    with Directory.for_settings(settings) as directory:
        directory.set_role("alice", "admin")
        assert whoami(client) == (200, {"user": "alice", "role": "admin"})  # at the next request
        directory.remove_user("alice")
    assert whoami(client)[0] == 401  # a removed user's cookie signs nobody in
    browser = client.get("/sessions", headers={"Sec-Fetch-Mode": "navigate"}, follow_redirects=False)
    assert browser.status_code == 303 and browser.headers["location"].startswith("/login")


def test_a_personal_token_signs_a_browser_in_but_a_kernel_token_does_not(livy_anonymous, people, settings):
    client = livy_anonymous
    headers = {**FORM, "Origin": LIVY_BASE}
    with Directory.for_settings(settings) as directory:
        _, kernel = directory.create_token("bob", kind="kernel", scope="workspace:1")
    assert client.post("/login", content=f"user=bob&token={kernel}", headers=headers).status_code == 401
    assert whoami(client, bearer(kernel)) == (200, {"user": "bob", "role": "admin"})  # the API takes it
    ok = client.post("/login", content=f"user=bob&token={people['bob']}", headers=headers, follow_redirects=False)
    assert ok.status_code == 303
    assert whoami(client) == (200, {"user": "bob", "role": "admin"})


def test_sign_ins_are_told_to_the_hook(tmp_path: Path):
    settings = make_settings(tmp_path)
    with Directory.for_settings(settings) as directory:
        directory.add_user("carol", password="carol's password")
    told: list[tuple[str, str, str, str]] = []

    def hook(user: str, client: str, outcome: str, method: str, scope: object = None) -> None:
        told.append((user, client, outcome, method))
        if user == "explode":
            raise RuntimeError("a hook that fails does not stop the sign-in")

    async def me(request: Request) -> JSONResponse:
        return JSONResponse({"user": request.user.name})

    app = gate(Starlette(routes=[Route("/me", me)]), settings, realm="test", bound_host="127.0.0.1", on_sign_in=hook)
    with TestClient(app, base_url=LIVY_BASE) as client:
        headers = {**FORM, "Origin": LIVY_BASE}
        client.post("/login", content="user=carol&token=wrong", headers=headers)
        client.post("/login", content="user=carol&token=carol%27s+password", headers=headers)
        client.post("/logout", headers={"Origin": LIVY_BASE})
        client.get(f"/me?token={TOKEN}")
        client.cookies.clear()
        client.get("/me?token=wrong")
        client.post("/login", content="user=explode&token=x", headers=headers)
        client.post("/login", content=f"token={TOKEN}", headers=headers)
    assert [(u, o, m) for u, _, o, m in told] == [
        ("carol", "failed", "password"),
        ("carol", "ok", "password"),
        ("carol", "signed-out", "logout"),
        ("admin", "ok", "token-url"),
        ("", "failed", "token-url"),
        ("explode", "failed", "password"),
        ("admin", "ok", "studio-token"),
    ]
    assert all(client == "testclient" for _, client, _, _ in told)


# -- the users' API of the workspace server ------------------------------------------------------


@pytest.fixture
def studio_people(tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, str]]]:
    from studio.workspaces.app import create_app

    settings = make_settings(tmp_path, livy_url="http://127.0.0.1:9", compute_timeout=2)
    with Directory.for_settings(settings) as directory:
        _, alice = directory.add_user("alice", password="alice's password")
    with TestClient(create_app(settings, STUDIO_BASE), base_url=STUDIO_BASE) as client:
        yield client, {"alice": alice}


def test_admins_manage_users(studio_people):
    client, people = studio_people
    admin, alice = AUTH, bearer(people["alice"])
    assert client.get("/api/whoami", headers=alice).json() == {"user": "alice", "role": "user"}
    assert client.get("/api/users", headers=alice).status_code == 403
    assert client.post("/api/users", json={"name": "dan"}, headers=alice).status_code == 403

    listed = client.get("/api/users", headers=admin).json()
    assert [u["name"] for u in listed["users"]] == ["admin", "alice"]
    assert listed["users"][1]["hasPassword"] and listed["users"][1]["tokenCount"] == 1

    made = client.post("/api/users", json={"name": "Dan", "role": "user", "password": "dan's password"}, headers=admin)
    assert made.status_code == 201
    dan_token = made.json()["token"]["secret"]
    assert made.json()["user"]["name"] == "dan" and dan_token.startswith("sst_")
    assert client.get("/api/whoami", headers=bearer(dan_token)).json() == {"user": "dan", "role": "user"}
    assert client.get("/api/whoami", headers=basic("dan", "dan's password")).status_code == 200
    assert client.post("/api/users", json={"name": "dan"}, headers=admin).status_code == 409
    assert client.post("/api/users", json={"name": "../x"}, headers=admin).status_code == 400
    assert client.post("/api/users", json={"name": "eve", "role": "root"}, headers=admin).status_code == 400
    assert client.post("/api/users", json={"name": "eve", "uid": 0}, headers=admin).status_code == 400

    shown = client.get("/api/users/dan", headers=admin).json()
    assert shown["tokens"][0]["note"] == "first token" and "secret" not in shown["tokens"][0]
    everything = client.get("/api/users", headers=admin).text + client.get("/api/users/dan", headers=admin).text
    assert "argon2" not in everything and dan_token not in everything and "digest" not in everything

    changed = client.patch(
        "/api/users/dan", json={"role": "admin", "password": "new one", "quotas": {"sessions": 2, "executions": None}}, headers=admin
    )
    assert changed.status_code == 200 and changed.json()["role"] == "admin"
    assert changed.json()["quotas"] == {"sessions": 2, "executions": None}
    assert client.get("/api/whoami", headers=basic("dan", "dan's password")).status_code == 401
    assert client.get("/api/whoami", headers=basic("dan", "new one")).json() == {"user": "dan", "role": "admin"}
    assert client.patch("/api/users/dan", json={"quotas": {"gpus": 1}}, headers=admin).status_code == 400
    assert client.patch("/api/users/dan", json={}, headers=admin).status_code == 400
    assert client.patch("/api/users/admin", json={"role": "user"}, headers=admin).status_code == 400
    assert client.patch("/api/users/nobody", json={"role": "user"}, headers=admin).status_code == 404

    assert client.delete("/api/users/admin", headers=admin).status_code == 400
    assert client.delete("/api/users/dan", headers=alice).status_code == 403
    assert client.delete("/api/users/dan", headers=admin).json() == {"msg": "deleted", "name": "dan"}
    assert client.get("/api/whoami", headers=bearer(dan_token)).status_code == 401
    assert client.get("/api/users/dan", headers=admin).status_code == 404


def test_everyone_manages_their_own_tokens(studio_people):
    client, people = studio_people
    admin, alice = AUTH, bearer(people["alice"])
    made = client.post("/api/tokens", json={"note": "ci", "expires_days": 30}, headers=alice)
    assert made.status_code == 201 and made.headers["cache-control"] == "no-store"
    token = made.json()
    assert token["user"] == "alice" and token["note"] == "ci" and token["expiresAt"] is not None
    assert client.get("/api/whoami", headers=bearer(token["secret"])).json()["user"] == "alice"
    listed = client.get("/api/tokens", headers=alice).json()
    assert [t["note"] for t in listed["tokens"]] == ["first token", "ci"]
    assert token["secret"] not in client.get("/api/tokens", headers=alice).text
    # another user's tokens: admins only
    assert client.get("/api/tokens?user=admin", headers=alice).status_code == 403
    assert client.post("/api/tokens", json={"user": "admin"}, headers=alice).status_code == 403
    assert client.get("/api/tokens?user=alice", headers=admin).json()["total"] == 2
    for_alice = client.post("/api/tokens", json={"user": "alice", "note": "by admin"}, headers=admin).json()
    assert for_alice["user"] == "alice"
    own = client.post("/api/tokens", json={"note": "mine"}, headers=admin).json()
    assert own["user"] == "admin"
    # revoking: one's own, or an admin anyone's; it stops working at once
    assert client.delete(f"/api/tokens/{own['id']}", headers=alice).status_code == 404
    assert client.delete(f"/api/tokens/{token['id']}", headers=alice).json()["msg"] == "revoked"
    assert client.get("/api/whoami", headers=bearer(token["secret"])).status_code == 401
    assert client.delete(f"/api/tokens/{for_alice['id']}", headers=admin).status_code == 200
    assert client.delete(f"/api/tokens/{for_alice['id']}", headers=admin).status_code == 404
    assert client.post("/api/tokens", json={"expires_days": -1}, headers=alice).status_code == 400


def test_a_kernel_token_manages_nothing(studio_people, tmp_path):
    client, _ = studio_people
    with Directory(tmp_path / "state") as directory:
        _, kernel = directory.create_token("alice", kind="kernel", scope="workspace:1")
    assert client.post("/api/tokens", json={"note": "persist"}, headers=bearer(kernel)).status_code == 403
    assert client.get("/api/tokens", headers=bearer(kernel)).status_code == 403


def test_the_users_and_tokens_pages(studio_people):
    client, people = studio_people
    admin, alice = AUTH, bearer(people["alice"])
    page = client.get("/users", headers=admin)
    assert page.status_code == 200 and "alice" in page.text and '/static/users.js"' in page.text
    assert page.headers["cache-control"] == "no-store"
    assert client.get("/users", headers=alice).status_code == 403
    assert "Only an admin" in client.get("/users", headers=alice).text
    rows = client.get("/ui/users", headers=admin)
    assert rows.status_code == 200 and 'data-name="alice"' in rows.text and "argon2" not in rows.text
    assert client.get("/ui/users", headers=alice).status_code == 403
    # a hostile note or e-mail is text, never markup
    hostile = "<img src=x onerror=alert(1)>"
    client.post("/api/tokens", json={"note": hostile}, headers=alice)
    client.post("/api/users", json={"name": "mallory", "email": hostile}, headers=admin)
    for response in (client.get("/tokens", headers=alice), client.get("/ui/tokens", headers=alice), client.get("/users", headers=admin)):
        assert response.status_code == 200 and hostile not in response.text and "&lt;img src=x" in response.text
    mine = client.get("/tokens", headers=alice)
    assert "Your tokens" in mine.text and "first token" in mine.text and people["alice"] not in mine.text
    assert client.get("/tokens?user=admin", headers=alice).status_code == 403
    theirs = client.get("/tokens?user=alice", headers=admin)
    assert theirs.status_code == 200 and "Tokens of alice" in theirs.text
    assert client.get("/tokens?user=nobody", headers=admin).status_code == 404
    assert client.get("/static/users.js", headers=admin).status_code == 200
