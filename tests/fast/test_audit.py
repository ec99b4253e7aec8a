"""The audit trail (studio/audit.py): records appended to SQLite and JSON lines, found by every
filter, never rewritten, private, free of secrets; and what both servers record, through their
real ``create_app`` (the gate included) with Starlette's TestClient."""

from __future__ import annotations

import base64
import hashlib
import json
import sqlite3
import stat
import time
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from studio import audit
from studio.audit import Trail
from studio.cli import main
from studio.errors import InvalidRequestError

from .conftest import AUTH, LIVY_BASE, STUDIO_BASE, TOKEN, make_settings


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def trail(tmp_path: Path):
    trail = Trail(tmp_path / "identity", server="serve").open()
    yield trail
    trail.close()


def fill(trail: Trail) -> None:
    """Six records over six hours, newest last."""
    start = time.time() - 6 * 3600
    rows = [
        ("alice", "POST /sessions", "/sessions/3", 201),
        ("alice", "POST /sessions/{session_id}/statements", "/sessions/3/statements/0", 201),
        ("bob", "POST /sessions/{session_id}/statements", "/sessions/30/statements/0", 403),
        ("bob", "DELETE /sessions/{session_id}", "/sessions/3", 403),
        (None, "sign-in", "/login", 401),
        ("admin", "POST /api/workspaces", "/api/workspaces/1", 201),
    ]
    for hour, (user, action, target, outcome) in enumerate(rows):
        trail.write(action, outcome, user=user, target=target, at=start + hour * 3600)


# -- the trail -----------------------------------------------------------------------------------


def test_records_are_appended_and_every_filter_finds_them(trail):
    fill(trail)
    ids = lambda **kw: [r.id for r in trail.query(**kw)]  # noqa: E731
    assert ids() == [6, 5, 4, 3, 2, 1]  # newest first
    assert ids(user="alice") == [2, 1]
    assert ids(action="statements") == [3, 2]  # a part of it
    assert ids(action="post /SESSIONS") == [3, 2, 1]  # any case
    assert ids(action="sign-in") == [5]
    assert ids(target="/sessions/3") == [4, 2, 1]  # the path and below it, not /sessions/30
    assert ids(target="/sessions/3/") == [4, 2, 1]
    assert ids(outcome="403") == [4, 3]
    now = time.time()
    assert ids(since=now - 2.5 * 3600) == [6, 5]
    assert ids(until=now - 4.5 * 3600) == [2, 1]
    assert ids(limit=2) == [6, 5] and ids(limit=2, before=5) == [4, 3] and ids(limit=2, before=3) == [2, 1]
    assert ids(user="bob", action="delete", target="/sessions/3", outcome="403") == [4]
    assert ids(user="nobody") == []
    record = trail.query(user="admin")[0]
    assert (record.server, record.action, record.target, record.outcome) == ("serve", "POST /api/workspaces", "/api/workspaces/1", "201")
    assert record.to_json()["timestamp"].endswith("Z")


def test_records_are_never_rewritten(trail):
    fill(trail)
    db = sqlite3.connect(trail.path)
    try:
        with pytest.raises(sqlite3.IntegrityError, match="audit records are never rewritten"):
            db.execute("UPDATE records SET user = 'mallory' WHERE id = 3")
        with pytest.raises(sqlite3.IntegrityError, match="audit records are never deleted"):
            db.execute("DELETE FROM records WHERE id = 3")
        assert db.execute("SELECT count(*) FROM records").fetchone() == (6,)
        assert audit.verify(trail.all()) == []
        # Whoever owns the file can still take the triggers away: the hash chain shows what changed.
        db.execute("DROP TRIGGER records_never_updated")
        db.execute("DROP TRIGGER records_never_deleted")
        db.execute("UPDATE records SET user = 'mallory' WHERE id = 3")
        db.execute("DELETE FROM records WHERE id = 5")
        db.commit()
    finally:
        db.close()
    assert audit.verify(trail.all()) == [
        "record 3 does not match its hash (changed, or the one before it was)",
        "records 5..5 are missing",
        "record 6 does not match its hash (changed, or the one before it was)",
    ]


def test_the_files_are_private(trail):
    trail.write("POST /sessions", 201, user="alice")
    assert stat.S_IMODE(trail.dir.stat().st_mode) == 0o700
    for name in ("audit.db", "audit.jsonl", "audit.lock", "audit.db-wal"):
        assert stat.S_IMODE((trail.dir / name).stat().st_mode) == 0o600, name


def test_the_json_lines_are_the_records(trail):
    fill(trail)
    trail.write("POST /sessions/{session_id}/statements", 201, user="alice", code="x = 1\nprint(x)", detail={"session": 3})
    written = lines(trail.json_lines)
    assert written == [record.to_json() for record in trail.all()]
    assert [line["id"] for line in written] == [1, 2, 3, 4, 5, 6, 7]
    assert audit.verify(written) == []  # a shipped copy can be checked on its own
    written[3]["outcome"] = "201"
    assert audit.verify(written) == ["record 4 does not match its hash (changed, or the one before it was)"]


def test_two_writers_keep_one_order(tmp_path):
    """Two servers (here two writers with their own connections and file descriptors) append to one trail."""
    first, second = Trail(tmp_path, server="serve").open(), Trail(tmp_path, server="livy").open()
    try:
        for i in range(20):
            (first if i % 3 else second).write("POST /sessions", 201, user=f"u{i}")
        assert [r.id for r in first.all()] == list(range(1, 21))
        assert [line["user"] for line in lines(tmp_path / "audit.jsonl")] == [f"u{i}" for i in range(20)]
        assert audit.verify(second.all()) == [] and audit.verify(lines(tmp_path / "audit.jsonl")) == []
        assert {r.server for r in first.all()} == {"serve", "livy"}
    finally:
        first.close()
        second.close()


def test_a_renamed_json_lines_file_is_followed_by_a_new_one(trail):
    trail.write("POST /sessions", 201)
    trail.json_lines.rename(trail.dir / "audit.jsonl.1")  # logrotate's default (create) mode
    trail.write("DELETE /sessions/{session_id}", 200)
    assert [line["id"] for line in lines(trail.dir / "audit.jsonl.1")] == [1]
    assert [line["id"] for line in lines(trail.json_lines)] == [2]
    assert stat.S_IMODE(trail.json_lines.stat().st_mode) == 0o600


def test_a_statement_is_kept_as_its_hash_and_first_line(trail):
    code = "\n\n   df = spark.range(10)  \nsecret_sauce = 42\n" + "x" * 10_000
    record = trail.write("POST /sessions/{session_id}/statements", 201, code=code)
    assert record is not None
    assert record.code_sha256 == hashlib.sha256(code.encode()).hexdigest()
    assert record.first_line == "df = spark.range(10)"
    long = trail.write("POST /sessions/{session_id}/statements", 201, code="y = '" + "z" * 500 + "'")
    assert long is not None and len(long.first_line) == audit.FIRST_LINE_CHARS and long.first_line.endswith("…")
    assert "secret_sauce" not in trail.json_lines.read_text() and "x" * 200 not in trail.json_lines.read_text()


SECRETS = ("hunter2", "AKIAEXAMPLESECRET", "sst_" + "Q" * 43, "p4ssw0rd", "s3cr3tvalue")


@pytest.mark.parametrize(
    "code, shown",
    [
        ('password = "hunter2"', 'password = *********(redacted)'),
        ("spark.conf.set('fs.s3a.secret.key', 'AKIAEXAMPLESECRET')", "spark.conf.set('fs.s3a.secret.key', *********(redacted))"),
        ("connect(url, api_token=sst_" + "Q" * 43 + ")", "connect(url, api_token=*********(redacted))"),
        ('df = spark.read.jdbc("jdbc:postgresql://me:p4ssw0rd@db/x", "t")', 'df = spark.read.jdbc("jdbc:postgresql://***@db/x", "t")'),
        ('opts = {"clientSecret": "s3cr3tvalue"}', 'opts = {"clientSecret": *********(redacted)}'),
        ("t = 'sst_" + "Q" * 43 + "'", "t = '*********(redacted)'"),
        ("keys = df.select('key').count()", "keys = df.select('key').count()"),  # a name, not a secret's value
    ],
)
def test_the_first_line_leaves_secrets_out(code, shown):
    assert audit.first_line(code) == shown
    assert not any(secret in audit.first_line(code) for secret in SECRETS)


def test_details_leave_secrets_out(trail):
    trail.write(
        "POST /sessions",
        201,
        target="/sessions/1",
        detail={
            "conf": {"spark.hadoop.fs.s3a.secret.key": "AKIAEXAMPLESECRET", "spark.driver.extraJavaOptions": "-Dmy.password=hunter2 -Xmx1g"},
            "url": "https://me:p4ssw0rd@livy.example/",
            "token": "s3cr3tvalue",
            "token_id": "tok_12",
            "note": "x" * 2000,
        },
    )
    text = trail.json_lines.read_text() + trail.path.read_bytes().decode("latin-1")
    assert not any(secret in text for secret in SECRETS)
    detail = trail.query()[0].detail
    assert detail["conf"]["spark.driver.extraJavaOptions"] == "-Dmy.password=*********(redacted) -Xmx1g"
    assert detail["url"] == "https://***@livy.example/" and detail["token_id"] == "tok_12"
    assert len(detail["note"]) == audit.MAX_TEXT


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1700000000", 1700000000.0),
        ("1700000000.5", 1700000000.5),
        ("2023-11-14T22:13:20Z", 1700000000.0),
        ("2023-11-14T22:13:20", 1700000000.0),  # no offset: UTC
        ("2023-11-14T23:13:20+01:00", 1700000000.0),
        ("2023-11-14", 1699920000.0),
    ],
)
def test_times_are_epoch_seconds_or_iso_8601(text, expected):
    assert audit.parse_time(text) == expected


def test_times_may_be_ages_and_nonsense_is_refused():
    assert abs(audit.parse_time("2h") - (time.time() - 7200)) < 5
    assert abs(audit.parse_time("15m") - (time.time() - 900)) < 5
    assert audit.parse_time("") is None
    with pytest.raises(InvalidRequestError, match="'until' must be epoch seconds, an ISO 8601 time"):
        audit.parse_time("yesterday", "until")


def test_a_trail_that_cannot_be_written_says_why_and_resumes_with_a_record(tmp_path, caplog):
    trail = Trail(tmp_path, json_lines=Path("/dev/full")).open()  # every write: ENOSPC
    try:
        assert trail.write("POST /sessions", 201, user="alice") is None
        assert "No space left on device" in (trail.failing or "")
        assert "could not be written" in caplog.text and '"user": "alice"' in caplog.text  # the record is in the log
        assert trail.ready() == trail.failing
        trail.json_lines = tmp_path / "audit.jsonl"  # room again
        assert trail.ready() is None and trail.failing is None
        resumed = trail.query(limit=1)[0]
        assert (resumed.action, resumed.outcome) == ("audit-trail-resumed", "ok")
        assert "No space left on device" in resumed.detail["failed"]
    finally:
        trail.close()


# -- what the servers record ----------------------------------------------------------------------


@pytest.fixture
def livy_app(tmp_path):
    from studio.livy.app import create_app

    settings = make_settings(tmp_path)
    with TestClient(create_app(settings), base_url=LIVY_BASE) as client:
        yield client, Trail.for_settings(settings, "reader")


def test_the_session_service_records_changes_and_refusals_not_reads(livy_app):
    client, trail = livy_app
    assert client.get("/sessions", headers=AUTH).status_code == 200  # a read: not recorded
    assert client.post("/sessions", json={"kind": "pyspark", "bogus": 1}, headers=AUTH).status_code == 400
    assert client.delete("/sessions/7", headers=AUTH).status_code == 404
    assert client.post("/sessions/7/completion", json={"code": "sp", "cursor": 2}, headers=AUTH).status_code == 404
    assert client.get("/sessions").status_code == 401  # no credentials: denied, recorded
    assert client.get("/batches", headers={"Authorization": "Bearer wrong"}).status_code == 401
    evil = {**AUTH, "Origin": "http://evil.example"}
    assert client.post("/sessions", json={"kind": "pyspark"}, headers=evil).status_code == 403
    records = trail.query()
    shown = [(r.user, r.auth, r.action, r.target, r.outcome) for r in reversed(records)]
    assert shown == [
        ("admin", "token", "POST /sessions", "/sessions", "400"),
        ("admin", "token", "DELETE /sessions/{session_id}", "/sessions/7", "404"),
        (None, None, "GET /sessions", "/sessions", "401"),
        (None, None, "GET /batches", "/batches", "401"),
        (None, None, "POST /sessions", "/sessions", "403"),  # the gate refused it before authenticating
    ]
    assert {r.server for r in records} == {"livy"} and {r.client for r in records} == {"testclient"}
    text = trail.json_lines.read_text() + trail.path.read_bytes().decode("latin-1")
    assert TOKEN not in text and "wrong" not in text


def test_refusals_of_one_unauthenticated_client_are_recorded_up_to_a_limit(livy_app, caplog):
    """Anyone who can reach the port could fill the trail's disk with 401s: per client and window,
    only so many are recorded, the rest counted in its next record."""
    client, trail = livy_app
    limit = client.app.denied
    limit.per_window, limit.window = 3, 0.5
    for _ in range(10):
        assert client.get("/sessions").status_code == 401
    assert client.get("/sessions", headers=AUTH).status_code == 200
    assert client.delete("/sessions/9", headers=AUTH).status_code == 404  # authenticated: always recorded
    assert "the rest of them are not recorded" in caplog.text
    time.sleep(0.6)
    assert client.post("/batches", json={}).status_code == 401
    found = [(r.outcome, r.user, r.detail) for r in reversed(trail.query())]
    assert found == [("401", None, {})] * 3 + [("404", "admin", {}), ("401", None, {"unrecorded": 7})]


def test_basic_credentials_never_enter_the_trail(livy_app):
    client, trail = livy_app
    basic = {"Authorization": "Basic " + base64.b64encode(f"{TOKEN}:hunter2".encode()).decode()}
    assert client.delete("/sessions/1", headers=basic).status_code == 401
    record = trail.query()[0]
    assert (record.user, record.outcome) == (None, "401")
    text = trail.json_lines.read_text() + trail.path.read_bytes().decode("latin-1")
    assert TOKEN not in text and "hunter2" not in text


@pytest.fixture
def studio_app(tmp_path):
    from studio.workspaces.app import create_app

    settings = make_settings(tmp_path, livy_url="http://127.0.0.1:9", compute_timeout=2)
    with TestClient(create_app(settings, STUDIO_BASE), base_url=STUDIO_BASE, headers=AUTH) as client:
        yield client


def test_the_studio_records_workspaces_and_answers_api_audit(studio_app):
    created = studio_app.post("/api/workspaces", json={"name": "sales", "repository_url": None})
    assert created.status_code == 201
    workspace_id = created.json()["id"]
    assert studio_app.post(f"/api/workspaces/{workspace_id}/stop", json={}).status_code in (202, 409)
    assert studio_app.delete(f"/api/workspaces/{workspace_id}").status_code == 200
    response = studio_app.get("/api/audit")
    assert response.status_code == 200 and response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["next"] is None and body["limit"] == 100
    actions = [(r["action"], r["target"], r["outcome"]) for r in body["records"]]
    assert actions[-1] == ("POST /api/workspaces", f"/api/workspaces/{workspace_id}", "201")
    assert actions[0] == ("DELETE /api/workspaces/{workspace_id}", f"/api/workspaces/{workspace_id}", "200")
    create = body["records"][-1]
    assert create["user"] == "admin" and create["detail"]["workspace"] == "sales" and create["server"] == "serve"
    assert body["records"][0]["detail"]["workspace"] == "sales"

    filtered = studio_app.get("/api/audit", params={"action": "delete", "user": "admin", "since": "1h", "target": "/api/workspaces"})
    assert [r["action"] for r in filtered.json()["records"]] == ["DELETE /api/workspaces/{workspace_id}"]
    paged = studio_app.get("/api/audit", params={"limit": 1}).json()
    assert len(paged["records"]) == 1 and paged["next"] == paged["records"][0]["id"]
    older = studio_app.get("/api/audit", params={"limit": 1, "before": paged["next"]}).json()
    assert older["records"][0]["id"] == paged["next"] - 1
    assert studio_app.get("/api/audit", params={"until": "2000-01-01"}).json()["records"] == []


@pytest.mark.parametrize(
    "params, message",
    [
        ({"limit": "0"}, "'limit' must be 1 or more, got 0."),
        ({"limit": "1001"}, "'limit' is at most 1000, got 1001."),
        ({"before": "x"}, "'before' must be a whole number, got 'x'."),
        ({"since": "last tuesday"}, "'since' must be epoch seconds, an ISO 8601 time"),
    ],
)
def test_api_audit_refuses_bad_filters(studio_app, params, message):
    response = studio_app.get("/api/audit", params=params)
    assert response.status_code == 400 and response.json()["msg"].startswith(message)


def test_the_audit_page_shows_records_escaped(studio_app):
    assert studio_app.post("/api/<script>alert(1)</script>", json={}).status_code == 404
    page = studio_app.get("/audit", params={"action": "script"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text and "<script>alert" not in page.text
    assert 'value="script"' in page.text
    studio_app.app.trail.write("POST /sessions", 201, user="<i>eve</i>", detail={"name": "<b>x</b>"}, code="print('<script>')")
    page = studio_app.get("/audit").text
    assert "name=&#34;&lt;b&gt;x&lt;/b&gt;&#34;" in page and "&lt;i&gt;eve&lt;/i&gt;" in page and "print(&#39;&lt;script&gt;&#39;)" in page
    assert "<b>x" not in page and "<i>eve" not in page and "<script>" not in page.replace('<script src=', '')
    assert studio_app.get("/audit", params={"since": "<b>"}).status_code == 400


def test_a_trail_that_cannot_be_written_refuses_changes_with_507_and_reads_go_on(tmp_path):
    from studio.workspaces.app import create_app

    settings = make_settings(tmp_path, livy_url="http://127.0.0.1:9", compute_timeout=2, audit_file=Path("/dev/full"))
    app = create_app(settings, STUDIO_BASE)
    with TestClient(app, base_url=STUDIO_BASE, headers=AUTH) as client:
        assert client.post("/api/workspaces", json={"name": "first"}).status_code == 201  # its record is in the log only
        refused = client.post("/api/workspaces", json={"name": "second"})
        assert refused.status_code == 507
        assert refused.json()["msg"].startswith("The audit trail cannot be written (")
        assert "(the disk is full: [Errno 28] No space left on device)), so this request was not carried out" in refused.json()["msg"]
        assert [w["name"] for w in client.get("/api/workspaces").json()["workspaces"]] == ["first"]
        assert client.get("/api/audit").status_code == 200
        assert client.post("/logout", json={}, follow_redirects=False).status_code == 303  # signing out is never refused
        app.trail.json_lines = tmp_path / "audit.jsonl"  # room again
        assert client.post("/api/workspaces", json={"name": "second"}).status_code == 201
        actions = [r["action"] for r in client.get("/api/audit").json()["records"]]
        assert actions[:2] == ["POST /api/workspaces", "audit-trail-resumed"]


def test_studio_audit_reads_the_same_trail(tmp_path, capsys):
    trail = Trail(tmp_path / "state").open()
    try:
        fill(trail)
        trail.write("POST /sessions/{session_id}/statements", 201, user="alice", code="print(1)", target="/sessions/3/statements/1")
    finally:
        trail.close()
    assert main(["audit", "--state-dir", str(tmp_path / "state"), "--user", "alice", "--limit", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and "alice" in out[0] and "/sessions/3/statements/1" in out[0] and "print(1)" in out[0]
    assert main(["audit", "--state-dir", str(tmp_path / "state"), "--action", "sign-in", "--json"]) == 0
    (record,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (record["id"], record["outcome"]) == (5, "401")
    assert main(["audit", "--state-dir", str(tmp_path / "state"), "--verify"]) == 0
    assert "7 records, the chain holds" in capsys.readouterr().out
    assert main(["audit", "--state-dir", str(tmp_path / "state"), "--since", "soon"]) == 2
    assert "'since' must be epoch seconds" in capsys.readouterr().err


def test_the_identity_dir_holds_the_trail(tmp_path):
    settings = make_settings(tmp_path, identity_dir=tmp_path / "people")
    assert Trail.for_settings(settings, "serve").path == tmp_path / "people" / "audit.db"
    assert make_settings(tmp_path).identity_dir == tmp_path / "state"


# -- sign-in and users ----------------------------------------------------------------------------


@pytest.fixture
def team(tmp_path):
    """The workspace server with a user besides admin: (admin client, anonymous client, alice's Basic headers)."""
    from studio.auth.users import Directory
    from studio.workspaces.app import create_app

    settings = make_settings(tmp_path, livy_url="http://127.0.0.1:9", compute_timeout=2)
    with Directory.for_settings(settings) as directory:
        directory.add_user("alice", password="alice-password-1")
    app = create_app(settings, STUDIO_BASE)
    with TestClient(app, base_url=STUDIO_BASE, headers=AUTH) as admin, TestClient(app, base_url=STUDIO_BASE) as anonymous:
        alice = {"Authorization": "Basic " + base64.b64encode(b"alice:alice-password-1").decode()}
        yield admin, anonymous, alice


def sign_ins(admin: TestClient) -> list[tuple]:
    found = admin.get("/api/audit", params={"action": "sign-"}).json()["records"]
    return [(r["action"], r["user"], r["auth"], r["outcome"], r["detail"]) for r in reversed(found)]


def test_sign_ins_failed_sign_ins_and_sign_outs_are_on_record(team):
    admin, anonymous, _ = team
    form = lambda user, password: anonymous.post("/login", data={"user": user, "token": password}, follow_redirects=False)  # noqa: E731
    assert form("alice", "wrong").status_code == 401
    assert form("mallory", "guess").status_code == 401
    assert form(TOKEN, "x").status_code == 401  # a secret typed as the user name stays out
    assert form("alice", "alice-password-1").status_code == 303
    assert anonymous.post("/logout", json={}, follow_redirects=False).status_code == 303
    assert form("", TOKEN).status_code == 303  # admin with the studio's token
    anonymous.cookies.clear()
    assert anonymous.get(f"/?token={TOKEN}", follow_redirects=False).status_code == 303
    assert sign_ins(admin) == [
        ("sign-in", "alice", "password", "401", {"result": "failed"}),
        ("sign-in", None, "password", "401", {"result": "failed", "claimed": "not a user of this studio"}),
        ("sign-in", None, "password", "401", {"result": "failed", "claimed": "not a user of this studio"}),
        ("sign-in", "alice", "password", "303", {"result": "ok"}),
        ("sign-out", "alice", "logout", "303", {}),
        ("sign-in", "admin", "studio-token", "303", {"result": "ok"}),
        ("sign-in", "admin", "token-url", "303", {"result": "ok"}),
    ]
    text = admin.app.trail.json_lines.read_text()
    assert "alice-password-1" not in text and TOKEN not in text and "guess" not in text and "mallory" not in text


def test_only_admins_read_the_trail_and_a_refusal_is_on_record(team):
    admin, anonymous, alice = team
    refused = anonymous.get("/api/audit", headers=alice)
    assert refused.status_code == 403 and refused.json() == {"msg": "Only admins may read the audit trail."}
    page = anonymous.get("/audit", headers=alice)
    assert page.status_code == 403 and "Only admins may read the audit trail." in page.text
    found = admin.get("/api/audit", params={"user": "alice"}).json()["records"]
    assert [(r["action"], r["auth"], r["outcome"]) for r in found] == [("GET /audit", "password", "403"), ("GET /api/audit", "password", "403")]
    assert admin.get("/audit").status_code == 200
    assert 'href="/audit"' in admin.get("/").text and 'href="/audit"' in admin.get("/tokens").text  # in the top bar
    assert 'href="/audit"' not in anonymous.get("/", headers=alice).text


def test_user_and_token_changes_on_the_command_line_are_on_record(tmp_path, capsys, monkeypatch):
    import getpass
    import io

    where = ["--state-dir", str(tmp_path / "state")]
    monkeypatch.setattr("sys.stdin", io.StringIO("kim's password\n"))
    secrets = ["kim's password"]
    for command in (["users", "add", "kim", "--password-stdin"], ["tokens", "create", "--user", "kim", "--note", "ci"], ["users", "reset-password", "kim"]):
        assert main([*command, *where]) == 0
        secrets.append(capsys.readouterr().out.splitlines()[-1])  # a token, a token, a password
    assert main(["users", "set-role", "kim", "admin", *where]) == 0
    capsys.readouterr()
    assert main(["audit", "--json", "--limit", "10", *where]) == 0
    found = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    shown = [(r["action"], r["target"], r["server"], r["auth"], r["outcome"]) for r in reversed(found)]
    token_id = found[2]["detail"]["token_id"]
    assert shown == [
        ("studio users add", "/api/users/kim", "cli", "local", "ok"),
        ("studio tokens create", f"/api/tokens/{token_id}", "cli", "local", "ok"),
        ("studio users reset-password", "/api/users/kim", "cli", "local", "ok"),
        ("studio users set-role", "/api/users/kim", "cli", "local", "ok"),
    ]
    assert {r["user"] for r in found} == {getpass.getuser()}
    assert found[3]["detail"] == {"role": "user", "login": "password"}
    assert found[2]["detail"] == {"token_id": token_id, "token_user": "kim", "token_note": "ci"}
    text = (tmp_path / "state" / "audit.jsonl").read_text()
    assert not any(secret in text for secret in secrets)


def test_users_and_tokens_through_the_api_are_on_record_without_secrets(team):
    admin, anonymous, alice = team
    created = admin.post("/api/users", json={"name": "bob", "password": "bobs-secret-pw"})
    assert created.status_code == 201
    first = created.json()["token"]
    assert admin.patch("/api/users/bob", json={"password": "another-pw-1", "role": "admin"}).status_code == 200
    minted = anonymous.post("/api/tokens", json={"note": "ci"}, headers=alice)
    assert minted.status_code == 201
    assert anonymous.delete(f"/api/tokens/{minted.json()['id']}", headers=alice).status_code == 200
    assert admin.delete("/api/users/bob").status_code == 200
    found = admin.get("/api/audit", params={"target": "/api/", "action": "users"}).json()["records"]
    found += admin.get("/api/audit", params={"action": "tokens"}).json()["records"]
    shown = sorted((r["id"], r["user"], r["action"], r["target"], r["outcome"], json.dumps(r["detail"], sort_keys=True)) for r in found)
    token_id = minted.json()["id"]
    assert [row[1:] for row in shown] == [
        ("admin", "POST /api/users", "/api/users/bob", "201", json.dumps({"login": "password", "role": "user", "token_id": first["id"]}, sort_keys=True)),
        ("admin", "PATCH /api/users/{name}", "/api/users/bob", "200", json.dumps({"changed": ["role", "password"], "role": "admin"}, sort_keys=True)),
        ("alice", "POST /api/tokens", f"/api/tokens/{token_id}", "201", json.dumps({"token_id": token_id, "token_note": "ci", "token_user": "alice"}, sort_keys=True)),
        ("alice", "DELETE /api/tokens/{token_id}", f"/api/tokens/{token_id}", "200", json.dumps({"token_id": token_id, "token_user": "alice"}, sort_keys=True)),
        ("admin", "DELETE /api/users/{name}", "/api/users/bob", "200", "{}"),
    ]
    text = admin.app.trail.json_lines.read_text()
    assert not any(secret in text for secret in (first["secret"], minted.json()["secret"], "bobs-secret-pw", "another-pw-1", "alice-password-1"))
