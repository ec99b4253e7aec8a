"""What runs inside one session worker process (``python -m studio.worker``)."""
