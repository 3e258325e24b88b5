"""Confirm front members on held-out prompts: generation judged by the default judge, with
cross-judge disagreement, and multi-token KL on the harmless test split.

The inner loop scores first tokens on validation prompts; confirmation is what a user would
see: ``max_new_tokens`` of greedy text on the shipped **test** harmful split and the borderline
set's test half, judged (strict refusal with Wilson intervals, deflection shares), next to
the unedited model and the rank-1 edit measured in the same run.

Example:
    >>> rec = confirm_front(model, ds, search, cfg)  # doctest: +SKIP
    >>> rec["members"][0]["harmful"]["refusal"]["rate"]  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from refusaldir.data import load_prompts
from refusaldir.directions import DirectionSet, Subspaces
from refusaldir.evaluate import Condition, evaluate
from refusaldir.optimize.config import OptimizeConfig
from refusaldir.optimize.objective import TrialScorer
from refusaldir.optimize.prompts import borderline_half
from refusaldir.optimize.space import build_edit

if TYPE_CHECKING:
    from refusaldir.models import ChatModel

__all__ = ["choose_members", "confirm_front"]


def choose_members(front: Sequence[dict[str, Any]], n: int, target: float = 0.05) -> list[dict[str, Any]]:
    """Which front members to confirm: the cheapest (lowest KL) ones whose search refusal rate
    is at most ``target``, then the lowest-refusal ones, ``n`` in all. The rank-1 edit is
    confirmed anyway, so it never takes one of the ``n`` places."""
    others = [r for r in front if not r.get("rank1")]
    under = sorted((r for r in others if r["refusal_rate"] <= target), key=lambda r: (r["kl"], r["trial"]))
    rest = sorted((r for r in others if r["refusal_rate"] > target), key=lambda r: (r["refusal"], r["kl"]))
    return (under + rest)[:n]


def confirm_front(
    model: ChatModel,
    ds: DirectionSet,
    search: dict[str, Any],
    cfg: OptimizeConfig,
    *,
    extra: Subspaces | None = None,
    harmful: Sequence[str] | None = None,
    harmless: Sequence[str] | None = None,
    borderline: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Generate and judge the unedited model, the rank-1 edit and the chosen front members."""
    n_layers = model.n_layers
    chosen = choose_members(search["front"], cfg.confirm)
    named: list[tuple[str, dict[str, Any] | None]] = [("baseline", None)]
    if search.get("rank1") is not None:
        named.append(("rank1", search["rank1"]))
    named += [(f"trial{r['trial']}", r) for r in chosen]
    conds = [Condition(name, () if row is None else (build_edit(row["params"], ds, n_layers, extra),),
                       description="unedited" if row is None else row["describe"])
             for name, row in named]
    harmful = list(harmful if harmful is not None else load_prompts("harmful", "test"))
    harmless = list(harmless if harmless is not None else load_prompts("harmless", "test"))
    borderline = list(borderline if borderline is not None else borderline_half("test"))
    datasets = {"harmful": harmful, **({"borderline": borderline} if borderline else {})}
    res = evaluate(model, ds, datasets=datasets, judge=cfg.judge, cross_judges=cfg.cross_judges,
                   max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                   progress=cfg.progress, prebuilt=conds)
    scorer = TrialScorer(model, replace(cfg, gen_tokens=0), harmful, harmless, [], search["refusal_ids"])  # KL only
    members = []
    for cond, (name, row) in zip(conds, named):
        summ = res.results["conditions"][name]["datasets"]
        kl = 0.0 if not cond.interventions else float(scorer.score(cond.interventions[0])["kl"])  # type: ignore[arg-type]
        members.append({
            "name": name, "trial": None if row is None else row["trial"],
            "describe": cond.description, "params": None if row is None else row["params"],
            "search": None if row is None else {k: row[k] for k in ("refusal", "refusal_rate", "kl", "over_refusal")},
            "harmful": _brief(summ["harmful"]),
            "borderline": _brief(summ["borderline"]) if "borderline" in summ else None,
            "kl": round(kl, 6), "kl_tokens": cfg.kl_tokens,
        })
    return {"members": members, "judges": res.results.get("judges"),
            "max_new_tokens": cfg.max_new_tokens, "prompts": {k: len(v) for k, v in datasets.items()},
            "completions": res.completions, "timings": res.results.get("timings")}


def _brief(s: dict[str, Any]) -> dict[str, Any]:
    return {"refusal": s["refusal"], "broad": s["broad"], "n": s["n"],
            "deflection": s.get("deflection"), "disagreement": s.get("disagreement"),
            "repetitive": s["repetitive"], "empty": s["empty"]}
