"""Parsing of the kernel's magics into typed commands; syntax-compatible with sparkmagic and
EMR Studio. Running them is the kernel's job (``kernel.py``).

A cell is routed by its first line:
  ``%%local`` / ``%local``            runs in the local IPython
  ``%%<kernel magic> ...``           one of ``CELL_MAGICS`` below
  ``%%time`` / ``%time CODE``        remote code, timed (IPython's would time local code)
  ``%pip ...``                       notebook-scoped packages in the remote session
  ``%matplot``/``%json``/``%table``  remote code (the session's REPL knows these lines)
  ``!command``                       a shell command on the kernel's machine (the local IPython)
  any other ``%``/``%%`` magic       the local IPython (``%%html``, ``%env``, ...)
  anything else                      remote PySpark code
"""

from __future__ import annotations

import argparse
import json
import keyword
import shlex
from dataclasses import dataclass, field
from typing import Any

REMOTE_LINE_MAGICS = ("matplot", "json", "table")
CHARTS = ("table", "bar", "line", "scatter", "pie", "area")


class MagicUsageError(Exception):
    """Bad magic syntax: unknown flag, missing value, malformed JSON, body where none belongs."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise MagicUsageError(f"{self.prog}: {message}. Usage: {self.format_usage().strip()[7:]}")


def _parser(name: str) -> _Parser:
    # exit_on_error stays on: every parse error reaches error(), which raises instead of exiting.
    return _Parser(prog=name, add_help=False)


@dataclass
class Cell:
    """A parsed cell: ``kind`` is "remote", "local" or a magic name; ``args`` its parsed flags."""

    kind: str
    body: str = ""
    args: argparse.Namespace = field(default_factory=argparse.Namespace)
    line: str = ""


def python_name(text: str) -> str:
    """An argparse type: a name a variable can have (``-o 1bad`` would make a name no cell can use)."""
    if not text.isidentifier() or keyword.iskeyword(text):
        raise argparse.ArgumentTypeError(f"'{text}' is not a valid Python variable name")
    return text


def _sql_flags(parser: _Parser) -> None:
    parser.add_argument("-o", "--output", dest="output", type=python_name, help="keep the rows in this local pandas variable")
    parser.add_argument("-q", "--quiet", action="store_true", help="show nothing")
    parser.add_argument("-n", "--maxrows", type=int, default=None, help="rows to bring back; -1 for all")
    parser.add_argument("-m", "--samplemethod", choices=("take", "sample"), default="take")
    parser.add_argument("-r", "--samplefraction", type=float, default=None)
    parser.add_argument("-c", "--coerce", default=None, help="accepted for sparkmagic compatibility; types come from Arrow")
    parser.add_argument("-s", "--session", default=None, help="accepted for sparkmagic compatibility")


def _build_parsers() -> dict[str, _Parser]:
    parsers: dict[str, _Parser] = {}

    p = parsers["configure"] = _parser("%%configure")
    p.add_argument("-f", "--force", action="store_true")

    for name in ("info", "logs", "help"):
        parsers[name] = _parser(f"%%{name}")

    p = parsers["cleanup"] = _parser("%%cleanup")
    p.add_argument("-f", "--force", action="store_true")

    p = parsers["delete"] = _parser("%%delete")
    p.add_argument("-f", "--force", action="store_true")
    p.add_argument("-s", "--session", dest="session_id", type=int, required=True)

    _sql_flags(parsers.setdefault("sql", _parser("%%sql")))
    _sql_flags(parsers.setdefault("spark", _parser("%%spark")))

    p = parsers["display"] = _parser("%%display")
    p.add_argument("--chart", choices=CHARTS, default="table")
    p.add_argument("--x", dest="x", default=None, help="column for the x axis (labels of a pie)")
    p.add_argument("--y", dest="y", default=None, help="column(s) for the y axis, comma-separated")
    p.add_argument("-n", "--rows", type=int, default=100, help="rows to show and to chart (-1 for all)")
    p.add_argument("--title", default=None)

    p = parsers["send_to_spark"] = _parser("%%send_to_spark")
    p.add_argument("-i", "--input", dest="input", required=True, help="local variable to send")
    p.add_argument("-t", "--type", dest="type", choices=("str", "df"), default=None)
    p.add_argument("-n", "--name", dest="name", type=python_name, default=None, help="name in the Spark session (default: same)")
    p.add_argument("-m", "--maxrows", type=int, default=-1, help="rows of a DataFrame to send (default -1: all)")

    parsers["pyspark"] = _parser("%%pyspark")
    parsers["time"] = _parser("%%time")
    return parsers


PARSERS = _build_parsers()
CELL_MAGICS = tuple(PARSERS)
EMPTY_BODY = ("info", "logs", "help", "cleanup", "delete", "send_to_spark")


def parse_cell(code: str) -> Cell:
    """Route a cell (see the module docstring); raises MagicUsageError for bad magic syntax."""
    stripped = code.lstrip()
    if not stripped:
        return Cell("empty")
    first, _, body = stripped.partition("\n")
    first = first.rstrip()
    if first.startswith("!"):
        return Cell("ipython", body=code)
    if first.startswith("%%"):
        name, _, line = first[2:].partition(" ")
        if name == "local":
            return Cell("local", body=body)
        if name in PARSERS:
            return _magic(name, line, body)
        return Cell("ipython", body=code)
    if first.startswith("%"):
        name, _, line = first[1:].partition(" ")
        if name == "local":
            return Cell("local", body=body)
        if name == "pip":
            return Cell("pip", args=argparse.Namespace(argv=_split(line)), body=body, line=line)
        if name == "time":
            return Cell("time", body=(line + "\n" + body).strip("\n"), args=argparse.Namespace(), line=line)
        if name in REMOTE_LINE_MAGICS:
            return Cell("remote", body=code)
        return Cell("ipython", body=code)
    return Cell("remote", body=code)


def _split(line: str) -> list[str]:
    try:
        return shlex.split(line)
    except ValueError as exc:
        raise MagicUsageError(f"cannot parse the magic's arguments: {exc}") from None


_DISPLAY_FLAG = r"""(--?(?:chart|x|y|n|rows|title))(?:=|\s+)("[^"]*"|'[^']*'|[^\s"']+)"""


def _display_line(line: str) -> tuple[str, str]:
    """(flags, expression) of ``%%display [FLAGS] [EXPRESSION] [FLAGS]``: the expression is kept as
    written (shell-style splitting would drop its quotes: ``F.col('id')`` became ``F.col(id)``)."""
    import re

    flags, rest = [], line.strip()
    while match := re.match(_DISPLAY_FLAG + r"\s*", rest):
        flags.append(match.group(0).strip())
        rest = rest[match.end() :]
    while match := re.search(r"\s" + _DISPLAY_FLAG + r"\s*$", " " + rest):
        flags.insert(len(flags), match.group(0).strip())
        rest = (" " + rest)[: match.start()].strip()
    if rest.startswith("-") and not flags:
        return rest, ""  # an unknown flag: the parser names it
    return " ".join(flags), rest


def _magic(name: str, line: str, body: str) -> Cell:
    if name == "time":  # %%time's line is code for IPython's; ours times the body only
        return Cell("time", body=body, args=argparse.Namespace(), line=line)
    if name == "display":
        flags, expression = _display_line(line)
        args = PARSERS[name].parse_args(_split(flags))
        args.expression = expression
        return Cell(name, body=body, args=args, line=line)
    args = PARSERS[name].parse_args(_split(line))
    if name in EMPTY_BODY and body.strip():
        raise MagicUsageError(f"Cell body for %%{name} magic must be empty.")
    return Cell(name, body=body, args=args, line=line)


def parse_configure_body(body: str) -> dict[str, Any]:
    """The JSON of a %%configure cell: Livy session settings."""
    try:
        settings = json.loads(body) if body.strip() else {}
    except ValueError as exc:
        raise MagicUsageError(f"Could not parse JSON object from input '{body.strip()}': {exc}") from None
    if not isinstance(settings, dict):
        raise MagicUsageError(f"%%configure needs a JSON object of session settings, got {type(settings).__name__}.")
    return settings


HELP_ROWS = [
    ("%%configure [-f]", '{"driverMemory": "2g", "conf": {"spark.sql.shuffle.partitions": "8"}}',
     "Session settings for the next session (Livy's POST /sessions body), checked before anything is deleted; "
     "-f restarts the current one (its variables are lost). If the new session does not start, the previous "
     "settings come back with a new session."),
    ("%%info", "", "The session's settings, the service it talks to, and this user's sessions."),
    ("%%logs", "", "The session's driver log (also of a session that ended)."),
    ("%%sql [-o VAR] [-q] [-n ROWS] [-m take|sample] [-r FRACTION]", "SELECT * FROM trips",
     "Runs Spark SQL; shows the rows (2,500 by default, -n -1 for all; a cut result says its total) and with -o "
     "keeps them as a local pandas DataFrame. -q shows nothing."),
    ("%%display [--chart table|bar|line|scatter|pie|area] [--x COL] [--y COLS] [-n ROWS] [--title TEXT]",
     "df.groupBy('zone').count()",
     "Shows a DataFrame expression as a table (columns, types, row count, first rows; the default) or a chart "
     "(--y takes comma-separated numeric columns; rows with nulls are skipped and counted)."),
    ("%%spark [-o VAR] [-n ROWS]", "df = spark.range(10)", "Runs code remotely; with -o brings DataFrame VAR back as pandas."),
    ("%%send_to_spark -i VAR [-t str|df] [-n NAME] [-m ROWS]", "",
     "Sends a local string or pandas DataFrame (all rows unless -m; a named index becomes columns) to the session."),
    ("%%local", "a = 1", "Runs the cell in the local Python of this kernel."),
    ("%%time", "spark.range(10**8).count()", "Runs the cell remotely and prints how long it took."),
    ("!command", "!ls", "Runs a shell command on the kernel's machine (where the notebook is), not in Spark."),
    ("%matplot plt", "", "Shows the session's current matplotlib figure (a line of its own, anywhere in a cell)."),
    ("%pip install|uninstall|list ...", "%pip install arrow", "Notebook-scoped packages in the remote session (also sc.install_pypi_package)."),
    ("%%cleanup -f", "", "Deletes all of this user's live sessions on the service."),
    ("%%delete -f -s ID", "", "Deletes session ID (not this notebook's own)."),
    ("%%help", "", "This table."),
]  # fmt: skip
