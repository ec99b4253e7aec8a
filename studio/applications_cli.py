"""``studio applications ...`` and ``studio jobs ...``: the session service's applications and job runs
from the command line, as ``aws emr-serverless`` drives EMR Serverless.

They are clients of a running session service's REST API (``/applications…`` and
``/applications/{app}/jobruns…``): input is JSON with EMR Serverless's field names (``--json FILE``,
``-`` for standard input, or ``--cli-input-json``, AWS's name for the same) with a few flags on top
for what is typed most (``--name``, ``--initial-drivers``, ...; a flag wins over the JSON), and the
output is exactly the service's JSON, indented, so ``| jq`` works. A refusal prints the service's
``msg`` on standard error and exits 1.

Where: ``--url``, else ``http://<host>:<port>`` of the settings (``STUDIO_HOST``/``STUDIO_PORT``,
127.0.0.1:8998, where ``studio livy`` listens by default). Credentials as every client of the
service finds them (``studio.auth.credentials``): ``STUDIO_LIVY_TOKEN`` (with ``STUDIO_LIVY_USER`` for
HTTP Basic), else ``STUDIO_TOKEN``, else, for a service on this machine only, the studio's token in
the state directory (``--state-dir``, as for ``studio users``). A token is never taken from the
command line: ``ps`` shows it to everyone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import quote, urlsplit

from studio.errors import StudioError

if TYPE_CHECKING:  # imported when a command runs, not for `studio --help`
    from studio.livy_client import LivyClient

# EMR Serverless's final job run states: --wait stops there.
FINAL_JOB_STATES = ("SUCCESS", "FAILED", "CANCELLED")


class UsageError(StudioError):
    """Bad input on the command line (not the service's refusal)."""


# -- where and as whom -------------------------------------------------------------------------


def service_url(args: argparse.Namespace) -> str:
    if args.url:
        return str(args.url).rstrip("/")
    from studio.config import Settings

    settings = Settings()
    host = settings.host
    if host in ("0.0.0.0", "::", ""):  # noqa: S104 - bound to every address: this machine's is the loopback one
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.port}"


def _authorization(url: str, state_dir: Path | None) -> str | None:
    from studio.auth.credentials import authorization, credentials_for
    from studio.paths import is_loopback

    if state_dir is None or os.environ.get("STUDIO_LIVY_TOKEN") or os.environ.get("STUDIO_TOKEN"):
        return authorization(*credentials_for(url))
    # The studio's token of the state directory asked for: read, never created (this is a client), and
    # only sent to a service on this machine (it would hand the studio's secret to whoever runs another).
    if not is_loopback(urlsplit(url).hostname or ""):
        return None
    try:
        token = (state_dir.expanduser() / "token").read_text().strip()
    except OSError:
        return None
    return authorization(None, token or None)


def client(args: argparse.Namespace) -> "LivyClient":
    from studio.livy_client import LivyClient

    url = service_url(args)
    return LivyClient(url, timeout=args.timeout, authorization=_authorization(url, args.state_dir))


def _app_path(app: str, *rest: str) -> str:
    return "/applications/" + "/".join(quote(part, safe="") for part in (app, *rest))


# -- JSON in and out ---------------------------------------------------------------------------


def _read_json(source: str) -> dict[str, Any]:
    """A JSON object from a file, ``-`` (standard input), ``file://PATH`` (as the AWS CLI), or the text itself."""
    text: str
    if source == "-":
        text = sys.stdin.read()
    elif source.lstrip().startswith(("{", "[")):
        text = source
    else:
        path = Path(source.removeprefix("file://")).expanduser()
        try:
            text = path.read_text()
        except OSError as exc:
            raise UsageError(f"Cannot read the JSON input {source}: {exc.strerror or exc}.") from None
    try:
        body = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"The JSON input {source} is not valid JSON: {exc}.") from None
    if not isinstance(body, dict):
        raise UsageError(f"The JSON input {source} must be an object ({{...}}), not {type(body).__name__}.")
    return body


def _body(args: argparse.Namespace) -> dict[str, Any]:
    sources = [s for s in (getattr(args, "json", None), getattr(args, "cli_input_json", None)) if s]
    if len(sources) > 1:
        raise UsageError("Give the JSON input once: --json or --cli-input-json.")
    return _read_json(sources[0]) if sources else {}


def _nested(body: dict[str, Any], *keys: str) -> dict[str, Any]:
    """``body[k1][k2]...``, made (as objects) where missing."""
    node = body
    for key in keys:
        child = node.get(key)
        if not isinstance(child, dict):
            child = node[key] = {}
        node = child
    return node


def _print(data: Any) -> None:
    if data is None:
        return
    if isinstance(data, bytes):
        sys.stdout.write(data.decode(errors="replace"))
        return
    print(json.dumps(data, indent=2))


# -- applications ------------------------------------------------------------------------------


def _application_flags(args: argparse.Namespace, body: dict[str, Any]) -> dict[str, Any]:
    if args.name is not None:
        body["name"] = args.name
    if args.initial_drivers is not None:
        _nested(body, "initialCapacity", "DRIVER")["workerCount"] = args.initial_drivers
    if args.max_drivers is not None:
        _nested(body, "maximumCapacity")["drivers"] = args.max_drivers
    if args.driver_memory is not None:
        _nested(body, "driverConfiguration")["driverMemory"] = args.driver_memory
    if args.idle_timeout_minutes is not None:
        stop = _nested(body, "autoStopConfiguration")
        stop["enabled"] = args.idle_timeout_minutes > 0
        if args.idle_timeout_minutes > 0:
            stop["idleTimeoutMinutes"] = args.idle_timeout_minutes
    return body


def applications_create(args: argparse.Namespace, livy: "LivyClient") -> int:
    body = _application_flags(args, _body(args))
    if not body.get("name"):
        raise UsageError("An application needs a name: --name NAME, or \"name\" in the JSON input.")
    _print(livy.request("POST", "/applications", json=body))
    return 0


def applications_list(args: argparse.Namespace, livy: "LivyClient") -> int:
    params: list[tuple[str, str | int]] = [("states", s) for s in _split(args.states)]
    if args.max_results is not None:
        params.append(("maxResults", args.max_results))
    _print(livy.request("GET", "/applications", params=params))
    return 0


def applications_get(args: argparse.Namespace, livy: "LivyClient") -> int:
    _print(livy.request("GET", _app_path(args.application)))
    return 0


def applications_update(args: argparse.Namespace, livy: "LivyClient") -> int:
    body = _application_flags(args, _body(args))
    if not body:
        raise UsageError("Nothing to update: give --json FILE or a flag (--initial-drivers, --max-drivers, ...).")
    _print(livy.request("PATCH", _app_path(args.application), json=body))
    return 0


def applications_start(args: argparse.Namespace, livy: "LivyClient") -> int:
    _print(livy.request("POST", _app_path(args.application, "start"), json={}, ok=(200, 201, 202)))
    return 0


def applications_stop(args: argparse.Namespace, livy: "LivyClient") -> int:
    _print(livy.request("POST", _app_path(args.application, "stop"), json={}, ok=(200, 201, 202)))
    return 0


def applications_delete(args: argparse.Namespace, livy: "LivyClient") -> int:
    _print(livy.request("DELETE", _app_path(args.application), ok=(200, 202, 204)))
    return 0


# -- job runs ----------------------------------------------------------------------------------


def jobs_run(args: argparse.Namespace, livy: "LivyClient") -> int:
    body = _body(args)
    if args.name is not None:
        body["name"] = args.name
    submit = _nested(body, "jobDriver", "sparkSubmit")
    if args.entry_point is not None:
        submit["entryPoint"] = args.entry_point
    if args.args is not None:
        submit["entryPointArguments"] = list(args.args)
    if args.spark_submit_parameters is not None:
        submit["sparkSubmitParameters"] = args.spark_submit_parameters
    if args.timeout_minutes is not None:
        body["executionTimeoutMinutes"] = args.timeout_minutes
    if not submit.get("entryPoint"):
        raise UsageError("A job run needs an entry point: --entry-point FILE, or jobDriver.sparkSubmit.entryPoint in the JSON.")
    started = livy.request("POST", _app_path(args.application, "jobruns"), json=body)
    if not args.wait:
        _print(started)
        return 0
    job_run_id = str(started.get("jobRunId"))
    run = _wait(livy, args.application, job_run_id, args.poll_seconds)
    _print(run)
    return 0 if _state(run) == "SUCCESS" else 1


def _state(run: dict[str, Any]) -> str:
    inner = run.get("jobRun", run)
    return str(inner.get("state", "")) if isinstance(inner, dict) else ""


def _wait(livy: "LivyClient", application: str, job_run_id: str, poll: float) -> dict[str, Any]:
    """Poll the job run until it ends; its state changes go to standard error (standard output stays JSON)."""
    path = _app_path(application, "jobruns", job_run_id)
    last = ""
    try:
        while True:
            run = livy.request("GET", path)
            state = _state(run)
            if state != last:
                print(f"job run {job_run_id}: {state}", file=sys.stderr, flush=True)
                last = state
            if state in FINAL_JOB_STATES:
                return dict(run)
            time.sleep(poll)
    except KeyboardInterrupt:
        print(f"studio: stopped waiting; job run {job_run_id} goes on (studio jobs cancel --application {application} {job_run_id})", file=sys.stderr)
        raise


def jobs_list(args: argparse.Namespace, livy: "LivyClient") -> int:
    params: list[tuple[str, str | int]] = [("states", s) for s in _split(args.states)]
    if args.created_at_after:
        params.append(("createdAtAfter", args.created_at_after))
    if args.created_at_before:
        params.append(("createdAtBefore", args.created_at_before))
    if args.max_results is not None:
        params.append(("maxResults", args.max_results))
    _print(livy.request("GET", _app_path(args.application, "jobruns"), params=params))
    return 0


def jobs_get(args: argparse.Namespace, livy: "LivyClient") -> int:
    _print(livy.request("GET", _app_path(args.application, "jobruns", args.job_run_id)))
    return 0


def jobs_cancel(args: argparse.Namespace, livy: "LivyClient") -> int:
    _print(livy.request("DELETE", _app_path(args.application, "jobruns", args.job_run_id), ok=(200, 202, 204)))
    return 0


def jobs_logs(args: argparse.Namespace, livy: "LivyClient") -> int:
    log = livy.request("GET", _app_path(args.application, "jobruns", args.job_run_id, "log"))
    if isinstance(log, bytes):
        sys.stdout.write(log.decode(errors="replace"))
    elif isinstance(log, str):
        sys.stdout.write(log)
    else:  # a JSON answer (a service that wraps the text): shown as it came
        _print(log)
    sys.stdout.flush()
    return 0


def _split(values: list[str] | None) -> list[str]:
    """``--states A --states B,C`` -> [A, B, C] (upper case, as EMR's states)."""
    return [part.strip().upper() for value in values or [] for part in value.split(",") if part.strip()]


# -- the parsers -------------------------------------------------------------------------------


def _run(action: Callable[[argparse.Namespace, "LivyClient"], int]) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        from studio.livy_client import LivyError

        try:
            livy = client(args)
            try:
                return action(args, livy)
            finally:
                livy.close()
        except LivyError as exc:
            status = f" (HTTP {exc.status})" if exc.status else ""
            print(f"studio: {exc}{status}", file=sys.stderr)
            return 1
        except StudioError as exc:
            print(f"studio: {exc.msg}", file=sys.stderr)
            return 2 if isinstance(exc, UsageError) else 1
        except KeyboardInterrupt:
            return 130

    return command


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="the session service (default http://127.0.0.1:8998, from STUDIO_HOST/STUDIO_PORT)")
    parser.add_argument(
        "--state-dir",
        type=Path,
        help="read the studio's token from this state directory (default: STUDIO_LIVY_TOKEN, STUDIO_TOKEN, "
        "else ~/.local/state/spark-studio/token for a service on this machine)",
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each answer (default 60)")


def _json_input(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="FILE", help="the request as JSON with EMR Serverless's field names (FILE, '-' for stdin)")
    parser.add_argument("--cli-input-json", metavar="FILE", help="the same as --json (the AWS CLI's name; file:// works too)")


def _application_options(parser: argparse.ArgumentParser) -> None:
    _json_input(parser)
    parser.add_argument("--name", help="the application's name")
    parser.add_argument("--initial-drivers", type=int, help="warm drivers kept ready (initialCapacity.DRIVER.workerCount)")
    parser.add_argument("--max-drivers", type=int, help="live sessions + running job runs at most (maximumCapacity.drivers)")
    parser.add_argument("--driver-memory", help="the drivers' memory, as Spark writes it: 2g (driverConfiguration.driverMemory)")
    parser.add_argument(
        "--idle-timeout-minutes",
        type=int,
        help="stop after this many idle minutes (autoStopConfiguration; 0 turns auto-stop off)",
    )


def add_parsers(sub: Any) -> None:
    """``studio applications`` and ``studio jobs`` on the ``studio`` command's subparsers."""
    apps = sub.add_parser("applications", help="applications of the session service: create, list, get, update, start, stop, delete")
    apps_sub = apps.add_subparsers(dest="applications_command", required=True)

    create = apps_sub.add_parser("create", help="create an application (admins); prints applicationId, name and arn")
    _application_options(create)
    _common(create)
    create.set_defaults(func=_run(applications_create))

    listing = apps_sub.add_parser("list", help="the applications (summaries)")
    listing.add_argument("--states", action="append", help="only these states (repeatable or comma-separated: STARTED,STOPPED)")
    listing.add_argument("--max-results", type=int, help="at most this many")
    _common(listing)
    listing.set_defaults(func=_run(applications_list))

    get = apps_sub.add_parser("get", help="one application with its definition, state and capacity")
    get.add_argument("application", help="name or id")
    _common(get)
    get.set_defaults(func=_run(applications_get))

    update = apps_sub.add_parser("update", help="change an application's definition (admins; while CREATED or STOPPED)")
    update.add_argument("application", help="name or id")
    _application_options(update)
    _common(update)
    update.set_defaults(func=_run(applications_update))

    for verb, action, text in (
        ("start", applications_start, "start an application: its warm drivers start (admins)"),
        ("stop", applications_stop, "stop an application: its warm drivers are released (admins)"),
        ("delete", applications_delete, "delete an application (admins; only while CREATED or STOPPED)"),
    ):
        parser = apps_sub.add_parser(verb, help=text)
        parser.add_argument("application", help="name or id")
        _common(parser)
        parser.set_defaults(func=_run(action))

    jobs = sub.add_parser("jobs", help="job runs in an application: run, list, get, cancel, logs")
    jobs_sub = jobs.add_subparsers(dest="jobs_command", required=True)

    run = jobs_sub.add_parser("run", help="start a job run (spark-submit of a file); prints its jobRunId (with --wait: the ended run)")
    run.add_argument("--application", "-a", required=True, help="application name or id")
    _json_input(run)
    run.add_argument("--entry-point", help="the file to run: a .py file or a jar (jobDriver.sparkSubmit.entryPoint)")
    run.add_argument("--args", nargs="*", help="its arguments (entryPointArguments)")
    run.add_argument("--spark-submit-parameters", help="e.g. '--conf spark.executor.memory=2g --py-files deps.zip'")
    run.add_argument("--name", help="the job run's name")
    run.add_argument("--timeout-minutes", type=int, help="cancel it after this many minutes (executionTimeoutMinutes)")
    run.add_argument("--wait", action="store_true", help="wait until it ends; exit 0 only for SUCCESS")
    run.add_argument("--poll-seconds", type=float, default=1.0, help="how often --wait asks (default 1)")
    _common(run)
    run.set_defaults(func=_run(jobs_run))

    jlist = jobs_sub.add_parser("list", help="job runs of an application, newest first")
    jlist.add_argument("--application", "-a", required=True, help="application name or id")
    jlist.add_argument("--states", action="append", help="only these states (repeatable or comma-separated)")
    jlist.add_argument("--created-at-after", help="created after this time (ISO 8601 or epoch seconds)")
    jlist.add_argument("--created-at-before", help="created before this time (ISO 8601 or epoch seconds)")
    jlist.add_argument("--max-results", type=int, help="at most this many")
    _common(jlist)
    jlist.set_defaults(func=_run(jobs_list))

    for verb, action, text in (
        ("get", jobs_get, "one job run"),
        ("cancel", jobs_cancel, "cancel a job run"),
        ("logs", jobs_logs, "the job run's driver log"),
    ):
        parser = jobs_sub.add_parser(verb, help=text)
        parser.add_argument("job_run_id", metavar="JOB_RUN_ID")
        parser.add_argument("--application", "-a", required=True, help="application name or id")
        _common(parser)
        parser.set_defaults(func=_run(action))
