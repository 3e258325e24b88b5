"""Direction selection."""

from refusaldir.select.search import *  # noqa: F401,F403 (split in progress)
