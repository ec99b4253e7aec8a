"""Notebook-scoped Python packages, EMR's API on ``sc``:

``sc.install_pypi_package("name[==version]"[, repo_url])``, ``sc.list_packages()``,
``sc.uninstall_package("name")``, plus the ``%pip`` magic of the PySpark kernel.

Each session gets a virtualenv of its own, layered on the interpreter the session runs: a
``.pth`` file in it adds every package folder of the session's own ``sys.path`` (the service's
virtualenv, and what that sees) behind the virtualenv's own. So pip sees exactly what the session
can import: ``%pip list`` shows pyspark and pandas, ``%pip show pyspark`` finds it, a package that
needs pandas installs without fetching pandas again (also offline, ``--no-index``), and a base
package is never uninstalled ("outside environment"). ``--system-site-packages`` would not do:
from inside a virtualenv it means the *base* interpreter's packages, not the service's.

The session's site-packages go first on the driver's ``sys.path`` and onto the ``PYTHONPATH``
that PySpark hands to executors' Python workers with every task (``sc.environment``), so UDFs
import it too, in local mode and on a standalone cluster on the same host.

A shared-driver session (Spark Connect) has no ``sc.environment``: after each change its own
site-packages go to the server as a zip, a Connect ``pyfile`` artifact of this session only, under
a new name every time (Connect refuses other content under a name it has).
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

# A requirement as pip takes it: name, extras, version specifiers (no shell metacharacters).
_REQUIREMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9._,-]+\])?\s*([<>=!~]=?\s*[A-Za-z0-9.*+!_-]+\s*,?\s*)*$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class SessionPackages:
    def __init__(self, sc: Any, root: Path, connect_session: Any = None) -> None:
        self.sc = sc
        self.venv = root / ".studio-venv"
        self.connect_session = connect_session  # a shared-driver session: UDFs see packages through artifacts
        self._published: list[tuple[str, int]] | None = None  # site-packages as last sent to the server

    # -- EMR's API ----------------------------------------------------------------------------

    def install_pypi_package(self, package: Any, repo_url: Any = None) -> None:
        """Install a package (``name``, ``name==1.2``, a local wheel or folder) for this session only."""
        if not isinstance(package, str) or not package.strip():
            raise ValueError("package must be a non-empty string such as 'arrow==1.3.0'")
        package = package.strip()
        if not (_REQUIREMENT.match(package) or _is_local_path(package) or _is_url(package)):
            raise ValueError(f"invalid package name or version: {package!r}")
        args = ["install", package]
        if repo_url is not None:
            if not isinstance(repo_url, str) or not _is_url(repo_url):
                raise ValueError(f"repo_url must be an http(s):// or file:// URL, got {repo_url!r}")
            args += ["--index-url", repo_url]
        self.pip(args)

    def uninstall_package(self, package: Any) -> None:
        """Uninstall a package that this session installed (base packages stay)."""
        if not isinstance(package, str) or not _NAME.match(package.strip()):
            raise ValueError(f"invalid package name: {package!r}")
        self.pip(["uninstall", "-y", package.strip()])

    def list_packages(self) -> None:
        """Print the packages this session sees: the base environment's and its own."""
        self.pip(["list"])

    # -- %pip -----------------------------------------------------------------------------

    def pip(self, args: list[str]) -> None:
        """Run pip against the session's environment; its output is the statement's output."""
        if not args or not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise ValueError("pip needs a command, e.g. %pip install arrow")
        python = self._ensure_venv()
        command = [sys.executable, "-P", "-m", "pip", "--python", str(python), "--disable-pip-version-check", *args]
        if args[0] == "install":
            command.append("--no-warn-script-location")
        # pip's lines are printed as they come, so a long install shows its progress in the cell.
        process = subprocess.Popen(  # noqa: S603 - this interpreter's pip with the session's own %pip arguments, no shell
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", env=_pip_env()
        )
        lines = []
        assert process.stdout is not None
        try:
            for line in process.stdout:
                lines.append(line)
                print(line, end="", flush=True)
        except BaseException:  # an interrupt stops pip too
            process.kill()
            raise
        finally:
            code = process.wait()
        if code != 0:
            raise RuntimeError(f"pip {args[0]} failed (exit {code}):\n{''.join(lines).strip()}")
        self._activate()

    # -- plumbing ---------------------------------------------------------------------------

    def _ensure_venv(self) -> Path:
        python = self.venv / "bin" / "python"
        if not python.exists():
            venv = [sys.executable, "-P", "-m", "venv", "--without-pip", str(self.venv)]
            subprocess.run(venv, check=True, capture_output=True)  # noqa: S603 - a fixed command
            layer = Path(self.site_packages()) / _BASE_LAYER
            layer.write_text(_base_layer(exclude=str(self.venv)))
        return python

    def site_packages(self) -> str:
        purelib = sysconfig.get_path("purelib", vars={"base": str(self.venv), "platbase": str(self.venv)})
        return purelib

    def _activate(self) -> None:
        site = self.site_packages()
        if site not in sys.path:
            sys.path.insert(0, site)
        importlib.invalidate_caches()
        if self.connect_session is not None:
            self._publish_artifact(Path(site))
            return
        paths = [p for p in self.sc.environment.get("PYTHONPATH", "").split(os.pathsep) if p]
        if site not in paths:
            self.sc.environment["PYTHONPATH"] = os.pathsep.join([site, *paths])

    def _publish_artifact(self, site: Path) -> None:
        """Send the session's own site-packages (not the base environment) to its Connect session."""
        state = sorted((entry.name, entry.stat().st_mtime_ns) for entry in site.iterdir())
        if state == self._published:  # pip list, or nothing changed
            return
        own = [entry for entry in site.iterdir() if entry.name not in (_BASE_LAYER, "__pycache__")]
        if not own and self._published is None:  # nothing of its own yet (a first pip list)
            self._published = state
            return
        folder = self.venv.parent / ".studio-artifacts"
        folder.mkdir(mode=0o700, exist_ok=True)
        archive = folder / f"session-packages-{time.time_ns()}.zip"
        compiled = set()
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as bundle:
            for entry in own:
                for path in [entry] if entry.is_file() else sorted(entry.rglob("*")):
                    if path.is_file() and "__pycache__" not in path.parts:
                        bundle.write(path, path.relative_to(site))
                        if path.suffix in (".so", ".pyd"):
                            compiled.add(entry.name)
        try:
            self.connect_session.addArtifacts(str(archive), pyfile=True)
        except Exception as exc:  # noqa: BLE001 - the driver side has the package; say what UDFs miss
            print(f"The change reached this session's driver-side Python, but not its UDFs: the shared driver "
                  f"refused the package artifact ({type(exc).__name__}: {exc}).", flush=True)
            return
        finally:
            archive.unlink(missing_ok=True)
        replaced = set(self._published or []) - set(state)
        self._published = state
        if replaced:
            print("Note: the shared driver keeps every package artifact this session sent (Spark Connect cannot remove "
                  "one), so its UDFs may still import what was uninstalled or replaced here, in its earlier version, "
                  "until the session ends.", flush=True)
        if compiled:
            print(f"Note: {', '.join(sorted(compiled))} contain compiled extensions: importable on the driver side, "
                  "but UDFs of a shared-driver session load packages from a zip, where Python cannot import "
                  "compiled modules. Use a DEDICATED application for them.", flush=True)
        print(f"UDFs of this session import its packages from the artifact {archive.name} (this session only).", flush=True)


_BASE_LAYER = "_studio_session_base.pth"


def _base_layer(exclude: str) -> str:
    """A ``.pth`` that adds this interpreter's package folders, in its order, behind the venv's own.

    ``site.addsitedir`` also reads their ``.pth`` files (editable installs put theirs there); the
    standard library is the venv's own already."""
    stdlib = {os.path.realpath(sysconfig.get_path(name)) for name in ("stdlib", "platstdlib")}
    folders = []
    for entry in sys.path:
        if not entry or not os.path.isdir(entry) or entry.startswith(exclude):
            continue
        real = os.path.realpath(entry)
        if real in stdlib or os.path.dirname(real) in stdlib and os.path.basename(real) == "lib-dynload":
            continue
        if entry not in folders:
            folders.append(entry)
    return "".join(f"import site; site.addsitedir({folder!r})\n" for folder in folders)


def _is_local_path(text: str) -> bool:
    return (text.startswith(("/", "./", "../", "~")) or text.endswith((".whl", ".tar.gz", ".zip"))) and os.path.exists(
        os.path.expanduser(text)
    )


def _is_url(text: str) -> bool:
    parsed = urlparse(text)
    return parsed.scheme in ("http", "https", "file") and bool(parsed.netloc or parsed.path)


def _pip_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # pip must see the session's environment, not the driver's path
    env["PIP_NO_INPUT"] = "1"
    return env


def bind_to_context(sc: Any, packages: SessionPackages) -> None:
    """Make EMR's functions available as methods of the session's ``sc``."""
    sc.install_pypi_package = packages.install_pypi_package
    sc.uninstall_package = packages.uninstall_package
    sc.list_packages = packages.list_packages
