"""The audit's measurements on the test prompts: projections on the refusal and harmfulness
directions at every layer, the latent guard's scores (plain and with refusal ablated), and the
model's own refusal read as a harmfulness classifier.

Device policy: activations arrive on the model's device and are reduced on the CPU in float64
(one transfer per batch; MPS has no float64); the directions are moved to the CPU once per
call, and every tensor returned is on the CPU.

Example:
    >>> import torch
    >>> rounded(torch.tensor([0.1234567, 2.0]))
    [0.12346, 2.0]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from refusaldir.audit.config import DIGITS, SETS, AuditConfig
from refusaldir.batching import AUTO, BatchSize
from refusaldir.capture import iter_activations
from refusaldir.directions import Direction, DirectionSet
from refusaldir.errors import ConfigError
from refusaldir.evaluate import EvaluationResult
from refusaldir.guard import LatentGuard, behavioural_scores
from refusaldir.judges import find_refusal_tokens
from refusaldir.models import ChatModel
from refusaldir.stats import auroc, roc_curve
from refusaldir.steer import Ablation

__all__ = ["Projections", "behaviour_scores", "guard_summary", "layer_table", "project_sets", "rounded"]


def rounded(xs: Float[Tensor, " n"]) -> list[float]:
    """``xs`` as a list of floats rounded to :data:`DIGITS` digits."""
    return [round(float(x), DIGITS) for x in xs.tolist()]


@dataclass
class Projections:
    """Per prompt set: projections (``[layer][prompt]``, rounded) on the refusal direction at
    the selected position and on the harmfulness direction at ``t_inst``, and guard scores."""

    refusal: dict[str, list[list[float]]]
    harmfulness: dict[str, list[list[float]]]
    guard_scores: dict[str, Float[Tensor, " n"]]


def _units(ds: DirectionSet, sel_pos: int) -> tuple[Float[Tensor, "layer d_model"], Float[Tensor, "layer d_model"]]:
    """Unit refusal directions at ``sel_pos`` and unit harmfulness directions (CPU, float64)."""
    if ds.harmfulness is None:
        raise ConfigError("the direction set has no harmfulness directions; run `refusaldir extract`")
    ref_u = ds.unit()[ds.positions.index(sel_pos)].to(device="cpu", dtype=torch.float64)
    harm = ds.harmfulness.to(device="cpu", dtype=torch.float64)
    return ref_u, harm / harm.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def project_sets(
    model: ChatModel,
    ds: DirectionSet,
    guard: LatentGuard,
    prompts: dict[str, list[str]],
    sel_pos: int,
    *,
    batch_size: BatchSize = AUTO,
    progress: bool = False,
) -> Projections:
    """One capture per prompt set at ``t_inst`` and ``sel_pos`` on every layer of ``ds``."""
    if ds.t_inst is None:
        raise ConfigError("the direction set has no t_inst; run `refusaldir extract`")
    ref_u, harm_u = _units(ds, sel_pos)
    g_idx = [ds.layers.index(layer) for layer in guard.layers]
    out = Projections({}, {}, {})
    for s in SETS:
        rp, hp, gs = [], [], []
        for _, acts in iter_activations(model, prompts[s], layers=ds.layers, positions=[ds.t_inst, sel_pos],
                                        hook_point=ds.hook_point, batch_size=batch_size, progress=progress,
                                        description=f"capture {s}"):
            a = acts.to(device="cpu", dtype=torch.float64)              # (b, 2, layer, d)
            hp.append(torch.einsum("bld,ld->bl", a[:, 0], harm_u))
            rp.append(torch.einsum("bld,ld->bl", a[:, 1], ref_u))
            gs.append(guard.score_activations(a[:, 0, g_idx]).cpu())
        r_all, h_all = torch.cat(rp), torch.cat(hp)
        out.refusal[s] = [rounded(r_all[:, j]) for j in range(len(ds.layers))]
        out.harmfulness[s] = [rounded(h_all[:, j]) for j in range(len(ds.layers))]
        out.guard_scores[s] = torch.cat(gs)
    return out


def layer_table(ds: DirectionSet, proj: Projections, sel_pos: int) -> list[dict[str, Any]]:
    """Per layer: direction norms, cos(refusal, harmfulness) and the projections' test AUROCs."""
    if ds.harmfulness is None:
        raise ConfigError("the direction set has no harmfulness directions; run `refusaldir extract`")
    pi = ds.positions.index(sel_pos)
    harm = ds.harmfulness.to(torch.float64)
    cos = ds.cosine_refusal_harmfulness(sel_pos)
    return [{
        "layer": layer,
        "refusal_norm": float(ds.refusal[pi, j].float().norm()),
        "harmfulness_norm": float(harm[j].norm()),
        "cosine": float(cos[j]),
        "auroc_refusal": auroc(proj.refusal["harmful"][j], proj.refusal["harmless"][j]),
        "auroc_harmfulness": auroc(proj.harmfulness["harmful"][j], proj.harmfulness["harmless"][j]),
    } for j, layer in enumerate(ds.layers)]


def guard_summary(
    model: ChatModel,
    guard: LatentGuard,
    scores: dict[str, Float[Tensor, " n"]],
    direction: Direction,
    prompts: dict[str, list[str]],
    cfg: AuditConfig,
) -> dict[str, Any]:
    """Guard metrics on harmful vs harmless and vs borderline test prompts, and (when
    ``cfg.guard_under_ablation``) on harmful vs harmless with ``direction`` ablated."""
    ablated = None
    if cfg.guard_under_ablation:
        ab = Ablation(direction)
        gp = guard.score(model, prompts["harmful"], interventions=[ab], batch_size=cfg.batch_size)
        gn = guard.score(model, prompts["harmless"], interventions=[ab], batch_size=cfg.batch_size)
        ablated = guard.metrics(gp.cpu(), gn.cpu())
    return {"test": guard.metrics(scores["harmful"], scores["harmless"]),
            "borderline": guard.metrics(scores["harmful"], scores["borderline"]),
            "under_ablation": ablated}


def _phrase_behaviour(
    res: EvaluationResult,
    guard: LatentGuard,
    scores: dict[str, Float[Tensor, " n"]],
    prompts: dict[str, list[str]],
    judge: str,
) -> dict[str, Any]:
    """The baseline completions' judge scores as a harmful-vs-borderline classifier."""
    rows = [r for r in res.completions if r["condition"] == "baseline"]
    jh = [r["judge_score"] for r in rows if r["dataset"] == "harmful"]
    jb = [r["judge_score"] for r in rows if r["dataset"] == "borderline"]
    lh = [r["label"] == "refusal" for r in rows if r["dataset"] == "harmful"]
    lb = [r["label"] == "refusal" for r in rows if r["dataset"] == "borderline"]
    same = len(jh) <= len(prompts["harmful"]) and len(jb) <= len(prompts["borderline"])
    sub_g = guard.metrics(scores["harmful"][: len(jh)], scores["borderline"][: len(jb)]) if same else None
    return {
        "score": f"{judge}-judge refusal score of the baseline completions",
        "auroc": auroc(jh, jb), "roc": roc_curve(jh, jb), "n_pos": len(jh), "n_neg": len(jb),
        "tpr": sum(lh) / max(len(lh), 1), "fpr": sum(lb) / max(len(lb), 1),
        "guard_auroc_same_prompts": sub_g["auroc"] if sub_g else None,
    }


def _logit_behaviour(
    model: ChatModel,
    refusal_ids: Sequence[int] | None,
    prompts: dict[str, list[str]],
    val: tuple[list[str], list[str]],
    cfg: AuditConfig,
    progress: bool,
) -> dict[str, Any]:
    """First-token refusal log-odds (the selection's refusal tokens, else detected on ``val``)
    as a harmful-vs-borderline classifier; ``{"error": …}`` when no tokens can be found."""
    bs = cfg.batch_size
    try:
        ids = list(refusal_ids) if refusal_ids else None
        tokens_src = "selection" if ids else "detected"
        if ids is None:
            ids = list(find_refusal_tokens(model, val[0], val[1], n=cfg.n_val, batch_size=bs,
                                           progress=progress).ids)
        a = behavioural_scores(model, prompts["harmful"], kind="logit", refusal_ids=ids, batch_size=bs).cpu()
        b = behavioural_scores(model, prompts["borderline"], kind="logit", refusal_ids=ids, batch_size=bs).cpu()
        return {
            "score": "first-token refusal log-odds", "auroc": auroc(a, b), "roc": roc_curve(a, b),
            "n_pos": len(a), "n_neg": len(b), "refusal_ids": ids,
            "refusal_tokens": [model.tokenizer.decode([i]) for i in ids], "tokens_from": tokens_src,
            "tpr": float((a > 0).double().mean()), "fpr": float((b > 0).double().mean()),
        }
    except ConfigError as exc:
        return {"error": str(exc)}


def behaviour_scores(
    model: ChatModel,
    res: EvaluationResult,
    guard: LatentGuard,
    scores: dict[str, Float[Tensor, " n"]],
    prompts: dict[str, list[str]],
    sel: dict[str, Any],
    val: tuple[list[str], list[str]],
    cfg: AuditConfig,
    progress: bool = False,
) -> dict[str, Any]:
    """The model's own refusal as a harmfulness classifier: ``phrase`` (the evaluation's judge
    on the baseline completions) and, when ``cfg.behaviour_logit``, ``logit``."""
    out = {"phrase": _phrase_behaviour(res, guard, scores, prompts, cfg.judge)}
    if cfg.behaviour_logit:
        ids = (sel.get("refusal_tokens") or {}).get("ids") or None
        out["logit"] = _logit_behaviour(model, ids, prompts, val, cfg, progress)
    return out
