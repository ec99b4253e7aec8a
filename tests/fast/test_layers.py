"""Which parts may import which: the workspace server shares helpers with the session service
through modules outside both (studio.web, studio.process, studio.launcher, studio.livy_client),
never by reaching into ``studio.livy``; ``studio run``, the bench and the kernel reach the Livy
API through the one client without importing the kernel package."""

from __future__ import annotations

import subprocess
import sys

import pytest


def imported_by(*modules: str) -> set[str]:
    """The studio modules a fresh interpreter has loaded after importing ``modules``."""
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules) + "print('\\n'.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return {name for name in result.stdout.split() if name.startswith("studio")}


def test_the_workspace_server_imports_nothing_from_the_session_service():
    loaded = imported_by("studio.workspaces.app", "studio.workspaces.executions", "studio.workspaces.routes")
    assert not {m for m in loaded if m == "studio.livy" or m.startswith("studio.livy.")}


@pytest.mark.parametrize("module", ["studio.livy_client", "studio.execution", "studio.bench"])
def test_the_livy_client_comes_without_the_kernel(module):
    loaded = imported_by(module)
    assert not {m for m in loaded if m.startswith("studio.kernel")}, module
