"""Chat-template formatting and automatic detection of instruction positions.

Positions are counted from the end of the formatted prompt (``-1`` is the last token before
generation starts), which makes them identical for every prompt in a left-padded batch.

- ``t_inst``: the last token of the instruction itself;
- post-instruction span (``positions``): the template tokens after the instruction up to
  where generation starts, e.g. ``<|im_end|>``, ``\\n``, ``<|im_start|>``, ``assistant``, ``\\n``
  for ChatML.

Both are found by rendering several different instructions and taking the longest common
token suffix, so no template string is hard-coded.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from functools import cached_property
from typing import Any

import torch
from jaxtyping import Int

from refusaldir.errors import TemplateError

_SENTINELS = (
    "Summarise the plot of a film",
    "List three prime numbers?",
    "Describe a quiet morning walk.",
)


class ChatTemplate:
    """Formats instructions with a tokenizer's chat template and knows the key positions.

    Example:
        >>> tpl = ChatTemplate(tokenizer)  # doctest: +SKIP
        >>> tpl.positions, tpl.t_inst  # doctest: +SKIP
        ([-5, -4, -3, -2, -1], -6)
        >>> batch = tpl.encode(["How do I bake bread?"])  # doctest: +SKIP
    """

    def __init__(
        self, tokenizer: Any, system_prompt: str | None = None, chat_template: str | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        if not self.chat_template:
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise TemplateError(
                f"tokenizer {name!r} has no chat template; pass one with "
                "load_model(..., chat_template=JINJA_STRING) or `--chat-template FILE`"
            )

    def format(self, instruction: str) -> str:
        """Render one user instruction followed by the generation prompt."""
        messages = []
        if self.system_prompt is not None:
            messages.append({"role": "system", "content": self.system_prompt})
        messages.append({"role": "user", "content": instruction})
        try:
            return self.tokenizer.apply_chat_template(
                messages,
                chat_template=self.chat_template,
                tokenize=False,
                add_generation_prompt=True,
            )
        except Exception as exc:  # jinja raises TemplateError subclasses of its own
            raise TemplateError(
                f"the chat template failed to render instruction {instruction[:60]!r}: {exc}. "
                "If it rejects system messages, load the model with system_prompt=None"
            ) from exc

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @cached_property
    def post_instruction_ids(self) -> tuple[int, ...]:
        """Token ids of the template after the instruction (shared by every prompt)."""
        renders = [self._ids(self.format(s)) for s in _SENTINELS]
        n = 0
        while all(n < len(r) for r in renders) and len({r[-1 - n] for r in renders}) == 1:
            n += 1
        if n == 0:
            raise TemplateError(
                "could not find any template tokens after the instruction: the chat template "
                "ends with the instruction itself. Pass a template that adds a generation prompt"
            )
        return tuple(renders[0][-n:])

    @property
    def pad_id(self) -> int:
        """Id used for left padding (masked out): the pad token, else EOS, else 0."""
        for cand in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if cand is not None:
                return int(cand)
        return 0

    @property
    def n_post(self) -> int:
        return len(self.post_instruction_ids)

    @property
    def positions(self) -> list[int]:
        """Post-instruction positions, counted from the end (``-n_post`` … ``-1``)."""
        return list(range(-self.n_post, 0))

    @property
    def t_inst(self) -> int:
        """Position (from the end) of the last instruction token."""
        return -self.n_post - 1

    @property
    def post_instruction_tokens(self) -> list[str]:
        return [self.tokenizer.decode([i]) for i in self.post_instruction_ids]

    @cached_property
    def hash(self) -> str:
        """sha256 of the template text, system prompt and detected post-instruction ids."""
        blob = json.dumps(
            {
                "template": self.chat_template,
                "system_prompt": self.system_prompt,
                "post_instruction_ids": list(self.post_instruction_ids),
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def encode(
        self, instructions: Sequence[str], max_length: int | None = None
    ) -> dict[str, Int[torch.Tensor, "batch seq"]]:
        """Format and tokenize a batch, left-padded, with ``position_ids`` that skip padding."""
        if not instructions:
            raise TemplateError("encode() got no instructions; pass at least one prompt")
        texts = [self.format(i) for i in instructions]
        rows = self.tokenizer(
            texts, add_special_tokens=False, truncation=max_length is not None, max_length=max_length,
        )["input_ids"]
        # Left-pad by hand: the tokenizer (the caller's object) is never modified, and
        # needs no pad token of its own.
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            if r:
                ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
                mask[i, width - len(r):] = 1
        post = torch.tensor(self.post_instruction_ids, dtype=ids.dtype)
        bad = (ids[:, -self.n_post :] != post).any(dim=1)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise TemplateError(
                f"instruction {instructions[i][:60]!r} does not end with the template's "
                f"post-instruction tokens {self.post_instruction_tokens}; its last characters "
                "merged with the template. Strip trailing whitespace or special characters"
            )
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        return {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids}
