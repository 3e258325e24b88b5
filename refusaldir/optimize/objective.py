"""The optimiser's cheap inner loop, on selection's :class:`~refusaldir.select.ForwardEngine`.

Per trial, with the edit's hooks: whether the first token on harmful validation prompts is a
refusal (the greedy margin, or the log-odds), KL(unedited ‖ edited) over the first
``kl_tokens`` tokens of the unedited model's greedy continuation of harmless validation
prompts (teacher-forced, one pass), and the refusal rate on the borderline set's search half.
A trial whose first tokens rarely refuse (and whose KL is under ``gen_max_kl``) also writes
``gen_tokens`` greedy tokens per harmful prompt, read by ``gen_judge``: refusals after a
preamble ("As an AI, I cannot ...") count with the phrase judge, deflections with the default
judge. The shared system-prompt prefix runs once per
pass; a trial whose KL exceeds the ceiling skips the refusal passes.

Example:
    >>> scorer = TrialScorer(model, cfg, harmful, harmless, borderline, refusal_ids)  # doctest: +SKIP
    >>> scorer.score(edit)["kl"]  # doctest: +SKIP
    0.012
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from refusaldir.batching import resolve_batch_size
from refusaldir.errors import ConfigError
from refusaldir.generation import generate
from refusaldir.judges import judge_texts, make_judge, refused
from refusaldir.optimize.config import OptimizeConfig
from refusaldir.readout import greedy_refusal_margin, refusal_score
from refusaldir.select import ForwardEngine
from refusaldir.steer import Edit

if TYPE_CHECKING:
    from refusaldir.models import ChatModel

__all__ = ["TrialScorer", "multi_token_kl"]


def multi_token_kl(base: Float[Tensor, "n t vocab"], other: Float[Tensor, "n t vocab"]) -> Float[Tensor, " n"]:
    """Mean over the ``t`` positions of KL(base ‖ other), per prompt, in float64.

    Example:
        >>> multi_token_kl(torch.zeros(2, 3, 5), torch.zeros(2, 3, 5)).tolist()
        [0.0, 0.0]
    """
    lp = torch.log_softmax(base.to(torch.float64), dim=-1)
    lq = torch.log_softmax(other.to(torch.float64), dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1).clamp_min(0).mean(-1)


class TrialScorer:
    """Scores :class:`~refusaldir.steer.Edit` s on fixed prompts against the unedited model."""

    def __init__(self, model: ChatModel, cfg: OptimizeConfig, harmful: Sequence[str],
                 harmless: Sequence[str], borderline: Sequence[str], refusal_ids: Sequence[int]) -> None:
        if not harmful or not harmless:
            raise ConfigError("the optimiser needs harmful and harmless validation prompts")
        self.model, self.cfg = model, cfg
        self.refusal_ids = [int(i) for i in refusal_ids]
        sets = {"harmful": list(harmful), "harmless": list(harmless)}
        if borderline:
            sets["borderline"] = list(borderline)
        for name, texts in sets.items():
            model.template.check_lengths(texts, reserve=cfg.kl_tokens, what=name)
        self.eng = ForwardEngine(model, sets, batch_size=resolve_batch_size(cfg.batch_size, model),
                                 share_prefix=True)
        self.harmful = list(harmful)
        self.judge = make_judge(cfg.gen_judge, model=model, harmful_val=self.harmful) if cfg.gen_tokens else None
        self.calls = 0
        self.base = self._baseline()

    def _idx(self, name: str) -> list[int]:
        return list(range(len(self.eng.sets[name].suffix)))

    def _baseline(self) -> dict[str, Any]:
        """The unedited model's greedy continuation, its logits over it, and its refusal scores."""
        n = self.cfg.kl_tokens
        cont: list[list[int]] = [[] for _ in self._idx("harmless")]
        name = "harmless"
        for step in range(n - 1):
            logits, _, _ = self.eng.run(name, self._idx(name), [])
            assert logits is not None
            for i, t in enumerate(logits.argmax(-1).tolist()):
                cont[i].append(int(t))
            name = f"kl{step + 1}"
            self.eng.continued(name, "harmless", cont)
        self.eng.continued("kl", "harmless", cont)
        logits, _, _ = self.eng.run("kl", self._idx("kl"), [], last_n=n)
        assert logits is not None
        base = {"kl_logits": logits.reshape(len(cont), n, -1), "continuation": cont}
        base["refusal"] = self._refusal("harmful", [])
        base["late"] = self._late([]) if self.cfg.gen_tokens else None
        if "borderline" in self.eng.sets:
            base["over"] = self._refusal("borderline", [])
        return base

    def _refusal(self, name: str, fwd: Any) -> Tensor:
        """Per prompt: > 0 when the first token counts as a refusal (``cfg.readout``)."""
        logits, _, _ = self.eng.run(name, self._idx(name), fwd)
        assert logits is not None
        read = greedy_refusal_margin if self.cfg.readout == "greedy" else refusal_score
        return read(logits, self.refusal_ids).cpu()

    def _late(self, interventions: Sequence[Any]) -> Tensor:
        """Per harmful prompt: 1.0 when ``gen_tokens`` greedy tokens read as a refusal (or partial)
        to ``cfg.gen_judge``, told which answers the token limit cut."""
        done = generate(self.model, self.harmful, interventions, max_new_tokens=self.cfg.gen_tokens,
                        batch_size=self.cfg.batch_size)
        labels = [j.label for j in judge_texts(self.judge, self.harmful, [c.completion for c in done],
                                               [c.finish_reason == "length" for c in done])]
        return torch.tensor([float(refused(x)) for x in labels], dtype=torch.float64)

    def _combine(self, r: Tensor, late: Tensor | None) -> dict[str, float]:
        soft, hard = torch.sigmoid(r), (r > 0).double()
        out = {"refusal_first": float(hard.mean())}
        if late is not None:
            soft, hard = torch.maximum(soft, late), torch.maximum(hard, late)
            out["late_refusal"] = float(((late > 0) & (r <= 0)).double().mean())
        out.update(refusal=float(soft.mean()), refusal_rate=float(hard.mean()))
        return out

    def baseline_scores(self) -> dict[str, float]:
        """The unedited model's refusal (soft and rate) and over-refusal, on the search prompts."""
        out = {**self._combine(self.base["refusal"], self.base["late"]), "kl": 0.0}
        if "over" in self.base:
            out["over_refusal"] = float((self.base["over"] > 0).double().mean())
        return out

    def score(self, edit: Edit) -> dict[str, float | bool]:
        """``refusal`` (a smooth refusal rate: per prompt the sigmoid of the first-token readout,
        or 1 when the generated tokens refuse), ``refusal_rate`` (first token or generated tokens
        refuse), ``refusal_first`` (first token only), ``late_refusal`` (generated tokens only;
        present when the trial generated), ``kl`` (mean per-token KL over the continuation),
        ``over_refusal`` (borderline first-token rate) and ``skipped`` (KL over the ceiling)."""
        fwd = edit.hook_list(self.model)
        self.calls += 1
        n = self.cfg.kl_tokens
        logits, _, _ = self.eng.run("kl", self._idx("kl"), fwd, last_n=n)
        assert logits is not None
        kl = float(multi_token_kl(self.base["kl_logits"], logits.reshape(self.base["kl_logits"].shape)).mean())
        out: dict[str, float | bool] = {"kl": kl, "skipped": kl > self.cfg.kl_ceiling}
        if out["skipped"]:
            out.update(refusal=1.0, refusal_rate=1.0, over_refusal=1.0)
            return out
        r = self._refusal("harmful", fwd)
        gen = (self.cfg.gen_tokens > 0 and float((r > 0).double().mean()) <= self.cfg.gen_below
               and (self.cfg.gen_max_kl is None or kl <= self.cfg.gen_max_kl))
        out.update(self._combine(r, self._late([edit]) if gen else None))
        if "borderline" in self.eng.sets:
            out["over_refusal"] = float((self._refusal("borderline", fwd) > 0).double().mean())
        return out
