"""One typed settings object for the whole studio.

Every value can come from the environment with the prefix ``STUDIO_`` (for example
``STUDIO_POOL_SIZE=2``) or from the command line, which overrides the environment.
Settings are passed explicitly (``create_app(settings)``), never read from module globals.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from studio.paths import default_cache_dir, default_root, default_state_dir, is_loopback

__all__ = ["Settings", "is_loopback"]


# Stands for "the state directory" until the settings are complete (no real path holds a NUL byte).
_DEFAULT_IDENTITY_DIR = Path("\0state_dir")


def _default_max_sessions() -> int:
    """About one live session per 1.5 GiB of this machine's memory, at least one."""
    try:
        pages = os.sysconf("SC_PHYS_PAGES")
        page_size = os.sysconf("SC_PAGE_SIZE")
        return max(1, int(pages * page_size / (1.5 * 1024**3)))
    except (ValueError, OSError):
        return 8


class Settings(BaseSettings):
    """Settings of the session service (``studio livy``) and the workspace server (``studio serve``)."""

    model_config = SettingsConfigDict(env_prefix="STUDIO_", extra="ignore")

    # --- network -------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address the session service binds to.")
    port: int = Field(8998, description="Port of the session service (Livy's default is 8998); 0 picks a free port.")
    token: SecretStr | None = Field(
        None,
        description="The studio's secret (STUDIO_TOKEN). Unset: one is generated at the first start and kept in "
        "<state_dir>/token (0600). API clients send it as `Authorization: Bearer <token>` or as the password of "
        "HTTP Basic (any user name); browsers exchange it once for a session cookie.",
    )
    insecure_no_auth: bool = Field(
        False,
        description="Turn authentication off (anyone who reaches the port runs code as you). Refused together with "
        "a non-loopback address. Host, Origin and Content-Type checks stay on.",
    )
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Host names (besides loopback names and the bound address) that requests may name in their Host "
        "header, e.g. the name of a reverse proxy in front of the studio: a comma-separated list or JSON. '*' turns "
        "the Host check off. Other Host values are refused (DNS rebinding).",
    )
    livy_token: SecretStr | None = Field(
        None,
        description="Credential `studio serve` uses for the Livy endpoint it was given with --livy-url (default: the "
        "studio's own token, right for a `studio livy` that shares the state directory).",
    )
    session_cookie_days: float = Field(
        7.0, gt=0, description="Days a browser stays signed in after it logged in with the token."
    )

    # --- single sign-on: OpenID Connect for the Studio's browsers (studio.auth.oidc) -------
    oidc_issuer: str = Field(
        "",
        description="Issuer URL of an OpenID Connect provider (its discovery document is <issuer>/.well-known/"
        "openid-configuration): https, or http only on a loopback address. Empty: no single sign-on.",
    )
    oidc_client_id: str = Field("", description="The Studio's client id at the provider.")
    oidc_client_secret: SecretStr | None = Field(
        None, description="The Studio's client secret at the provider (never logged, never in an API answer)."
    )
    oidc_scopes: str = Field("openid email profile", description="Scopes asked for (space-separated; openid is always asked).")
    oidc_allowed_domains: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="E-mail domains whose users may sign in (comma-separated or JSON), e.g. example.com.",
    )
    oidc_allowed_groups: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Groups (in the groups claim) whose members may sign in (comma-separated or JSON).",
    )
    oidc_admin_group: str = Field(
        "", description="Members of this group sign in with the role admin (and may sign in whatever the other rules say)."
    )
    oidc_allow_any_user: bool = Field(
        False,
        description="Let in every user the provider signs in. Without it, and without allowed domains or groups, "
        "`studio serve` refuses to start.",
    )
    oidc_groups_claim: str = Field("groups", description="Claim of the ID token (or userinfo) that lists the user's groups.")
    oidc_username_claim: str = Field(
        "preferred_username",
        description="Claim that gives the user's name in the Studio (falling back to the e-mail's local part).",
    )
    oidc_provider_name: str = Field(
        "", description="Name on the sign-in button (\"Sign in with <name>\"); default: the issuer's host."
    )
    oidc_redirect_url: str = Field(
        "",
        description="The callback URL registered at the provider, <studio url>/oauth/callback; default: built from "
        "the address the browser used (set it behind a reverse proxy).",
    )

    # --- Spark ---------------------------------------------------------------------------
    master: str = Field("local[*]", description="spark.master for every session worker and batch.")
    spark_conf: dict[str, str] = Field(
        default_factory=dict,
        description="Spark configuration applied to every worker and batch before the session's own conf.",
    )
    spark_local_ip: str = Field(
        "127.0.0.1",
        description="SPARK_LOCAL_IP for workers and batches: the address drivers and their UIs bind to. "
        "Set it to a reachable address when executors run on other machines.",
    )
    spark_log_level: str = Field("WARN", description="Log level of the Spark drivers in session workers.")
    java_options: str = Field(
        "",
        description="Extra JVM options for every session driver (appended to spark.driver.extraJavaOptions).",
    )
    cds: bool = Field(
        True,
        description="Use an AppCDS class-data archive for driver JVMs; it is built once per installation "
        "in the background and roughly halves a cold driver's start time.",
    )
    cache_dir: Path = Field(default_factory=default_cache_dir, description="Where the AppCDS archive is kept.")

    # --- pool and workers ------------------------------------------------------------------
    pool_size: int = Field(1, ge=0, description="Warm workers kept ready (SparkSession up, first job run). 0: cold only.")
    pool_warmup_seconds: float = Field(
        10.0,
        ge=0,
        description="Seconds a warm worker spends running small jobs before it joins the pool, so the JIT has "
        "compiled the job path and a session's first statements run at full speed.",
    )
    pool_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="Niceness of warm workers while they wait in the pool, so that refilling the pool does not "
        "slow down running sessions; a handed-out worker is set back to normal priority where allowed.",
    )
    pool_refill_max_delay: float = Field(
        30.0,
        ge=0,
        description="A refill waits until no statement has run for a second, so interactive work keeps both "
        "cores; after this many seconds it starts anyway.",
    )
    worker_command: list[str] = Field(
        default_factory=list,
        description="Command that starts a worker (default: this Python with -m studio.worker). "
        "Tests point it at small misbehaving programs.",
    )
    worker_start_timeout: float = Field(
        180.0, gt=0, description="Seconds a worker may take to create its SparkSession before it is killed."
    )
    worker_restart_limit: int = Field(
        5,
        ge=1,
        description="Warm workers that may fail to start in a row before the pool stops refilling (and logs why).",
    )
    stop_timeout: float = Field(
        5.0, gt=0, description="Seconds a worker gets to stop politely before SIGTERM, and again before SIGKILL."
    )
    cancel_timeout: float = Field(
        30.0,
        gt=0,
        description="Seconds a cancelled statement may keep running (repeatedly interrupted) before it is "
        "recorded as cancelled while the code still runs.",
    )
    worker_orphan_timeout: float = Field(
        600.0,
        gt=0,
        description="Seconds a session worker keeps running without its session service: workers outlive a restart "
        "of `studio livy` (and of `studio serve`), and the next start finds them again with their sessions; a "
        "worker whose service has not come back after this long stops itself (Livy's rsc idle timeout: 10 min).",
    )
    stop_sessions_on_exit: bool = Field(
        False,
        description="Stop every session and worker when the service stops (`--stop-sessions-on-exit`). By default "
        "they keep running, so that the next start on the same state directory carries on with them (each worker "
        "stops itself after STUDIO_WORKER_ORPHAN_TIMEOUT if none comes).",
    )

    # --- sessions ------------------------------------------------------------------------
    max_sessions: int = Field(
        default_factory=_default_max_sessions,
        ge=1,
        description="Live sessions at most; more are refused with a clear message (default: one per 1.5 GiB of RAM).",
    )
    driver_mode: Literal["dedicated", "shared"] = Field(
        "dedicated",
        description="How the default application runs sessions: `dedicated`, a Spark driver (JVM) of its own per "
        "session; `shared`, lean sessions on one Spark Connect driver per user (about a third of the memory per "
        "idle session; no `sc` or RDDs). Other applications say it in their `driverMode`.",
    )
    shared_pool_size: int = Field(
        2,
        ge=0,
        le=64,
        description="Shared-driver mode: lean sessions kept ready (Spark Connect session made) per user's driver.",
    )
    shared_driver_idle_minutes: float = Field(
        15.0,
        gt=0,
        description="Shared-driver mode of the default application: a user's driver with no session stops after "
        "this many idle minutes (other applications use their autoStopConfiguration.idleTimeoutMinutes).",
    )
    connect_port: int = Field(
        15002,
        ge=-1,
        le=65535,
        description="Port of the Spark Connect endpoint (sc://host:port) through which any Connect client reaches "
        "its user's shared driver with the studio's credentials; 0 picks a free port, -1 turns it off.",
    )
    memory_budget_mb: int | None = Field(
        None,
        ge=256,
        description="Memory that sessions and drivers may take together, in MB (default: 80% of this machine's "
        "RAM). Admission counts the footprints measured of live sessions and drivers against it.",
    )
    min_available_memory_mb: int = Field(
        600,
        ge=0,
        description="A new worker is not started while the machine has less memory available than this.",
    )
    session_idle_timeout: float = Field(
        3600.0, ge=0, description="Seconds of inactivity after which an idle session is stopped (Livy: 1h). 0: never."
    )
    session_state_retain: float = Field(
        600.0,
        ge=0,
        description="Seconds a session or batch that ended on its own (dead, success) stays listed with its log "
        "(Livy: 600s). A DELETEd one leaves the API at once, as in Livy; its log stays readable this long at its "
        "appInfo.driverLogUrl (/ui/session/{id}/log, /ui/batch/{id}/log).",
    )
    cull_interval: float = Field(
        30.0, gt=0, description="Seconds between checks for idle, expired and finished sessions."
    )
    retained_statements: int = Field(100, ge=1, description="Statements kept per session (Livy: 100).")
    max_code_bytes: int = Field(10 * 1024 * 1024, ge=1, description="Largest statement code accepted, in bytes.")
    max_output_bytes: int = Field(
        10 * 1024 * 1024,
        ge=1024,
        description="Largest output of one statement, in UTF-8 bytes: longer text is cut, a `sql` result keeps "
        "the rows that fit, other oversized parts are dropped, each with a note saying so.",
    )
    max_session_output_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1024,
        description="Bytes of statement output one session keeps in the service's memory; beyond it the oldest "
        "finished statements are forgotten (404), as Livy forgets statements beyond its retained 100.",
    )
    max_log_page_lines: int = Field(
        10000,
        ge=1,
        description="Lines one /log request may read: a larger explicit `size` is refused with 400, and `size=-1` "
        "(all) returns the newest this many lines.",
    )
    sql_num_rows: int = Field(1000, ge=1, description="Rows a `sql` statement returns at most (livy.rsc.sql.num-rows).")
    max_request_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="Largest HTTP request body accepted, in bytes."
    )
    forwarded_allow_ips: str = Field(
        "",
        description="Addresses of reverse proxies whose X-Forwarded-For/-Proto headers are believed (uvicorn's "
        "forwarded_allow_ips, comma-separated, '*' for any). Empty: none, so a client cannot choose the address "
        "that the audit trail records.",
    )
    max_connections: int = Field(
        1000,
        ge=1,
        description="Open HTTP connections (and requests in progress) each server accepts at most; beyond it a "
        "request gets 503. Idle kept-alive connections count.",
    )
    header_timeout: float = Field(
        15.0,
        gt=0,
        description="Seconds a new HTTP connection has to send its complete request head (request line and "
        "headers) before the server closes it, so connections that trickle their headers (slowloris) cannot "
        "hold the server's slots.",
    )

    # --- quotas per user (studio.auth.quotas): defaults per role, a user's own override in the users' directory ---
    user_max_sessions: int | None = Field(
        5, ge=0, description="Live Spark sessions (and batches) a user with the role `user` may have at once; empty: no limit."
    )
    user_max_running_workspaces: int | None = Field(
        2, ge=0, description="Workspaces a user with the role `user` may have running at once; empty: no limit."
    )
    user_max_executions: int | None = Field(
        4, ge=0, description="Notebook executions a user with the role `user` may have queued or running; empty: no limit."
    )
    admin_max_sessions: int | None = Field(None, ge=0, description="As user_max_sessions, for admins (default: no limit).")
    admin_max_running_workspaces: int | None = Field(
        None, ge=0, description="As user_max_running_workspaces, for admins (default: no limit)."
    )
    admin_max_executions: int | None = Field(None, ge=0, description="As user_max_executions, for admins (default: no limit).")

    # --- access control of the session service (Livy's livy.server.access-control.*; studio.livy.access) ---
    view_users: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Users who may see every session and batch of the session service (state, statements and their "
        "output, logs) besides their owners and admins (Livy's livy.server.access-control.view-users): a "
        "comma-separated list or JSON.",
    )
    modify_users: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Users who may see and also change every session and batch (run statements, cancel, delete) besides "
        "their owners and admins (Livy's livy.server.access-control.modify-users): a comma-separated list or JSON.",
    )

    # --- applications (studio.livy.applications) -------------------------------------------
    applications_file: Path | None = Field(
        None,
        description="A JSON or TOML file of application definitions (EMR Serverless's fields: name, driverConfiguration, "
        "initialCapacity, maximumCapacity, autoStopConfiguration, ...), created or brought up to date at every start.",
    )

    # --- observability (GET /metrics, GET /events; studio.events) ---------------------------
    event_webhooks: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="http(s) URLs that get every state-change event (applications, sessions, job runs, workspaces, "
        "executions) as a JSON POST, as GET /events shows them: a comma-separated list or JSON. Checked at start; a "
        "receiver that fails or is slow (5 s) loses events, which is logged (without the URL's credentials or query).",
    )

    # --- storage -------------------------------------------------------------------------
    state_dir: Path = Field(
        default_factory=default_state_dir,
        description="Where the database and the worker and batch logs live: a folder of its own, since at every "
        "start it is made 0700 and everything in it private to this user (group and other bits removed).",
    )

    identity_dir: Path = Field(
        default_factory=lambda: _DEFAULT_IDENTITY_DIR,
        description="Where the users' directory (users.db: users, roles, hashed passwords and tokens) and the audit "
        "trail live (default: state_dir). `studio serve` gives its own to the session service it starts, so both "
        "servers and the `studio users` and `studio tokens` commands share one set of users.",
    )

    # --- workspace server (studio serve) ----------------------------------------------------
    serve_host: str = Field("127.0.0.1", description="Address the workspace server and its Studio UI bind to.")
    serve_port: int = Field(8890, description="Port of the workspace server and Studio UI; 0 picks a free port.")
    root: Path = Field(
        default_factory=default_root,
        description="Folder that holds one sub-folder of notebooks per workspace (<root>/<workspace name>).",
    )
    livy_url: str = Field(
        "",
        description="Livy URL that `studio serve` registers as the compute `local`. Empty: it starts its own "
        "session service (`studio livy`, on `port` or a free port when that is taken) and stops it on exit.",
    )
    workspace_idle_timeout: float = Field(
        3600.0,
        ge=0,
        description="Seconds without activity in a running workspace's JupyterLab (API requests, kernel messages; "
        "a busy kernel always counts as active) after which the workspace is stopped, with the reason recorded. "
        "0: never. A workspace's own idle_timeout overrides it.",
    )
    workspace_cull_interval: float = Field(
        30.0, gt=0, description="Seconds between checks for idle workspaces and for JupyterLab servers that died."
    )
    max_running_workspaces: int = Field(
        10,
        ge=1,
        description="Workspaces whose JupyterLab runs (or is starting) at once; starting one more is refused with "
        "429 until one stops. Each JupyterLab with its kernels takes ~150 MB and more.",
    )
    jupyterlab_start_timeout: float = Field(
        60.0,
        gt=0,
        description="Seconds a workspace's JupyterLab may take to answer on its port before the start fails and "
        "the workspace becomes Failed.",
    )
    jupyterlab_stop_timeout: float = Field(
        10.0,
        gt=0,
        description="Seconds JupyterLab gets to shut down with its kernels after a polite request, and again after "
        "SIGTERM, before its processes are killed.",
    )
    jupyterlab_command: list[str] = Field(
        default_factory=list,
        description="Command that starts a workspace's JupyterLab (default: this Python with -m jupyterlab); "
        "the server adds its --ServerApp options.",
    )
    git_clone_timeout: float = Field(
        300.0, gt=0, description="Seconds `git clone` of a workspace's repository may take before it is stopped."
    )
    git_clone_max_bytes: int = Field(
        1024**3,
        ge=1024,
        description="Bytes a workspace's clone may take on disk; a clone that grows beyond it is stopped and its "
        "folder removed.",
    )
    git_allow_local: bool = Field(
        False,
        description="Allow workspaces to clone local paths and file:// URLs (by default only https:// and ssh "
        "repositories, including scp-like git@host:path): a local path reads whatever the server's user can read.",
    )
    compute_timeout: float = Field(
        5.0, gt=0, description="Seconds a compute (a Livy URL) gets to answer a health check or a session listing."
    )
    workspace_seed_dir: Path | None = Field(
        None,
        description="Notebooks (*.ipynb) copied into every new workspace that does not clone a repository. "
        "Default: the studio's own notebooks/ (getting-started.ipynb), when it is installed.",
    )

    max_concurrent_executions: int = Field(
        2,
        ge=1,
        description="Notebook executions (POST /api/executions) that run at once; the others wait in START_PENDING. "
        "Each one holds a Spark session while it runs.",
    )
    execution_stop_timeout: float = Field(
        60.0,
        gt=0,
        description="Seconds a stopped execution gets to cancel its cell, write its output notebook and delete its "
        "Spark session after SIGINT, before it is terminated.",
    )

    # --- audit trail (studio.audit) ----------------------------------------------------------
    audit_file: Path | None = Field(
        None,
        description="The audit trail as JSON lines, one record a line, for a log shipper to follow (default: "
        "<identity_dir>/audit.jsonl; the records themselves are in <identity_dir>/audit.db). Renaming the file away "
        "(log rotation) is noticed at the next record, which starts a new one.",
    )

    @field_validator(
        "allowed_hosts", "oidc_allowed_domains", "oidc_allowed_groups", "view_users", "modify_users", "event_webhooks",
        mode="before",
    )
    @classmethod
    def _list(cls, value: object) -> object:
        """A list from the environment: JSON (``["a", "b"]``) or comma-separated (``a, b``)."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("state_dir", "cache_dir", "root", mode="after")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @field_validator("audit_file", mode="after")
    @classmethod
    def _absolute_file(cls, value: Path | None) -> Path | None:
        return value.expanduser().resolve() if value is not None else None

    @model_validator(mode="after")
    def _identity_dir(self) -> "Settings":
        # default: the state directory (STUDIO_IDENTITY_DIR or the argument wins)
        chosen = self.state_dir if self.identity_dir == _DEFAULT_IDENTITY_DIR else self.identity_dir
        self.identity_dir = chosen.expanduser().resolve()
        return self

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def database_path(self) -> Path:
        return self.state_dir / "studio.db"
