"""``python -m studio.kernel -f CONNECTION_FILE``: what the "PySpark" kernelspec runs."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Sequence
from types import ModuleType


class _RefuseDebugpy(importlib.abc.MetaPathFinder):
    """Makes ``import debugpy`` fail while the kernel starts.

    ipykernel builds its visual debugger at start whenever debugpy is installed, which costs
    ~150 ms here (a sixth of a kernel's start) and advertises a "debugger" feature. In this
    kernel the cells run in a remote Spark session, where that debugger cannot follow them, so the
    kernel starts without it (ipykernel's own path for "debugpy is not installed"). The finder is
    removed once the kernel is up, so ``%%local`` code can still import debugpy.
    """

    def find_spec(
        self, name: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name == "debugpy" or name.startswith("debugpy."):
            raise ModuleNotFoundError(f"No module named {name!r} (the PySpark kernel starts without its debugger)", name=name)
        return None


def notebook_folder_last() -> None:
    """Put the notebook's folder at the end of ``sys.path`` instead of before site-packages.

    The kernelspec starts this module with ``python -P``, so nothing in the notebook's folder (the
    kernel's working directory, often a cloned repository) is importable while the kernel starts.
    ipykernel's ``init_path`` then inserts ``''`` before site-packages, where a ``pandas.py`` beside
    the notebook would shadow pandas when the kernel imports it later. At the end, ``%%local import
    mymodule`` still finds a sibling file, and nothing installed can be shadowed.
    """
    here = os.getcwd()
    sys.path[:] = [entry for entry in sys.path if entry not in ("", ".", here)]
    sys.path.append("")


def main() -> None:
    refuse = _RefuseDebugpy()
    sys.meta_path.insert(0, refuse)
    try:
        from ipykernel.kernelapp import IPKernelApp

        from studio.kernel.kernel import PySparkKernel

        app = IPKernelApp.instance(kernel_class=PySparkKernel)
        app.initialize()
    finally:
        sys.meta_path.remove(refuse)
    notebook_folder_last()
    app.start()


if __name__ == "__main__":
    main()
