"""Headless notebook runs: ``studio run NOTEBOOK [-p NAME VALUE ...] ...``, for CI and for the
executions API of ``studio serve`` (which runs each execution as a ``studio run`` child).

One concept per module:

``parameters``  papermill's convention: the ``parameters`` cell, the ``injected-parameters`` cell,
                values typed like the defaults, checked before anything runs
``notebook``    reading the given notebook (a clear error for anything that is not one)
``runner``      the run itself: nbclient in a thread, signals, the output notebook after every cell
``service``     the session service of a run given no ``--livy-url``
``events``      progress as JSON lines for programs (``--events``), apart from the text for people
``record``      the run record (``--record``): what ran, with what, where, each cell, the driver log
``html``        the output notebook as HTML (``--html``)
``errors``      exit codes, ``RunError`` (bad input: exit 2) and ``RunStopped``

The names below are the public ones, importable from ``studio.execution`` itself.
"""

from studio.execution.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, RunError, RunStopped
from studio.execution.notebook import read_notebook
from studio.execution.parameters import (
    check_parameter_names,
    declared_parameters,
    inject_parameters,
    load_parameter_file,
    parameters_cell,
    python_source,
)
from studio.execution.record import json_safe, write_record
from studio.execution.runner import NotebookRun, RunOptions, run

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "NotebookRun",
    "RunError",
    "RunOptions",
    "RunStopped",
    "check_parameter_names",
    "declared_parameters",
    "inject_parameters",
    "json_safe",
    "load_parameter_file",
    "parameters_cell",
    "python_source",
    "read_notebook",
    "run",
    "write_record",
]
