"""Where a model's residual stream is: the hook points every stage reads and writes, checked
once when the model loads, so an architecture without them fails with one clear error before
any capture.

Every block must expose ``hook_resid_pre``, a token-mixer output (``hook_attn_out``, or for
the linear-attention layers of hybrid models such as Qwen3.5 ``linear_attn.hook_out``) and an
MLP output (``hook_mlp_out``). A pure state-space model (Mamba) has neither sublayer output,
so ablation and weight orthogonalization have nothing to act on: it is refused by name.

Example:
    >>> mixer_out_names(3)
    ('blocks.3.hook_attn_out', 'blocks.3.linear_attn.hook_out')
"""

from __future__ import annotations

from typing import Any

from refusaldir.errors import ModelLoadError

__all__ = ["MIXER_OUT_ALIASES", "check_residual_stream", "has_recurrent_layers", "mixer_out_names"]

#: Hook names (after ``blocks.<layer>.``) that carry a token mixer's write into the residual
#: stream, in order of preference.
MIXER_OUT_ALIASES = ("hook_attn_out", "linear_attn.hook_out")


def mixer_out_names(layer: int) -> tuple[str, ...]:
    """The hook names that may carry layer ``layer``'s attention (token-mixer) output."""
    return tuple(f"blocks.{layer}.{a}" for a in MIXER_OUT_ALIASES)


def check_residual_stream(bridge: Any, hf: Any) -> None:
    """Raise :class:`~refusaldir.errors.ModelLoadError` naming the family when a block lacks
    its residual-stream input, its token-mixer output or its MLP output hook."""
    names = set(bridge.hook_dict)
    n = int(bridge.cfg.n_layers)
    for layer in range(n):
        missing = []
        if f"blocks.{layer}.hook_resid_pre" not in names:
            missing.append("the residual stream input (hook_resid_pre)")
        if not any(a in names for a in mixer_out_names(layer)):
            missing.append("an attention output (hook_attn_out)")
        if f"blocks.{layer}.hook_mlp_out" not in names:
            missing.append("an MLP output (hook_mlp_out)")
        if missing:
            family = getattr(hf.config, "model_type", None) or type(hf).__name__
            raise ModelLoadError(
                f"{type(hf).__name__} (model family {family!r}) has no residual stream where "
                f"refusaldir reads and edits it: block {layer} of {n} has no {' and no '.join(missing)}. "
                "Refusal directions need transformer blocks that add attention and MLP outputs to a "
                "residual stream (state-space blocks such as Mamba do not); use a transformer "
                "chat model (Llama, Qwen, Gemma, Mistral, Phi-3, OLMo 2, …)"
            )


def has_recurrent_layers(hf: Any) -> bool:
    """Whether some layers carry a recurrent state instead of a KV cache (Qwen3.5's linear
    attention): such a cache cannot be copied across a batch, nor take padding in the middle
    of a sequence, so shared-prefix caching is off for them."""
    cfg = hf.config.get_text_config() if hasattr(hf.config, "get_text_config") else hf.config
    kinds = set(getattr(cfg, "layer_types", None) or [])
    return bool(kinds - {"full_attention", "sliding_attention", "chunked_attention"})
