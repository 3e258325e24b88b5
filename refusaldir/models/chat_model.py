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

from refusaldir.errors import ConfigError
from refusaldir.models.templates import ChatTemplate

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

__all__ = ["ChatModel", "cache_dir", "input_device", "stop_token_ids"]


def cache_dir() -> Path:
    """Folder for dequantized model caches (``$REFUSALDIR_CACHE`` or ``~/.cache/refusaldir``)."""
    env = os.environ.get("REFUSALDIR_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "refusaldir"


def input_device(hf: Any) -> torch.device:
    """Where a model's inputs go: its embedding's device, or for an embedding offloaded by
    accelerate (``meta``), the first accelerator in ``hf_device_map`` (else the CPU)."""
    emb = hf.get_input_embeddings().weight
    if emb.device.type != "meta":
        return torch.device(emb.device)
    mapped = [d for d in getattr(hf, "hf_device_map", {}).values() if d not in ("cpu", "disk")]
    if not mapped:
        return torch.device("cpu")
    first = mapped[0]
    return torch.device(f"cuda:{first}" if isinstance(first, int) else str(first))


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
    truncate_prompts: bool = False
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
        """Where inputs go (the embedding's device; its execution device when offloaded)."""
        return input_device(self.hf)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    @property
    def context_length(self) -> int | None:
        """Most tokens the model takes (its config's ``max_position_embeddings`` or the like,
        else the tokenizer's ``model_max_length`` when that is a real limit; ``None``: unknown)."""
        cfg = self.hf.config
        text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        for c in (text_cfg, cfg):
            for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
                v = getattr(c, name, None)
                if isinstance(v, int) and not isinstance(v, bool) and 0 < v < 10**8:
                    return v
        v = getattr(self.tokenizer, "model_max_length", None)
        return v if isinstance(v, int) and 0 < v < 10**8 else None

    @property
    def template(self) -> ChatTemplate:
        """The chat template with detected instruction/post-instruction positions; it checks
        prompts against :attr:`context_length` and truncates them when
        :attr:`truncate_prompts` is set."""
        if self._template is None:
            self._template = ChatTemplate(
                self.tokenizer, system_prompt=self.system_prompt, chat_template=self.chat_template,
                context_length=self.context_length,
            )
        self._template.truncate = bool(self.truncate_prompts)
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


def stop_token_ids(model: ChatModel) -> list[int]:
    """Every token id that ends a turn: generation-config EOS id(s), the tokenizer's EOS and
    the chat template's end-of-turn token when it is a special token."""
    ids: list[int] = []

    def extend(x: Any) -> None:
        if x is None:
            return
        for i in x if isinstance(x, (list, tuple, set)) else [x]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))

    extend(getattr(model.hf.generation_config, "eos_token_id", None))
    extend(getattr(model.hf.config, "eos_token_id", None))
    tok = model.tokenizer
    extend(tok.eos_token_id)
    try:
        end_of_turn = model.template.post_instruction_ids[0]
    except Exception:  # noqa: BLE001 - a template without post-instruction tokens has no turn end
        end_of_turn = None
    if end_of_turn is not None and int(end_of_turn) in _special_ids(tok):
        extend(end_of_turn)
    if not ids:
        raise ConfigError(
            f"{model.spec} defines no EOS token; set tokenizer.eos_token or "
            "model.hf.generation_config.eos_token_id"
        )
    return ids


def _special_ids(tok: Any) -> set[int]:
    """Ids of the tokenizer's special tokens: the named ones and every added token marked
    special (GGUF tokenizers such as Gemma's list ``<end_of_turn>`` only there)."""
    ids = {int(i) for i in getattr(tok, "all_special_ids", [])}
    decoder = getattr(tok, "added_tokens_decoder", None) or {}
    return ids | {int(i) for i, t in decoder.items() if getattr(t, "special", False)}
