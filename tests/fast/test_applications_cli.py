"""`studio applications` and `studio jobs` without a service: the JSON they would send (EMR Serverless's
field names, flags over --json), input mistakes said before anything is sent, and the Studio's
Applications page and API when its session service does not answer. The page builds its rows from
data with textContent only."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from studio import applications_cli
from studio.cli import build_parser

STATIC = Path(applications_cli.__file__).parent / "workspaces" / "static"


def parse(*argv: str):
    return build_parser().parse_args(list(argv))


def test_flags_become_emr_fields_and_win_over_the_json(tmp_path):
    source = tmp_path / "app.json"
    source.write_text(json.dumps({"name": "from-json", "maximumCapacity": {"cpu": "8vCPU", "drivers": 9}, "tags": {"t": "x"}}))
    args = parse(
        "applications", "create", "--json", str(source), "--name", "bigmem", "--initial-drivers", "2",
        "--max-drivers", "4", "--driver-memory", "4g", "--idle-timeout-minutes", "15",
    )
    body = applications_cli._application_flags(args, applications_cli._body(args))
    assert body == {
        "name": "bigmem",
        "maximumCapacity": {"cpu": "8vCPU", "drivers": 4},
        "tags": {"t": "x"},
        "initialCapacity": {"DRIVER": {"workerCount": 2}},
        "driverConfiguration": {"driverMemory": "4g"},
        "autoStopConfiguration": {"enabled": True, "idleTimeoutMinutes": 15},
    }
    off = parse("applications", "update", "bigmem", "--idle-timeout-minutes", "0")
    assert applications_cli._application_flags(off, {}) == {"autoStopConfiguration": {"enabled": False}}


def test_json_input_forms(tmp_path, monkeypatch):
    path = tmp_path / "in.json"
    path.write_text('{"name": "a"}')
    assert applications_cli._read_json(str(path)) == {"name": "a"}
    assert applications_cli._read_json(f"file://{path}") == {"name": "a"}
    assert applications_cli._read_json('{"name": "b"}') == {"name": "b"}
    for text, message in (("[1]", "must be an object"), ("{nope", "not valid JSON")):
        with pytest.raises(applications_cli.UsageError, match=message):
            applications_cli._read_json(text)
    with pytest.raises(applications_cli.UsageError, match="Cannot read"):
        applications_cli._read_json(str(tmp_path / "missing.json"))
    both = parse("applications", "create", "--json", str(path), "--cli-input-json", str(path))
    with pytest.raises(applications_cli.UsageError, match="once"):
        applications_cli._body(both)


def test_states_are_upper_case_and_comma_separated():
    assert applications_cli._split(["started", "STOPPED, created"]) == ["STARTED", "STOPPED", "CREATED"]
    assert applications_cli._split(None) == []


def test_a_job_run_needs_an_entry_point_and_says_so_before_sending(capsys):
    args = parse("jobs", "run", "--application", "small", "--url", "http://127.0.0.1:9")
    assert args.func(args) == 2
    assert "needs an entry point" in capsys.readouterr().err
    listing = parse("applications", "list", "--url", "http://127.0.0.1:9", "--timeout", "2")
    assert listing.func(listing) == 1
    assert "Cannot reach" in capsys.readouterr().err


def test_paths_quote_what_users_typed():
    assert applications_cli._app_path("a b/../c", "jobruns", "7") == "/applications/a%20b%2F..%2Fc/jobruns/7"


def test_the_default_url_is_the_session_service_of_the_settings(monkeypatch):
    monkeypatch.setenv("STUDIO_PORT", "18998")
    monkeypatch.setenv("STUDIO_HOST", "0.0.0.0")  # noqa: S104 - a setting's value, nothing binds here
    assert applications_cli.service_url(parse("applications", "list")) == "http://127.0.0.1:18998"


def test_the_state_directory_token_goes_only_to_this_machine(tmp_path, monkeypatch):
    for name in ("STUDIO_TOKEN", "STUDIO_LIVY_TOKEN", "STUDIO_LIVY_USER"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "token").write_text("s3cret\n")
    assert applications_cli._authorization("http://127.0.0.1:8998", tmp_path) == "Bearer s3cret"
    assert applications_cli._authorization("https://livy.example.com", tmp_path) is None
    assert applications_cli._authorization("http://127.0.0.1:8998", tmp_path / "nowhere") is None
    assert not (tmp_path / "nowhere").exists()  # read, never created
    monkeypatch.setenv("STUDIO_TOKEN", "from-env")
    assert applications_cli._authorization("http://127.0.0.1:8998", tmp_path) == "Bearer from-env"


def test_the_page_script_never_puts_data_into_html():
    script = (STATIC / "applications.js").read_text()
    assert "innerHTML" not in script and "outerHTML" not in script and "insertAdjacentHTML" not in script
    assert "textContent" in script


def test_the_applications_page_and_api_without_a_session_service(studio):
    page = studio.get("/ui/applications")
    assert page.status_code == 200
    assert 'href="/ui/applications" aria-current="page"' in page.text
    assert 'data-admin="true"' in page.text and "applications.js" in page.text
    assert re.search(r'href="/ui/applications"', studio.get("/").text)
    listing = studio.get("/api/applications")
    assert listing.status_code == 502 and "did not answer" in listing.json()["msg"]
    assert studio.post("/api/applications/small/stop", json={}).status_code == 502
    # Nothing but `local` (the service does not answer: no application is made up or forgotten).
    assert [c["name"] for c in studio.get("/api/computes?check=false").json()["computes"]] == ["local"]
