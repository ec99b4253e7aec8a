"""The ``studio`` command: ``studio serve`` | ``studio livy`` | ``studio bench`` (and more as the studio grows)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

from studio.config import Settings, is_loopback


def _settings(args: argparse.Namespace, **names: str) -> Settings:
    """Settings from the environment (STUDIO_*), overridden by the flags that were given."""
    overrides: dict[str, Any] = {}
    for flag, field in names.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides[field] = value
    return Settings(**overrides)


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY on accepted connections only when the
    # socket says it is TCP, and without it every keep-alive response waits ~40 ms for an ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def check_bind(settings: Settings, host: str) -> None:
    """Authentication may be off only on loopback: anyone who reaches the port runs code as you."""
    if settings.insecure_no_auth and not is_loopback(host):
        sys.exit(
            f"studio: refusing to bind to {host} with --insecure-no-auth: anyone who can reach it could run code "
            "on this machine. Bind to 127.0.0.1, or leave authentication on."
        )


def check_database(settings: Settings) -> None:
    """A database that a newer version wrote is refused in one line, before anything starts."""
    from studio.store import NewerDatabaseError, check_schema

    try:
        check_schema(settings.database_path)
    except NewerDatabaseError as exc:
        sys.exit(f"studio: {exc}")


def check_single_sign_on(settings: Settings) -> None:
    """Single sign-on settings that cannot work (or would let in anyone) are refused before anything starts."""
    from studio.auth.oidc import check_settings

    problem = check_settings(settings)
    if problem:
        sys.exit(f"studio: {problem}")


def with_token(settings: Settings) -> tuple[Settings, str]:
    """The settings with the studio's token resolved (STUDIO_TOKEN, else kept in the state directory)."""
    from pydantic import SecretStr

    from studio.auth.gate import settings_token

    token = settings_token(settings)
    return settings.model_copy(update={"token": SecretStr(token)}), token


def sign_in_hint(url: str, settings: Settings, token: str) -> str:
    """What to print for people: a ready-to-click URL on a terminal; never the token into a log file."""
    if settings.insecure_no_auth:
        return f"  authentication is OFF (--insecure-no-auth): {url}/"
    if sys.stdout.isatty():
        return f"  open {url}/?token={token}\n  (API clients: 'Authorization: Bearer <token>' or HTTP Basic with it as password)"
    where = "STUDIO_TOKEN" if os.environ.get("STUDIO_TOKEN") else settings.state_dir / "token"
    return f"  sign in with the token in {where} (API clients: Bearer token, or HTTP Basic with it as password)"


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%y/%m/%d %H:%M:%S",
    )


KEEP_ALIVE_SECONDS = 75


def ready_info(service: str, url: str, settings: Settings) -> dict[str, Any]:
    """What ``--ready-file`` holds once the server listens (``studio.launcher`` reads it). Never a secret."""
    return {"service": service, "url": url, "pid": os.getpid(), "state_dir": str(settings.state_dir)}


async def serve_app(
    app: Any, sock: socket.socket, announce: str, settings: Settings, ready_file: Path | None = None, ready: dict[str, Any] | None = None
) -> None:
    """Serve an ASGI app with uvicorn on an already bound socket until SIGINT/SIGTERM.

    Once it listens (its lifespan has started everything), ``announce`` is printed for people and
    ``ready`` written to ``ready_file`` for programs (JSON, 0600, atomically; removed at the end).
    At most ``settings.max_connections`` open connections are served (more get 503), and a request
    head must be complete within ``settings.header_timeout`` seconds (see ``studio.http_limits``).
    """
    import signal

    import uvicorn

    from studio import events
    from studio.http_limits import ConnectionBudget, protocol_class

    # uvicorn re-raises the signal that stopped it once it has shut down; with these handlers
    # that is a no-op, so a stop by SIGINT/SIGTERM after a clean shutdown exits with status 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    # Keep idle client connections open far longer than uvicorn's 5 s default: polling clients
    # (the `livy` client waits 5 s between batch polls, Airflow's LivyOperator and sparkmagic poll
    # on their own timers) reuse a kept-alive connection, and one the server closes at the very
    # moment the client sends on it fails with "connection reset" instead of being retried.
    budget = ConnectionBudget(app, None, settings.max_connections)
    config = uvicorn.Config(
        budget,
        lifespan="on",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        loop="auto",
        http=protocol_class(settings.header_timeout),
        # uvicorn believes X-Forwarded-For from 127.0.0.1 by default: any local process could then
        # choose the client address the audit trail records. Only configured proxies are believed.
        proxy_headers=bool(settings.forwarded_allow_ips),
        forwarded_allow_ips=settings.forwarded_allow_ips or None,
    )
    server = uvicorn.Server(config)
    budget.server_state = server.server_state
    loop, uvicorn_exit = asyncio.get_running_loop(), server.handle_exit

    def handle_exit(sig: int, frame: Any) -> None:
        # Open event streams (GET /events) end at once: uvicorn waits for open responses before it stops.
        loop.call_soon_threadsafe(events.server_stopping)
        uvicorn_exit(sig, frame)

    server.handle_exit = handle_exit  # type: ignore[method-assign]
    startup = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not startup.done():
        await asyncio.sleep(0.05)
    if server.started:
        print(announce, flush=True)
        if ready_file is not None:
            from studio.files import write_private_json

            write_private_json(ready_file, ready or {})
    try:
        await startup
    finally:
        if ready_file is not None and server.started:
            with contextlib.suppress(OSError):
                ready_file.unlink()  # it no longer listens


def cmd_livy(args: argparse.Namespace) -> int:
    settings = _settings(
        args,
        host="host",
        port="port",
        pool="pool_size",
        master="master",
        state_dir="state_dir",
        insecure_no_auth="insecure_no_auth",
        stop_sessions_on_exit="stop_sessions_on_exit",
        applications="applications_file",
    )
    check_bind(settings, settings.host)
    check_database(settings)
    setup_logging(args.verbose)
    settings, token = with_token(settings)
    from studio.livy.app import create_app

    sock = bind_socket(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    url = f"http://{host}:{port}"
    announce = (
        f"studio livy: listening on {url} (master {settings.master}, warm pool {settings.pool_size}, "
        f"state {settings.state_dir})\n{sign_in_hint(url, settings, token)}"
    )
    ready = ready_info("livy", url, settings)
    asyncio.run(serve_app(create_app(settings), sock, announce, settings, args.ready_file, ready))
    return 0


def cmd_kernel_install(args: argparse.Namespace) -> int:
    from studio.kernel.install import install

    path = install(user=args.user, sys_prefix=args.sys_prefix, prefix=args.prefix)
    print(f"Installed the PySpark kernelspec in {path}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    try:
        return _run_notebook(args)
    except KeyboardInterrupt:  # Ctrl-C before the run handles it itself (it does from its first line on)
        print("studio run: interrupted before the run started; nothing ran", file=sys.stderr)
        return 130


def _run_notebook(args: argparse.Namespace) -> int:
    from studio.execution import RunError, RunOptions, load_parameter_file, run

    parameters: dict[str, tuple[Any, bool]] = {}
    try:
        for path in args.parameter_file or []:
            parameters.update({name: (value, False) for name, value in load_parameter_file(path).items()})
    except RunError as exc:
        print(f"studio run: {exc}", file=sys.stderr)
        return 2
    for name, value in args.parameter or []:
        parameters[name] = (value, True)
    notebook = args.notebook
    output = args.output or notebook.with_name(f"{notebook.stem}.output.ipynb")
    options = RunOptions(
        notebook=notebook,
        output=output,
        html=args.html,
        parameters=parameters,
        livy_url=args.livy_url,
        cell_timeout=args.cell_timeout,
        kernel=args.kernel,
        record=args.record,
        events=args.events,
    )
    return run(options)


def cmd_bench(args: argparse.Namespace) -> int:
    from studio import bench

    return bench.main(args)


def cmd_audit(args: argparse.Namespace) -> int:
    from studio import audit

    return audit.command(args, _settings(args, state_dir="state_dir", identity_dir="identity_dir"))


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings(
        args,
        host="serve_host",
        port="serve_port",
        livy_url="livy_url",
        root="root",
        livy_port="port",
        pool="pool_size",
        state_dir="state_dir",
        insecure_no_auth="insecure_no_auth",
        stop_sessions_on_exit="stop_sessions_on_exit",
    )
    check_bind(settings, settings.serve_host)
    check_database(settings)
    check_single_sign_on(settings)
    setup_logging(args.verbose)
    if not args.verbose:
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per health check and status poll
    settings, token = with_token(settings)
    from studio.workspaces.app import create_app

    sock = bind_socket(settings.serve_host, settings.serve_port)
    host, port = sock.getsockname()[:2]
    url = f"http://{host}:{port}"
    compute = settings.livy_url or "embedded session service"
    announce = (
        f"studio serve: listening on {url} (root {settings.root}, compute local: {compute}, state {settings.state_dir})"
        f"\n{sign_in_hint(url, settings, token)}"
    )
    ready = ready_info("serve", url, settings)
    asyncio.run(serve_app(create_app(settings, url), sock, announce, settings, args.ready_file, ready))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="studio", description="Spark Studio: warm PySpark sessions for notebooks.")
    sub = parser.add_subparsers(dest="command", required=True)

    livy = sub.add_parser("livy", help="run the Livy-compatible session service")
    livy.add_argument("--host", help="address to bind (default 127.0.0.1)")
    livy.add_argument("--port", type=int, help="port (default 8998; 0 picks a free one)")
    livy.add_argument("--pool", type=int, help="warm workers to keep ready (default 1; 0 = cold sessions only)")
    livy.add_argument("--master", help="spark.master for sessions and batches (default local[*])")
    livy.add_argument(
        "--applications",
        type=Path,
        help="a JSON or TOML file of applications (EMR Serverless's definitions) to create or update at start",
    )
    livy.add_argument("--state-dir", type=Path, help="database and logs (default ~/.local/state/spark-studio)")
    livy.add_argument(
        "--insecure-no-auth",
        action="store_true",
        default=None,
        help="turn authentication off (loopback only: anyone who reaches the port runs code as you)",
    )
    livy.add_argument(
        "--stop-sessions-on-exit",
        action="store_true",
        default=None,
        help="stop every session and worker when the service stops (default: they keep running, and the next start "
        "on the same state directory carries on with them)",
    )
    livy.add_argument(
        "--ready-file",
        type=Path,
        help="once it listens, write JSON with its url and pid here (0600); for programs that start it",
    )
    livy.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    livy.set_defaults(func=cmd_livy)

    kernel = sub.add_parser("kernel", help="the PySpark Jupyter kernel")
    kernel_sub = kernel.add_subparsers(dest="kernel_command", required=True)
    install = kernel_sub.add_parser("install", help="install the PySpark kernelspec for Jupyter")
    where = install.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="for this user only (~/.local/share/jupyter)")
    where.add_argument("--sys-prefix", action="store_true", help="into this Python environment (sys.prefix)")
    where.add_argument("--prefix", help="under this prefix")
    install.set_defaults(func=cmd_kernel_install)

    run = sub.add_parser("run", help="run a notebook headless (for CI), with papermill-style parameters")
    run.add_argument("notebook", type=Path)
    run.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("NAME", "VALUE"), help="a parameter; repeatable")
    run.add_argument("-f", "--parameter-file", type=Path, action="append", help="YAML file of parameters; repeatable")
    run.add_argument("-o", "--output", type=Path, help="output notebook (default NOTEBOOK.output.ipynb beside it)")
    run.add_argument("--html", type=Path, help="also write the output as HTML")
    run.add_argument("--livy-url", help="session service to use (default: start one for this run)")
    run.add_argument("--cell-timeout", type=float, help="seconds a cell may run (default: no limit)")
    run.add_argument("--kernel", default="pyspark", help="kernel to run it with (default pyspark)")
    run.add_argument("--record", type=Path, help="folder for the run record (record.json)")
    run.add_argument(
        "--events", type=Path, help="append progress to this file as JSON lines, for programs (see studio.execution.events)"
    )
    run.set_defaults(func=cmd_run)

    bench = sub.add_parser("bench", help="measure warm vs cold start, statement round trip and memory")
    bench.add_argument("--runs", type=int, default=200, help="round trips per latency measurement (default 200)")
    bench.add_argument("--cold-runs", type=int, default=3, help="cold sessions and plain PySpark starts (default 3)")
    bench.add_argument("--warm-runs", type=int, default=5, help="warm sessions to time (default 5)")
    bench.add_argument("--transfer-rows", type=int, default=1_000_000, help="rows of the %%%%sql transfer test (default 1,000,000)")
    bench.add_argument("--transfer-runs", type=int, default=3, help="repetitions of the transfer test (default 3)")
    bench.add_argument("--idle-seconds", type=float, default=75.0, help="idle time before measuring worker memory (default 75)")
    bench.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    bench.add_argument("--state-dir", type=Path, help="state directory of the services the bench starts")
    bench.add_argument(
        "--load",
        action="store_true",
        help="instead: many notebooks at once (sessions x statements over REST, plus kernels); round trips beside one client alone, and the books",
    )
    bench.add_argument(
        "--applications",
        action="store_true",
        help="instead: applications (a session of its application's shape warm vs cold, auto-stop and auto-start, "
        "maximum capacity under 20 concurrent requests)",
    )
    bench.add_argument(
        "--density",
        action="store_true",
        help="instead: shared-driver sessions (Spark Connect) vs dedicated drivers: memory of N idle sessions, a new "
        "session's first result from the warm pool and with an empty one, N sessions aggregating at once, paired statement latency",
    )
    bench.add_argument("--sessions", type=int, default=50, help="idle shared sessions of --density (default 50)")
    bench.add_argument("--dedicated-sessions", type=int, default=3, help="dedicated sessions --density measures beside them (default 3)")
    bench.add_argument("--latency-rounds", type=int, default=7, help="paired shared/dedicated rounds of --density's statement latency (default 7)")
    bench.add_argument("--settle-seconds", type=float, default=15.0, help="--density: idle seconds before memory is measured (default 15)")
    bench.add_argument("--wave", type=int, default=10, help="--density: sessions asked for at once while the N are created (default 10)")
    bench.add_argument("--load-sessions", type=int, default=10, help="sessions of --load, each with a client of its own (default 10)")
    bench.add_argument("--load-statements", type=int, default=100, help="statements each --load client sends (default 100)")
    bench.add_argument("--load-kernels", type=int, default=4, help="PySpark kernels running a notebook during --load (default 4)")
    bench.set_defaults(func=cmd_bench)

    serve = sub.add_parser("serve", help="run the workspace server and Studio web UI (and a session service)")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port of the Studio (default 8890; 0 picks a free one)")
    serve.add_argument(
        "--livy-url", help="Livy URL to register as the compute 'local' (default: start a session service here)"
    )
    serve.add_argument("--root", type=Path, help="folder of the workspaces' notebooks (default ~/spark-studio)")
    serve.add_argument(
        "--livy-port", type=int, help="port of the session service it starts (default 8998, or a free one if taken)"
    )
    serve.add_argument("--pool", type=int, help="warm workers of the session service it starts (default 1)")
    serve.add_argument("--state-dir", type=Path, help="database and logs (default ~/.local/state/spark-studio)")
    serve.add_argument(
        "--insecure-no-auth",
        action="store_true",
        default=None,
        help="turn authentication off for the Studio and its session service (loopback only)",
    )
    serve.add_argument(
        "--stop-sessions-on-exit",
        action="store_true",
        default=None,
        help="stop everything when it stops: running workspaces (JupyterLabs, kernels), notebook runs, and the "
        "sessions of the session service it started (default: they keep running, and the next start on the same "
        "state directory finds them again)",
    )
    serve.add_argument(
        "--ready-file",
        type=Path,
        help="once it listens, write JSON with its url and pid here (0600); for programs that start it",
    )
    serve.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    serve.set_defaults(func=cmd_serve)

    from studio.auth.commands import add_parsers as add_user_parsers

    add_user_parsers(sub)  # studio users ..., studio tokens ...
    from studio.applications_cli import add_parsers as add_application_parsers

    add_application_parsers(sub)  # studio applications ..., studio jobs ...

    trail = sub.add_parser("audit", help="read the audit trail (newest first), as GET /api/audit does")
    trail.add_argument("--user", help="records of this user")
    trail.add_argument("--action", help="records whose action contains this, any case (statements, sign-in, DELETE)")
    trail.add_argument("--target", help="records about this path and below it (/sessions/3, /api/workspaces/2)")
    trail.add_argument("--outcome", help="records with this outcome (201, 403, ok, ...)")
    trail.add_argument("--since", help="from this time: epoch seconds, ISO 8601 (UTC unless it says), or an age (15m, 2h, 7d)")
    trail.add_argument("--until", help="up to this time (as --since)")
    trail.add_argument("--limit", type=int, default=50, help="records at most (default 50, at most 1000)")
    trail.add_argument("--before", type=int, help="records older than this id (paging)")
    trail.add_argument("--json", action="store_true", help="one JSON record a line, as in audit.jsonl")
    trail.add_argument("--verify", action="store_true", help="instead: check that no record was changed or removed (hash chain)")
    trail.add_argument("--state-dir", type=Path, help="state directory (default ~/.local/state/spark-studio)")
    trail.add_argument("--identity-dir", type=Path, help="where audit.db is (default: the state directory; STUDIO_IDENTITY_DIR)")
    trail.set_defaults(func=cmd_audit)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("serve", "livy", "run"):
        # Everything these and their children create is private to this user (README: Files and modes).
        # Not for `kernel install`: a kernelspec in a shared prefix must stay readable by everyone.
        from studio.files import private_umask

        private_umask()
    return int(args.func(args) or 0)
