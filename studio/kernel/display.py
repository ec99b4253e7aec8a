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
    head = "".join(f"<th>{h}</th>" for h in ("ID", "Application ID", "Kind", "State", "Spark UI", "Driver log", "User", "Current session?"))
    rows, lines = [], []
    for s in sessions:
        info = s.get("appInfo") or {}
        mark = "\u2714" if s["id"] == current else ""
        cells = (
            escape(s["id"]), escape(s.get("appId") or ""), escape(s.get("kind")), escape(s.get("state")),
            link(info.get("sparkUiUrl")), link(info.get("driverLogUrl")), escape(s.get("owner") or ""), mark,
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
    if total_rows is not None:
        parts.append(f"{total_rows:,} in the DataFrame")
    if truncated:
        parts.append(f"cut at the row limit of {limit:,} (-n to change, -n -1 for all)")
    elif limit is not None and limit >= 0:
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


def chart_png(frame: Any, chart: str, x: str | None, y: str | None, title: str | None) -> tuple[bytes, str]:
    """Draw a chart of the rows with matplotlib (Agg), as PNG bytes; returns (png, description)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import pandas as pd

    columns = list(frame.columns)
    numeric = [c for c in columns if pd.api.types.is_numeric_dtype(frame[c])]
    if not columns:
        raise ValueError("there are no columns to chart")
    x = x or next((c for c in columns if c not in numeric), columns[0])
    ys = [c.strip() for c in y.split(",")] if y else [c for c in numeric if c != x][:1]
    for column in [x, *ys]:
        if column not in columns:
            raise ValueError(f"no column {column!r}; the columns are {', '.join(columns)}")
    if not ys:
        raise ValueError("--y needs a numeric column to chart")
    figure, axes = plt.subplots(figsize=(8, 4.5), dpi=100)
    try:
        if chart == "pie":
            axes.pie(frame[ys[0]], labels=frame[x].astype(str), autopct="%1.0f%%")
            axes.axis("equal")
        elif chart == "bar":
            frame.plot.bar(x=x, y=ys, ax=axes, legend=len(ys) > 1)
        elif chart == "line":
            frame.plot.line(x=x, y=ys, ax=axes, legend=len(ys) > 1)
        elif chart == "area":
            frame.plot.area(x=x, y=ys, ax=axes, legend=len(ys) > 1)
        elif chart == "scatter":
            for column in ys:
                axes.scatter(frame[x], frame[column], label=column, s=12)
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
    return buffer.getvalue(), f"{chart} chart of {', '.join(ys)} by {x} ({len(frame):,} rows)"


def png_bundle(png: bytes, text: str) -> dict[str, str]:
    return {"image/png": base64.b64encode(png).decode("ascii"), "text/plain": text}


# -- progress ---------------------------------------------------------------------------------


def progress_bundle(progress: float, jobs: list[dict[str, Any]], elapsed: float, final: str | None = None) -> dict[str, str]:
    """A progress bar for the running statement, or its final line (``final``: Done, Cancelled, Failed)."""
    total = sum(int(j.get("numTasks", 0)) for j in jobs)
    done = sum(int(j.get("numCompletedTasks", 0)) for j in jobs)
    running = [j for j in jobs if j.get("status") == "RUNNING"] or jobs[-1:]
    stage = running[-1].get("stage", "") if running else ""
    if stage.startswith("$anonfun"):  # an adaptive-execution stage named after Spark's own code
        stage = ""
    job = f"job {running[-1]['jobId']}" if running else ""
    tasks = f"{done}/{total} tasks" if total else "no Spark job yet"
    if final:
        text = f"{final} in {elapsed:.1f} s" + (f" · {len(jobs)} Spark job{'s' if len(jobs) != 1 else ''}, {total} tasks" if jobs else "")
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


def help_bundle(rows: list[tuple[str, str, str]]) -> dict[str, str]:
    body = "".join(f"<tr><td><code>{escape(m)}</code></td><td><code>{escape(e)}</code></td><td>{escape(d)}</td></tr>" for m, e, d in rows)
    table = f"<table><tr><th>Magic</th><th>Example</th><th>Explanation</th></tr>{body}</table>"
    text = "\n".join(f"{m}\n    {d}" for m, _, d in rows)
    return {"text/html": table, "text/plain": text}
