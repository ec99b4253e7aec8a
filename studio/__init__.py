"""Spark Studio: a Livy-compatible session service with warm PySpark sessions, a PySpark
Jupyter kernel and a workspace server."""

__version__ = "0.1.0"
