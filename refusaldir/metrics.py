"""Small, dependency-free statistics: AUROC and Wilson intervals.

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

import torch


def auroc(positive: Sequence[float] | torch.Tensor, negative: Sequence[float] | torch.Tensor) -> float:
    """Area under the ROC curve: P(score(pos) > score(neg)), ties counted half."""
    pos = torch.as_tensor(positive, dtype=torch.float64).flatten()
    neg = torch.as_tensor(negative, dtype=torch.float64).flatten()
    if pos.numel() == 0 or neg.numel() == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).double().sum()
    ties = (pos[:, None] == neg[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (pos.numel() * neg.numel()))


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))
