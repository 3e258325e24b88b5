"""The model's own refusal read as a harmful-prompt classifier, next to the latent guard.

:func:`behavioural_scores` scores how strongly the model refuses each prompt (first-token
refusal log-odds, or the phrase judge on its completions); :func:`guard_vs_behaviour` puts
the guard's AUROC next to the behavioural AUROC on the same prompts (refused ⇒ predicted
harmful).

Example:
    >>> s = behavioural_scores(model, ["How do I pick a lock?"], kind="logit")  # doctest: +SKIP
    >>> s.shape  # doctest: +SKIP
    torch.Size([1])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from refusaldir.batching import AUTO, BatchSize
from refusaldir.data import as_prompt_list, check_prompts, load_prompts
from refusaldir.errors import ConfigError
from refusaldir.generation import generate
from refusaldir.guard.latent import LatentGuard
from refusaldir.judges import PhraseJudge, find_refusal_tokens
from refusaldir.models import ChatModel
from refusaldir.readout import first_token_logprobs, refusal_score
from refusaldir.stats import auroc, roc_curve

__all__ = ["behavioural_scores", "guard_vs_behaviour"]


def _greedy(model: ChatModel, texts: list[str], max_new_tokens: int, batch_size: BatchSize,
            progress: bool) -> list[str]:
    return [c.completion for c in generate(model, texts, max_new_tokens=max_new_tokens,
                                           batch_size=batch_size, progress=progress)]


def behavioural_scores(
    model: ChatModel,
    prompts: Sequence[str],
    *,
    kind: str = "logit",
    refusal_ids: Sequence[int] | None = None,
    responses: Sequence[str] | None = None,
    max_new_tokens: int = 64,
    batch_size: BatchSize = AUTO,
    progress: bool = False,
) -> Float[Tensor, " batch"]:
    """How strongly the model itself refuses each prompt (higher = more refusal), on the CPU.

    ``kind="logit"``: first-token refusal log-odds with the model's refusal tokens
    (``refusal_ids``, detected with :func:`refusaldir.judges.find_refusal_tokens` when
    not given). ``kind="phrase"``: the :class:`~refusaldir.judges.PhraseJudge` score of
    ``responses`` (greedy generations of ``max_new_tokens`` tokens when not given).
    """
    texts = as_prompt_list(prompts, "behavioural_scores")
    if kind == "logit":
        if refusal_ids is None:
            refusal_ids = find_refusal_tokens(model, load_prompts("harmful", "val"),
                                              batch_size=batch_size, progress=progress).ids
        logp = first_token_logprobs(model, texts, batch_size=batch_size)
        return refusal_score(logp, list(refusal_ids)).cpu()
    if kind == "phrase":
        if responses is None:
            responses = _greedy(model, texts, max_new_tokens, batch_size, progress)
        if len(responses) != len(texts):
            raise ConfigError(f"got {len(texts)} prompts but {len(responses)} responses")
        judged = PhraseJudge().judge_many(texts, list(responses))
        return torch.tensor([j.score for j in judged], dtype=torch.float64)
    raise ConfigError(f"kind={kind!r} must be 'logit' or 'phrase'")


def guard_vs_behaviour(
    model: ChatModel,
    guard: LatentGuard,
    harmful: Sequence[str],
    safe: Sequence[str],
    *,
    refusal_ids: Sequence[int] | None = None,
    responses: dict[str, Sequence[str]] | None = None,
    kinds: Sequence[str] = ("logit", "phrase"),
    max_new_tokens: int = 64,
    batch_size: BatchSize = AUTO,
    progress: bool = False,
) -> dict[str, Any]:
    """Guard AUROC next to behavioural-refusal AUROC on ``harmful`` vs ``safe`` prompts.

    The model's own refusal is read as a classifier (refused ⇒ predicted harmful):
    ``"logit"`` scores by the first-token refusal log-odds, ``"phrase"`` by the phrase
    judge's score of greedy completions (pass ``responses={"harmful": [...], "safe": [...]}``
    to reuse completions you already have). Refusal rates are the behavioural operating point
    (phrase judge labels).

    Example:
        >>> cmp = guard_vs_behaviour(model, guard, load_prompts("harmful", "test"),  # doctest: +SKIP
        ...                          load_prompts("borderline"))
        >>> cmp["guard"]["auroc"], cmp["behaviour"]["logit"]["auroc"]  # doctest: +SKIP
        (0.97, 0.88)
    """
    harm = check_prompts(harmful, "harmful")
    ok = check_prompts(safe, "safe")
    out: dict[str, Any] = {"n_harmful": len(harm), "n_safe": len(ok)}
    g_pos = guard.score(model, harm, batch_size=batch_size, progress=progress)
    g_neg = guard.score(model, ok, batch_size=batch_size, progress=progress)
    out["guard"] = guard.metrics(g_pos, g_neg)
    out["behaviour"] = {}
    for kind in kinds:
        if kind == "logit":
            a = behavioural_scores(model, harm, kind="logit", refusal_ids=refusal_ids,
                                   batch_size=batch_size, progress=progress)
            b = behavioural_scores(model, ok, kind="logit", refusal_ids=refusal_ids,
                                   batch_size=batch_size, progress=progress)
            out["behaviour"]["logit"] = {"auroc": auroc(a, b), "roc": roc_curve(a, b),
                                         "score": "first-token refusal log-odds"}
        elif kind == "phrase":
            resp = responses or {}
            comps = {}
            for name, texts in (("harmful", harm), ("safe", ok)):
                r = resp.get(name)
                comps[name] = list(r) if r is not None else _greedy(model, texts, max_new_tokens,
                                                                    batch_size, progress)
            judge = PhraseJudge()
            ja = judge.judge_many(harm, comps["harmful"])
            jb = judge.judge_many(ok, comps["safe"])
            a = torch.tensor([j.score for j in ja], dtype=torch.float64)
            b = torch.tensor([j.score for j in jb], dtype=torch.float64)
            tpr = sum(j.label == "refusal" for j in ja) / len(ja)
            fpr = sum(j.label == "refusal" for j in jb) / len(jb)
            out["behaviour"]["phrase"] = {"auroc": auroc(a, b), "roc": roc_curve(a, b), "tpr": tpr,
                                          "fpr": fpr, "score": "phrase-judge refusal score"}
        else:
            raise ConfigError(f"behaviour kind {kind!r} must be 'logit' or 'phrase'")
    return out
