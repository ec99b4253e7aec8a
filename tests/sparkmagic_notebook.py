"""Run a notebook of cells with sparkmagic's own PySpark kernel against a Livy endpoint, as a user
of sparkmagic would (its config file names the endpoint and the credentials; nothing else)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import nbformat

from helpers import REPO
from test_sparkmagic import cell_text, sparkmagic_python


def run_sparkmagic_notebook(base_url: str, token: str, cells: list[str], folder: Path, user: str = "analyst") -> list[str]:
    """Each cell's text output, after sparkmagic's kernel ran them all against ``base_url``."""
    config_dir = folder / "sparkmagic"
    config_dir.mkdir(exist_ok=True)
    (config_dir / "config.json").write_text(
        json.dumps(
            {
                "kernel_python_credentials": {"username": user, "password": token, "url": base_url, "auth": "Basic_Access"},
                "livy_session_startup_timeout_seconds": 240,
            }
        )
    )
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(cell) for cell in cells]
    source, executed = folder / "sparkmagic.ipynb", folder / "sparkmagic-out.ipynb"
    nbformat.write(notebook, source)
    env = {**os.environ, "SPARKMAGIC_CONF_DIR": str(config_dir), "JUPYTER_PLATFORM_DIRS": "1"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [str(sparkmagic_python()), str(REPO / "tests" / "sparkmagic_runner.py"), str(source), str(executed)],
        capture_output=True, text=True, timeout=900, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-5000:]
    return [cell_text(cell) for cell in nbformat.read(executed, as_version=4).cells]
