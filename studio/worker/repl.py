"""Livy's Python REPL semantics, so existing Livy clients see the output they expect.

The rules follow Livy's ``fake_shell.py``:

* The cell is parsed whole. Every top-level statement but the last runs in ``exec`` mode, the
  last in ``single`` (interactive) mode, so a trailing expression's repr is printed.
* ``text/plain`` is a magic's own text, then everything printed to stdout, then stderr,
  right-stripped.
* Only when the whole cell fails to parse is it split into chunks of code and lines starting
  with ``%`` (``%json VAR``, ``%table VAR``, ``%matplot VAR``), so ``%matplot plt`` works as the
  last line of a code cell.
* An error is ``{"status": "error", "ename", "evalue", "traceback": [lines]}`` with the REPL's own
  frames removed.

Where Livy has quirks that lose work (``%json`` of a value that is not JSON kills the
interpreter; a missing variable for ``%table`` comes back as ``ok``), we return a proper error.
"""

from __future__ import annotations

import ast
import base64
import datetime
import decimal
import io
import json
import linecache
import os
import re
import sys
import traceback
from typing import Any, Callable

Output = dict[str, Any]

_MAGIC_LINE = re.compile(r"^%")
_WORKER_DIR = os.path.dirname(os.path.abspath(__file__))


def ok(data: dict[str, Any]) -> Output:
    return {"status": "ok", "data": data}


def error(ename: str, evalue: str, tb: list[str]) -> Output:
    return {"status": "error", "ename": ename, "evalue": evalue, "traceback": tb}


def error_from_exception(exc: BaseException, filename: str | None = None) -> Output:
    """Livy's error output: the traceback of the cell's code, without the REPL's own frames."""
    if filename is None or isinstance(exc, SyntaxError):
        return error(type(exc).__name__, str(exc), traceback.format_exception_only(type(exc), exc))
    lines = traceback.format_exception(type(exc), exc, exc.__traceback__, chain=False)
    top = re.compile(r'\s*File "%s", line \d+, in <module>' % re.escape(filename))
    for i, line in enumerate(lines):
        if top.match(line):
            # Keep the "Traceback (most recent call last):" header and the cell's own frame.
            lines = lines[:1] + lines[i:]
            break
    else:
        return error(type(exc).__name__, str(exc), traceback.format_exception_only(type(exc), exc))
    # An interrupt raised by the worker's signal handler would show the worker's own frame last.
    lines = [line for line in lines if not line.lstrip().startswith(f'File "{_WORKER_DIR}')]
    return error(type(exc).__name__, str(exc), lines)


class UnknownMagic(Exception):
    """A ``%name`` line whose magic does not exist (Livy's ename for it)."""


class _Capture(io.TextIOWrapper):
    """stdout/stderr of one statement, a real text stream: ``encoding`` is UTF-8 and ``buffer``
    takes bytes. What UTF-8 cannot hold (a lone surrogate, as in a file name decoded with
    ``surrogateescape``) is written as its backslash escape instead of failing the print, and so
    are bytes that are not UTF-8. Bytes given to ``write`` itself are decoded like Livy's
    UnicodeDecodingStringIO. ``forward`` also gets every byte written, as it is written (the
    statement's live output, ``studio.worker.streaming``)."""

    def __init__(self, forward: Callable[[bytes], None] | None = None) -> None:
        super().__init__(_Forwarding(forward), encoding="utf-8", errors="backslashreplace", write_through=True)

    def write(self, s: Any) -> int:
        if isinstance(s, (bytes, bytearray)):
            s = bytes(s).decode("utf-8", "replace")
        return super().write(s)

    def getvalue(self) -> str:
        self.flush()
        return self.buffer.getvalue().decode("utf-8", "backslashreplace")  # type: ignore[attr-defined]


class _Forwarding(io.BytesIO):
    def __init__(self, forward: Callable[[bytes], None] | None) -> None:
        super().__init__()
        self._forward = forward

    def write(self, data: Any) -> int:
        written = super().write(data)
        if self._forward is not None:
            self._forward(bytes(data))
        return written


class PythonRepl:
    """Runs statements in one namespace with Livy's output rules."""

    def __init__(self, namespace: dict[str, Any], max_output_bytes: int) -> None:
        self.namespace = namespace
        self.max_output_bytes = max_output_bytes
        self.published: dict[str, Any] = {}
        self.unstreamed = ""  # the last statement's text/plain that is not what it printed (a magic's own)
        self.magics: dict[str, Callable[[str], dict[str, Any]]] = {
            "json": self._magic_json,
            "table": self._magic_table,
            "matplot": self._magic_matplot,
        }

    # -- running code -----------------------------------------------------------------------

    def publish(self, data: dict[str, Any]) -> None:
        """Add mime data to the running statement's output (helpers of the kernel's magics use it)."""
        self.published.update(data)

    def execute(self, statement_id: int, code: str, forward: Callable[[bytes], None] | None = None) -> Output:
        """Run a statement; ``forward`` gets what it prints while it runs."""
        filename = f"<statement-{statement_id}>"
        self.published = {}
        self.unstreamed = ""
        stdout, stderr = _Capture(forward), _Capture(forward)
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = stdout, stderr
        try:
            try:
                chunks = self._parse(code, filename)
            except (SyntaxError, ValueError) as exc:  # ValueError: a lone surrogate in the code itself
                return error_from_exception(exc)
            result: dict[str, Any] | None = None
            try:
                for chunk in chunks:
                    if isinstance(chunk, str):
                        result = self._run_magic(chunk)
                    else:
                        self._run_module(chunk, filename)
                        result = None
            except BaseException as exc:  # noqa: BLE001 - user code may raise anything, even SystemExit
                return error_from_exception(exc, filename)
        finally:
            sys.stdout, sys.stderr = saved
        data = {**self.published, **(result or {})}
        self.unstreamed = data.pop("text/plain", "")
        text = self.unstreamed + stdout.getvalue() + stderr.getvalue()
        text = text.rstrip()
        if text or not data:
            data["text/plain"] = text
        return ok(self.limit(data))

    def _parse(self, code: str, filename: str) -> list[Any]:
        """The cell as a list of AST modules and magic lines (str)."""
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        try:
            return [compile(code, filename, "exec", ast.PyCF_ONLY_AST)]
        except SyntaxError:
            pass
        chunks: list[Any] = []
        normal: list[str] = []
        for line in code.rstrip().split("\n"):
            if _MAGIC_LINE.match(line):
                if normal:
                    chunks.append("\n".join(normal))
                    normal = []
                chunks.append(line)
            else:
                normal.append(line)
        if normal:
            chunks.append("\n".join(normal))
        if not any(c.startswith("%") for c in chunks):
            # No magic to blame: report the original syntax error of the whole cell.
            compile(code, filename, "exec", ast.PyCF_ONLY_AST)
        parsed: list[Any] = []
        for chunk in chunks:
            if chunk.startswith("%"):
                parsed.append(chunk)
            else:
                # Chunks keep the cell's filename; their line numbers restart at 1 like Livy's.
                parsed.append(compile(chunk, filename, "exec", ast.PyCF_ONLY_AST))
        return parsed

    def _run_module(self, module: ast.Module, filename: str) -> None:
        body = module.body
        # Running the user's statement is what this REPL is for.
        for node in body[:-1]:
            exec(compile(ast.Module([node], []), filename, "exec"), self.namespace)  # noqa: S102
        for node in body[-1:]:
            exec(compile(ast.Interactive([node]), filename, "single"), self.namespace)  # noqa: S102

    def _run_magic(self, line: str) -> dict[str, Any]:
        name, _, rest = line[1:].partition(" ")
        if not name:
            raise UnknownMagic("magic command not specified")
        handler = self.magics.get(name)
        if handler is None:
            raise UnknownMagic(f"unknown magic command '{name}'")
        return handler(rest.strip())

    def _variable(self, name: str) -> Any:
        if not name:
            raise UnknownMagic("the magic needs a variable name, e.g. %json result")
        try:
            return self.namespace[name]
        except KeyError:
            raise NameError(f"name '{name}' is not defined") from None

    # -- magics -----------------------------------------------------------------------------

    def _magic_json(self, name: str) -> dict[str, Any]:
        value = self._variable(name)
        json.dumps(value)  # a TypeError here is the statement's error, not a dead interpreter
        return {"application/json": value}

    def _magic_matplot(self, name: str) -> dict[str, Any]:
        plot = self._variable(name)
        if hasattr(plot, "get_fignums") and not plot.get_fignums():
            # gcf() would make an empty figure, and the cell would show a blank image.
            return {"text/plain": f"%matplot {name}: there is no figure to show; draw one first (e.g. {name}.plot(...))."}
        figure = plot.gcf() if hasattr(plot, "gcf") else plot
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        return {"image/png": base64.b64encode(buffer.getvalue()).decode("ascii"), "text/plain": ""}

    def _magic_table(self, name: str) -> dict[str, Any]:
        return {"application/vnd.livy.table.v1+json": livy_table(self._variable(name))}

    # -- output size ------------------------------------------------------------------------

    def limit(self, data: dict[str, Any]) -> dict[str, Any]:
        """Keep an output under ``max_output_bytes`` of UTF-8: cut text, drop other oversized parts."""
        limit = self.max_output_bytes
        text = data.get("text/plain")
        if isinstance(text, str):
            raw = text.encode("utf-8", "backslashreplace")
            if len(raw) > limit:
                data["text/plain"] = (
                    raw[:limit].decode("utf-8", "ignore") + f"\n[output truncated: showing {limit:,} of {len(raw):,} "
                    "bytes; the limit is STUDIO_MAX_OUTPUT_BYTES]"
                )
        for mime in [m for m in data if m != "text/plain"]:
            size = json_bytes(data[mime])
            if size > limit:
                del data[mime]
                note = (
                    f"[{mime} output of {size:,} bytes dropped: over the {limit:,}-byte limit "
                    "(STUDIO_MAX_OUTPUT_BYTES)]"
                )
                data["text/plain"] = (data.get("text/plain", "") + "\n" + note).strip()
        return data


# -- %table ---------------------------------------------------------------------------------

_TABLE_SCALARS: list[tuple[type, str, Callable[[Any], Any]]] = [
    (type(None), "NULL_TYPE", lambda v: v),
    (bool, "BOOLEAN_TYPE", lambda v: v),
    (int, "INT_TYPE", lambda v: v),
    (float, "DOUBLE_TYPE", lambda v: v),
    (str, "STRING_TYPE", lambda v: v),
    (datetime.datetime, "TIMESTAMP_TYPE", str),
    (datetime.date, "DATE_TYPE", str),
    (decimal.Decimal, "DECIMAL_TYPE", str),
]


def _table_value(value: Any) -> tuple[str, Any]:
    if isinstance(value, (list, tuple)):
        kinds = {_table_value(v)[0] for v in value}
        if len(kinds) > 1:
            raise ValueError("value has inconsistent types")
        return "ARRAY_TYPE", [_table_value(v)[1] for v in value]
    if isinstance(value, dict):
        kinds = {_table_value(v)[0] for v in value.values()}
        if len(kinds) > 1:
            raise ValueError("value has inconsistent types")
        return "MAP_TYPE", {str(_table_value(k)[1]): _table_value(v)[1] for k, v in value.items()}
    for cls, kind, convert in _TABLE_SCALARS:
        if type(value) is cls:
            return kind, convert(value)
    return "STRING_TYPE", str(value)


def livy_table(value: Any) -> dict[str, Any]:
    """Livy's ``application/vnd.livy.table.v1+json`` for rows that are lists, tuples, dicts, Rows or scalars."""
    rows = value if isinstance(value, (list, tuple)) else [value]
    headers: dict[Any, dict[str, str]] = {}
    data = []
    for row in rows:
        if type(row).__name__ == "Row" and hasattr(row, "asDict"):
            row = row.asDict()
        if not isinstance(row, (list, tuple, dict)):
            row = [row]
        items = sorted(row.items()) if isinstance(row, dict) else list(enumerate(row))
        cells = []
        for key, cell in items:
            kind, cell = _table_value(cell)
            header = headers.setdefault(key, {"name": str(key), "type": kind})
            if kind != "NULL_TYPE" and header["type"] != kind:
                if header["type"] != "NULL_TYPE":
                    raise ValueError("table rows have different types")
                header["type"] = kind
            cells.append(cell)
        data.append(cells)
    return {"headers": [headers[k] for k in sorted(headers, key=str)], "data": data}


# -- sql ------------------------------------------------------------------------------------


def json_value(value: Any) -> Any:
    """A Spark value as plain JSON (Rows as objects, dates as ISO text, decimals as numbers)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if hasattr(value, "asDict"):
        return {k: json_value(v) for k, v in value.asDict().items()}
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    return str(value)


def json_bytes(value: Any) -> int:
    """Size of ``value`` as UTF-8 JSON, as the service will keep and send it."""
    return len(json.dumps(value, default=str, ensure_ascii=False).encode("utf-8", "backslashreplace"))


def run_sql(spark: Any, code: str, max_rows: int, max_bytes: int = 10 * 1024 * 1024) -> Output:
    """Livy's ``sql`` statement kind: schema and at most ``max_rows`` rows as application/json;
    rows beyond ``max_bytes`` of JSON are cut, and a text/plain note says so."""
    query = code.strip()
    if query.endswith(";"):
        query = query[:-1]
    try:
        frame = spark.sql(query)
        rows = frame.take(max_rows)
    except BaseException as exc:  # noqa: BLE001
        return error(type(exc).__name__, str(exc), traceback.format_exception_only(type(exc), exc))
    schema = frame.schema.jsonValue()
    budget = max_bytes - json_bytes(schema)
    data: list[list[Any]] = []
    for row in rows:
        values = [json_value(v) for v in row]
        budget -= json_bytes(values) + 1
        if budget < 0:
            break
        data.append(values)
    output: dict[str, Any] = {"application/json": {"schema": schema, "data": data}}
    if len(data) < len(rows):
        output["text/plain"] = (
            f"[sql result cut to {len(data):,} of {len(rows):,} rows: over the {max_bytes:,}-byte output limit "
            "(STUDIO_MAX_OUTPUT_BYTES)]"
        )
    return ok(output)
