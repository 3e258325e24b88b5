"""Chat-template formatting and automatic detection of instruction positions.

Positions are counted from the end of the formatted prompt (``-1`` is the last token before
generation starts), which makes them identical for every prompt in a left-padded batch.

- ``t_inst``: the last token of the instruction itself;
- post-instruction span (``positions``): the template tokens after the instruction up to
  where generation starts, e.g. ``<|im_end|>``, ``\\n``, ``<|im_start|>``, ``assistant``, ``\\n``
  for ChatML.

Both are found by rendering several different instructions and taking the longest common
token suffix, so no template string is hard-coded.

Prompts are checked against the model's context window (``context_length``) before any
forward pass (:meth:`ChatTemplate.check_lengths`): a prompt that does not fit is refused,
or, with ``truncate=True`` (``load_model(..., truncate_prompts=True)``, ``--truncate-prompts``),
its instruction is cut to fit, keeping the template's head and post-instruction tail, with
a :class:`PromptTruncatedWarning`.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from functools import cached_property
from typing import Any

import torch
from jaxtyping import Int

from refusaldir.errors import ConfigError, TemplateError

__all__ = ["ChatTemplate", "PromptTruncatedWarning"]

class PromptTruncatedWarning(RuntimeWarning):
    """Prompts longer than the context window were cut to fit (``truncate_prompts=True``)."""


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
        self,
        tokenizer: Any,
        system_prompt: str | None = None,
        chat_template: str | None = None,
        *,
        context_length: int | None = None,
        truncate: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.truncate = truncate
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
        texts = [self.format(s) for s in _SENTINELS]
        missing = [s for s, t in zip(_SENTINELS, texts) if s not in t]
        if missing:
            raise TemplateError(
                f"the chat template does not put the user's message into the prompt (rendering "
                f"{missing[0]!r} gave {texts[0][:80]!r}); pass a chat template that renders "
                "message['content']"
            )
        tails = [t[t.rindex(s) + len(s):] for s, t in zip(_SENTINELS, texts)]
        if len(set(tails)) > 1:
            raise TemplateError(
                f"the chat template's text after the instruction differs between prompts ({tails[0]!r} "
                f"after {_SENTINELS[0]!r}, {next(t for t in tails if t != tails[0])!r} after another), so "
                "the post-instruction positions would mean different tokens for different prompts; pass "
                "a template whose generation prompt (thinking block included) does not depend on the message"
            )
        renders = [self._ids(t) for t in texts]
        n = 0
        while all(n < len(r) for r in renders) and len({r[-1 - n] for r in renders}) == 1:
            n += 1
        if n == 0:
            raise TemplateError(
                "could not find any template tokens after the instruction: the chat template "
                "ends with the instruction itself. Pass a template that adds a generation prompt"
            )
        return tuple(renders[0][-n:])

    @cached_property
    def n_head(self) -> int:
        """Number of template tokens before the instruction (system prompt, role header)."""
        renders = [self._ids(self.format(s)) for s in _SENTINELS]
        n = 0
        while all(n < len(r) for r in renders) and len({r[n] for r in renders}) == 1:
            n += 1
        return n

    def lengths(self, instructions: Sequence[str]) -> list[int]:
        """Token count of each instruction once formatted with the template."""
        texts = [self.format(i) for i in instructions]
        return [len(r) for r in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def check_lengths(
        self, instructions: Sequence[str], *, reserve: int = 0, what: str = "prompts"
    ) -> list[int]:
        """Check that every formatted instruction fits the context window, before any work.

        ``reserve`` tokens are kept free (``max_new_tokens`` when generating). A prompt that
        does not fit raises :class:`~refusaldir.errors.ConfigError` naming it, unless
        ``truncate`` is set: then a :class:`PromptTruncatedWarning` says how many prompts
        :meth:`encode` will cut. Returns the token counts.

        Example:
            >>> model.template.check_lengths(["Hi"], reserve=64)  # doctest: +SKIP
            [30]
        """
        lengths = self.lengths(instructions)
        budget = self.budget(reserve)
        if budget is None:
            return lengths
        long = [i for i, n in enumerate(lengths) if n > budget]
        if not long:
            return lengths
        room = f"the model's context window of {self.context_length} tokens" + (
            f" less max_new_tokens={reserve}" if reserve else "")
        if not self.truncate:
            i = long[0]
            raise ConfigError(
                f"{what}[{i}] ({instructions[i][:40]!r}…) is {lengths[i]} tokens long with the chat "
                f"template, more than {room} ({budget} tokens)"
                + (f"; {len(long)} prompts are too long" if len(long) > 1 else "")
                + ". Shorten or drop it, or pass truncate_prompts=True to cut the instruction to fit"
            )
        warnings.warn(
            f"{len(long)} of {len(lengths)} {what} are longer than {room}; their instructions "
            f"are cut to fit {budget} tokens (the chat template is kept)",
            PromptTruncatedWarning, stacklevel=2,
        )
        return lengths

    def budget(self, reserve: int = 0) -> int | None:
        """Most prompt tokens that fit with ``reserve`` tokens kept free (``None``: no limit)."""
        if self.context_length is None:
            return None
        budget = int(self.context_length) - int(reserve)
        need = self.n_head + 1 + self.n_post
        if budget < need:
            raise ConfigError(
                f"the model's context window ({self.context_length} tokens) leaves {budget} tokens "
                f"for the prompt after reserving {reserve}, but the chat template alone takes "
                f"{need - 1}; lower max_new_tokens or shorten the system prompt"
            )
        return budget

    def _fit(self, rows: list[list[int]], limit: int | None, instructions: Sequence[str]) -> list[list[int]]:
        """Rows cut to ``limit`` tokens (instruction end dropped, template tail kept) or refused."""
        if limit is None or all(len(r) <= limit for r in rows):
            return rows
        out = []
        for i, r in enumerate(rows):
            if len(r) <= limit:
                out.append(r)
            elif not self.truncate:
                raise ConfigError(
                    f"prompt {instructions[i][:40]!r}… is {len(r)} tokens long with the chat template, "
                    f"more than the {limit} that fit the model's context window; shorten it, or "
                    "pass truncate_prompts=True to cut the instruction to fit"
                )
            else:
                out.append(r[: limit - self.n_post] + r[-self.n_post :])
        return out

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
        """Format and tokenize a batch, left-padded, with ``position_ids`` that skip padding.

        A prompt longer than ``max_length`` (default: the context window) is refused, or with
        ``truncate`` set its instruction is cut, keeping the post-instruction tokens.
        """
        if not instructions:
            raise TemplateError("encode() got no instructions; pass at least one prompt")
        texts = [self.format(i) for i in instructions]
        rows = self._fit(
            [list(r) for r in self.tokenizer(texts, add_special_tokens=False)["input_ids"]],
            max_length if max_length is not None else self.budget(), instructions,
        )
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
