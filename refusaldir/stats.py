"""Small, dependency-free statistics: AUROC, ROC curves, Wilson intervals, FPR thresholds,
per-layer separation tables and bootstrap weights. One implementation of each.

Example:
    >>> auroc([3.0, 2.0], [1.0, 0.0])
    1.0
    >>> lo, hi = wilson_interval(6, 10)
    >>> round(lo, 3), round(hi, 3)
    (0.313, 0.832)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from refusaldir.errors import ConfigError

__all__ = [
    "auroc", "bootstrap_weights", "pooled_std", "rate", "roc_curve", "separation_table",
    "threshold_for_fpr", "wilson_interval",
]

Scores = Sequence[float] | Tensor


def auroc(positive: Scores, negative: Scores) -> float:
    """Area under the ROC curve: P(score(pos) > score(neg)), ties counted half."""
    pos = torch.as_tensor(positive, dtype=torch.float64).flatten().cpu()
    neg = torch.as_tensor(negative, dtype=torch.float64).flatten().cpu()
    if pos.numel() == 0 or neg.numel() == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).double().sum()
    ties = (pos[:, None] == neg[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (pos.numel() * neg.numel()))


def roc_curve(positive: Scores, negative: Scores) -> dict[str, list[float | None]]:
    """ROC points (``fpr``, ``tpr``, ``threshold``) for "score >= threshold ⇒ positive".

    Example:
        >>> roc_curve([0.9, 0.4], [0.1, 0.5])["tpr"]
        [0.0, 0.5, 0.5, 1.0, 1.0]
    """
    pos = torch.as_tensor(positive, dtype=torch.float64).flatten().cpu()
    neg = torch.as_tensor(negative, dtype=torch.float64).flatten().cpu()
    if pos.numel() == 0 or neg.numel() == 0:
        raise ConfigError("roc_curve needs at least one positive and one negative score")
    thresholds = torch.cat([pos, neg]).unique().sort(descending=True).values
    fpr: list[float | None] = [0.0]
    tpr: list[float | None] = [0.0]
    thr: list[float | None] = [None]
    for t in thresholds.tolist():
        tpr.append(float((pos >= t).double().mean()))
        fpr.append(float((neg >= t).double().mean()))
        thr.append(t if math.isfinite(t) else None)
    return {"fpr": fpr, "tpr": tpr, "threshold": thr}


def threshold_for_fpr(negative: Scores, target_fpr: float) -> float:
    """Threshold so that at most ``target_fpr`` of ``negative`` lie strictly above it.

    Example:
        >>> threshold_for_fpr([0.0, 1.0, 2.0, 3.0], 0.25)
        2.0
    """
    if not 0 <= target_fpr <= 1 or not math.isfinite(target_fpr):
        raise ConfigError(f"target_fpr={target_fpr} must be a number in [0, 1]")
    s = torch.as_tensor(negative, dtype=torch.float64).flatten().cpu().sort(descending=True).values
    if s.numel() == 0:
        raise ConfigError("threshold_for_fpr needs at least one negative score")
    k = math.floor(target_fpr * len(s) + 1e-9)
    if k >= len(s):
        return float(s[-1]) - 1e-6
    return float(s[k])


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def rate(k: int, n: int, digits: int | None = None) -> dict[str, Any]:
    """``{"k", "n", "rate", "ci95"}`` with a Wilson 95% interval (``rate`` is None when n=0).

    Example:
        >>> rate(1, 4, digits=3)
        {'k': 1, 'n': 4, 'rate': 0.25, 'ci95': [0.046, 0.699]}
    """
    lo, hi = wilson_interval(k, n)
    r = k / n if n else None

    def rd(x: float | None) -> float | None:
        return None if x is None or digits is None else round(x, digits)

    if digits is None:
        return {"k": k, "n": n, "rate": r, "ci95": [lo, hi]}
    return {"k": k, "n": n, "rate": rd(r), "ci95": [rd(lo), rd(hi)]}


def pooled_std(a: Tensor, b: Tensor, dim: int = 0) -> Tensor:
    """Square root of the mean of the two groups' (biased) variances, floored at 1e-8."""
    var = (a.var(dim=dim, unbiased=False) + b.var(dim=dim, unbiased=False)) / 2
    return var.sqrt().clamp_min(1e-8)


def separation_table(
    positive: Float[Tensor, "n_pos layer"],
    negative: Float[Tensor, "n_neg layer"],
    layers: Sequence[int],
) -> list[dict[str, float]]:
    """Per layer: AUROC, standardized mean separation and both means of a projection.

    Example:
        >>> t = separation_table(torch.tensor([[2.0], [3.0]]), torch.tensor([[0.0], [1.0]]), [7])
        >>> t[0]["layer"], t[0]["auroc"], round(t[0]["separation"], 3)
        (7, 1.0, 4.0)
    """
    if positive.ndim != 2 or negative.ndim != 2 or positive.shape[1] != negative.shape[1]:
        raise ConfigError(
            f"separation_table needs (n, layer) scores with the same layer count; got "
            f"{tuple(positive.shape)} and {tuple(negative.shape)}"
        )
    if positive.shape[1] != len(layers):
        raise ConfigError(f"{positive.shape[1]} score columns but {len(layers)} layers")
    a, b = positive.double().cpu(), negative.double().cpu()
    sd = pooled_std(a, b)
    rows = []
    for j, layer in enumerate(layers):
        rows.append({
            "layer": int(layer),
            "auroc": auroc(a[:, j], b[:, j]),
            "separation": float((a[:, j].mean() - b[:, j].mean()) / sd[j]),
            "mean_positive": float(a[:, j].mean()),
            "mean_negative": float(b[:, j].mean()),
        })
    return rows


def bootstrap_weights(n: int, b: int, generator: torch.Generator) -> Tensor | None:
    """``(b, n)`` resampling weights (counts / n) of ``b`` bootstrap resamples; None if b=0."""
    if b == 0:
        return None
    idx = torch.randint(n, (b, n), generator=generator)
    w = torch.zeros((b, n), dtype=torch.float64)
    w.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
    return w / n
