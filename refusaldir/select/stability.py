"""How stable the pick is, and free hints about every candidate.

- :func:`bootstrap`: resample the validation prompts (:func:`refusaldir.stats.bootstrap_weights`)
  and re-run the final decision on the resampled mean scores: how often does the pick win?
- :func:`proxies` / :func:`linearised_proxy`: zero-pass proxies computed from the unmodified
  activations (reported, never used to select).

Device policy: the proxy math runs on the activations' device (the direction is moved
there once per candidate); scores and bootstrap weights are CPU data, and every result that
leaves these functions is a Python float or a CPU tensor.

Example:
    >>> import torch
    >>> h = torch.randn(4, 3, 2, 8); l = torch.randn(4, 3, 2, 8)
    >>> p, sep = linearised_proxy(h, l, torch.randn(8), layer=1, pos_index=0, eval_layers=[1, 2])
    >>> p.shape, sep.shape
    (torch.Size([]), torch.Size([]))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from refusaldir.select import criteria
from refusaldir.select.config import Key
from refusaldir.select.state import SelectionState
from refusaldir.steer import project_out, unit_vector

__all__ = ["bootstrap", "linearised_proxy", "proxies", "resampled_means"]

Acts = Float[Tensor, "n layer pos d_model"]


def resampled_means(w: Float[Tensor, "b n"], scores: Float[Tensor, " n"]) -> Float[Tensor, " b"]:
    """Mean of per-prompt ``scores`` under each resample's weights (on ``w``'s device, float64)."""
    return w @ scores.to(w.device, torch.float64)


# ----------------------------------------------------------------------------- proxies
def linearised_proxy(
    harmful: Acts, harmless: Acts, vector: Float[Tensor, " d_model"], *, layer: int,
    pos_index: int, eval_layers: Sequence[int], center: bool = True,
) -> tuple[Float[Tensor, ""], Float[Tensor, ""]]:
    """``(proxy, proxy_sep)`` of one candidate direction, on ``harmful``'s device (float64).

    ``proxy`` is the linearised cosine score: the cosine score of
    :func:`~refusaldir.select.cosine.cosine_scores` with the intervention applied to the
    baseline mean activations at the evaluation layers instead of being propagated through
    the model — ablation removes the direction from harmful means, addition adds it to
    harmless means at evaluation layers at or above the candidate's ``layer``.
    ``proxy_sep`` is the standardised separation of harmful and harmless projections at the
    candidate's own position and layer.
    """
    dev = harmful.device
    harmless = harmless.to(dev)
    v = vector.to(dev, torch.float64)
    u = unit_vector(vector, torch.float32).to(dev, torch.float64)
    e_idx = list(eval_layers)
    mh = harmful[:, e_idx].double().mean(0)  # (E, P, d)
    ml = harmless[:, e_idx].double().mean(0)
    centre = (mh + ml) / 2 if center else torch.zeros_like(mh)
    a = harmful[:, layer, pos_index].double() @ u
    b = harmless[:, layer, pos_index].double() @ u
    pooled = ((a.var(unbiased=False) + b.var(unbiased=False)) / 2).sqrt()
    pooled = torch.where(pooled > 0, pooled, torch.full_like(pooled, 1e-12))
    after = torch.tensor([e >= layer for e in e_idx], dtype=torch.float64, device=dev)[:, None, None]
    cos = torch.nn.functional.cosine_similarity
    s_abl = cos(project_out(mh, u) - centre, ml - centre, dim=-1).mean()
    s_add = cos(ml + after * v - centre, mh - centre, dim=-1).mean()
    return s_abl + s_add, (a.mean() - b.mean()) / pooled


def proxies(st: SelectionState) -> None:
    """Zero-pass proxies of every candidate (higher is better), stored as details.

    Reported per candidate as a free hint; no mode selects by them (fast mode ranks by a
    short bypass pass instead). See :func:`linearised_proxy`.
    """
    hh, hl = st.base_acts["harmful"], st.base_acts["harmless"]
    for c in st.cands:
        if c in st.degenerate:
            st.extra[c].update(proxy=-math.inf, proxy_sep=-math.inf)
            continue
        p, sep = linearised_proxy(hh, hl, st.vec(c), layer=c[1], pos_index=st.positions.index(c[0]),
                                  eval_layers=st.cos_layers, center=st.cfg.cosine_center)
        st.extra[c].update(proxy=float(p), proxy_sep=float(sep))


# ----------------------------------------------------------------------------- bootstrap
def _cosine_table(st: SelectionState, lev: criteria.Level, b: int) -> tuple[list[Key], Tensor, Tensor]:
    w_l = st.boot_w["harmless"]
    assert w_l is not None
    cands = [c for c in st.cands if c in st.boot_cos and (not lev.layer or st.layer_ok(c))]
    # Candidates whose KL was never checked count as eligible (conservative).
    ok = []
    for c in cands:
        if not math.isinf(lev.kl_max) and "kl" not in st.scores[c] \
                and criteria.passes(st, c, lev) is False:
            ok.append(torch.zeros(b, dtype=torch.bool))  # KL known to exceed the bound
        elif math.isinf(lev.kl_max) or "kl" not in st.scores[c]:
            ok.append(torch.ones(b, dtype=torch.bool))
        else:
            ok.append(resampled_means(w_l, st.scores[c]["kl"]).cpu() <= lev.kl_max)
    score = torch.stack([st.boot_cos[c].cpu() for c in cands])
    score = torch.where(torch.stack(ok), score, torch.full_like(score, -math.inf))
    return cands, score.argmax(0), torch.isfinite(score.max(0).values)


def _filter_mask(st: SelectionState, c: Key, lev: criteria.Level, b: int) -> Tensor:
    """Per resample: does ``c`` pass the induce and KL filters it was scored on?"""
    w_l = st.boot_w["harmless"]
    assert w_l is not None
    s = st.scores[c]
    m = torch.ones(b, dtype=torch.bool)
    if lev.induce and "induce" in s:
        m &= resampled_means(w_l, s["induce"]).cpu() > st.cfg.induce_min
    if not math.isinf(lev.kl_max) and "kl" in s:
        m &= resampled_means(w_l, s["kl"]).cpu() <= lev.kl_max
    return m


def _exact_table(st: SelectionState, lev: criteria.Level, b: int) -> tuple[list[Key], Tensor, Tensor]:
    w_h = st.boot_w["harmful"]
    assert w_h is not None
    # Candidates whose KL was never computed (bypass ranked below the top-k) count as
    # passing it: that can only lower the reported stability (conservative).
    need = {"bypass"} | ({"induce"} if lev.induce else set())
    cands = [c for c in st.cands if need <= set(st.scores[c])
             and (not lev.layer or st.layer_ok(c)) and c not in st.degenerate]
    rows, ok = [], []
    for c in cands:
        rows.append(resampled_means(w_h, st.scores[c]["bypass"]).cpu())
        m = _filter_mask(st, c, lev, b)
        if not math.isinf(lev.kl_max) and "kl" not in st.scores[c] and criteria.passes(st, c, lev) is False:
            m &= False  # KL known to exceed the bound (early stop)
        ok.append(m)
    score = torch.stack(rows)
    score = torch.where(torch.stack(ok), score, torch.full_like(score, math.inf))
    return cands, score.argmin(0), torch.isfinite(score.min(0).values)


def bootstrap(st: SelectionState, li: int, pick: Key) -> dict[str, Any]:
    """Bootstrap the final decision at relaxation rung ``li``: the pick's share of wins,
    the most frequent winners, and how often no candidate was eligible."""
    cfg = st.cfg
    if cfg.n_bootstrap == 0:
        return {"n": 0}
    lev = criteria.levels(cfg)[li]
    b = cfg.n_bootstrap
    if cfg.mode == "cosine":
        cands, winners, valid = _cosine_table(st, lev, b)
    else:
        cands, winners, valid = _exact_table(st, lev, b)
    counts: dict[Key, int] = {}
    for w, v in zip(winners.tolist(), valid.tolist()):
        if v:
            counts[cands[w]] = counts.get(cands[w], 0) + 1
    share = {f"{p},{layer}": n / b for (p, layer), n in
             sorted(counts.items(), key=lambda kv: -kv[1])[:10]}
    out: dict[str, Any] = {
        "n": b, "top1_share": counts.get(pick, 0) / b, "winners": share,
        "no_eligible_share": 1 - float(valid.float().mean()),
        "candidates": len(cands),
    }
    if cfg.mode != "cosine":
        # Candidates rejected before being fully scored: how often would they have
        # passed the filters they were scored on in a resample?
        flips = 0.0
        for c in st.cands:
            if c in cands or c in st.degenerate or (lev.layer and not st.layer_ok(c)):
                continue
            if not st.scores[c]:
                continue
            flips = max(flips, float(_filter_mask(st, c, lev, b).double().mean()))
        out["unscored_max_pass_share"] = flips
    return out
