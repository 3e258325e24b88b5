"""Audit."""

from refusaldir.audit.pipeline import *  # noqa: F401,F403 (split in progress)
from refusaldir.audit.pipeline import audit  # noqa: F401
