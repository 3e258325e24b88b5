"""Output-free (COSMIC-style) cosine scores: at the layers where mean harmful and harmless
activations differ most, ablating a good direction makes harmful activations look harmless
and adding it makes harmless ones look harmful; the score is the sum of the two (centred)
cosine similarities, for the full sample and every bootstrap resample.

The tensor math (:func:`eval_layers`, :func:`cosine_scores`) runs on the activations'
device; weights and other operands are moved there, and the callers move results to the CPU.

Example:
    >>> import torch
    >>> h, l = torch.ones(3, 2, 1, 4), -torch.ones(3, 2, 1, 4)
    >>> s_abl, s_add = cosine_scores(h, l, l, h, None, None, center=True)
    >>> float(s_abl[0] + s_add[0])
    2.0
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor

from refusaldir.select.config import Key
from refusaldir.select.state import SelectionState

__all__ = ["cosine_scores", "eval_layers", "store_acts"]

Acts = Float[Tensor, "n layer pos d_model"]


def eval_layers(harmful: Acts, harmless: Acts, frac: float, n_layers: int) -> tuple[list[int], Tensor]:
    """The ``ceil(frac · n_layers)`` (at least 2) layers where mean harmful and harmless
    activations differ most (lowest cosine), and the per-layer cosine (CPU)."""
    mh = harmful.mean(0)
    ml = harmless.to(mh.device).mean(0)
    cos = torch.nn.functional.cosine_similarity(mh, ml, dim=-1).mean(-1).cpu()  # (layer,)
    k = min(max(2, math.ceil(frac * n_layers)), n_layers)
    return sorted(int(i) for i in torch.argsort(cos)[:k]), cos


def cosine_scores(
    harmful: Acts, harmless: Acts, ablated: Acts, added: Acts,
    w_harmful: Float[Tensor, "b n_harmful"] | None, w_harmless: Float[Tensor, "b n_harmless"] | None,
    *, center: bool,
) -> tuple[Float[Tensor, " r"], Float[Tensor, " r"]]:
    """Ablation and addition cosine scores at the evaluation layers, for the full sample
    (row 0) and each bootstrap resample (rows 1..b, paired: the same resampled prompts enter
    the baseline and the intervened means). On ``harmful``'s device, float64."""
    dev = harmful.device
    n_h, n_l = harmful.shape[0], harmless.shape[0]
    ones_h = torch.full((1, n_h), 1.0 / n_h, dtype=torch.float64, device=dev)
    ones_l = torch.full((1, n_l), 1.0 / n_l, dtype=torch.float64, device=dev)
    wh = torch.cat([ones_h, w_harmful.to(dev, torch.float64)]) if w_harmful is not None else ones_h
    wl = torch.cat([ones_l, w_harmless.to(dev, torch.float64)]) if w_harmless is not None else ones_l
    shape = harmful.shape[1:]

    def means(w: Tensor, x: Tensor) -> Tensor:
        return (w @ x.to(dev).reshape(x.shape[0], -1).double()).reshape(w.shape[0], *shape)

    m_hh, m_hl = means(wh, harmful), means(wl, harmless)
    m_abl, m_add = means(wh, ablated), means(wl, added)
    centre = (m_hh + m_hl) / 2 if center else torch.zeros_like(m_hh)
    cos = torch.nn.functional.cosine_similarity
    s_abl = cos(m_abl - centre, m_hl - centre, dim=-1).mean(dim=(-1, -2))
    s_add = cos(m_add - centre, m_hh - centre, dim=-1).mean(dim=(-1, -2))
    return s_abl, s_add


def store_acts(st: SelectionState, c: Key, kind: str, acts: Acts | None, layers: list[int]) -> None:
    """Fill in the evaluation-layer activations of one side (``ablation`` | ``addition``)
    and score ``c`` when both are in."""
    base = st.base_acts["harmless" if kind == "addition" else "harmful"]
    full = base[:, st.cos_layers].clone()  # layers below an addition are unchanged
    if acts is not None:
        for j, e in enumerate(layers):
            full[:, st.cos_layers.index(e)] = acts[:, j].to(full.device)
    st.cos_acts.setdefault(c, {})[kind] = full
    _score(st, c)


def _score(st: SelectionState, c: Key) -> None:
    got = st.cos_acts.get(c, {})
    if "ablation" not in got or "addition" not in got:
        return
    del st.cos_acts[c]
    s_abl, s_add = cosine_scores(
        st.base_acts["harmful"][:, st.cos_layers], st.base_acts["harmless"][:, st.cos_layers],
        got["ablation"], got["addition"], st.boot_w["harmful"], st.boot_w["harmless"],
        center=st.cfg.cosine_center,
    )
    ex = st.extra[c]
    ex["cos_ablation"], ex["cos_addition"] = float(s_abl[0]), float(s_add[0])
    ex["cosine"] = float(s_abl[0] + s_add[0])
    st.boot_cos[c] = (s_abl + s_add)[1:].cpu()

