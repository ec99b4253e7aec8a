"""The output notebook as HTML (``studio run --html``), with nbconvert's templates found also in
a virtualenv that sees nbconvert through ``--system-site-packages``."""

from __future__ import annotations

import os
from pathlib import Path


def _nbconvert_data_dir() -> str | None:
    """The ``share/jupyter`` of the prefix nbconvert is installed in, which holds its templates.

    Jupyter's search path only has this environment's prefix, so a virtualenv made with
    ``--system-site-packages`` sees nbconvert's code but not its templates without this."""
    import nbconvert

    prefix = Path(nbconvert.__file__).resolve().parents[4]  # <prefix>/lib/pythonX.Y/site-packages/nbconvert
    data = prefix / "share" / "jupyter"
    return str(data) if (data / "nbconvert" / "templates").is_dir() else None


def write_html(notebook_path: Path, html_path: Path) -> None:
    from nbconvert import HTMLExporter

    extra = _nbconvert_data_dir()
    paths = os.environ.get("JUPYTER_PATH", "").split(os.pathsep)
    if extra and extra not in paths:
        os.environ["JUPYTER_PATH"] = os.pathsep.join(p for p in (*paths, extra) if p)
    body, _ = HTMLExporter().from_filename(str(notebook_path))
    html_path.parent.mkdir(parents=True, exist_ok=True)
    html_path.write_text(body, encoding="utf-8")
