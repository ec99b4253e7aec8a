"""Secrets out of what is shown (redaction, credentials in URLs), links, clone URLs, and the
properties files that carry Spark conf. Pure functions and real files."""

from __future__ import annotations

import base64
import stat

import pytest

from studio import redact
from studio.auth.credentials import SECRET_VARIABLES, authorization, without_secrets
from studio.errors import InvalidRequestError
from studio.urls import http_url, split_credentials
from studio.worker.properties import write_properties
from studio.workspaces.git import check_repository_url, clone_command

# -- redaction -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    ["spark.hadoop.fs.s3a.secret.key", "spark.ssl.keyStorePassword", "spark.myapp.apiToken", "db.passwd",
     "x.PASSPHRASE", "spark.authenticate.secret", "aws.credentials.provider", "spark.hadoop.fs.s3a.access.key"],
)  # fmt: skip
def test_keys_that_name_a_secret_are_redacted(key):
    assert redact.is_secret(key)
    assert redact.value(key, "hunter2") == redact.REDACTED


def test_other_values_stay_and_jvm_options_inside_them_are_redacted():
    assert redact.value("spark.executor.memory", "2g") == "2g"
    assert redact.value("spark.driver.extraJavaOptions", "-Xmx1g -Dfs.s3a.secret.key=abc -Dcolor=blue") == (
        f"-Xmx1g -Dfs.s3a.secret.key={redact.REDACTED} -Dcolor=blue"
    )
    assert redact.value("spark.x.opts", "user=ana password=abc") == f"user=ana password={redact.REDACTED}"
    assert redact.value("spark.x", 3) == 3
    assert redact.conf({"spark.a.token": "t", "spark.b": "b"}) == {"spark.a.token": redact.REDACTED, "spark.b": "b"}
    assert redact.conf(None) is None
    body = {"kind": "pyspark", "conf": {"spark.ssl.keyPassword": "k"}}
    assert redact.session_body(body) == {"kind": "pyspark", "conf": {"spark.ssl.keyPassword": redact.REDACTED}}
    assert body["conf"]["spark.ssl.keyPassword"] == "k"  # the request itself keeps the real value
    assert redact.session_body({"kind": "sql"}) == {"kind": "sql"}


def test_a_command_line_as_it_may_be_logged():
    argv = ["spark-submit", "--conf", "spark.ssl.keyPassword=k", "--conf=spark.app.token=t", "--conf", "spark.a=b",
            "-Dtrust.password=p", "job.py", "password=not-conf"]  # fmt: skip
    assert redact.command(argv) == [
        "spark-submit", "--conf", f"spark.ssl.keyPassword={redact.REDACTED}", f"--conf=spark.app.token={redact.REDACTED}",
        "--conf", "spark.a=b", f"-Dtrust.password={redact.REDACTED}", "job.py", "password=not-conf",
    ]  # fmt: skip


def test_children_that_run_user_code_never_get_the_studios_secrets():
    env = {"PATH": "/bin", **{name: "secret" for name in SECRET_VARIABLES}}
    assert without_secrets(env) == {"PATH": "/bin"}
    assert authorization(None, None) is None and authorization("ana", None) is None
    assert authorization(None, "t") == "Bearer t"
    assert authorization("ana", "t") == "Basic " + base64.b64encode(b"ana:t").decode()


# -- links and credentials in URLs ---------------------------------------------------------------


@pytest.mark.parametrize(
    "value, link",
    [
        ("http://host:4040/jobs/", "http://host:4040/jobs/"),
        (" HTTPS://host/x ", "HTTPS://host/x"),
        ("javascript:alert(1)", None),
        ("java\tscript:alert(1)", None),
        ("JaVaScRiPt:alert(1)", None),
        ("data:text/html,<script>", None),
        ("//host/path", None),
        ("/ui/session/1/log", None),
        ("http:\\\\evil.example", None),
        ("http://", None),
        ("http://[::1", None),
        (None, None),
        (42, None),
    ],
)
def test_only_absolute_http_urls_become_links(value, link):
    assert http_url(value) == link


def test_credentials_come_out_of_urls():
    assert split_credentials("https://ana:s3cr%40t@git.example/repo.git") == ("https://git.example/repo.git", "ana", "s3cr%40t")
    assert split_credentials("https://token@git.example/r") == ("https://git.example/r", "token", None)
    assert split_credentials("https://a@b:p@host/x") == ("https://host/x", "a@b", "p")
    assert split_credentials("https://git.example/r") == ("https://git.example/r", None, None)
    assert split_credentials("git@github.example:org/repo.git") == ("git@github.example:org/repo.git", None, None)


# -- clone URLs ----------------------------------------------------------------------------------


def test_https_and_ssh_repositories_are_cloned():
    source = check_repository_url(" https://ana:s3cr%40t@git.example/org/repo.git ", allow_local=False)
    assert (source.url, source.kind, source.username, source.password) == ("https://git.example/org/repo.git", "https", "ana", "s3cr@t")
    assert "s3cr" not in repr(source)
    assert source.scrub("fatal: Authentication failed for ana with s3cr@t") == "fatal: Authentication failed for *** with ***"
    ssh = check_repository_url("ssh://git:pw@git.example:2222/org/repo.git", allow_local=False)
    assert (ssh.url, ssh.kind, ssh.password) == ("ssh://git@git.example:2222/org/repo.git", "ssh", None)  # keys, not passwords
    assert check_repository_url("git+ssh://git.example/r", allow_local=False).url == "git+ssh://git.example/r"
    assert check_repository_url("git@git.example:org/repo.git", allow_local=False).kind == "ssh"


@pytest.mark.parametrize(
    "url, message",
    [
        ("", "Repository URL is empty."),
        ("http://git.example/r.git", "uses http://; workspaces clone https:// and ssh repositories only. Use https:// instead."),
        ("git://git.example/r.git", "uses git://"),
        ("ftp://git.example/r.git", "uses ftp://"),
        ("ext::sh -c touch% /tmp/pwned", "names a git transport helper"),
        ("fd::17", "names a git transport helper"),
        ("https://-oProxyCommand=x/r", "has no valid host"),
        ("ssh://-oProxyCommand=x/r", "has no valid host"),
        ("-oProxyCommand=x:r", "has no valid host"),
        ("https://git.example/r\n.git", "contains control characters"),
        ("https://ana:a%0Ab@git.example/r", "credentials contain a line break"),
        ("file:///srv/repo", "is a local path or file:// URL"),
        ("/srv/repo", "is a local path or file:// URL"),
        ("./repo", "is a local path or file:// URL"),
    ],
)
def test_what_may_not_be_cloned_is_a_400_before_anything_runs(url, message):
    with pytest.raises(InvalidRequestError) as caught:
        check_repository_url(url, allow_local=False)
    assert message in caught.value.msg


def test_local_repositories_only_when_allowed():
    assert check_repository_url("/srv/repo", allow_local=True).kind == "local"
    assert check_repository_url("file:///srv/repo", allow_local=True).kind == "local"
    with pytest.raises(InvalidRequestError, match="is not absolute"):
        check_repository_url("repo", allow_local=True)


def test_the_clone_command_keeps_credentials_off_its_command_line(tmp_path):
    source = check_repository_url("https://ana:hunter2@git.example/r.git", allow_local=False)
    argv, env = clone_command(source, tmp_path / "w", allow_local=False)
    assert not any("hunter2" in arg for arg in argv)
    assert "--" in argv and argv.index("--") < argv.index("https://git.example/r.git")
    assert env["GIT_ALLOW_PROTOCOL"] == "https:ssh" and env["GIT_TERMINAL_PROMPT"] == "0"
    assert "protocol.file.allow=never" in argv
    assert not set(SECRET_VARIABLES) & set(env)
    assert "hunter2" in env.values()  # the helper reads it from git's environment


# -- properties files ----------------------------------------------------------------------------

# Each value as java.util.Properties must write it (Properties.store's escaping, without its
# \uXXXX for non-ASCII: Spark reads properties files as UTF-8).
ESCAPED = [
    ("spark.app.name", "plain", "spark.app.name=plain"),
    ("spark.a", "x=y:z", "spark.a=x\\=y\\:z"),
    ("spark.b", "#not a comment!", "spark.b=\\#not a comment\\!"),
    ("spark.c", "  leading spaces kept", "spark.c=\\ \\ leading spaces kept"),
    ("spark.d", "trailing  ", "spark.d=trailing  "),
    ("spark.e", "line\nbreak\r\ttab\fform", "spark.e=line\\nbreak\\r\\ttab\\fform"),
    ("spark.f", "C:\\path\\to", "spark.f=C\\:\\\\path\\\\to"),
    ("key with space=and:colon", "v", "key\\ with\\ space\\=and\\:colon=v"),
    ("spark.g", "ünïcødé ✓", "spark.g=ünïcødé ✓"),
    ("spark.h", "", "spark.h="),
]


def test_properties_files_escape_like_java_and_are_private(tmp_path):
    path = write_properties(tmp_path / "spark.properties", {key: value for key, value, _ in ESCAPED})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text(encoding="utf-8").split("\n") == [line for _, _, line in ESCAPED] + [""]
