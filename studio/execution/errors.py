"""How a run ends when it cannot run: its exit codes and the two exceptions that stop it early."""

from __future__ import annotations

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class RunError(Exception):
    """Bad input for a run (missing notebook, unknown parameter, wrong type): exit code 2."""


class RunStopped(Exception):
    """A stop was requested before the next cell started: no further cell runs."""

