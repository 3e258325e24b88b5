"""The ``refusaldir`` command line."""

from refusaldir.cli.main import app, main

__all__ = ["app", "main"]
