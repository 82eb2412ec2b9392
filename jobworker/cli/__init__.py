"""The jobworker command line."""

from jobworker.cli.app import app, main

__all__ = ["app", "main"]
