"""The "PySpark" Jupyter kernel: cells run in a remote Spark session of a Livy-compatible service.

It is an IPython kernel underneath, so ``%%local`` cells, ``-o`` variables and local magics
run in a real local IPython. Unlike sparkmagic, a remote error fails the cell (so "Run all" and
headless runs stop there), an interrupt cancels the remote statement and keeps the session,
results travel as Arrow, and a progress bar follows the statement's Spark jobs.
"""

from __future__ import annotations

import ast
import base64
import getpass
import json
import os
import sys
import time
import uuid
from typing import Any

from IPython.display import display, update_display
from ipykernel.ipkernel import IPythonKernel

import studio
from studio.kernel import display as bundles
from studio.kernel.livy_client import FINAL_SESSION_STATES, FINAL_STATEMENT_STATES, LivyError
from studio.kernel.magics import HELP_ROWS, Cell, MagicUsageError, parse_cell, parse_configure_body
from studio.kernel.session import RemoteSession

PROGRESS_AFTER = 0.3  # seconds; quicker statements show no progress bar
DEFAULT_SQL_ROWS = 2500  # sparkmagic's default, always shown with the result


class RemoteError(Exception):
    """A failed cell with Jupyter's (ename, evalue, traceback)."""

    def __init__(self, ename: str, evalue: str, traceback: list[str] | None = None) -> None:
        super().__init__(f"{ename}: {evalue}")
        self.ename = ename
        self.evalue = evalue
        self.traceback = traceback or []


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001
        return "unknown"


class PySparkKernel(IPythonKernel):
    implementation = "spark-studio-pyspark"
    implementation_version = studio.__version__
    banner = "PySpark (Spark Studio): cells run in a remote Spark session. %%help lists the magics."

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        timeout = float(os.environ.get("STUDIO_SESSION_STARTUP_TIMEOUT", "600"))
        self.remote = RemoteSession(startup_timeout=timeout)
        self.remote.prepare_in_background()

    # -- execution ------------------------------------------------------------------------

    async def do_execute(  # type: ignore[override]
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
        count = self.shell.execution_count
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
            self.shell.execution_count += 1
        return {"status": "ok", "execution_count": count, "payload": [], "user_expressions": {}}

    def _count_and_fail(self, error: RemoteError, store_history: bool) -> dict[str, Any]:
        count = self.shell.execution_count
        if store_history:
            self.shell.execution_count += 1
        traceback = [line.rstrip("\n") for line in error.traceback] or [f"{error.ename}: {error.evalue}"]
        content = {"ename": error.ename, "evalue": error.evalue, "traceback": traceback}
        sys.stdout.flush()
        sys.stderr.flush()
        self.send_response(self.iopub_socket, "error", content)
        return {"status": "error", "execution_count": count, **content}

    # -- the remote session -----------------------------------------------------------------

    def _session_id(self) -> int:
        """The session, started on first use (warm sessions are idle at once)."""
        if self.remote.started:
            return self.remote.id  # type: ignore[return-value]
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

    def _statement(self, code: str, kind: str | None = None) -> tuple[int, dict[str, Any]]:
        """Run code remotely; (statement id, Livy output). Shows live progress; Ctrl-C cancels."""
        session_id = self._session_id()
        client = self.remote.client
        assert client is not None
        try:
            statement = client.submit(session_id, code, kind)
        except LivyError as exc:
            if exc.status in (400, 404):  # the session ended meanwhile: start a new one next time
                self.remote.forget()
            raise
        started = time.monotonic()
        handle = f"studio-progress-{uuid.uuid4().hex}"
        shown = False
        last: tuple[Any, ...] = ()
        delay = 0.05

        def show(final: str | None = None) -> None:
            nonlocal shown, last
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
                statement = client.statement(session_id, statement["id"], wait=0.25)
                if not client.is_studio:
                    time.sleep(delay)
                    delay = min(1.0, delay * 1.5)
                if statement["state"] not in FINAL_STATEMENT_STATES and time.monotonic() - started > PROGRESS_AFTER:
                    show()
        except KeyboardInterrupt:
            statement = self._cancel(session_id, statement)
            if shown:
                show("Cancelled")
            raise RemoteError(
                "KeyboardInterrupt",
                f"statement {statement['id']} was cancelled; the session keeps its variables",
            ) from None
        output = statement.get("output")
        if shown:
            failed = statement["state"] == "cancelled" or (output or {}).get("status") == "error"
            show("Failed" if failed else "Done")
        if statement["state"] == "cancelled" or output is None:
            raise RemoteError("Cancelled", f"statement {statement['id']} was cancelled")
        if output.get("status") == "error":
            if output.get("ename") == "SessionWorkerDied":
                self.remote.forget()
            raise RemoteError(output.get("ename", "Error"), output.get("evalue", ""), output.get("traceback"))
        return int(statement["id"]), output

    def _cancel(self, session_id: int, statement: dict[str, Any]) -> dict[str, Any]:
        client = self.remote.client
        assert client is not None
        client.cancel(session_id, statement["id"])
        deadline = time.monotonic() + 30
        while statement["state"] not in FINAL_STATEMENT_STATES and time.monotonic() < deadline:
            try:
                statement = client.statement(session_id, statement["id"], wait=1.0)
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
        self._show(self._statement(cell.body)[1])

    _run_pyspark = _run_remote

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
        return table.to_pandas(), description

    def _export(self, expression: str, rows: int | None, method: str, fraction: float | None, count: bool = False, prelude: str = "") -> tuple[Any, dict[str, Any]]:
        max_rows = DEFAULT_SQL_ROWS if rows is None else rows
        code = (
            f"{prelude}__studio__.export(({expression}), max_rows={max_rows}, method={method!r}, "
            f"fraction={fraction!r}, count={count!r})"
        )
        statement_id, output = self._statement(code)
        return self._arrow_frame(statement_id, output)

    def _run_sql(self, cell: Cell) -> None:
        args = cell.args
        if not cell.body.strip():
            raise MagicUsageError("%%sql needs a query in the cell body")
        frame, description = self._export(f"spark.sql({cell.body.strip()!r})", args.maxrows, args.samplemethod, args.samplefraction)
        if args.output:
            self.shell.user_ns[args.output] = frame
        if not args.quiet:
            display(
                bundles.frame_bundle(
                    frame, types=description["columns"], truncated=description["truncated"], limit=description["limit"]
                ),
                raw=True,
            )

    def _run_spark(self, cell: Cell) -> None:
        args = cell.args
        if cell.body.strip():
            self._show(self._statement(cell.body)[1])
        if args.output:
            frame, description = self._export(args.output, args.maxrows, args.samplemethod, args.samplefraction)
            self.shell.user_ns[args.output] = frame
            if not args.quiet:
                display(
                    bundles.frame_bundle(
                        frame, title=args.output, types=description["columns"], truncated=description["truncated"], limit=description["limit"]
                    ),
                    raw=True,
                )

    def _run_display(self, cell: Cell) -> None:
        args = cell.args
        prelude, expression = _split_expression(cell.body, " ".join(args.expression))
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
            png, text = bundles.chart_png(frame, args.chart, args.x, args.y, args.title)
        except ValueError as exc:
            raise MagicUsageError(f"%%display --chart {args.chart}: {exc}") from None
        display(bundles.png_bundle(png, text), raw=True)

    def _run_send_to_spark(self, cell: Cell) -> None:
        args = cell.args
        if args.input not in self.shell.user_ns:
            raise MagicUsageError(f"local variable '{args.input}' is not defined (define it in a %%local cell)")
        value = self.shell.user_ns[args.input]
        name = args.name or args.input
        if not name.isidentifier():
            raise MagicUsageError(f"'{name}' is not a valid Python name")
        import pandas as pd

        kind = args.type or ("df" if isinstance(value, pd.DataFrame) else "str")
        if kind == "df":
            if not isinstance(value, pd.DataFrame):
                raise MagicUsageError(f"'{args.input}' is a {type(value).__name__}, not a pandas DataFrame")
            import pyarrow as pa

            frame = value if args.maxrows < 0 else value.head(args.maxrows)
            sink = pa.BufferOutputStream()
            table = pa.Table.from_pandas(frame, preserve_index=False)
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
            payload = base64.b64encode(sink.getvalue().to_pybytes()).decode("ascii")
            self._statement(f"{name} = __studio__.import_arrow({payload!r})")
        else:
            self._statement(f"{name} = {str(value)!r}")
        print(f"Successfully passed '{args.input}' as '{name}' to Spark kernel", flush=True)

    def _run_configure(self, cell: Cell) -> None:
        settings = parse_configure_body(cell.body)
        if self.remote.started and not cell.args.force:
            raise MagicUsageError(
                "A session has already been started. Use %%configure -f to restart it with these settings "
                "(its variables will be lost)."
            )
        self.remote.config = settings
        if self.remote.started:
            self.remote.delete()
            self._session_id()
        self._run_info(cell)

    def _run_info(self, cell: Cell) -> None:
        client = self.remote.connect()
        configs = json.dumps(self.remote.body(), indent=None)
        display(
            {
                "text/html": f"Current session configs: <tt>{bundles.escape(configs)}</tt><br>"
                f"Spark session service: <tt>{bundles.escape(self.remote.url)}</tt> ({bundles.escape(self.remote.url_source)})",
                "text/plain": f"Current session configs: {configs}\nSpark session service: {self.remote.url} ({self.remote.url_source})",
            },
            raw=True,
        )
        mine = [
            s
            for s in client.list_sessions()
            if s["id"] == self.remote.id or (s.get("owner") == _user() and s["state"] not in FINAL_SESSION_STATES)
        ]
        if mine:
            display(bundles.sessions_table(mine, self.remote.id), raw=True)
        else:
            print("No active sessions.", flush=True)

    def _run_logs(self, cell: Cell) -> None:
        if not self.remote.started:
            print("No logs yet.", flush=True)
            return
        assert self.remote.client is not None and self.remote.id is not None
        print("\n".join(self.remote.client.log(self.remote.id)), flush=True)

    def _run_help(self, cell: Cell) -> None:
        display(bundles.help_bundle(HELP_ROWS), raw=True)

    def _run_cleanup(self, cell: Cell) -> None:
        if not cell.args.force:
            print("Add -f to delete all of your sessions on the Spark session service (this one too).", flush=True)
            return
        client = self.remote.connect()
        mine = [s["id"] for s in client.list_sessions() if s.get("owner") == _user() or s["id"] == self.remote.id]
        for session_id in mine:
            client.delete_session(session_id)
        if self.remote.id in mine:
            self.remote.forget()
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
            cell = parse_cell(code)
        except MagicUsageError:
            cell = Cell("remote", body=code)
        if cell.kind in ("local", "ipython") or not self.remote.started:
            return super().do_complete(code, cursor_pos)
        assert self.remote.client is not None and self.remote.id is not None
        before = code[:cursor_pos]
        token = before[len(before.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.")) :]
        try:
            matches = self.remote.client.completion(self.remote.id, code, cursor_pos)
        except (LivyError, KeyboardInterrupt):
            matches = []
        return {
            "status": "ok",
            "matches": matches,
            "cursor_start": cursor_pos - len(token),
            "cursor_end": cursor_pos,
            "metadata": {},
        }

    def do_inspect(self, code: str, cursor_pos: int, detail_level: int = 0, omit_sections: Any = ()) -> dict[str, Any]:  # type: ignore[override]
        if not self.remote.started or parse_cell(code).kind in ("local", "ipython"):
            return super().do_inspect(code, cursor_pos, detail_level, omit_sections)
        assert self.remote.client is not None and self.remote.id is not None
        try:
            reply = self.remote.client.inspect(self.remote.id, code, cursor_pos, detail_level)
        except (LivyError, KeyboardInterrupt, MagicUsageError):
            reply = {"found": False, "data": {}}
        return {"status": "ok", "found": reply["found"], "data": reply["data"], "metadata": {}}

    def do_shutdown(self, restart: bool) -> dict[str, Any]:  # type: ignore[override]
        self.remote.close()
        return super().do_shutdown(restart)


def _split_expression(body: str, inline: str) -> tuple[str, str]:
    """(code to run first, the DataFrame expression) of a %%display cell.

    EMR writes both ``%%display`` + a body and ``%%display df`` on one line; the body's last
    statement must be an expression.
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
    lines = source.splitlines()
    prelude = "\n".join(lines[: last.lineno - 1]) + "\n" if last.lineno > 1 else ""
    expression = ast.get_source_segment(source, last.value) or ""
    return prelude, expression
