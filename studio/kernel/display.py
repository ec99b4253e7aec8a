"""From results to MIME bundles: tables, the session table, progress bars, charts.

Every bundle has a ``text/plain`` form as well, so headless runs and terminals read well too.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

from studio.urls import http_url

TABLE_STYLE = (
    "<style>.studio-note{color:#555;font-size:12px;margin:4px 0}"
    ".studio-progress{font-family:sans-serif;font-size:12px;color:#333}"
    ".studio-bar{display:inline-block;width:240px;height:10px;background:#e6e6e6;border-radius:3px;"
    "vertical-align:middle;margin-right:8px;overflow:hidden}"
    ".studio-bar>span{display:block;height:100%;background:#2f7ed8}</style>"
)
MAX_HTML_ROWS = 100


def escape(value: Any) -> str:
    return html.escape(str(value))


def note(text: str) -> dict[str, str]:
    return {"text/html": f'<div class="studio-note">{escape(text)}</div>', "text/plain": text}


def link(url: str | None, label: str = "Link") -> str:
    """An ``<a>`` for an http(s) URL; nothing for any other (a compute may send ``javascript:``)."""
    safe = http_url(url)
    return f'<a href="{escape(safe)}" target="_blank" rel="noopener noreferrer">{escape(label)}</a>' if safe else ""


# -- sessions ---------------------------------------------------------------------------------


def sessions_table(sessions: list[dict[str, Any]], current: int | None) -> dict[str, str]:
    """%%info's table; "User" is whom the session runs as (``proxyUser``, else ``owner``), as sparkmagic shows it."""
    head = "".join(f"<th>{h}</th>" for h in ("ID", "Application ID", "Kind", "State", "Spark UI", "Driver log", "User", "Current session?"))
    rows, lines = [], []
    for s in sessions:
        info = s.get("appInfo") or {}
        mark = "\u2714" if s["id"] == current else ""
        cells = (
            escape(s["id"]), escape(s.get("appId") or ""), escape(s.get("kind")), escape(s.get("state")),
            link(info.get("sparkUiUrl")), link(info.get("driverLogUrl")), escape(s.get("proxyUser") or s.get("owner") or ""), mark,
        )  # fmt: skip
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        lines.append(f"{str(s['id']):>4}  {str(s.get('state', '')):<10} {str(s.get('appId') or ''):<24} {info.get('sparkUiUrl') or ''} {mark}")
    table = f"<table><tr>{head}</tr>{''.join(rows)}</table>"
    text = "  ID  State      Application ID           Spark UI\n" + "\n".join(lines)
    return {"text/html": table, "text/plain": text}


# -- data -------------------------------------------------------------------------------------


def frame_bundle(
    frame: Any,
    *,
    title: str = "",
    types: list[dict[str, str]] | None = None,
    total_rows: int | None = None,
    truncated: bool = False,
    limit: int | None = None,
    max_html_rows: int = MAX_HTML_ROWS,
) -> dict[str, str]:
    """A pandas DataFrame as an HTML table with what the reader must know about its rows."""
    rows = len(frame)
    parts = [f"{rows:,} row{'s' if rows != 1 else ''} x {len(frame.columns)} column{'s' if len(frame.columns) != 1 else ''}"]
    if truncated:
        of = f" of {total_rows:,} rows" if total_rows is not None else ""
        parts.append(f"cut at {limit:,}{of} (-n to change, -n -1 for all)")
    elif total_rows is not None:
        parts.append(f"{total_rows:,} in the DataFrame")
    if not truncated and limit is not None and limit >= 0:
        parts.append(f"row limit {limit:,}")
    if rows > max_html_rows:
        parts.append(f"showing the first {max_html_rows:,}")
    summary = "; ".join(parts)
    shown = frame.head(max_html_rows)
    header = ""
    if types:
        header = "<tr>" + "".join(f"<th>{escape(t['name'])}<br><small>{escape(t['type'])}</small></th>" for t in types) + "</tr>"
    table = shown.to_html(index=False, border=0, classes="dataframe", escape=True, max_rows=max_html_rows)
    if header:
        table = table.replace("<thead>", "<thead>" + header, 1)
    heading = f"<b>{escape(title)}</b> " if title else ""
    text = (f"{title}: " if title else "") + summary + "\n" + shown.to_string(index=False, max_rows=20)
    return {"text/html": f'{TABLE_STYLE}<div class="studio-note">{heading}{escape(summary)}</div>{table}', "text/plain": text}


def livy_table_bundle(table: dict[str, Any]) -> dict[str, str]:
    """Livy's application/vnd.livy.table.v1+json as HTML."""
    headers = [h["name"] for h in table.get("headers", [])]
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in table.get("data", []))
    text = "\t".join(headers) + "\n" + "\n".join("\t".join(str(c) for c in row) for row in table.get("data", []))
    return {"text/html": f"<table><tr>{head}</tr>{body}</table>", "text/plain": text}


def chart_png(frame: Any, chart: str, x: str | None, y: str | None, title: str | None) -> tuple[bytes, str, list[str]]:
    """Draw a chart of the rows with matplotlib (Agg): (PNG bytes, description, notes).

    ValueError says what is wrong with the data (no rows, no such column, a --y that is not
    numeric); rows that cannot be drawn (a null x or y, a negative or null pie value) are skipped
    and the notes say how many."""
    import warnings

    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    data, x, ys, notes = _chart_data(frame, chart, x, y)
    with warnings.catch_warnings(record=True) as caught, plt.rc_context({"font.sans-serif": _fonts()}):
        warnings.simplefilter("always")
        figure, axes = plt.subplots(figsize=(8, 4.5), dpi=100)
        try:
            if chart == "pie":
                axes.pie(data[ys[0]], labels=data[x].astype(str), autopct="%1.0f%%")
                axes.axis("equal")
            elif chart == "bar":
                data.plot.bar(x=x, y=ys, ax=axes, legend=len(ys) > 1)
            elif chart == "line":
                data.plot.line(x=x, y=ys, ax=axes, legend=len(ys) > 1)
            elif chart == "area":
                # pandas stacks areas and refuses a column with both signs; such areas overlap instead
                stackable = all((data[c] >= 0).all() or (data[c] <= 0).all() for c in ys)
                if len(ys) > 1 and not stackable:
                    notes.append("The areas overlap instead of stacking: a column has both positive and negative values.")
                data.plot.area(x=x, y=ys, ax=axes, legend=len(ys) > 1, stacked=stackable)
            elif chart == "scatter":
                for column in ys:
                    axes.scatter(data[x], data[column], label=column, s=12)
                axes.set_xlabel(x)
                if len(ys) > 1:
                    axes.legend()
            if chart != "pie" and len(ys) == 1:
                axes.set_ylabel(ys[0])
            axes.set_title(title or f"{', '.join(ys)} by {x}")
            figure.tight_layout()
            buffer = io.BytesIO()
            figure.savefig(buffer, format="png")
        finally:
            plt.close(figure)
    if any("missing from font" in str(w.message) for w in caught):
        notes.append("Some characters could not be drawn: no installed font has them (a CJK font such as Noto Sans CJK would).")
    rows = f"{len(data):,} row{'s' if len(data) != 1 else ''}"
    return buffer.getvalue(), f"{chart} chart of {', '.join(ys)} by {x} ({rows})", notes


def _chart_data(frame: Any, chart: str, x: str | None, y: str | None) -> tuple[Any, str, list[str], list[str]]:
    """(the rows to draw, x, the y columns, notes), or ValueError saying what is wrong."""
    import pandas as pd

    frame = frame.rename(columns=str)
    columns = list(frame.columns)
    if not columns:
        raise ValueError("there are no columns to chart")
    if frame.empty:
        raise ValueError("the DataFrame has no rows to chart")
    numeric = [c for c in columns if pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c])]
    x = x or next((c for c in columns if c not in numeric), columns[0])
    ys = [c.strip() for c in y.split(",") if c.strip()] if y else [c for c in numeric if c != x][:1]
    for column in [x, *ys]:
        if column not in columns:
            raise ValueError(f"no column {column!r}; the columns are {', '.join(columns)}")
    if not ys:
        raise ValueError(f"there is no numeric column to chart against {x!r}; the columns are {', '.join(columns)}")
    data = frame[[x, *[c for c in ys if c != x]]].copy()
    for column in ys:
        if column in numeric:
            data[column] = data[column].astype("float64")
            continue
        values = pd.to_numeric(data[column], errors="coerce")  # e.g. decimals arrive as objects
        if values.notna().sum() < data[column].notna().sum() or pd.api.types.is_bool_dtype(data[column]):
            others = ", ".join(c for c in numeric if c != x) or "none"
            raise ValueError(
                f"--y column {column!r} holds {frame[column].dtype} values, not numbers; the numeric columns are {others}"
            )
        data[column] = values.astype("float64")
    notes = []
    null_x = int(data[x].isna().sum())
    null_y = int(data[ys].isna().any(axis=1).sum() - (data[x].isna() & data[ys].isna().any(axis=1)).sum())
    data = data.dropna(subset=[x, *ys])
    if null_x:
        notes.append(f"Skipped {null_x:,} row{'s' if null_x != 1 else ''} whose {x!r} is null.")
    if null_y:
        notes.append(f"Skipped {null_y:,} row{'s' if null_y != 1 else ''} with a null in {', '.join(map(repr, ys))}.")
    if chart == "pie":
        negative = int((data[ys[0]] < 0).sum())
        data = data[data[ys[0]] >= 0]
        if negative:
            notes.append(f"Skipped {negative:,} negative value{'s' if negative != 1 else ''} of {ys[0]!r}: a pie has no negative slices.")
        if not data.empty and float(data[ys[0]].sum()) == 0:
            raise ValueError(f"every value of {ys[0]!r} is 0: there is no pie to draw")
    if data.empty:
        raise ValueError("no row has both an x value and a y value to draw (they are all null)")
    return data, x, ys, notes


def _fonts() -> list[str]:
    """Sans-serif fonts in fallback order: matplotlib's default, then installed ones that cover CJK."""
    from matplotlib import font_manager

    names = sorted({f.name for f in font_manager.fontManager.ttflist})
    cjk = [n for n in names if any(k in n for k in ("CJK", "WenQuanYi", "Droid Sans Fallback", "Noto Sans SC", "Noto Sans JP", "Unifont"))]
    return ["DejaVu Sans", *cjk]


def png_bundle(png: bytes, text: str) -> dict[str, str]:
    return {"image/png": base64.b64encode(png).decode("ascii"), "text/plain": text}


# -- progress ---------------------------------------------------------------------------------


def progress_bundle(progress: float, jobs: list[dict[str, Any]], elapsed: float, final: str | None = None) -> dict[str, str]:
    """A progress bar for the running statement, or its final line (``final``: Done, Cancelled, Failed)."""
    total = sum(int(j.get("numTasks", 0)) for j in jobs)
    done = sum(int(j.get("numCompletedTasks", 0)) for j in jobs)
    running = [j for j in jobs if j.get("status") == "RUNNING"] or jobs[-1:]
    stage = stage_label(running[-1].get("stage", "")) if running else ""
    job = f"job {running[-1]['jobId']}" if running else ""
    tasks = f"{done}/{total} task{'s' if total != 1 else ''}" if total else "no Spark job yet"
    if final:
        text = f"{final} in {elapsed:.1f} s" + (
            f" · {len(jobs)} Spark job{'s' if len(jobs) != 1 else ''}, {total} task{'s' if total != 1 else ''}" if jobs else ""
        )
        return {"text/html": f'{TABLE_STYLE}<div class="studio-progress">{escape(text)}</div>', "text/plain": text}
    percent = max(0.0, min(1.0, progress)) * 100
    detail = " · ".join(p for p in (tasks, job, f"stage '{stage}'" if stage else "", f"{elapsed:.1f} s") if p)
    bar = "#" * int(percent / 5)
    text = f"[{bar:<20}] {percent:3.0f}% {detail}"
    html_bar = (
        f'{TABLE_STYLE}<div class="studio-progress"><span class="studio-bar"><span style="width:{percent:.0f}%"></span></span>'
        f"{percent:.0f}% · {escape(detail)}</div>"
    )
    return {"text/html": html_bar, "text/plain": text}


def stage_label(stage: str) -> str:
    """A stage's name as a reader knows it. Spark names a stage after the call that made it,
    ``toArrow at /.../studio/worker/helpers.py:61`` or ``count at <statement-5>:3``: the kernel's
    own helpers are not the user's code, and a statement is a cell."""
    import re

    if stage.startswith("$anonfun"):  # an adaptive-execution stage named after Spark's own code
        return ""
    match = re.match(r"^(?P<call>.+?) at (?P<file>.+):(?P<line>\d+)$", stage)
    if not match:
        return stage
    call, file, line = match.group("call", "file", "line")
    if file.startswith("<statement-"):
        return f"{call} (line {line})"
    if "/studio/" in file.replace("\\", "/"):
        return call
    return f"{call} ({file.replace(chr(92), '/').rsplit('/', 1)[-1]}:{line})"


def help_bundle(rows: list[tuple[str, str, str]]) -> dict[str, str]:
    body = "".join(f"<tr><td><code>{escape(m)}</code></td><td><code>{escape(e)}</code></td><td>{escape(d)}</td></tr>" for m, e, d in rows)
    table = f"<table><tr><th>Magic</th><th>Example</th><th>Explanation</th></tr>{body}</table>"
    text = "\n".join(f"{m}\n    {d}" for m, _, d in rows)
    return {"text/html": table, "text/plain": text}
