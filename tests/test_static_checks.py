"""Static checks as part of the suite, so the README's test command (and CI) runs them: ruff
(pyflakes, pycodestyle, and bandit's security rules) on the code and the tests, and mypy on
studio/. Their settings are in pyproject.toml; each finding is a failure with its text."""

from __future__ import annotations

import os
import subprocess
import sys

from helpers import REPO


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - a fixed command of this interpreter's own tools
        [sys.executable, "-m", *argv], cwd=REPO, capture_output=True, text=True, timeout=900, check=False,
        env={**os.environ, "NO_COLOR": "1"},
    )


def test_ruff_finds_nothing():
    result = run("ruff", "check", "--no-cache", "--output-format", "concise", "studio", "tests")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_finds_nothing():
    result = run("mypy", "studio")
    assert result.returncode == 0, result.stdout + result.stderr
