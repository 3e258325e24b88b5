"""Evaluation harness."""

from refusaldir.evaluate.harness import *  # noqa: F401,F403 (split in progress)
from refusaldir.evaluate.harness import evaluate  # noqa: F401
