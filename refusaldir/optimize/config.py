"""Settings of :func:`refusaldir.optimize.optimize_edit`, validated on creation (before any
model loads) and saved beside the study.

Example:
    >>> OptimizeConfig(n_trials=40, sampler="tpe").kl_tokens
    3
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field
from typing import Any

from refusaldir.batching import AUTO, BatchSize
from refusaldir.errors import ConfigError
from refusaldir.judges import check_judge_spec
from refusaldir.steer import SUBSPACES

__all__ = ["READOUTS", "SAMPLERS", "SOURCE_CHOICES", "OptimizeConfig", "make_sampler"]

#: Optuna samplers by name (``--sampler``); any other name of ``optuna.samplers`` works too.
SAMPLERS = {"tpe": "TPESampler", "nsga2": "NSGAIISampler", "random": "RandomSampler",
            "qmc": "QMCSampler", "gp": "GPSampler"}
SOURCE_CHOICES = ("selected", "per_layer", "index")
#: How the inner loop reads a first-token refusal (see :class:`OptimizeConfig`).
READOUTS = ("greedy", "log_odds")
#: Optuna samplers that handle two objectives (others, e.g. CmaEsSampler, are refused up front).
MULTI_OBJECTIVE = ("TPESampler", "NSGAIISampler", "NSGAIIISampler", "RandomSampler", "QMCSampler", "GPSampler")


def _int(x: Any, name: str, lo: int, hi: int = 10**9) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral) or not lo <= int(x) <= hi:
        raise ConfigError(f"{name}={x!r} must be a whole number in [{lo}, {hi}]")
    return int(x)


def _real(x: Any, name: str, lo: float, hi: float) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(x) or not lo <= float(x) <= hi:
        raise ConfigError(f"{name}={x!r} must be a number in [{lo:g}, {hi:g}]")
    return float(x)


def sampler_class(name: str) -> Any:
    """The Optuna sampler class for ``name`` (short names in :data:`SAMPLERS`, or a class name)."""
    import optuna

    cls_name = SAMPLERS.get(name.lower(), name) if isinstance(name, str) else None
    cls = getattr(optuna.samplers, cls_name, None) if cls_name else None
    if cls is None or not isinstance(cls, type) or not issubclass(cls, optuna.samplers.BaseSampler):
        raise ConfigError(
            f"sampler {name!r} is not an Optuna sampler; use one of {', '.join(SAMPLERS)} or a "
            f"multi-objective class name from optuna.samplers ({', '.join(MULTI_OBJECTIVE)})"
        )
    if cls.__name__ not in MULTI_OBJECTIVE:
        raise ConfigError(
            f"sampler {name!r} cannot search two objectives (refusal and damage) at once; use one of "
            f"{', '.join(SAMPLERS)} or {', '.join(MULTI_OBJECTIVE)}"
        )
    return cls


def make_sampler(name: str, seed: int) -> Any:
    """An Optuna sampler seeded with ``seed`` (multi-objective and constraint aware where it can)."""
    cls = sampler_class(name)
    kwargs: dict[str, Any] = {"seed": seed}
    import optuna

    if cls.__name__ in ("TPESampler", "NSGAIISampler", "GPSampler") \
            and not hasattr(optuna.trial.Trial, "set_constraint"):  # optuna < 5
        kwargs["constraints_func"] = lambda t: t.user_attrs.get("constraints", [0.0])
    if cls.__name__ == "TPESampler":
        kwargs["n_startup_trials"] = 8
        kwargs["multivariate"] = True
    return cls(**kwargs)


@dataclass
class OptimizeConfig:
    """What the search varies, how each trial is scored, and how the front is confirmed.

    Inner loop (per trial, on *validation* prompts, never test): ``n_harmful`` harmful val
    prompts (refusal), ``n_harmless`` harmless val prompts (KL over the first ``kl_tokens``
    tokens of the unedited model's greedy continuation) and ``n_borderline`` prompts of the
    borderline set's search half (over-refusal). The first token counts as a refusal by
    ``readout``: ``"greedy"`` (greedy decoding would open with a refusal token) or
    ``"log_odds"`` (refusal tokens hold over half the probability). A trial whose first-token
    refusal rate is at most ``gen_below`` (and whose KL is at most ``gen_max_kl``, when set)
    also writes ``gen_tokens`` greedy tokens per harmful prompt, read by ``gen_judge``, so
    refusals after a preamble count too (``"phrase"``) or deflections as well (the default
    judge, ``"probe:coder-1.5b"``: about 3 s per answer on 2 CPU cores, hence ``gen_max_kl``
    to spend it only where the trial could join the cheap end of the front). Gate by KL rather
    than by ``gen_below``: a trial just over ``gen_below`` is scored by its first token only and
    looks better than a judged one just under it (so ``gen_below=1`` with ``gen_max_kl``), while
    a trial over ``gen_max_kl`` costs more KL than every judged one and cannot hide them on the
    front. Off by default: on the demo model 24 tokens read by the phrase judge found no
    refusal the greedy first token missed. A trial whose KL exceeds ``kl_ceiling`` skips the refusal passes. A trial
    is infeasible when its over-refusal exceeds the unedited model's by more than
    ``over_refusal_margin``.

    Confirmation: the ``confirm`` front members with the lowest refusal (plus the rank-1 edit
    and the unedited model) are generated on the **test** splits with ``max_new_tokens`` and
    judged by ``judge`` (default: the default judge), cross-checked by ``cross_judges``.
    """

    n_trials: int = 60
    sampler: str = "tpe"
    seed: int = 0
    kl_tokens: int = 3
    kl_ceiling: float = 0.5
    n_harmful: int = 48
    n_harmless: int = 48
    n_borderline: int = 48
    over_refusal_margin: float = 0.02
    readout: str = "greedy"
    gen_tokens: int = 0
    gen_below: float = 0.25
    gen_judge: str = "phrase"
    gen_max_kl: float | None = None
    sources: tuple[str, ...] = SOURCE_CHOICES
    subspaces: tuple[str, ...] = SUBSPACES
    variants: tuple[str, ...] = ("plain", "projected", "norm_preserving")
    max_k: int = 4
    confirm: int = 3
    max_new_tokens: int = 128
    judge: str | None = None
    cross_judges: tuple[str, ...] = ("prefix",)
    batch_size: BatchSize = AUTO
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.n_trials = _int(self.n_trials, "n_trials", 1, 100_000)
        sampler_class(self.sampler)
        self.seed = _int(self.seed, "seed", 0, 2**31 - 1)
        self.kl_tokens = _int(self.kl_tokens, "kl_tokens", 1, 64)
        self.kl_ceiling = _real(self.kl_ceiling, "kl_ceiling", 1e-6, 1e6)
        for name in ("n_harmful", "n_harmless", "n_borderline"):
            setattr(self, name, _int(getattr(self, name), name, 0 if name == "n_borderline" else 2, 100_000))
        self.over_refusal_margin = _real(self.over_refusal_margin, "over_refusal_margin", 0.0, 1.0)
        if self.readout not in READOUTS:
            raise ConfigError(f"readout={self.readout!r} must be one of {', '.join(READOUTS)}")
        self.gen_tokens = _int(self.gen_tokens, "gen_tokens", 0, 4096)
        self.gen_below = _real(self.gen_below, "gen_below", 0.0, 1.0)
        try:
            self.gen_judge = check_judge_spec(self.gen_judge)
        except ConfigError as exc:
            raise ConfigError(f"gen_judge: {exc}") from exc
        if self.gen_judge == "logit":
            raise ConfigError("gen_judge='logit' reads only the first token, which the inner loop "
                              "already reads; use phrase, or probe:coder-1.5b to see deflections")
        if self.gen_max_kl is not None:
            self.gen_max_kl = _real(self.gen_max_kl, "gen_max_kl", 0.0, 1e6)
        self.sources = self._subset("sources", self.sources, SOURCE_CHOICES)
        self.subspaces = self._subset("subspaces", self.subspaces, SUBSPACES)
        self.variants = self._subset("variants", self.variants, ("plain", "projected", "norm_preserving"))
        self.max_k = _int(self.max_k, "max_k", 2, 16)
        self.confirm = _int(self.confirm, "confirm", 0, 1000)
        self.max_new_tokens = _int(self.max_new_tokens, "max_new_tokens", 1, 100_000)
        self.cross_judges = tuple(self.cross_judges)

    @staticmethod
    def _subset(name: str, got: Any, allowed: tuple[str, ...]) -> tuple[str, ...]:
        vals = tuple(x.strip() for x in got.split(",")) if isinstance(got, str) else tuple(got)
        bad = [v for v in vals if v not in allowed]
        if not vals or bad:
            raise ConfigError(f"{name}={list(vals)!r} must be a non-empty subset of {', '.join(allowed)}")
        return vals

    def scoring(self) -> dict[str, Any]:
        """The settings that decide a trial's scores (a resumed study must not change them)."""
        keys = ("kl_tokens", "kl_ceiling", "n_harmful", "n_harmless", "n_borderline", "over_refusal_margin",
                "readout", "gen_tokens", "gen_below", "gen_judge", "gen_max_kl", "sources", "subspaces", "variants", "max_k")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if k in keys}

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
