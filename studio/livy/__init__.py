"""The Livy-compatible session service."""
