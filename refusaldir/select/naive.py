"""The straightforward loop (``method="naive"``): three full forward passes per candidate with
:class:`~refusaldir.steer.Ablation` / :class:`~refusaldir.steer.Addition` applied, full
logits, the last position kept. The ``shared`` method computes exactly the same scores with
less work; this is the reference the tests compare it with.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from refusaldir.batching import resolve_batch_size
from refusaldir.readout import first_token_kl
from refusaldir.select.config import Key
from refusaldir.select.state import SelectionState
from refusaldir.steer import Ablation, Addition

__all__ = ["naive_baseline", "naive_candidate", "naive_logits"]


def naive_logits(st: SelectionState, texts: list[str]) -> Float[Tensor, "n vocab"]:
    """Full forward passes, full logits; the last position's row is kept (model device)."""
    out = []
    model, bs = st.model, resolve_batch_size(st.cfg.batch_size, st.model)
    with torch.inference_mode():
        for s in range(0, len(texts), bs):
            enc = {k: v.to(model.device) for k, v in model.template.encode(texts[s : s + bs]).items()}
            out.append(model.hf(**enc, use_cache=False).logits[:, -1].float())
    return torch.cat(out)


def naive_baseline(st: SelectionState) -> None:
    st.base_logits = {"harmful": naive_logits(st, st.harmful), "harmless": naive_logits(st, st.harmless)}
    st.base_scores = {k: st.rscore(v) for k, v in st.base_logits.items()}
    st.baseline = {
        "refusal_score_harmful": float(st.base_scores["harmful"].mean()),
        "refusal_score_harmless": float(st.base_scores["harmless"].mean()),
    }


def naive_candidate(st: SelectionState, c: Key) -> None:
    """Bypass, KL and induce of ``c``: three separate full passes."""
    if {"bypass", "induce", "kl"} <= set(st.scores[c]):
        return
    d = st.ds.refusal_direction(c[1], c[0])
    with Ablation(d).apply(st.model):
        bypass = naive_logits(st, st.harmful)
        ablated = naive_logits(st, st.harmless)
    with Addition(d, coeff=1.0).apply(st.model):
        induced = naive_logits(st, st.harmless)
    st.work["candidate_passes"] += 3
    st.scores[c]["bypass"] = st.rscore(bypass)
    st.scores[c]["kl"] = first_token_kl(st.base_logits["harmless"], ablated).cpu()
    st.scores[c]["induce"] = st.rscore(induced)
