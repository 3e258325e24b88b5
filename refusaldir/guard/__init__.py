"""Latent guard."""

from refusaldir.guard.latent import *  # noqa: F401,F403 (split in progress)
