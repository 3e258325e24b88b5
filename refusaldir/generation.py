"""Batched chat generation, with or without interventions, as plain records.

Prompts are formatted with the model's chat template, left-padded and run through
``model.hf.generate`` (KV cache on, greedy by default; see :func:`refusaldir.hooks.bridge_kv_cache` for
the cache work-around the bridge needs under transformers 5). Generation stops at every stop token:
the generation config's EOS id(s), the tokenizer's EOS token, and the template's end-of-turn
token (e.g. ``<|im_end|>``), so a completion never runs into an invented next turn.

Example:
    >>> from refusaldir import load_model  # doctest: +SKIP
    >>> from refusaldir.generation import generate  # doctest: +SKIP
    >>> model = load_model("demo")  # doctest: +SKIP
    >>> [c.completion for c in generate(model, ["Name a prime number."], max_new_tokens=8)]  # doctest: +SKIP
    ['2 is a prime number.']
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Int
from torch import Tensor

from refusaldir.batching import AUTO, BatchSize, BatchSizer
from refusaldir.data import check_prompts
from refusaldir.errors import ConfigError
from refusaldir.hooks import applied_all, bridge_kv_cache
from refusaldir.models import stop_token_ids
from refusaldir.progress import progress_bar
from refusaldir.steer import ConditionalSteering, Intervention

if TYPE_CHECKING:
    from refusaldir.models import ChatModel

__all__ = ["Completion", "generate", "stop_token_ids"]


@dataclass
class Completion:
    """One prompt and what the model wrote.

    ``completion_tokens`` counts generated tokens before the stop token; ``finish_reason`` is
    ``"stop"`` (a stop token was produced) or ``"length"`` (``max_new_tokens`` reached).
    ``triggered`` is the conditional-steering decision for this prompt (``None`` when no
    conditional intervention was active).
    """

    prompt: str
    completion: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    interventions: list[dict[str, Any]] = field(default_factory=list)
    triggered: bool | None = None
    detector_score: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _split(
    row: Int[Tensor, " new"], stops: set[int]
) -> tuple[list[int], str]:
    toks = row.tolist()
    for i, t in enumerate(toks):
        if t in stops:
            return toks[:i], "stop"
    return toks, "length"


def _cuda_devices(model: ChatModel) -> list[int]:
    dev = model.device
    return [dev.index or 0] if dev.type == "cuda" else []


def generate(
    model: ChatModel,
    prompts: Sequence[str],
    interventions: Sequence[Intervention] = (),
    *,
    max_new_tokens: int = 64,
    batch_size: BatchSize = AUTO,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    sort_by_length: bool = True,
    progress: bool = False,
) -> list[Completion]:
    """Generate a completion for each instruction, in input order.

    Greedy by default (``do_sample=True`` samples with ``temperature``/``top_p`` from an RNG
    seeded with ``seed``; the caller's RNG state is restored afterwards); only these settings are used, not sampling defaults from
    the model's own generation config. Prompts are batched by token length (less padding;
    results are returned in input order); ``batch_size="auto"`` halves the batch on
    out-of-memory. ``interventions`` are entered once around all
    batches and compose in order.

    Example:
        >>> from refusaldir.steer.interventions import Ablation  # doctest: +SKIP
        >>> out = generate(model, ["How do I pick a lock?"], [Ablation(direction)])  # doctest: +SKIP
        >>> out[0].finish_reason, out[0].interventions[0]["type"]  # doctest: +SKIP
        ('stop', 'ablation')
    """
    from transformers import GenerationConfig

    texts = check_prompts(prompts, "prompts", single=True)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) \
            or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens!r} must be a whole number >= 1")
    sizer = BatchSizer(batch_size, model, kind="generate")
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ConfigError(f"{name}={value!r} must be a finite number")
    if do_sample and not (temperature > 0 and 0 < top_p <= 1):
        raise ConfigError(f"temperature={temperature} must be > 0 and top_p={top_p} in (0, 1]")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ConfigError(f"seed={seed!r} must be a whole number")
    template = model.template
    lengths = template.check_lengths(texts, reserve=int(max_new_tokens))
    budget = template.budget(int(max_new_tokens))
    stops = stop_token_ids(model)
    stop_set = set(stops)
    tok = model.tokenizer
    pad = model.template.pad_id
    gen_kw: dict[str, Any] = dict(
        max_new_tokens=int(max_new_tokens), do_sample=bool(do_sample), eos_token_id=stops,
        pad_token_id=pad, use_cache=True,
    )
    if do_sample:
        gen_kw.update(temperature=float(temperature), top_p=float(top_p), top_k=0)
    config = GenerationConfig(**gen_kw)
    records = [i.to_dict() for i in interventions]

    order = list(range(len(texts)))
    if sort_by_length:
        order.sort(key=lambda i: lengths[i])
    results: list[Completion | None] = [None] * len(texts)
    bar = progress_bar(progress)
    # bridge_kv_cache: transformer-lens 4.x bridges ignore transformers 5's `cache=` kwarg and
    # would leave the KV cache empty (every decode step attending to itself only).
    # fork_rng: a sampling seed must not change the caller's global RNG state.
    with bar, applied_all(model, interventions) as applied, bridge_kv_cache(), \
            torch.inference_mode(), torch.random.fork_rng(devices=_cuda_devices(model)):
        if do_sample:
            torch.manual_seed(seed)
        conditional = [a for a in applied if isinstance(a.intervention, ConditionalSteering)]
        task = bar.add_task("generate", total=len(texts))

        def run(idx: list[int]) -> Tensor:
            enc = {k: v.to(model.device)
                   for k, v in template.encode([texts[i] for i in idx], max_length=budget).items()}
            for a in conditional:
                a.mask = a.scores = None
            out = model.hf.generate(**enc, generation_config=config)
            n_prompt = enc["attention_mask"].sum(dim=1).cpu()
            return torch.cat([n_prompt[:, None], out[:, enc["input_ids"].shape[1] :].cpu()], dim=1)

        for _, idx, rows in sizer.map(order, run):
            for row, i in enumerate(idx):
                ids, reason = _split(rows[row, 1:], stop_set)
                trig: bool | None = None
                score: float | None = None
                if conditional:
                    trig = any(bool(a.mask[row]) for a in conditional if a.mask is not None)
                    first = conditional[0].scores
                    score = float(first[row]) if first is not None else None
                results[i] = Completion(
                    prompt=texts[i],
                    completion=tok.decode(ids, skip_special_tokens=True),
                    prompt_tokens=int(rows[row, 0]),
                    completion_tokens=len(ids),
                    finish_reason=reason,
                    interventions=records,
                    triggered=trig,
                    detector_score=score,
                )
            bar.advance(task, len(idx))
    return [r for r in results if r is not None]
