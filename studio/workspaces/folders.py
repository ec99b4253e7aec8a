"""A workspace's folder of notebooks, ``<root>/<name>``: making it (empty but for the studio's
example notebooks, or a clone of the workspace's repository), moving it on a rename, removing it.

This is the file work behind ``WorkspaceManager``'s states; the manager decides when, these say
how. They raise only ``studio.errors`` (``remove_folder`` an ``OSError`` for the manager to word).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from studio.config import Settings
from studio.errors import ConflictError, StudioError
from studio.workspaces import git
from studio.workspaces.git import GitSource

SEED_NOTEBOOK_GLOB = "*.ipynb"


def default_seed_dir() -> Path | None:
    """The studio's own example notebooks: ``notebooks/`` of a source checkout, else the installed copy."""
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file() and (checkout / "notebooks").is_dir():
        return checkout / "notebooks"
    installed = Path(sys.prefix) / "share" / "spark-studio" / "notebooks"  # pyproject's data-files
    return installed if installed.is_dir() else None


def seed(folder: Path, seed_dir: Path | None) -> None:
    """Copy the example notebooks into a new folder (never over a file that is there)."""
    if seed_dir is None or not seed_dir.is_dir():
        return
    for notebook in sorted(seed_dir.glob(SEED_NOTEBOOK_GLOB)):
        target = folder / notebook.name
        if not target.exists():
            shutil.copyfile(notebook, target)


async def make_folder(settings: Settings, folder: Path, source: GitSource | None, seed_dir: Path | None) -> str | None:
    """Make a new workspace's folder: a clone of ``source``, or a folder with the examples in it (an
    existing folder is taken as it is). Returns why a clone failed (the workspace is then Failed),
    or None; ConflictError when a clone would go into a folder that is not empty."""
    if source is None:
        existed = folder.exists()
        folder.mkdir(parents=True, exist_ok=True)
        if not existed:
            seed(folder, seed_dir)
        return None
    if folder.exists() and any(folder.iterdir()):
        raise ConflictError(
            f"Folder {folder} already exists and is not empty, so the repository cannot be cloned into it; "
            "choose another name."
        )
    try:
        await git.clone(settings, source, folder)
    except StudioError as exc:
        return exc.msg
    return None


def move_folder(folder: Path, target: Path) -> None:
    """A rename moves the folder (when there is one); ConflictError when ``target`` is taken."""
    if target.exists():
        raise ConflictError(f"Folder {target} already exists; choose another name.")
    if folder.exists():
        folder.rename(target)


def remove_folder(root: Path, folder: Path) -> None:
    """Remove a workspace's folder with its files; OSError for anything but a real folder directly in ``root``."""
    # The name was checked to be one plain path component; check again that this stays inside the root.
    resolved = folder.resolve()
    if resolved.parent != root.resolve() or folder.is_symlink():
        raise OSError(f"refusing to remove {folder}: not a folder directly inside {root}")
    if folder.exists():
        shutil.rmtree(folder)
