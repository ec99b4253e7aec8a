"""``python -m studio.die_with_parent PARENT_PID -- COMMAND...``

Asks Linux to send this process SIGTERM when its parent dies (``PR_SET_PDEATHSIG``), then
becomes COMMAND (``exec``, same pid). The setting survives the exec, so COMMAND is stopped
politely even if its parent is killed with SIGKILL and never gets to stop it. Doing this in a
small program instead of a ``preexec_fn`` keeps the parent's fork free of Python code, which is
unsafe in a process that runs threads. Elsewhere than Linux it only execs.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m studio.die_with_parent PARENT_PID -- COMMAND...", file=sys.stderr)
        return 2
    parent, command = int(argv[0]), argv[2:]
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the request was in place
            return 1
    os.execvp(command[0], command)  # noqa: S606 - becomes the given command, as its caller asked (no shell)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
