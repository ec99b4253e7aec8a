"""``__studio__``: what the PySpark kernel calls inside a session for its magics.

Rows leave the driver in Arrow's columnar IPC format, written to a file the service streams
to the kernel (``GET /sessions/{id}/statements/{sid}/arrow``), instead of sparkmagic's
one-JSON-line-per-row text: 1M rows arrive as a ~40 MB binary stream rather than ~100 MB of
JSON parsed line by line. The statement's own output only carries a small description.
"""

from __future__ import annotations

import inspect
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

from studio.worker.packages import SessionPackages

ARROW_MIME = "application/vnd.studio.arrow+json"


class StudioHelpers:
    def __init__(
        self,
        spark: Any,
        results_dir: Path,
        current_statement: Callable[[], int | None],
        publish: Callable[[dict[str, Any]], None],
        packages: SessionPackages,
    ) -> None:
        self.spark = spark
        self.results_dir = results_dir
        self._current = current_statement
        self._publish = publish
        self.packages = packages

    def export(
        self,
        frame: Any,
        max_rows: int = 2500,
        method: str = "take",
        fraction: float | None = None,
        seed: int | None = None,
        count: bool = False,
    ) -> None:
        """Send up to ``max_rows`` rows (all with -1) of a DataFrame to the kernel as Arrow.

        ``total_rows`` is the DataFrame's row count when ``count`` asks for it, and also when the
        rows were cut at ``max_rows`` (so the cell can say "cut at 2,500 of 10,000 rows"): the
        count runs the query once more, which only a cut result pays."""
        from pyspark.sql import DataFrame

        if not isinstance(frame, DataFrame):
            raise TypeError(f"expected a Spark DataFrame, got {type(frame).__name__}")
        total = frame.count() if count else None
        rows = frame
        if method == "sample":
            if fraction is None or not 0 < fraction <= 1:
                raise ValueError(f"the sample fraction must be in (0, 1], got {fraction}")
            rows = rows.sample(False, fraction, seed)
        elif method != "take":
            raise ValueError(f"unknown sampling method {method!r}: use take or sample")
        if max_rows >= 0:
            rows = rows.limit(max_rows + 1)  # one more row tells whether there were more
        table = _local_timestamps(rows.toArrow(), self.spark.conf.get("spark.sql.session.timeZone"))
        truncated = max_rows >= 0 and table.num_rows > max_rows
        if truncated:
            table = table.slice(0, max_rows)
            if total is None:
                total = frame.count()
        size = self._write(table)
        schema = [{"name": field.name, "type": field.dataType.simpleString()} for field in frame.schema.fields]
        description = {
            "rows": table.num_rows,
            "truncated": truncated,
            "limit": max_rows,
            "bytes": size,
            "columns": schema,
            "total_rows": total,
        }
        text = f"<{table.num_rows} rows x {len(schema)} columns as Arrow ({size:,} bytes){' (truncated)' if truncated else ''}>"
        self._publish({ARROW_MIME: description, "text/plain": text})

    def import_arrow(self, payload: str) -> Any:
        """A DataFrame from base64 Arrow IPC sent by the kernel (%%send_to_spark -t df)."""
        import base64

        import pyarrow as pa

        table = pa.ipc.open_stream(pa.py_buffer(base64.b64decode(payload))).read_all()
        return self.spark.createDataFrame(table)

    def _write(self, table: Any) -> int:
        import pyarrow as pa

        statement_id = self._current()
        self.results_dir.mkdir(parents=True, exist_ok=True)
        path = self.results_dir / f"{statement_id}.arrow"
        tmp = path.with_suffix(".tmp")
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        os.replace(tmp, path)
        return path.stat().st_size

    def pip(self, *args: str) -> None:
        self.packages.pip(list(args))


def _local_timestamps(table: Any, time_zone: str) -> Any:
    """Timestamps as toPandas() gives them: wall-clock time in the session time zone, no zone."""
    import pyarrow as pa
    import pyarrow.compute as pc

    for index, column in enumerate(table.schema):
        if pa.types.is_timestamp(column.type) and column.type.tz:
            local = pc.local_timestamp(table.column(index).cast(pa.timestamp(column.type.unit, time_zone)))
            table = table.set_column(index, column.name, local)
    return table


def completions(namespace: dict[str, Any], code: str, cursor: int) -> list[str]:
    """What completes the text before ``cursor``: names and dotted names (``spark.ra`` ->
    ``spark.range``), and attributes after a call (``df.groupBy('id').co`` -> ``count``), found from
    the called method's return annotation without calling it: completing must never run a query."""
    import rlcompleter

    text = code[: max(0, cursor)]
    chained = _chained_receiver(text)
    if chained is not None:
        receiver, prefix = chained
        found = _static_value(receiver, namespace)
        if found is None:
            return []
        names = [name for name in dir(found) if name.startswith(prefix)]
        return sorted(names, key=lambda n: (n.startswith("_"), n))
    match = re.search(r"[A-Za-z_][\w.]*$", text)
    if not match:
        return []
    token = match.group(0)
    completer = rlcompleter.Completer(namespace)
    candidates: list[str] = []
    for state in range(500):
        try:
            candidate = completer.complete(token, state)
        except Exception:  # noqa: BLE001 - evaluating `a.b.` may raise anything
            break
        if candidate is None:
            break
        candidate = candidate.rstrip("(")
        if candidate not in candidates:
            candidates.append(candidate)
    return sorted(candidates, key=lambda c: (c.rsplit(".", 1)[-1].startswith("_"), c))


def _chained_receiver(text: str) -> tuple[str, str] | None:
    """(receiver expression, attribute prefix) when ``text`` ends in ``<expression with a call>.<prefix>``."""
    match = re.search(r"\.(\w*)$", text)
    if not match:
        return None
    end = match.start()
    depth, start = 0, end
    while start > 0:
        char = text[start - 1]
        if char in ")]":
            depth += 1
        elif char in "([":
            if depth == 0:
                break
            depth -= 1
        elif depth == 0 and not (char.isalnum() or char in "_."):
            break
        start -= 1
    receiver = text[start:end]
    if depth or not receiver or "(" not in receiver:
        return None
    return receiver, match.group(1)


def _static_value(source: str, namespace: dict[str, Any]) -> Any:
    """The value (or, past a call, the class) an expression would have, without calling anything."""
    import ast

    try:
        node = ast.parse(source, mode="eval").body
    except SyntaxError:
        return None

    def resolve(node: Any) -> Any:
        if isinstance(node, ast.Name):
            return namespace.get(node.id)
        if isinstance(node, ast.Attribute):
            owner = resolve(node.value)
            return None if owner is None else getattr(owner, node.attr, None)
        if isinstance(node, ast.Call):
            function = resolve(node.func)
            if isinstance(function, type):
                return function
            return None if function is None else _returned_class(function)
        return None

    try:
        return resolve(node)
    except Exception:  # noqa: BLE001 - a property may raise anything
        return None


def _returned_class(function: Any) -> type | None:
    """The class a function's return annotation names (PySpark annotates its methods)."""
    try:
        annotation = inspect.signature(function).return_annotation
    except (TypeError, ValueError):
        return None
    if isinstance(annotation, type) and annotation is not inspect.Signature.empty:
        return annotation
    if not isinstance(annotation, str) or not annotation.isidentifier():
        return None
    target = getattr(function, "__func__", function)
    found = getattr(target, "__globals__", {}).get(annotation)
    if isinstance(found, type):
        return found
    # Names imported for type checking only: look in the function's own package, as loaded.
    package = (getattr(target, "__module__", "") or "").split(".")[0]
    for name, module in list(sys.modules.items()):
        if package and name.split(".")[0] == package:
            candidate = getattr(module, annotation, None)
            if isinstance(candidate, type):
                return candidate
    return None


def inspection(namespace: dict[str, Any], code: str, cursor: int, detail_level: int = 0) -> dict[str, Any]:
    """What Jupyter's shift-Tab shows: the object's type, signature and docstring."""
    text = code[: max(0, cursor)]
    # The dotted name the cursor is in or right after, e.g. "spark.range(" -> spark.range.
    tail = re.search(r"([A-Za-z_][\w.]*)\s*\(?\s*$", text) or re.search(r"([A-Za-z_][\w.]*)$", text)
    following = re.match(r"[\w.]*", code[max(0, cursor) :])
    if not tail:
        return {"found": False, "data": {}}
    name = tail.group(1) + (following.group(0) if following and not text.endswith("(") else "")
    name = name.rstrip(".")
    try:
        # a dotted name only: attribute access, never a call, in the session that runs its user's code anyway
        value = eval(name, namespace)  # noqa: S307
    except Exception:  # noqa: BLE001
        return {"found": False, "data": {}}
    lines = [f"Type:      {type(value).__name__}"]
    try:
        lines.append(f"Signature: {name}{inspect.signature(value)}")
    except (TypeError, ValueError):
        pass
    doc = inspect.getdoc(value)
    if doc:
        lines.append("Docstring:\n" + (doc if detail_level else doc[:4000]))
    return {"found": True, "data": {"text/plain": "\n".join(lines)}}
