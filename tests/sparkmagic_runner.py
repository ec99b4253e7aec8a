"""Runs a notebook with sparkmagic's PySpark kernel through nbclient. Executed by the Python of
the separate sparkmagic virtualenv (sparkmagic is never a dependency of ours)."""

import sys

import nbformat
from nbclient import NotebookClient

notebook = nbformat.read(sys.argv[1], as_version=4)
client = NotebookClient(notebook, kernel_name="pysparkkernel", timeout=600, startup_timeout=120, allow_errors=False)
try:
    client.execute()
finally:
    nbformat.write(notebook, sys.argv[2])
