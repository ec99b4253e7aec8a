"""The session service of a run given no ``--livy-url``: a ``studio livy`` of its own, started
through ``studio.launcher`` (it dies with the run, even a killed one) and stopped after."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from pathlib import Path

from studio.errors import ServiceStartError
from studio.execution.errors import RunError
from studio.launcher import ServiceLauncher


class EmbeddedService:
    """A `studio livy` just for this run (cold sessions only: no warm pool to fill), stopped after;
    it dies with the run even when the run is killed (``studio.launcher``)."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="studio-run-"))
        self.url = ""
        self.token = secrets.token_urlsafe(32)  # this run's service answers only this run
        self.launcher = ServiceLauncher(
            "livy",
            # Its sessions are this run's: they stop with it (its folder is removed after).
            ["--port", "0", "--pool", "0", "--state-dir", str(self.folder), "--stop-sessions-on-exit"],
            ready_file=self.folder / "ready.json",
            log_path=self.folder / "service.log",
            env={**os.environ, "STUDIO_TOKEN": self.token},  # in the environment: `ps` shows command lines
        )

    def start(self, timeout: float = 120.0) -> str:
        try:
            self.url = self.launcher.start_sync(timeout)
        except ServiceStartError as exc:
            raise RunError(f"the embedded session service did not start: {exc.msg}") from None
        return self.url

    def stop(self) -> None:
        if self.launcher.pid is not None:
            self.launcher.stop_sync(timeout=120)
        shutil.rmtree(self.folder, ignore_errors=True)
