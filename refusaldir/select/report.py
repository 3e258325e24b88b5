"""Turn a finished selection state into a :class:`~refusaldir.select.SelectionResult`: one
:class:`~refusaldir.select.CandidateScore` per candidate with its status, rank and reasons.
"""

from __future__ import annotations

import math
from typing import Any

from refusaldir.select import criteria
from refusaldir.select.config import Key
from refusaldir.select.result import CandidateScore, SelectionResult
from refusaldir.select.state import SelectionState, texts_info

__all__ = ["build_result"]

#: Details reported as first-class fields rather than in ``details``.
MAIN_FIELDS = ("cosine", "cos_ablation", "cos_addition", "proxy")


def _status(st: SelectionState, c: Key, rec: CandidateScore, ok: bool | None, pick: Key) -> None:
    """Set ``rec.status`` and explain candidates that were never fully scored."""
    cosine = st.cfg.mode == "cosine"
    primary = rec.cosine if cosine else rec.bypass
    if c == pick:
        rec.status = "selected"
    elif ok is False:
        rec.status = "rejected" if primary is not None else "not scored"
    elif ok is None or primary is None:
        rec.status = "not scored"
    else:
        rec.status = "passed"
    if rec.status == "not scored" and not rec.reasons and primary is None:
        rec.reasons = ["not scored: pruned by fast mode (short bypass ranking)" if st.cfg.mode == "fast"
                       else "not scored"]
    elif rec.status == "not scored":
        missing = [k for k in ("induce", "kl", "bypass") if getattr(rec, k) is None
                   and not (k == "kl" and "kl_lower_bound" in st.extra[c])]
        rec.reasons = [*rec.reasons, (f"not scored ({', '.join(missing)}): rejected as above; "
                                      "the missing scores could not change the pick")]
    if rec.status == "not scored" and ok is None and primary is not None:
        rec.reasons = [(f"not scored (KL): {'cosine' if cosine else 'bypass'} "
                        "ranks below the top-k candidates, so KL cannot change the pick")]


def build_result(st: SelectionState, li: int, pick: Key, stability: dict[str, Any]) -> SelectionResult:
    """The result of a selection that picked ``pick`` at relaxation rung ``li``."""
    cfg = st.cfg
    ladder = criteria.levels(cfg)
    lev, strict = ladder[li], ladder[0]
    recs: list[CandidateScore] = []
    for c in st.cands:
        ex = st.extra[c]
        rec = CandidateScore(
            pos=c[0], layer=c[1], bypass=st.mean(c, "bypass"), induce=st.mean(c, "induce"),
            kl=st.mean(c, "kl"), cosine=ex.get("cosine"), cos_ablation=ex.get("cos_ablation"),
            cos_addition=ex.get("cos_addition"), proxy=ex.get("proxy"),
            norm=float(st.vec(c).float().norm()),
            details={k: v for k, v in ex.items() if k not in MAIN_FIELDS},
        )
        for k in ("bypass", "induce", "kl"):
            t = st.scores[c].get(k)
            if t is not None and t.numel() > 1:
                rec.details[f"{k}_sem"] = float(t.std() / math.sqrt(t.numel()))
        rec.reasons = criteria.reasons(st, c, strict)
        _status(st, c, rec, criteria.passes(st, c, lev), pick)
        recs.append(rec)
    eligible = [r for r in recs if r.status in ("selected", "passed")]
    if cfg.mode == "cosine":
        eligible.sort(key=lambda r: (-(r.cosine or -math.inf), r.layer, r.pos))
    else:
        eligible.sort(key=lambda r: (r.bypass, r.layer, r.pos))
    for i, r in enumerate(eligible):
        r.rank = i + 1
    relax = lev.to_dict(li)
    relax["all_filtered"] = li > 0
    work = dict(st.work)
    if st.eng is not None:
        work["forward_tokens"] = st.eng.forward_tokens
    return SelectionResult(
        pos=pick[0], layer=pick[1], mode=cfg.mode, method=cfg.method, candidates=recs,
        relaxation=relax, top_k=[r.key for r in eligible[: cfg.top_k]], stability=stability,
        timings={k: round(v, 3) for k, v in st.timings.items()},
        refusal_tokens=st.refusal, config=cfg, baseline=st.baseline, model=st.model.describe(),
        prompts={"harmful": texts_info(st.harmful), "harmless": texts_info(st.harmless)},
        cosine_layers=st.cos_layers, work=work,
    )
