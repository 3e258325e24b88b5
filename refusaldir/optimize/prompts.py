"""The prompts the optimiser may search on, and those it must not.

Harmful and harmless prompts come split already (``val`` for the search, ``test`` for
confirmation). The borderline-safe set has no splits, so it is halved here by a hash of each
prompt: stable across runs and machines, independent of file order.

Example:
    >>> len(borderline_half("search")) + len(borderline_half("test")) == len(load_prompts("borderline"))
    True
"""

from __future__ import annotations

import hashlib

from refusaldir.data import load_prompts
from refusaldir.errors import ConfigError

__all__ = ["borderline_half"]


def borderline_half(which: str) -> list[str]:
    """The borderline-safe prompts whose sha256 starts with an even (``"search"``) or odd
    (``"test"``) byte."""
    if which not in ("search", "test"):
        raise ConfigError(f"borderline half {which!r} must be 'search' or 'test'")
    keep = 0 if which == "search" else 1
    return [p for p in load_prompts("borderline") if hashlib.sha256(p.encode()).digest()[0] % 2 == keep]
