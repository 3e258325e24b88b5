"""``ChatModel``: a loaded chat model — the transformer-lens bridge (hooks), the HF model it
wraps, its tokenizer and the chat template with detected positions.

Example:
    >>> from refusaldir import load_model  # doctest: +SKIP
    >>> model = load_model("smollm2")  # doctest: +SKIP
    >>> model.n_layers, model.d_model, model.template.positions  # doctest: +SKIP
    (30, 576, [-5, -4, -3, -2, -1])
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from refusaldir.models.templates import ChatTemplate

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

__all__ = ["ChatModel", "cache_dir"]


def cache_dir() -> Path:
    """Folder for dequantized model caches (``$REFUSALDIR_CACHE`` or ``~/.cache/refusaldir``)."""
    env = os.environ.get("REFUSALDIR_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "refusaldir"


@dataclass
class ChatModel:
    """A loaded chat model: the bridge (hooks), the HF model it wraps, and its tokenizer.

    Example:
        >>> model = load_model("smollm2")  # doctest: +SKIP
        >>> model.n_layers, model.d_model  # doctest: +SKIP
        (30, 576)
    """

    bridge: TransformerBridge
    tokenizer: Any
    spec: str
    weights_hash: str
    revision: str | None = None
    system_prompt: str | None = None
    chat_template: str | None = None
    _template: ChatTemplate | None = field(default=None, repr=False)

    @property
    def hf(self) -> Any:
        """The underlying Hugging Face ``PreTrainedModel`` (same object the bridge hooks)."""
        return self.bridge.original_model

    @property
    def n_layers(self) -> int:
        return int(self.bridge.cfg.n_layers)

    @property
    def d_model(self) -> int:
        return int(self.bridge.cfg.d_model)

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    @property
    def template(self) -> ChatTemplate:
        """The chat template with detected instruction/post-instruction positions."""
        if self._template is None:
            self._template = ChatTemplate(
                self.tokenizer, system_prompt=self.system_prompt, chat_template=self.chat_template
            )
        return self._template

    def describe(self) -> dict[str, Any]:
        """Facts about the model for metadata and reports."""
        return {
            "spec": self.spec,
            "architecture": type(self.hf).__name__,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "n_params": int(sum(p.numel() for p in self.hf.parameters())),
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "weights_hash": self.weights_hash,
            "revision": self.revision,
        }
