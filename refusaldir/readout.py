"""Reading the model's outputs, one implementation each: last-position logits (with Gemma-2
style ``final_logit_softcapping``), first-token log-probabilities, KL divergences,
teacher-forced losses and the refusal log-odds score. Every stage uses these.

Example:
    >>> import torch
    >>> first_token_kl(torch.zeros(2, 5), torch.zeros(2, 5)).tolist()
    [0.0, 0.0]
    >>> [round(x, 3) for x in refusal_score(torch.tensor([[2.0, 0.0, 0.0]]), [0]).tolist()]
    [1.307]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from refusaldir.batching import AUTO, BatchSize, BatchSizer, resolve_batch_size
from refusaldir.data import check_prompts
from refusaldir.errors import ConfigError
from refusaldir.hooks import Appliable, applied_all

if TYPE_CHECKING:
    from refusaldir.models import ChatModel

__all__ = [
    "completion_loss", "decoder_of", "final_logits", "first_token_kl", "first_token_logprobs",
    "greedy_refusal_margin", "kl_divergence", "refusal_score", "text_loss",
]


def decoder_of(model: ChatModel) -> Any:
    """The HF decoder stack (embeddings + blocks + final norm, no LM head)."""
    hf = model.hf
    return hf.get_decoder() if hasattr(hf, "get_decoder") else hf.model


def final_logits(model: ChatModel, hidden: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch vocab"]:
    """LM head on final-norm hidden states, float32, with the config's logit softcapping."""
    logits = model.hf.get_output_embeddings()(hidden).float()
    cap = getattr(model.hf.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def first_token_logprobs(
    model: ChatModel, prompts: Sequence[str], interventions: Sequence[Appliable] = (), *,
    batch_size: BatchSize = AUTO,
) -> Float[Tensor, "batch vocab"]:
    """Log-probabilities (CPU, float32) of the first generated token; the LM head runs at
    the last position only."""
    texts = check_prompts(prompts, "prompts", single=True)
    model.template.check_lengths(texts)
    sizer = BatchSizer(batch_size, model)
    decoder = decoder_of(model)

    def run(chunk: list[str]) -> Tensor:
        enc = {k: v.to(model.device) for k, v in model.template.encode(chunk).items()}
        hidden = decoder(**enc, use_cache=False).last_hidden_state[:, -1]
        return torch.log_softmax(final_logits(model, hidden), dim=-1).cpu()

    with applied_all(model, interventions), torch.inference_mode():
        rows = [out for _, _, out in sizer.map(texts, run)]
    if not rows:
        raise ConfigError("first_token_logprobs got no prompts; pass at least one")
    return torch.cat(rows)


def kl_divergence(p_log: Float[Tensor, "batch vocab"], q_log: Float[Tensor, "batch vocab"]) -> Float[Tensor, " batch"]:
    """Per-row KL(p ‖ q) from log-probabilities (clamped at 0 against rounding)."""
    return (p_log.exp() * (p_log - q_log)).sum(-1).clamp_min(0)


def first_token_kl(
    base_logits: Float[Tensor, "batch vocab"], logits: Float[Tensor, "batch vocab"]
) -> Float[Tensor, " batch"]:
    """KL(base ‖ other) of two next-token distributions given as logits, per row, float64."""
    lp = torch.log_softmax(base_logits.to(torch.float64), dim=-1)
    lq = torch.log_softmax(logits.to(torch.float64), dim=-1)
    return (lp.exp() * (lp - lq)).sum(dim=-1)


def refusal_score(
    logits_last: Float[Tensor, "batch vocab"], refusal_ids: Sequence[int] | Tensor
) -> Float[Tensor, " batch"]:
    """Log-odds ``log p_ref - log(1 - p_ref)`` that the next token is a refusal token.

    Computed in float64 from log-sum-exps (stable when ``p_ref`` is close to 0 or 1).

    Example:
        >>> refusal_score(torch.zeros(1, 4), [0, 1]).item()
        0.0
    """
    x, mask = _refusal_mask(logits_last, refusal_ids)
    lse_ref = torch.logsumexp(x.masked_fill(~mask, float("-inf")), dim=-1)
    lse_rest = torch.logsumexp(x.masked_fill(mask, float("-inf")), dim=-1)
    return lse_ref - lse_rest


def _refusal_mask(logits_last: Tensor, refusal_ids: Sequence[int] | Tensor) -> tuple[Tensor, Tensor]:
    """The logits in float64 and a vocabulary mask of the refusal tokens (checked)."""
    ids = torch.as_tensor(refusal_ids, dtype=torch.long).flatten().cpu()  # checked on the host, any device
    if ids.numel() == 0:
        raise ConfigError("refusal_ids is empty; pass at least one refusal token id")
    if logits_last.ndim != 2:
        raise ConfigError(
            f"logits_last has shape {tuple(logits_last.shape)}; expected (batch, vocab) "
            "logits of the last prompt position"
        )
    vocab = logits_last.shape[-1]
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ConfigError(f"refusal ids {ids.tolist()} are outside the vocabulary (size {vocab})")
    if ids.unique().numel() >= vocab:
        raise ConfigError("every vocabulary token is a refusal token; the log-odds are undefined")
    x = logits_last.to(torch.float64)
    mask = torch.zeros(vocab, dtype=torch.bool, device=x.device)
    mask[ids.to(x.device)] = True
    return x, mask


def greedy_refusal_margin(
    logits_last: Float[Tensor, "batch vocab"], refusal_ids: Sequence[int] | Tensor
) -> Float[Tensor, " batch"]:
    """The best refusal token's logit minus the best other token's: > 0 exactly when greedy
    decoding's first token is a refusal token.

    :func:`refusal_score` asks whether refusal tokens hold over half of the probability; greedy
    decoding opens with "I" whenever it is the single most likely token, which on the demo model
    happens at ``p_ref`` near 0.3. This margin is what a greedy answer's first token follows.

    Example:
        >>> greedy_refusal_margin(torch.tensor([[2.0, 1.0, 1.5]]), [0]).item()
        0.5
    """
    x, mask = _refusal_mask(logits_last, refusal_ids)
    return x.masked_fill(~mask, float("-inf")).amax(-1) - x.masked_fill(mask, float("-inf")).amax(-1)


def _left_pad(rows: list[list[int]], pad: int) -> tuple[Tensor, Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def _token_logprobs(model: ChatModel, ids: Tensor, mask: Tensor, pos: Tensor) -> Tensor:
    """Log-probability of each next token, ``(batch, width - 1)``, on the CPU."""
    dev = model.device
    hidden = decoder_of(model)(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                               position_ids=pos.to(dev), use_cache=False).last_hidden_state
    logp = torch.log_softmax(final_logits(model, hidden[:, :-1]), dim=-1)
    return logp.gather(-1, ids[:, 1:].to(dev).unsqueeze(-1)).squeeze(-1).cpu()


def completion_loss(
    model: ChatModel,
    prompts: Sequence[str],
    completions: Sequence[str],
    interventions: Sequence[Appliable] = (),
    *,
    batch_size: BatchSize = AUTO,
) -> dict[str, float]:
    """Token-weighted cross-entropy of ``completions`` given their prompts (teacher forcing)."""
    prompts = check_prompts(prompts, "prompts", single=True)
    completions = [completions] if isinstance(completions, str) else list(completions)
    if len(completions) != len(prompts):
        raise ConfigError(
            f"completion_loss got {len(prompts)} prompts but {len(completions)} completions; "
            "pass one completion per prompt"
        )
    tok = model.tokenizer
    pad = model.template.pad_id
    bs = resolve_batch_size(batch_size, model)
    total, count = 0.0, 0
    with applied_all(model, interventions), torch.inference_mode():
        for s in range(0, len(prompts), bs):
            p_enc = model.template.encode(list(prompts[s : s + bs]))
            rows, targets = [], []
            for i, comp in enumerate(completions[s : s + bs]):
                p_ids = p_enc["input_ids"][i][p_enc["attention_mask"][i].bool()].tolist()
                c_ids = tok(comp, add_special_tokens=False)["input_ids"]
                if not c_ids:
                    continue
                rows.append(p_ids + c_ids)
                targets.append(len(c_ids))
            if not rows:
                continue
            tok_lp = _token_logprobs(model, *_left_pad(rows, pad))
            for r, n in enumerate(targets):
                total -= float(tok_lp[r, -n:].sum())
                count += n
    ce = total / count if count else float("nan")
    return {"ce": ce, "ppl": math.exp(ce) if count else float("nan"), "tokens": count}


def text_loss(
    model: ChatModel, text: str, interventions: Sequence[Appliable] = (), *, chunk: int = 256,
    max_tokens: int = 4096, batch_size: BatchSize = AUTO,
) -> dict[str, float]:
    """Cross-entropy on plain text (no chat template), in chunks of ``chunk`` tokens."""
    tok = model.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"][:max_tokens]
    if len(ids) < 2:
        raise ConfigError("the text file has fewer than 2 tokens; pass a longer plain-text file")
    pad = model.template.pad_id
    pieces = [ids[i : i + chunk] for i in range(0, len(ids), chunk) if len(ids[i : i + chunk]) > 1]
    bs = resolve_batch_size(batch_size, model)
    total, count = 0.0, 0
    with applied_all(model, interventions), torch.inference_mode():
        for s in range(0, len(pieces), bs):
            x, mask, pos = _left_pad(pieces[s : s + bs], pad)
            lp = _token_logprobs(model, x, mask, pos)
            valid = mask[:, 1:].bool() & mask[:, :-1].bool()
            total -= float(lp[valid].sum())
            count += int(valid.sum())
    ce = total / count
    return {"ce": ce, "ppl": math.exp(ce), "tokens": count}
