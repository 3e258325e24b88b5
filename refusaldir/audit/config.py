"""Settings of the audit (:class:`AuditConfig`) and the constants its report uses.

Example:
    >>> AuditConfig(mode="cosine", limit=16).refusal_threshold
    0.05
    >>> REPORT_HTML, REPORT_JSON
    ('report.html', 'report.json')
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from refusaldir.batching import AUTO, BatchSize, check_batch_size
from refusaldir.errors import ConfigError
from refusaldir.evaluate import CONDITIONS
from refusaldir.guard import GUARD_METHODS
from refusaldir.judges import check_judge_spec, default_judge
from refusaldir.select import MODES, SelectionConfig

__all__ = ["COLORS", "DIGITS", "REPORT_HTML", "REPORT_JSON", "SETS", "AuditConfig", "resolve_config"]

REPORT_HTML = "report.html"
REPORT_JSON = "report.json"
SETS = ("harmful", "harmless", "borderline")
COLORS = {"harmful": "#d62728", "harmless": "#1f77b4", "borderline": "#ff7f0e"}
DIGITS = 5

_POSITIVE = ("max_new_tokens", "n_val", "k_max", "concentration_n", "guard_n_layers")
_POSITIVE_OR_NONE = ("limit", "n_train", "capture_limit", "concentration_tokens")
_ADDITION = ("add", "subtract", "conditional")


@dataclass
class AuditConfig:
    """Settings for :func:`refusaldir.audit.audit` (validated on creation).

    Example:
        >>> AuditConfig(mode="cosine", limit=16).refusal_threshold
        0.05
    """

    mode: str = "cosine"
    limit: int | None = 32
    max_new_tokens: int = 48
    n_val: int = 32
    n_train: int | None = None
    capture_limit: int | None = None
    batch_size: BatchSize = AUTO
    conditions: tuple[str, ...] = ("baseline", "ablate", "add", "ortho")
    add_coeff: float | None = None
    judge: str = field(default_factory=default_judge)
    cross_judges: tuple[str, ...] = ("prefix",)
    refusal_threshold: float = 0.05
    kl_threshold: float = 0.1
    k_max: int = 4
    concentration_n: int = 16
    concentration_tokens: int | None = 32
    min_residual: float = 0.2
    guard_method: str = "projection"
    guard_layers: list[int] | None = None
    guard_n_layers: int = 3
    target_fpr: float = 0.05
    behaviour_logit: bool = True
    guard_under_ablation: bool = True
    n_samples: int = 3
    seed: int = 0
    select_options: dict[str, Any] = field(default_factory=dict)
    optimize_trials: int = 0
    front: str | None = None

    def __post_init__(self) -> None:
        if self.judge is None:  # as in evaluate(judge=None): the default judge
            self.judge = default_judge()
        if isinstance(self.conditions, str):  # "baseline,ablate" as on the command line
            self.conditions = tuple(c.strip() for c in self.conditions.split(",") if c.strip())
        self.conditions = tuple(self.conditions)
        if isinstance(self.cross_judges, str):
            self.cross_judges = tuple(c.strip() for c in self.cross_judges.split(",") if c.strip())
        self.cross_judges = tuple(self.cross_judges)
        self._check_choices()
        self._check_counts()
        self._check_thresholds()
        known = {f.name for f in fields(SelectionConfig)}
        bad_opts = sorted(set(self.select_options) - known)
        if bad_opts:
            raise ConfigError(f"unknown selection option(s) {bad_opts}; see refusaldir.select.SelectionConfig")
        if not _whole(self.optimize_trials) or self.optimize_trials < 0:
            raise ConfigError(f"optimize_trials={self.optimize_trials!r} must be a whole number >= 0 (0: no search)")
        if self.front is not None and self.optimize_trials:
            raise ConfigError("front= uses an existing optimiser front and optimize_trials= searches a new one; "
                              "pass one of them")
        if self.front is not None and not Path(str(self.front).rpartition("#")[0] or str(self.front)).is_file():
            raise ConfigError(f"front={self.front!r} is not a file; pass runs/MODEL/optimize/front.json")
        if self.add_coeff is not None and (not _real(self.add_coeff) or not math.isfinite(self.add_coeff)):
            raise ConfigError(f"add_coeff={self.add_coeff!r} is not a finite number; pass a number or None to calibrate")

    def _check_choices(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode={self.mode!r} is not one of {', '.join(MODES)}")
        if self.guard_method not in GUARD_METHODS:
            raise ConfigError(f"guard_method={self.guard_method!r} is not one of {', '.join(GUARD_METHODS)}")
        bad = [c for c in self.conditions if c not in CONDITIONS]
        if bad:
            raise ConfigError(f"unknown condition(s) {bad}; choose from {', '.join(CONDITIONS)}")
        for spec in (self.judge, *self.cross_judges):
            check_judge_spec(spec)
        if "baseline" not in self.conditions:
            raise ConfigError("the audit compares against the unmodified model; keep 'baseline' in conditions")

    def _check_counts(self) -> None:
        check_batch_size(self.batch_size)
        for name in (*_POSITIVE, *_POSITIVE_OR_NONE, "n_samples", "seed"):
            v = getattr(self, name)
            if not (v is None and name in _POSITIVE_OR_NONE) and not _whole(v):
                raise ConfigError(f"{name}={v!r} must be a whole number")
        for name in _POSITIVE:
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        for name in _POSITIVE_OR_NONE:
            v = getattr(self, name)
            if v is not None and int(v) < 1:
                raise ConfigError(f"{name}={v} must be >= 1 (or None for no limit)")
        if self.n_samples < 0:
            raise ConfigError(f"n_samples={self.n_samples} must be >= 0")
        if self.guard_layers is not None and (
                isinstance(self.guard_layers, (str, bytes)) or not all(_whole(x) for x in self.guard_layers)):
            raise ConfigError(f"guard_layers={self.guard_layers!r} must be a list of layer indices (or None)")

    def _check_thresholds(self) -> None:
        for name in ("refusal_threshold", "target_fpr", "kl_threshold", "min_residual"):
            v = getattr(self, name)
            if not _real(v) or not math.isfinite(v):
                raise ConfigError(f"{name}={v!r} must be a finite number")
        for name in ("refusal_threshold", "target_fpr"):
            v = getattr(self, name)
            if not 0 <= v < 1:
                raise ConfigError(f"{name}={v} must be in [0, 1), e.g. 0.05")
        if not (math.isfinite(self.kl_threshold) and self.kl_threshold >= 0):
            raise ConfigError(f"kl_threshold={self.kl_threshold} must be a finite number >= 0")
        if not 0 <= self.min_residual < 1:
            raise ConfigError(f"min_residual={self.min_residual} must be in [0, 1)")

    @property
    def addition_conditions(self) -> list[str]:
        """The requested conditions that need an addition coefficient."""
        return [c for c in self.conditions if c in _ADDITION]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["conditions"] = list(self.conditions)
        d["cross_judges"] = list(self.cross_judges)
        return d


def _whole(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def resolve_config(config: AuditConfig | None, overrides: dict[str, Any]) -> AuditConfig:
    """``config`` updated with keyword ``overrides`` (or a new one built from them).

    Example:
        >>> resolve_config(None, {"limit": 8}).limit
        8
    """
    unknown = sorted(set(overrides) - {f.name for f in fields(AuditConfig)})
    if unknown:
        raise ConfigError(f"unknown audit setting(s) {unknown}; see AuditConfig")
    if config is None:
        return AuditConfig(**overrides)
    return replace(config, **overrides)
