"""sparkmagic, as its users run it, from the separate virtualenv the test command makes (see
scripts/test.sh; its Python is found through STUDIO_SPARKMAGIC_PYTHON or at
.venv-sparkmagic/bin/python): a notebook of cells with sparkmagic's own PySpark kernel against a
Livy endpoint, configured only by its config file (the endpoint and the credentials)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import nbformat
import pytest

from helpers import REPO


def sparkmagic_python() -> Path:
    python = Path(os.environ.get("STUDIO_SPARKMAGIC_PYTHON", REPO / ".venv-sparkmagic" / "bin" / "python"))
    if not python.exists():
        pytest.fail(f"sparkmagic's virtualenv is missing ({python}); run scripts/test.sh, which creates it")
    return python


def sparkmagic_env(config_dir: Path) -> dict[str, str]:
    """The environment of a sparkmagic process: its config folder, and nothing of this virtualenv's path."""
    env = {**os.environ, "SPARKMAGIC_CONF_DIR": str(config_dir), "JUPYTER_PLATFORM_DIRS": "1"}
    env.pop("PYTHONPATH", None)
    return env


def cell_text(cell: Any) -> str:
    parts = []
    for output in cell.get("outputs", []):
        if output.get("output_type") == "stream":
            parts.append(output["text"])
        for mime in ("text/plain", "text/html"):
            value = output.get("data", {}).get(mime)
            if value:
                parts.append(value if isinstance(value, str) else "".join(value))
    return "\n".join(parts)


def run_sparkmagic_notebook(
    base_url: str, token: str, cells: list[str], folder: Path, user: str = "analyst", startup_timeout: int = 240
) -> list[Any]:
    """The executed cells, after sparkmagic's kernel ran them all against ``base_url`` (Basic_Access:
    ``user`` and ``token`` as the password)."""
    config_dir = folder / "sparkmagic"
    config_dir.mkdir(exist_ok=True)
    (config_dir / "config.json").write_text(
        json.dumps(
            {
                "kernel_python_credentials": {"username": user, "password": token, "url": base_url, "auth": "Basic_Access"},
                "livy_session_startup_timeout_seconds": startup_timeout,
            }
        )
    )
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(cell) for cell in cells]
    source, executed = folder / "sparkmagic.ipynb", folder / "sparkmagic-out.ipynb"
    nbformat.write(notebook, source)
    result = subprocess.run(
        [str(sparkmagic_python()), str(REPO / "tests" / "sparkmagic_runner.py"), str(source), str(executed)],
        capture_output=True, text=True, timeout=900, env=sparkmagic_env(config_dir),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-5000:]
    return list(nbformat.read(executed, as_version=4).cells)


def sparkmagic_texts(base_url: str, token: str, cells: list[str], folder: Path, user: str = "analyst") -> list[str]:
    """Each cell's text output (see ``run_sparkmagic_notebook``)."""
    return [cell_text(cell) for cell in run_sparkmagic_notebook(base_url, token, cells, folder, user)]
