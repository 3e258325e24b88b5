"""Selection settings: :class:`SelectionConfig` (validated on creation), the modes, methods,
relaxation ladder and artifact file names.

Example:
    >>> SelectionConfig(mode="cosine", n_val=16).kl_max
    0.1
    >>> "fast" in MODES
    True
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from refusaldir.batching import AUTO, BatchSize, check_batch_size
from refusaldir.errors import ConfigError

__all__ = [
    "CANDIDATES_PER_PASS", "FIGURES_FILE", "METHODS", "MODES", "RELAXATIONS",
    "SELECTION_FILE", "Key", "SelectionConfig",
]

MODES = ("exact", "cosine", "fast")
METHODS = ("shared", "naive")
SELECTION_FILE = "selection.json"
FIGURES_FILE = "selection.html"
#: Relaxation ladder used when every candidate is filtered out (recorded in the result).
RELAXATIONS = (
    "none",
    "drop induce filter",
    "raise KL bound",
    "ignore induce and KL filters",
    "ignore all filters",
)
#: Candidates scored together in one batched pass (progress and checkpoint granularity).
CANDIDATES_PER_PASS = 8
#: A candidate: ``(position, layer)``.
Key = tuple[int, int]


@dataclass
class SelectionConfig:
    """Settings for :func:`~refusaldir.select.select_direction` (validated on creation).

    ``checkpoint``: a file where per-prompt scores (and detected refusal tokens) are saved as
    they are computed; a rerun with the same model, directions, prompts and scoring settings
    resumes from it instead of recomputing (useful for long CPU sweeps).

    Example:
        >>> SelectionConfig(mode="cosine", n_val=16).kl_max
        0.1
    """

    mode: str = "exact"
    method: str = "shared"
    n_val: int = 32
    kl_max: float = 0.1
    induce_min: float = 0.0
    max_layer_frac: float = 0.8
    positions: list[int] | None = None
    layers: list[int] | None = None
    batch_size: BatchSize = AUTO
    top_k: int = 5
    n_bootstrap: int = 1000
    seed: int = 0
    refusal_ids: list[int] | None = None
    detect_max_new_tokens: int = 16
    relax: bool = True
    kl_relax: tuple[float, ...] = (0.2, 0.5, 1.0, 2.0)
    cosine_layer_frac: float = 0.1
    cosine_center: bool = True
    fast_keep: int = 2
    fast_prompts: int = 8
    share_prefix: bool = True
    score_all: bool = False
    checkpoint: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode={self.mode!r} is not one of {', '.join(MODES)}")
        if self.method not in METHODS:
            raise ConfigError(f"method={self.method!r} is not one of {', '.join(METHODS)}")
        if self.method == "naive" and self.mode != "exact":
            raise ConfigError("method='naive' (the straightforward loop) exists for mode='exact' only")
        check_batch_size(self.batch_size)
        for name in ("n_val", "top_k", "fast_keep", "fast_prompts", "detect_max_new_tokens", "n_bootstrap", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise ConfigError(f"{name}={v!r} must be a whole number")
            if name not in ("n_bootstrap", "seed") and v < 1:
                raise ConfigError(f"{name}={v} must be >= 1")
        if int(self.n_bootstrap) < 0:
            raise ConfigError(f"n_bootstrap={self.n_bootstrap} must be >= 0 (0 disables it)")
        for name in ("kl_max", "induce_min", "max_layer_frac", "cosine_layer_frac"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise ConfigError(f"{name}={v!r} must be a finite number")
        if self.kl_max < 0:
            raise ConfigError(f"kl_max={self.kl_max} must be >= 0 (e.g. 0.1)")
        if not 0 < self.max_layer_frac <= 1:
            raise ConfigError(f"max_layer_frac={self.max_layer_frac} must be in (0, 1] (e.g. 0.8)")
        if not 0 < self.cosine_layer_frac <= 1:
            raise ConfigError(f"cosine_layer_frac={self.cosine_layer_frac} must be in (0, 1]")
        try:
            self.kl_relax = tuple(float(k) for k in self.kl_relax)
        except (TypeError, ValueError):
            raise ConfigError(f"kl_relax={self.kl_relax!r} must be a list of numbers") from None
        if any(not math.isfinite(k) or k <= 0 for k in self.kl_relax):
            raise ConfigError(f"kl_relax={self.kl_relax} must hold positive finite KL bounds")
        self.positions = _ints(self.positions, "positions", "pass None for every post-instruction position")
        self.layers = _ints(self.layers, "layers", "pass None for every layer of the direction set")
        self.refusal_ids = _ints(self.refusal_ids, "refusal_ids", "pass None to detect them")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kl_relax"] = list(self.kl_relax)
        return d


def _ints(values: Any, name: str, fix: str) -> list[int] | None:
    """``values`` as a non-empty list of whole numbers (``None`` stays ``None``)."""
    if values is None:
        return None
    items = [values] if isinstance(values, (str, bytes)) or not isinstance(values, Iterable) else list(values)
    if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in items):
        raise ConfigError(f"{name}={values!r} must be a list of whole numbers")
    if not items:
        raise ConfigError(f"{name} is empty; {fix}")
    return [int(v) for v in items]
