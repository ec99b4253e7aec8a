"""The "PySpark" Jupyter kernel: cells run in a remote Spark session of a Livy-compatible service.

It is an IPython kernel underneath, so ``%%local`` cells, ``-o`` variables and local magics
run in a real local IPython. Unlike sparkmagic, a remote error fails the cell (so "Run all" and
headless runs stop there), an interrupt cancels the remote statement and keeps the session,
results travel as Arrow, and a progress bar follows the statement's Spark jobs.
"""

from __future__ import annotations

import ast
import json
import os
import sys
import time
import uuid
from typing import Any

from IPython.core.interactiveshell import InteractiveShell
from IPython.display import display, update_display
from ipykernel.ipkernel import IPythonKernel

import studio
from studio import redact
from studio.kernel import completion, frames
from studio.kernel import display as bundles
from studio.livy_client import FINAL_SESSION_STATES, FINAL_STATEMENT_STATES, LivyError
from studio.kernel.magics import HELP_ROWS, Cell, MagicUsageError, parse_cell, parse_configure_body
from studio.kernel.session import RECONNECT_TIMEOUT, RemoteSession

PROGRESS_AFTER = 0.3  # seconds; quicker statements show no progress bar
DEFAULT_SQL_ROWS = 2500  # sparkmagic's default, always shown with the result


class RemoteError(Exception):
    """A failed cell with Jupyter's (ename, evalue, traceback)."""

    def __init__(self, ename: str, evalue: str, traceback: list[str] | None = None) -> None:
        super().__init__(f"{ename}: {evalue}")
        self.ename = ename
        self.evalue = evalue
        self.traceback = traceback or []




class StreamedText:
    """What a running statement prints, written to the cell as it arrives: exactly once, in order.

    Spark Studio's service adds ``stream`` (``from``, ``text``, ``total``; once final also
    ``unstreamed``, the output's text that did not come through the stream) to a statement asked
    for with ``?stream=OFFSET``; other Livy services do not, and their output shows at the end."""

    def __init__(self) -> None:
        self.offset = 0

    def write(self, statement: dict[str, Any]) -> None:
        stream = statement.get("stream")
        if not stream or stream.get("from") != self.offset:
            return
        text = str(stream.get("text") or "")
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()
            self.offset += len(text)

    def rest_of(self, output: dict[str, Any] | None, statement: dict[str, Any]) -> dict[str, Any] | None:
        """The final output without what is on the screen already."""
        if not self.offset or output is None or output.get("status") != "ok":
            return output
        data = dict(output.get("data") or {})
        data["text/plain"] = str((statement.get("stream") or {}).get("unstreamed") or "")
        return {**output, "data": data}


class PySparkKernel(IPythonKernel):
    implementation = "spark-studio-pyspark"
    implementation_version = studio.__version__
    banner = "PySpark (Spark Studio): cells run in a remote Spark session. %%help lists the magics."

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        timeout = float(os.environ.get("STUDIO_SESSION_STARTUP_TIMEOUT", "600"))
        reconnect = float(os.environ.get("STUDIO_KERNEL_RECONNECT_TIMEOUT", str(RECONNECT_TIMEOUT)))
        self.remote = RemoteSession(startup_timeout=timeout, reconnect_timeout=reconnect, on_reconnect=_say)
        self.remote.prepare_in_background()

    @property
    def ipython(self) -> InteractiveShell:
        """The local IPython (``%%local`` cells, ``-o`` variables); ipykernel types it optional, but
        it exists from the kernel's start on."""
        assert self.shell is not None
        return self.shell

    # -- execution ------------------------------------------------------------------------

    async def do_execute(
        self,
        code: str,
        silent: bool,
        store_history: bool = True,
        user_expressions: dict[str, Any] | None = None,
        allow_stdin: bool = False,
        *,
        cell_meta: dict[str, Any] | None = None,
        cell_id: str | None = None,
    ) -> dict[str, Any]:
        try:
            cell = parse_cell(code)
        except MagicUsageError as exc:
            return self._count_and_fail(RemoteError("UsageError", str(exc)), store_history)
        if cell.kind in ("local", "ipython", "empty"):
            local_code = cell.body if cell.kind == "local" else code
            return await super().do_execute(
                local_code, silent, store_history, user_expressions, allow_stdin, cell_meta=cell_meta, cell_id=cell_id
            )
        count = self.ipython.execution_count
        try:
            getattr(self, f"_run_{cell.kind}")(cell)
        except RemoteError as exc:
            return self._count_and_fail(exc, store_history)
        except MagicUsageError as exc:
            return self._count_and_fail(RemoteError("UsageError", str(exc)), store_history)
        except LivyError as exc:
            return self._count_and_fail(RemoteError("SparkSessionError", str(exc)), store_history)
        except KeyboardInterrupt:
            return self._count_and_fail(RemoteError("KeyboardInterrupt", "interrupted"), store_history)
        except Exception as exc:  # noqa: BLE001 - any failure is the cell's, never the kernel's
            return self._count_and_fail(RemoteError(type(exc).__name__, str(exc)), store_history)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
        if store_history:
            self.ipython.execution_count += 1
        return {"status": "ok", "execution_count": count, "payload": [], "user_expressions": {}}

    def _count_and_fail(self, error: RemoteError, store_history: bool) -> dict[str, Any]:
        count = self.ipython.execution_count
        if store_history:
            self.ipython.execution_count += 1
        traceback = [line.rstrip("\n") for line in error.traceback] or [f"{error.ename}: {error.evalue}"]
        content = {"ename": error.ename, "evalue": error.evalue, "traceback": traceback}
        sys.stdout.flush()
        sys.stderr.flush()
        self.send_response(self.iopub_socket, "error", content)
        return {"status": "error", "execution_count": count, **content}

    # -- the remote session -----------------------------------------------------------------

    def _session_id(self) -> int:
        """The session, started on first use (warm sessions are idle at once).

        When a session with new %%configure settings does not start, the settings of the last
        session that did start come back, with a session, and this cell fails saying so: later
        cells work instead of failing the same way until someone happens to fix the settings."""
        if self.remote.started:
            return self.remote.id  # type: ignore[return-value]
        try:
            return self._start_session()
        except LivyError as exc:
            if self.remote.config == self.remote.good_config:
                raise
            self.remote.config = dict(self.remote.good_config)
            print(
                "The session with the %%configure settings did not start; starting one with the previous settings.",
                file=sys.stderr,
                flush=True,
            )
            try:
                session_id = self._start_session()
            except LivyError as again:
                raise RemoteError(
                    "SparkSessionError", f"{exc}\nWith the previous settings, the session did not start either: {again}"
                ) from None
            raise RemoteError(
                "SessionStartError",
                f"{exc}\nThe previous settings are back and session {session_id} runs with them; this cell did not run. "
                "Correct the settings and run %%configure -f again.",
            ) from None

    def _start_session(self) -> int:
        print("Starting Spark application", flush=True)
        handle = f"studio-start-{uuid.uuid4().hex}"
        shown = False

        def waiting(session: dict[str, Any], elapsed: float) -> None:
            nonlocal shown
            text = f"Waiting for session {session['id']} to start ({session['state']}, {elapsed:.0f} s)"
            if not shown:
                display(bundles.note(text), raw=True, display_id=handle)
                shown = True
            else:
                update_display(bundles.note(text), raw=True, display_id=handle)

        info = self.remote.start(on_wait=waiting)
        if shown:
            update_display(bundles.note(f"Session {info['id']} started."), raw=True, display_id=handle)
        display(bundles.sessions_table([info], info["id"]), raw=True)
        print("SparkSession available as 'spark'.", flush=True)
        return int(info["id"])

    def _statement(self, code: str, kind: str | None = None, quiet: bool = False) -> tuple[int, dict[str, Any]]:
        """Run code remotely; (statement id, Livy output). What the code prints appears while it runs
        (Spark Studio's service streams it; any other Livy shows it at the end); a live progress bar
        follows its Spark jobs unless ``quiet``; Ctrl-C cancels it and keeps what it printed."""
        session_id = self._session_id()
        client = self.remote.client
        assert client is not None
        self._idle_note(session_id)
        try:
            statement = client.submit(session_id, code, kind)
        except LivyError as exc:
            if exc.status in (400, 404):  # the session ended meanwhile: start a new one next time
                self._session_lost(session_id, str(exc))
            raise
        self.remote.last_activity = started = time.monotonic()
        handle = f"studio-progress-{uuid.uuid4().hex}"
        shown = False
        last: tuple[Any, ...] = ()
        delay = 0.05
        printed = StreamedText()

        def show(final: str | None = None) -> None:
            nonlocal shown, last
            if quiet:
                return
            elapsed = time.monotonic() - started
            # Redraw when Spark made progress, and otherwise once a second for the clock.
            state = (statement.get("progress"), json.dumps(statement.get("jobs")), int(elapsed), final)
            if state == last:
                return
            last = state
            bundle = bundles.progress_bundle(float(statement.get("progress") or 0.0), statement.get("jobs") or [], elapsed, final)
            sys.stdout.flush()
            if shown:
                update_display(bundle, raw=True, display_id=handle)
            else:
                display(bundle, raw=True, display_id=handle)
                shown = True

        try:
            while statement["state"] not in FINAL_STATEMENT_STATES:
                statement = client.statement(session_id, statement["id"], wait=0.25, stream=printed.offset)
                printed.write(statement)
                if not client.is_studio:
                    time.sleep(delay)
                    delay = min(1.0, delay * 1.5)
                if statement["state"] not in FINAL_STATEMENT_STATES and time.monotonic() - started > PROGRESS_AFTER:
                    show()
        except KeyboardInterrupt:
            statement = self._cancel(session_id, statement, printed)
            if shown:
                show("Cancelled")
            raise RemoteError(
                "KeyboardInterrupt",
                f"statement {statement['id']} was cancelled; the session keeps its variables"
                + ("; what it printed is above" if printed.offset else ""),
            ) from None
        except LivyError as exc:
            if exc.status == 404:  # the session went while the cell waited (deleted; a restart without it)
                self._session_lost(session_id, str(exc))
            raise
        self.remote.last_activity = time.monotonic()
        output = printed.rest_of(statement.get("output"), statement)
        if shown:
            failed = statement["state"] == "cancelled" or (output or {}).get("status") == "error"
            show("Failed" if failed else "Done")
        if statement["state"] == "cancelled" or output is None:
            raise RemoteError("Cancelled", f"statement {statement['id']} was cancelled")
        if output.get("status") == "error":
            if output.get("ename") in ("SessionWorkerDied", "SessionStopped"):
                evalue = self._session_lost(session_id, output.get("evalue", ""), raise_=False)
                raise RemoteError(output["ename"], evalue, output.get("traceback"))
            raise RemoteError(output.get("ename", "Error"), output.get("evalue", ""), output.get("traceback"))
        return int(statement["id"]), output

    def _session_lost(self, session_id: int, reason: str, raise_: bool = True) -> str:
        """The session ended under this kernel (its worker died, it was idle too long, someone deleted
        it): forget it, and say why (the service's reason, when it gives one) and what that means."""
        why = self.remote.end_reason(session_id)
        self.remote.forget(why or reason)
        if why:
            message = (
                f"Spark session {session_id} has ended: {why.rstrip('.')}; the next cell starts a new session, and "
                "the variables of this one are lost."
            )
        else:
            message = (
                f"{reason.rstrip('.')}. Spark session {session_id} is gone: the next cell starts a new session, "
                "and the variables of this one are lost."
            )
        if raise_:
            raise RemoteError("SessionLost", message)
        return message

    def _idle_note(self, session_id: int) -> None:
        """Before a cell: say so when the session came near being stopped for idleness, and when that
        happens (the cell starts its clock again). Past the limit it says nothing: the cell finds out."""
        idle, limit = self.remote.idle_seconds(), self.remote.idle_timeout
        if idle is None or not limit or not limit / 2 <= idle < limit:
            return
        print(
            f"Note: Spark session {session_id} had been idle for {_duration(idle)}; the service stops a session after "
            f"{_duration(limit)} without a statement, and its variables are lost with it. This cell starts the clock "
            "again.",
            file=sys.stderr,
            flush=True,
        )

    def _cancel(self, session_id: int, statement: dict[str, Any], printed: "StreamedText") -> dict[str, Any]:
        client = self.remote.client
        assert client is not None
        client.cancel(session_id, statement["id"])
        deadline = time.monotonic() + 30
        while statement["state"] not in FINAL_STATEMENT_STATES and time.monotonic() < deadline:
            try:
                statement = client.statement(session_id, statement["id"], wait=1.0, stream=printed.offset)
                printed.write(statement)
            except KeyboardInterrupt:
                break
        return statement

    def _show(self, output: dict[str, Any]) -> None:
        """Render a Livy output by mime type; text/plain is the statement's stdout."""
        data = dict(output.get("data") or {})
        text = data.pop("text/plain", "")
        data.pop("application/vnd.studio.arrow+json", None)
        if "image/png" in data:
            display({"image/png": data["image/png"], "text/plain": "<image>"}, raw=True)
        if "text/html" in data:
            display({"text/html": data["text/html"], "text/plain": text}, raw=True)
            text = ""
        if "application/json" in data:
            display({"application/json": data["application/json"], "text/plain": json.dumps(data["application/json"])}, raw=True)
        if "application/vnd.livy.table.v1+json" in data:
            display(bundles.livy_table_bundle(data["application/vnd.livy.table.v1+json"]), raw=True)
        if text:
            print(text, flush=True)

    # -- cells ----------------------------------------------------------------------------

    def _run_remote(self, cell: Cell) -> None:
        try:
            self._show(self._statement(cell.body)[1])
        except RemoteError as exc:
            raise self._with_local_hint(exc) from None

    _run_pyspark = _run_remote

    def _run_time(self, cell: Cell) -> None:
        """%%time: the cell runs remotely (IPython's %%time would run it here, where there is no Spark)."""
        from IPython.core.magics.execution import _format_time

        started = time.monotonic()
        try:
            self._run_remote(Cell("remote", body=cell.body))
        finally:
            print(f"Wall time: {_format_time(time.monotonic() - started)}", flush=True)

    def _with_local_hint(self, error: RemoteError) -> RemoteError:
        """A remote NameError for a name that only this kernel's local Python has: say how to send it."""
        if error.ename != "NameError":
            return error
        import re

        match = re.search(r"name '([^']+)' is not defined", error.evalue)
        if not match or match.group(1) not in self.ipython.user_ns:
            return error
        name = match.group(1)
        hint = (
            f"'{name}' is a variable of this notebook's local Python (%%local), not of the Spark session; "
            f"send it with %%send_to_spark -i {name}"
            + (" -t df" if type(self.ipython.user_ns[name]).__name__ == "DataFrame" else "")
            + " first."
        )
        return RemoteError(error.ename, f"{error.evalue}. {hint}", [*error.traceback, hint])

    def _run_pip(self, cell: Cell) -> None:
        lines = [cell.line] + [line.strip() for line in cell.body.splitlines() if line.strip()]
        for index, line in enumerate(lines):
            if index and not line.startswith("%pip"):
                raise MagicUsageError("a %pip cell may only hold %pip lines")
            argv = parse_cell(line if index else f"%pip {line}").args.argv
            if not argv:
                raise MagicUsageError("%pip needs a command: install, uninstall, list, show or freeze")
            self._show(self._statement(f"__studio__.pip(*{argv!r})")[1])

    def _arrow_frame(self, statement_id: int, output: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        import pyarrow as pa

        description = (output.get("data") or {}).get("application/vnd.studio.arrow+json")
        if description is None:
            raise RemoteError("ResultError", "the session returned no rows (is the service Spark Studio's?)")
        assert self.remote.client is not None and self.remote.id is not None
        data = self.remote.client.arrow(self.remote.id, statement_id)
        table = pa.ipc.open_stream(pa.py_buffer(data)).read_all()
        return frames.pandas_frame(table), description

    def _export(
        self, expression: str, rows: int | None, method: str, fraction: float | None, count: bool = False, prelude: str = "", quiet: bool = False
    ) -> tuple[Any, dict[str, Any]]:
        max_rows = DEFAULT_SQL_ROWS if rows is None else rows
        code = (
            f"{prelude}__studio__.export(({expression}), max_rows={max_rows}, method={method!r}, "
            f"fraction={fraction!r}, count={count!r})"
        )
        try:
            statement_id, output = self._statement(code, quiet=quiet)
        except RemoteError as exc:
            raise self._with_local_hint(_without_wrapper(exc)) from None
        return self._arrow_frame(statement_id, output)

    def _run_sql(self, cell: Cell) -> None:
        args = cell.args
        if not cell.body.strip():
            raise MagicUsageError("%%sql needs a query in the cell body")
        frame, description = self._export(
            f"spark.sql({cell.body.strip()!r})", args.maxrows, args.samplemethod, args.samplefraction, quiet=args.quiet
        )
        if args.output:
            self.ipython.user_ns[args.output] = frame
        if not args.quiet:
            display(
                bundles.frame_bundle(
                    frame,
                    types=description["columns"],
                    total_rows=description.get("total_rows"),
                    truncated=description["truncated"],
                    limit=description["limit"],
                ),
                raw=True,
            )

    def _run_spark(self, cell: Cell) -> None:
        args = cell.args
        if cell.body.strip():
            self._show(self._statement(cell.body)[1])
        if args.output:
            frame, description = self._export(args.output, args.maxrows, args.samplemethod, args.samplefraction, quiet=args.quiet)
            self.ipython.user_ns[args.output] = frame
            if not args.quiet:
                display(
                    bundles.frame_bundle(
                        frame,
                        title=args.output,
                        types=description["columns"],
                        total_rows=description.get("total_rows"),
                        truncated=description["truncated"],
                        limit=description["limit"],
                    ),
                    raw=True,
                )

    def _run_display(self, cell: Cell) -> None:
        args = cell.args
        prelude, expression = _split_expression(cell.body, args.expression)
        frame, description = self._export(expression, args.rows, "take", None, count=True, prelude=prelude)
        if args.chart == "table":
            display(
                bundles.frame_bundle(
                    frame,
                    title=args.title or "",
                    types=description["columns"],
                    total_rows=description.get("total_rows"),
                    truncated=description["truncated"],
                    limit=description["limit"],
                ),
                raw=True,
            )
            return
        try:
            png, text, notes = bundles.chart_png(frame, args.chart, args.x, args.y, args.title)
        except ValueError as exc:
            raise MagicUsageError(f"%%display --chart {args.chart}: {exc}") from None
        display(bundles.png_bundle(png, text), raw=True)
        for note in notes:
            display(bundles.note(note), raw=True)

    def _run_send_to_spark(self, cell: Cell) -> None:
        args = cell.args
        if args.input not in self.ipython.user_ns:
            raise MagicUsageError(f"local variable '{args.input}' is not defined (define it in a %%local cell)")
        value = self.ipython.user_ns[args.input]
        name = args.name or args.input
        if not name.isidentifier():
            raise MagicUsageError(f"'{name}' is not a valid Python name")
        import pandas as pd

        kind = args.type or ("df" if isinstance(value, pd.DataFrame) else "str")
        if kind != "df":
            self._statement(f"{name} = {str(value)!r}", quiet=True)
            print(f"Successfully passed '{args.input}' as '{name}' to Spark kernel", flush=True)
            return
        if not isinstance(value, pd.DataFrame):
            raise MagicUsageError(f"'{args.input}' is a {type(value).__name__}, not a pandas DataFrame")
        payload, sent, notes = frames.arrow_payload(value, args.maxrows)
        try:
            self._statement(f"{name} = __studio__.import_arrow({payload!r})", quiet=True)
        except LivyError as exc:
            if exc.status == 413:
                raise MagicUsageError(
                    f"'{args.input}' is too large to send in one statement ({exc}); send fewer rows with -m ROWS"
                ) from None
            raise
        rows = f"{sent:,} of {len(value):,} rows" if sent < len(value) else f"all {sent:,} rows"
        print(f"Successfully passed '{args.input}' as '{name}' to Spark kernel ({rows})", flush=True)
        for note in notes:
            print(note, flush=True)

    def _run_configure(self, cell: Cell) -> None:
        """Settings for the next session; with -f, the current one is replaced. The service checks the
        settings before anything is deleted, and if the new session still fails to start, the previous
        settings come back with a session of their own (see ``_session_id``)."""
        settings = parse_configure_body(cell.body)
        if self.remote.started and not cell.args.force:
            raise MagicUsageError(
                "A session has already been started. Use %%configure -f to restart it with these settings "
                "(its variables will be lost)."
            )
        try:
            self.remote.check(settings)
        except LivyError as exc:
            if exc.status == 400:
                kept = f"session {self.remote.id} keeps running as it was" if self.remote.started else "the settings stay as they were"
                raise RemoteError("InvalidSessionSettings", f"The service refuses these settings: {exc}. Nothing changed: {kept}.") from None
            if self.remote.started:
                raise  # the service cannot be asked: replacing the session now would strand it
        self.remote.config = settings
        if self.remote.started:
            self.remote.delete()
            self._session_id()
        self._run_info(cell)

    def _run_info(self, cell: Cell) -> None:
        client = self.remote.connect()
        configs = json.dumps(redact.session_body(self.remote.body()), indent=None)
        display(
            {
                "text/html": f"Current session configs: <tt>{bundles.escape(configs)}</tt><br>"
                f"Spark session service: <tt>{bundles.escape(self.remote.url)}</tt> ({bundles.escape(self.remote.url_source)})",
                "text/plain": f"Current session configs: {configs}\nSpark session service: {self.remote.url} ({self.remote.url_source})",
            },
            raw=True,
        )
        me = client.whoami()
        mine = [
            s
            for s in client.list_sessions()
            if s["id"] == self.remote.id or (s.get("owner") == me and s["state"] not in FINAL_SESSION_STATES)
        ]
        if mine:
            display(bundles.sessions_table(mine, self.remote.id), raw=True)
        else:
            print("No active sessions.", flush=True)
        if self.remote.started:
            self._info_lifetime(client)
        if not self.remote.started and self.remote.lost:
            print(self._lost_text(client), flush=True)

    def _info_lifetime(self, client: Any) -> None:
        """%%info about this notebook's session: how long it has left while idle, or, when it has
        ended (a dead session never passes for a live one), why."""
        session_id = self.remote.id
        assert session_id is not None
        described = client.describe_session(session_id)
        if described is None:
            return
        if described.get("state") in FINAL_SESSION_STATES or not described.get("listed", True):
            self.remote.forget(str(described.get("reason") or ""))
            return
        if described.get("driverMode") == "shared":
            print(
                f"Session {session_id} runs on {described.get('sharedDriverUser')}'s shared Spark driver (Spark Connect, application "
                f"{described.get('application')}): `spark` and the DataFrame API work; `sc` and RDDs do not (an application with "
                "driverMode DEDICATED gives a driver of its own).",
                flush=True,
            )
        limit, left = described.get("idleTimeout"), described.get("stopsInSeconds")
        if not limit:
            print(f"Session {session_id} is never stopped for idleness.", flush=True)
        elif left is None:
            print(f"Session {session_id} is busy; once idle, it is stopped after {_duration(limit)} without a statement.", flush=True)
        else:
            at = time.strftime("%H:%M", time.localtime(time.time() + float(left)))
            print(
                f"Session {session_id} has been idle for {_duration(described.get('idleSeconds') or 0)}; it is stopped after "
                f"{_duration(limit)} without a statement, so {_duration(left)} are left (until {at}) unless a cell runs.",
                flush=True,
            )

    def _lost_text(self, client: Any) -> str:
        """What became of this notebook's last session, which ended under it."""
        lost = self.remote.lost or {}
        try:
            state = client.get_session(lost["id"]).get("state", "gone")
        except LivyError:
            state = "gone"
        reason = f": {lost['reason']}" if lost.get("reason") else ""
        return f"This notebook's last session, {lost['id']}, is {state}{reason}. The next Spark cell starts a new one."

    def _run_logs(self, cell: Cell) -> None:
        if self.remote.started:
            assert self.remote.client is not None and self.remote.id is not None
            print("\n".join(self.remote.client.log(self.remote.id)), flush=True)
            return
        if not self.remote.lost:
            print("No logs yet: no Spark session has started in this notebook.", flush=True)
            return
        client = self.remote.connect()
        print(self._lost_text(client), flush=True)
        try:
            lines = client.log(self.remote.lost["id"])
        except LivyError as exc:
            print(f"Its log is no longer available from the service ({exc}).", flush=True)
            return
        print("Its log:\n" + "\n".join(lines), flush=True)

    def _run_help(self, cell: Cell) -> None:
        display(bundles.help_bundle(HELP_ROWS), raw=True)

    def _run_cleanup(self, cell: Cell) -> None:
        if not cell.args.force:
            print("Add -f to delete all of your sessions on the Spark session service (this one too).", flush=True)
            return
        client = self.remote.connect()
        me = client.whoami()
        mine = [
            s["id"]
            for s in client.list_sessions()
            if (s.get("owner") == me or s["id"] == self.remote.id) and s["state"] not in FINAL_SESSION_STATES
        ]  # ended sessions are not deleted again, nor listed as deleted
        for session_id in mine:
            client.delete_session(session_id)
        if self.remote.id in mine:
            self.remote.forget("deleted by %%cleanup -f")
        print(f"Deleted sessions: {', '.join(map(str, mine)) or 'none'}", flush=True)

    def _run_delete(self, cell: Cell) -> None:
        if not cell.args.force:
            raise MagicUsageError("%%delete needs -f to delete a session")
        if cell.args.session_id == self.remote.id:
            raise MagicUsageError("Cannot delete this kernel's own session; use %%cleanup -f or restart the kernel")
        client = self.remote.connect()
        client.get_session(cell.args.session_id)  # a clear 404 for an unknown id
        client.delete_session(cell.args.session_id)
        print(f"Deleted session {cell.args.session_id}.", flush=True)

    # -- completion, inspection, shutdown -------------------------------------------------

    def do_complete(self, code: str, cursor_pos: int) -> dict[str, Any]:  # type: ignore[override]
        try:
            return self._complete(code, cursor_pos)
        except Exception:  # noqa: BLE001 - every request gets a reply, if an empty one
            return {"status": "ok", "matches": [], "cursor_start": cursor_pos, "cursor_end": cursor_pos, "metadata": {}}

    def _complete(self, code: str, cursor_pos: int) -> dict[str, Any]:
        before = code[:cursor_pos]
        if "\n" not in before and before.lstrip().startswith("%"):  # a magic's name, e.g. %%lo -> %%local
            word = before.lstrip()
            return _matches(sorted(m for m in completion.MAGICS if m.startswith(word)), cursor_pos, len(word))
        try:
            cell = parse_cell(code)
        except MagicUsageError:
            cell = Cell("remote", body=code)
        if cell.kind == "sql":
            word = before[len(before.rstrip(completion.WORD_CHARS)) :]
            return _matches(completion.sql_words(word), cursor_pos, len(word))
        if cell.kind in ("local", "ipython") or not self.remote.started:
            return super().do_complete(code, cursor_pos)
        assert self.remote.client is not None and self.remote.id is not None
        token = before[len(before.rstrip(completion.WORD_CHARS + ".")) :]
        try:
            matches = self.remote.client.completion(self.remote.id, code, cursor_pos)
        except (LivyError, KeyboardInterrupt):
            matches = []
        if matches and all("." not in m for m in matches) and "." in token:
            token = token.rsplit(".", 1)[1]  # attributes of an expression (df.groupBy('id').co): replace the last name
        return _matches(matches, cursor_pos, len(token))

    def do_inspect(self, code: str, cursor_pos: int, detail_level: int = 0, omit_sections: Any = ()) -> dict[str, Any]:  # type: ignore[override]
        """Shift-Tab: help for a magic, else what the session knows about the name at the cursor.
        Every request gets a reply, also for a half-typed magic."""
        try:
            first_line = code.lstrip().split("\n", 1)[0]
            if first_line.startswith("%") and cursor_pos <= len(code) - len(code.lstrip()) + len(first_line):
                text = completion.magic_help(first_line, HELP_ROWS)
                return {"status": "ok", "found": bool(text), "data": {"text/plain": text} if text else {}, "metadata": {}}
            kind = parse_cell(code).kind
            if not self.remote.started or kind in ("local", "ipython"):
                return super().do_inspect(code, cursor_pos, detail_level, omit_sections)
            assert self.remote.client is not None and self.remote.id is not None
            reply = self.remote.client.inspect(self.remote.id, code, cursor_pos, detail_level)
            return {"status": "ok", "found": reply["found"], "data": reply["data"], "metadata": {}}
        except Exception:  # noqa: BLE001 - MagicUsageError, LivyError, KeyboardInterrupt, anything
            return {"status": "ok", "found": False, "data": {}, "metadata": {}}

    def do_shutdown(self, restart: bool) -> dict[str, Any]:  # type: ignore[override]
        self.remote.close()
        return super().do_shutdown(restart)


def _say(text: str) -> None:
    """A note from the kernel itself, in the running cell (stderr, like a warning)."""
    print(text, file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    """A duration for people: 45 s, 12 min, 2 h 5 min."""
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    if minutes < 90:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60} min" if minutes % 60 else f"{minutes // 60} h"


def _matches(matches: list[str], cursor_pos: int, replaced: int) -> dict[str, Any]:
    return {"status": "ok", "matches": matches, "cursor_start": cursor_pos - replaced, "cursor_end": cursor_pos, "metadata": {}}


def _without_wrapper(error: RemoteError) -> RemoteError:
    """The error of a magic's statement without the frame of the kernel's own wrapper code
    (``__studio__.export(...)``) and of the worker's helpers: the user did not write them."""
    lines: list[str] = []
    skip_next = False
    for line in error.traceback:
        if skip_next:
            skip_next = False
            continue
        if line.lstrip().startswith('File "<statement-') and "__studio__." in line:
            continue
        if line.lstrip().startswith('File "<statement-') and "in <module>" in line:
            skip_next = True  # its next line is the wrapper's source
            continue
        if "/studio/worker/" in line and line.lstrip().startswith("File "):
            skip_next = True
            continue
        lines.append(line)
    if lines and lines[0].startswith("Traceback") and len(lines) == 1:
        lines = []
    return RemoteError(error.ename, error.evalue, lines)


def _split_expression(body: str, inline: str) -> tuple[str, str]:
    """(code to run first, the DataFrame expression) of a %%display cell.

    EMR writes both ``%%display`` + a body and ``%%display df`` on one line; the last statement
    must be an expression, and what comes before it (``x = 5; df.filter(F.col('id') > x)``, on the
    same line or above) runs first.
    """
    source = body.strip() or inline.strip()
    if not source:
        raise MagicUsageError("%%display needs a DataFrame expression, e.g. df.groupBy('zone').count()")
    try:
        module = ast.parse(source)
    except SyntaxError as exc:
        raise MagicUsageError(f"%%display: the expression does not parse: {exc}") from None
    last = module.body[-1] if module.body else None
    if not isinstance(last, ast.Expr):
        raise MagicUsageError("%%display needs a DataFrame expression as its last line")
    lines = source.splitlines(keepends=True)
    # col_offset counts UTF-8 bytes of its line
    column = len(lines[last.lineno - 1].encode("utf-8")[: last.col_offset].decode("utf-8"))
    start = sum(len(line) for line in lines[: last.lineno - 1]) + column
    prelude = source[:start].rstrip().rstrip(";").rstrip()
    expression = ast.get_source_segment(source, last.value) or ""
    return (prelude + "\n" if prelude else ""), expression
