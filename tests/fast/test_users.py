"""The users' directory (studio.auth.users): users, passwords, tokens, in a real SQLite file."""

from __future__ import annotations

import sqlite3
import stat
import time

import pytest

from studio.auth.users import ADMIN, SCHEMA_VERSION, Directory, normalize_name, token_digest
from studio.errors import ConflictError, InvalidRequestError, NotFoundError

from .conftest import make_settings


@pytest.fixture
def directory(tmp_path):
    with Directory(tmp_path / "identity") as found:
        yield found


def test_the_file_is_private_and_versioned(tmp_path, directory):
    assert stat.S_IMODE((tmp_path / "identity").stat().st_mode) == 0o700
    assert stat.S_IMODE(directory.path.stat().st_mode) == 0o600
    db = sqlite3.connect(directory.path)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        db.close()


def test_settings_put_it_in_the_state_directory_unless_told(tmp_path):
    settings = make_settings(tmp_path)
    assert settings.identity_dir == settings.state_dir
    elsewhere = make_settings(tmp_path, identity_dir=tmp_path / "ids")
    assert elsewhere.identity_dir == tmp_path / "ids"
    with Directory.for_settings(elsewhere) as directory:
        assert directory.path == tmp_path / "ids" / "users.db"


def test_admin_is_built_in(directory):
    admin = directory.get_user("admin")
    assert admin is not None and admin.role == "admin" and admin.is_admin
    with pytest.raises(InvalidRequestError, match="cannot be removed"):
        directory.remove_user(ADMIN)
    with pytest.raises(InvalidRequestError, match="stays an admin"):
        directory.set_role(ADMIN, "user")
    with pytest.raises(InvalidRequestError, match="studio's token"):
        directory.set_password(ADMIN, "something")
    assert directory.check_password(ADMIN, "") is None
    # it may still have personal tokens
    _, secret = directory.create_token(ADMIN, note="ci")
    principal = directory.principal_for_token(secret)
    assert principal is not None and principal.name == ADMIN and principal.is_admin


def test_add_a_user_with_a_password_and_a_first_token(directory):
    user, token = directory.add_user("Alice", password="correct horse", email="alice@example.com")
    assert (user.name, user.role, user.source, user.email, user.has_password) == ("alice", "user", "local", "alice@example.com", True)
    assert token.startswith("sst_") and len(token) > 40
    assert directory.check_password("alice", "correct horse") == user
    assert directory.check_password("ALICE", "correct horse") == user  # names are lowercase
    assert directory.check_password("alice", "correct horse!") is None
    assert directory.check_password("nobody", "correct horse") is None
    assert directory.check_password("alice", "") is None
    principal = directory.principal_for_token(token)
    assert principal is not None and (principal.name, principal.kind, principal.role) == ("alice", "personal", "user")
    assert not principal.is_admin
    with pytest.raises(ConflictError):
        directory.add_user("alice")
    bob, _ = directory.add_user("bob", role="admin")
    assert bob.is_admin and not bob.has_password and directory.check_password("bob", "") is None
    assert [u.name for u in directory.list_users()] == ["admin", "alice", "bob"]


def test_secrets_are_never_kept_in_plain_text(tmp_path, directory):
    _, token = directory.add_user("carol", password="hunter2-but-longer")
    _, second = directory.create_token("carol", note="laptop")
    raw = b"".join(path.read_bytes() for path in (tmp_path / "identity").iterdir())
    for secret in (token, second, "hunter2-but-longer"):
        assert secret.encode() not in raw
    assert token_digest(token).encode() in raw  # the token as its SHA-256
    db = sqlite3.connect(directory.path)
    try:
        (stored,) = db.execute("SELECT password_hash FROM users WHERE name = 'carol'").fetchone()
    finally:
        db.close()
    assert stored.startswith("$argon2id$")
    # and nothing the API shows has either
    shown = repr([directory.get_user("carol").to_json(), *(t.to_json() for t in directory.list_tokens("carol"))])  # type: ignore[union-attr]
    assert "argon2" not in shown and token_digest(token) not in shown and token not in shown


def test_passwords_change_and_the_old_one_stops_working(directory):
    directory.add_user("dave", password="first password")
    assert directory.check_password("dave", "first password") is not None  # now cached
    directory.set_password("dave", "second password")
    assert directory.check_password("dave", "first password") is None
    assert directory.check_password("dave", "second password") is not None
    with pytest.raises(InvalidRequestError):
        directory.set_password("dave", "")
    with pytest.raises(NotFoundError):
        directory.set_password("nobody", "x")


def test_tokens_expire_and_are_revoked_at_once(directory):
    directory.add_user("erin")
    soon, secret = directory.create_token("erin", note="short", expires_at=time.time() + 0.5)
    assert soon.expires_at is not None and not soon.expired
    assert directory.principal_for_token(secret) is not None
    time.sleep(0.6)
    assert directory.principal_for_token(secret) is None
    assert directory.get_token(soon.id).expired  # type: ignore[union-attr]
    with pytest.raises(InvalidRequestError, match="future"):
        directory.create_token("erin", expires_at=time.time() - 1)

    info, secret = directory.create_token("erin", note="ci")
    assert directory.principal_for_token(secret) is not None
    assert directory.get_token(info.id).last_used_at is not None  # type: ignore[union-attr]
    assert not directory.revoke_token(info.id, user="admin")  # not theirs
    assert directory.revoke_token(info.id, user="erin")
    assert directory.principal_for_token(secret) is None
    assert not directory.revoke_token(info.id)
    assert directory.principal_for_token("") is None and directory.principal_for_token("sst_nope") is None


def test_kernel_and_execution_tokens_are_revoked_by_scope(directory):
    directory.add_user("frank")
    _, kernel1 = directory.create_token("frank", kind="kernel", scope="workspace:7")
    _, kernel2 = directory.create_token("frank", kind="kernel", scope="workspace:7")
    _, other = directory.create_token("frank", kind="kernel", scope="workspace:8")
    _, run = directory.create_token("frank", kind="execution", scope="execution:3")
    principal = directory.principal_for_token(run)
    assert principal is not None and (principal.kind, principal.scope) == ("execution", "execution:3")
    assert len(directory.list_tokens("frank", kind="kernel")) == 2 + 1
    assert directory.revoke_scope("kernel", "workspace:7") == 2
    assert directory.principal_for_token(kernel1) is None and directory.principal_for_token(kernel2) is None
    assert directory.principal_for_token(other) is not None and directory.principal_for_token(run) is not None
    with pytest.raises(InvalidRequestError):
        directory.create_token("frank", kind="master")


def test_removing_a_user_revokes_their_tokens(directory):
    _, token = directory.add_user("grace", password="pw for grace")
    directory.remove_user("grace")
    assert directory.get_user("grace") is None
    assert directory.principal_for_token(token) is None
    assert directory.check_password("grace", "pw for grace") is None
    assert directory.list_tokens("grace") == []
    with pytest.raises(NotFoundError):
        directory.remove_user("grace")
    with pytest.raises(NotFoundError):
        directory.create_token("grace")


def test_roles_and_quotas_change_what_the_next_lookup_says(directory):
    _, token = directory.add_user("heidi")
    directory.set_role("heidi", "admin")
    assert directory.principal_for_token(token).role == "admin"  # type: ignore[union-attr]
    with pytest.raises(InvalidRequestError):
        directory.set_role("heidi", "root")
    directory.set_quotas("heidi", {"sessions": 3, "executions": None})
    assert directory.get_user("heidi").quotas == {"sessions": 3, "executions": None}  # type: ignore[union-attr]
    directory.set_quotas("heidi", {})
    assert directory.get_user("heidi").quotas == {}  # type: ignore[union-attr]
    for bad in ({"gpus": 1}, {"sessions": -1}, {"sessions": "3"}, {"sessions": True}):
        with pytest.raises(InvalidRequestError):
            directory.set_quotas("heidi", bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name", ["", " ", "1abc", "-x", ".hidden", "a/b", "../etc", "a b", "a:b", "é", "x" * 65, "a\nb", "root;rm", "$(id)"]
)
def test_bad_user_names_are_refused(directory, name):
    with pytest.raises(InvalidRequestError, match="not a valid user name"):
        directory.add_user(name)


def test_good_user_names():
    assert normalize_name("Alice.Smith") == "alice.smith"
    assert normalize_name("_svc-etl_2") == "_svc-etl_2"
    assert normalize_name("x" * 64) == "x" * 64


def test_two_directories_on_one_file_see_each_other(tmp_path):
    with Directory(tmp_path / "ids") as one, Directory(tmp_path / "ids") as two:
        _, token = one.add_user("ivan")
        assert two.principal_for_token(token) is not None
        two.remove_user("ivan")
        assert one.principal_for_token(token) is None


def test_single_sign_on_users(directory):
    user = directory.upsert_oidc_user("judy", "judy@example.com", None)
    assert (user.source, user.role, user.email, user.has_password) == ("oidc", "user", "judy@example.com", False)
    assert directory.list_tokens("judy") == []
    user = directory.upsert_oidc_user("judy", "judy@corp.example.com", "admin")
    assert (user.role, user.email) == ("admin", "judy@corp.example.com")
    assert directory.upsert_oidc_user("judy", "judy@corp.example.com", None).role == "admin"


def test_the_commands(tmp_path, capsys, monkeypatch):
    """studio users / studio tokens on a state directory, as an operator types them (no server needed)."""
    import io

    from studio.cli import main

    where = ["--state-dir", str(tmp_path / "state")]

    def run(*args: str, stdin: str | None = None) -> tuple[int, str, str]:
        if stdin is not None:
            monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        code = main([*args, *where])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, _ = run("users", "add", "Kim", "--password-stdin", stdin="kim's password\n")
    token = out.strip().splitlines()[-1]
    assert code == 0 and token.startswith("sst_") and out.count(token) == 1
    with Directory(tmp_path / "state") as directory:
        assert directory.principal_for_token(token).name == "kim"  # type: ignore[union-attr]
        assert directory.check_password("kim", "kim's password") is not None
    code, out, _ = run("users", "list")
    assert code == 0 and "kim" in out and "sst_" not in out and "argon2" not in out
    code, out, _ = run("tokens", "create", "--user", "kim", "--note", "ci", "--expires-days", "1")
    second = out.strip().splitlines()[-1]
    assert code == 0 and second.startswith("sst_") and second != token
    code, out, _ = run("tokens", "list", "--user", "kim")
    assert code == 0 and "ci" in out and "first token" in out and "sst_" not in out
    token_id = out.splitlines()[-1].split()[0]
    assert run("tokens", "revoke", token_id)[0] == 0
    code, _, err = run("tokens", "revoke", token_id)
    assert code == 1 and "No token" in err
    code, out, _ = run("users", "reset-password", "kim")
    generated = out.strip().splitlines()[-1]
    assert code == 0 and len(generated) >= 16
    assert run("users", "set-role", "kim", "admin")[0] == 0
    assert run("users", "set-quota", "kim", "--sessions", "2", "--executions", "unlimited")[0] == 0
    with Directory(tmp_path / "state") as directory:
        kim = directory.get_user("kim")
        assert kim is not None and kim.role == "admin" and kim.quotas == {"sessions": 2, "executions": None}
        assert directory.check_password("kim", generated) is not None
    assert run("users", "set-quota", "kim", "--sessions", "none")[0] == 0
    code, _, err = run("users", "add", "../etc")
    assert code == 1 and "not a valid user name" in err
    code, _, err = run("users", "remove", "admin")
    assert code == 1 and "cannot be removed" in err
    assert run("users", "remove", "kim")[0] == 0
    with Directory(tmp_path / "state") as directory:
        assert directory.get_user("kim") is None and directory.principal_for_token(token) is None
