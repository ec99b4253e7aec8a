"""The PySpark Jupyter kernel: sends cells to a Livy-compatible session service over httpx."""
