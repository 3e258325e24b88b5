"""The ``refusaldir`` command line.

:mod:`refusaldir.cli.common` holds the typer ``app``; :mod:`refusaldir.cli.main` (extract,
generate, orthogonalize, evaluate, select) and :mod:`refusaldir.cli.audit` (audit, guard)
register their commands on it when imported, in that order (the order of ``--help``).
"""

from refusaldir.cli.common import app
from refusaldir.cli.main import main

# isort: split
# after main: registers `optimize`, then `audit` and `guard`, so --help lists them last
from refusaldir.cli import optimize as optimize  # isort: skip
from refusaldir.cli import audit as audit  # isort: skip

__all__ = ["app", "main"]
