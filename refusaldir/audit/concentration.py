"""How concentrated is refusal? Ablate the top-1, top-2, … candidate directions together until
harmful prompts are no longer refused.

Candidates come in the selection's ranking (:func:`candidate_order`); each is
Gram–Schmidt-orthogonalized against those already taken, and near-duplicates are skipped.

Example:
    >>> candidate_order({"mode": "cosine", "selected": {"pos": -1, "layer": 2},
    ...                  "candidates": [{"pos": -1, "layer": 1, "cosine": 0.9},
    ...                                 {"pos": -1, "layer": 2, "cosine": 0.5}]})
    [(-1, 2), (-1, 1)]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from refusaldir.batching import AUTO, BatchSize
from refusaldir.directions import Direction, DirectionSet
from refusaldir.errors import ConfigError
from refusaldir.generation import generate
from refusaldir.judges import PhraseJudge
from refusaldir.models import ChatModel
from refusaldir.stats import rate
from refusaldir.steer import Ablation

__all__ = ["candidate_order", "concentration_curve"]


def concentration_curve(
    model: ChatModel,
    ds: DirectionSet,
    harmful: Sequence[str],
    order: Sequence[tuple[int, int]],
    *,
    threshold: float = 0.05,
    k_max: int = 4,
    min_residual: float = 0.2,
    max_new_tokens: int = 32,
    batch_size: BatchSize = AUTO,
    progress: bool = False,
) -> dict[str, Any]:
    """Refusal rate on ``harmful`` with the top-1, top-2, … directions ablated together.

    ``order`` lists candidate ``(pos, layer)`` pairs best first; each is orthogonalized
    against the directions already taken (skipped when its residual norm is below
    ``min_residual`` of its own norm), and all taken directions are ablated at every layer.
    Stops once the refusal rate (phrase judge) is below ``threshold`` or ``k_max`` directions
    were used. The orthogonalization runs on the CPU in float64 (whatever device ``ds`` is on).

    Example:
        >>> curve = concentration_curve(model, ds, harmful[:16], [(-1, 12), (-1, 10)])  # doctest: +SKIP
        >>> curve["k_needed"]  # doctest: +SKIP
        1
    """
    texts = [str(p) for p in harmful]
    if not texts:
        raise ConfigError("concentration_curve needs at least one harmful prompt")
    judge = PhraseJudge()
    basis: list[Float[Tensor, " d_model"]] = []
    taken: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    curve: list[dict[str, Any]] = []
    k_needed = None
    for pos, layer in order:
        if len(basis) >= k_max:
            break
        r, why = _orthogonal_residual(ds, pos, layer, basis, min_residual)
        if r is None:
            skipped.append({"pos": pos, "layer": layer, "why": why})
            continue
        resid = float(r.norm())
        basis.append(r / resid)
        taken.append({"pos": pos, "layer": layer, "residual_norm": round(resid, 4)})
        k = _refusals_with(model, texts, basis, judge, max_new_tokens, batch_size, progress)
        point = rate(k, len(texts))
        curve.append({"k": len(basis), "refused": k, "n": point["n"], "rate": point["rate"],
                      "ci95": point["ci95"], "added": taken[-1]})
        if k / len(texts) < threshold:
            k_needed = len(basis)
            break
    return {"threshold": threshold, "k_max": k_max, "n": len(texts), "max_new_tokens": max_new_tokens,
            "min_residual": min_residual, "curve": curve, "directions": taken, "skipped": skipped,
            "k_needed": k_needed}


def _orthogonal_residual(
    ds: DirectionSet,
    pos: int,
    layer: int,
    basis: Sequence[Float[Tensor, " d_model"]],
    min_residual: float,
) -> tuple[Float[Tensor, " d_model"] | None, str]:
    """The unit candidate minus its projection on ``basis`` (CPU, float64), or ``None`` and why."""
    v = ds.refusal_direction(layer, pos).vector.to(device="cpu", dtype=torch.float64)
    norm = float(v.norm())
    if norm == 0.0:
        return None, "zero vector"
    r = v / norm
    for b in basis:
        r = r - (r @ b) * b
    resid = float(r.norm())
    if resid < min_residual:
        return None, f"residual {resid:.3f} < {min_residual}"
    return r, ""


def _refusals_with(
    model: ChatModel,
    texts: list[str],
    basis: Sequence[Float[Tensor, " d_model"]],
    judge: PhraseJudge,
    max_new_tokens: int,
    batch_size: BatchSize,
    progress: bool,
) -> int:
    """How many of ``texts`` the phrase judge calls refusals with every ``basis`` vector ablated."""
    abls = [Ablation(Direction(b.float(), layer=-1, pos=None, kind="custom")) for b in basis]
    comps = generate(model, texts, abls, max_new_tokens=max_new_tokens, batch_size=batch_size,
                     progress=progress)
    labels = [j.label for j in judge.judge_many(texts, [c.completion for c in comps])]
    return sum(lab == "refusal" for lab in labels)


def candidate_order(sel: dict[str, Any]) -> list[tuple[int, int]]:
    """Selected first, then ranked (eligible) candidates, then the rest by their score
    (``sel`` is ``SelectionResult.to_dict()``).

    Example:
        >>> candidate_order({"mode": "exact", "selected": {"pos": -1, "layer": 3}, "candidates": [
        ...     {"pos": -1, "layer": 3, "bypass": 0.1, "rank": 1},
        ...     {"pos": -2, "layer": 2, "bypass": 0.2, "rank": 2},
        ...     {"pos": -1, "layer": 1, "bypass": 0.0}]})
        [(-1, 3), (-2, 2), (-1, 1)]
    """
    cosine = sel["mode"] == "cosine"

    def key(c: dict[str, Any]) -> tuple[Any, ...]:
        if cosine:
            s = -(c["cosine"] if c.get("cosine") is not None else -math.inf)
        else:
            s = c["bypass"] if c.get("bypass") is not None else (-(c.get("proxy") or -math.inf) + 1e6)
        return (0 if c.get("rank") is not None else 1, c.get("rank") or 0, s, c["layer"], c["pos"])

    first = (int(sel["selected"]["pos"]), int(sel["selected"]["layer"]))
    rest = [(int(c["pos"]), int(c["layer"])) for c in sorted(sel["candidates"], key=key)]
    return [first, *[k for k in rest if k != first]]
