"""Reading the notebook a run is given: a clear ``RunError`` for anything that is not one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nbformat

from studio.execution.errors import RunError


def read_notebook(path: Path) -> tuple[bytes, Any]:
    """(the file's bytes, the notebook), or RunError saying why it is not a notebook.

    Cells without ``metadata`` (or code cells without ``outputs``), which some generators write,
    get empty ones: nothing is lost by that, and the notebook runs."""
    if not path.is_file():
        raise RunError(f"no notebook at {path}")
    try:
        raw = path.read_bytes()
        data = json.loads(raw.decode("utf-8"))
    except OSError as exc:
        raise RunError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise RunError(f"{path} is not a notebook: it is not JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("cells", data.get("worksheets")), list):
        raise RunError(f"{path} is not a notebook: its JSON has no list of 'cells'")
    for cell in data.get("cells", []):
        if isinstance(cell, dict):
            cell.setdefault("metadata", {})
            if cell.get("cell_type") == "code":
                cell.setdefault("outputs", [])
                cell.setdefault("execution_count", None)
    try:
        notebook = nbformat.reads(json.dumps(data), as_version=4)
    except Exception as exc:  # noqa: BLE001 - nbformat raises several kinds for a malformed notebook
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RunError(f"{path} is not a valid notebook: {reason}") from None
    return raw, notebook
