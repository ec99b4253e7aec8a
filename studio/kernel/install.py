"""Installing the "PySpark" kernelspec (``studio kernel install``) and writing it for a
JupyterLab that the workspace server starts (``write_kernelspec``)."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

KERNEL_NAME = "pyspark"


def kernelspec() -> dict[str, Any]:
    """The kernelspec, with this interpreter as the kernel's Python."""
    spec = json.loads(resources.files("studio.kernel").joinpath("kernelspec/kernel.json").read_text())
    spec["argv"][0] = sys.executable
    return spec


def write_kernelspec(jupyter_path: Path) -> Path:
    """Write ``<jupyter_path>/kernels/pyspark/kernel.json``; put ``jupyter_path`` on JUPYTER_PATH to use it."""
    folder = jupyter_path / "kernels" / KERNEL_NAME
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "kernel.json").write_text(json.dumps(kernelspec(), indent=2) + "\n")
    return folder


def install(user: bool = False, sys_prefix: bool = False, prefix: str | None = None) -> str:
    """Install the kernelspec where Jupyter finds it (default: the system-wide location)."""
    from jupyter_client.kernelspec import KernelSpecManager

    with tempfile.TemporaryDirectory() as folder:
        source = write_kernelspec(Path(folder))
        if sys_prefix:
            prefix = sys.prefix
        destination = KernelSpecManager().install_kernel_spec(
            str(source), KERNEL_NAME, user=user, prefix=prefix, replace=None
        )
    return destination


def uninstall() -> None:
    from jupyter_client.kernelspec import KernelSpecManager

    manager = KernelSpecManager()
    try:
        path = manager.get_kernel_spec(KERNEL_NAME).resource_dir
    except Exception:  # noqa: BLE001 - nothing installed
        return
    shutil.rmtree(path, ignore_errors=True)
