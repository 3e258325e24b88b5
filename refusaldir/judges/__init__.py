"""Refusal judges."""

from refusaldir.judges.phrase import *  # noqa: F401,F403 (split in progress)
