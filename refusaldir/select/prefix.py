"""Tokenised prompt sets for the forward engine: the shared prefix (e.g. the system prompt),
left-padded suffix batches whose position ids continue it, and the prefix KV-cache stores.

Example:
    >>> ids = left_pad_suffixes([[5, 6], [7]], prefix_len=0, pad_id=0, device="cpu")
    >>> ids["input_ids"].tolist(), ids["position_ids"].tolist()
    ([[5, 6], [0, 7]], [[0, 1], [0, 0]])
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Int
from torch import Tensor

from refusaldir.models import has_recurrent_layers

if TYPE_CHECKING:
    from refusaldir.models import ChatModel

__all__ = ["PrefixBanks", "PromptRows", "TokenizedSets", "left_pad_suffixes", "new_kv_cache"]

#: Prefix KV caches kept per intervention key (oldest dropped first).
MAX_PREFIX_CACHES = 256
#: Batched prefix caches (one row per intervention) kept.
MAX_BANKS = 8


@dataclass
class PromptRows:
    """One prompt set: its texts and, per prompt, the token ids after the shared prefix."""

    name: str
    texts: list[str]
    suffix: list[list[int]]


class TokenizedSets:
    """Prompt sets encoded with the chat template, split into a shared prefix and suffixes.

    The prefix is everything before the first token that differs between any two prompts
    (of every set), but never ``t_inst`` and the template tail; shorter than 2 tokens it is
    not shared (``prefix_len == 0``).
    """

    def __init__(self, model: ChatModel, sets: dict[str, list[str]], *, share_prefix: bool) -> None:
        tpl = model.template
        rows: dict[str, list[list[int]]] = {}
        for name, texts in sets.items():
            enc = tpl.encode(texts)
            rows[name] = [r[m.bool()].tolist() for r, m in zip(enc["input_ids"], enc["attention_mask"])]
        everything = [r for rs in rows.values() for r in rs]
        k = 0
        if share_prefix and not has_recurrent_layers(model.hf):  # a recurrent state cannot be shared
            shortest = min(len(r) for r in everything)
            limit = shortest - tpl.n_post - 1  # keep t_inst and the template tail in the suffix
            first = everything[0]
            while k < limit and all(r[k] == first[k] for r in everything):
                k += 1
            if k < 2:
                k = 0
        self.prefix_len = k
        self.prefix_ids: Int[Tensor, "1 prefix"] | None = (
            torch.tensor([everything[0][:k]], dtype=torch.long) if k else None)
        self.sets = {n: PromptRows(n, list(sets[n]), [r[k:] for r in rs]) for n, rs in rows.items()}


def left_pad_suffixes(
    seqs: Sequence[Sequence[int]], *, prefix_len: int, pad_id: int, device: torch.device | str,
) -> dict[str, Tensor]:
    """Suffixes left-padded after a shared prefix of ``prefix_len`` tokens, on ``device``.

    ``attention_mask`` covers the prefix too (its KV cache comes from elsewhere);
    ``position_ids`` continue the prefix.
    """
    n = len(seqs)
    width = max(len(q) for q in seqs)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for r, q in enumerate(seqs):
        ids[r, width - len(q):] = torch.tensor(list(q), dtype=torch.long)
        mask[r, width - len(q):] = 1
    pos = prefix_len + (mask.cumsum(-1) - 1).clamp(min=0)
    full_mask = torch.cat([torch.ones((n, prefix_len), dtype=torch.long), mask], dim=1)
    return {"input_ids": ids.to(device), "attention_mask": full_mask.to(device),
            "position_ids": pos.to(device)}


def new_kv_cache(config: Any) -> Any:
    """An empty ``transformers.DynamicCache`` (``config=`` where the version takes it)."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=config)
    except TypeError:
        return DynamicCache()


class PrefixBanks:
    """Prefix KV caches: one per intervention key, and batched ones (one row per key)."""

    def __init__(self) -> None:
        self.single: dict[Hashable, Any] = {}
        self.banks: list[tuple[dict[Hashable, int], Any]] = []

    def get(self, key: Hashable) -> Any | None:
        return self.single.get(key)

    def put(self, key: Hashable, cache: Any) -> None:
        if len(self.single) > MAX_PREFIX_CACHES:
            self.single.pop(next(iter(self.single)))
        self.single[key] = cache

    def find(self, keys: Sequence[Hashable]) -> tuple[Any, list[int]] | None:
        """A batched cache holding every key (the newest first), with each key's row."""
        for index, cache in reversed(self.banks):
            if all(k in index for k in keys):
                return cache, [index[k] for k in keys]
        return None

    def add(self, keys: Sequence[Hashable], cache: Any) -> None:
        self.banks.append(({key: r for r, key in enumerate(keys)}, cache))
        del self.banks[:-MAX_BANKS]
