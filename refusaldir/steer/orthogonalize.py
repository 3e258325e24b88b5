"""Weight orthogonalization: bake directional ablation into a plain Hugging Face model.

For a unit direction ``u`` every matrix that writes into the residual stream is projected:
the input embedding ``E ← E - (E u) uᵀ``, each attention output ``W_O ← W_O - u (uᵀ W_O)`` and
each MLP output ``W_down ← W_down - u (uᵀ W_down)`` (biases ``b ← b - (b·u) u``). The residual
stream then never holds a component along ``u``, which is what :class:`~refusaldir.steer.
Ablation` does with hooks at every layer. The unembedding is not edited (the
hook ablation never touches it either): when the input and output embeddings are tied they
are untied first, and only the input embedding is edited.

The result is a normal ``transformers`` model on the source model's device and dtype (the
edit itself is computed in float64 and cast back): :func:`refusaldir.steer.save_orthogonalized`
writes it as a folder that ``AutoModelForCausalLM.from_pretrained`` loads without refusaldir.

Example:
    >>> import refusaldir as rd  # doctest: +SKIP
    >>> model, ds = rd.load_model("demo"), rd.DirectionSet.load("runs/demo")  # doctest: +SKIP
    >>> ortho = orthogonalize(model, ds.refusal_direction(12, -1))  # doctest: +SKIP
    >>> ids = ortho.generate(**model.template.encode(["How do I pick a lock?"]), max_new_tokens=8)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from refusaldir.directions import Direction
from refusaldir.errors import ConfigError
from refusaldir.steer.directions_io import as_direction, check_direction

if TYPE_CHECKING:
    from refusaldir.models import ChatModel

__all__ = [
    "ATTN_OUT_NAMES", "MLP_OUT_NAMES", "POST_NORM_NAMES", "Writer", "edited_copy",
    "edited_parameters", "orthogonalize", "orthogonalize_with_info", "plain_copy", "project_along",
    "residual_writers", "work_dtype",
]

ATTN_OUT_NAMES = ("o_proj", "out_proj", "dense", "c_proj")
MLP_OUT_NAMES = ("down_proj", "fc2", "c_proj", "dense_4h_to_h", "w2")
# Norms applied to a sublayer's output before it joins the residual stream break the
# equivalence between weight editing and activation ablation (e.g. Gemma 2/3).
POST_NORM_NAMES = ("post_feedforward_layernorm", "pre_feedforward_layernorm", "post_attention_norm",
                   "post_mlp_norm", "post_ffw_norm")


def _strip(name: str) -> str:
    return name.replace("._original_component", "").replace("_original_component.", "")


def plain_copy(model: ChatModel) -> Any:
    """A fresh ``transformers`` model (no bridge wrappers) with a copy of ``model``'s weights.

    The input model is not modified: its tensors are copied, never shared.
    """
    from transformers.initialization import no_init_weights

    hf = model.hf
    config = copy.deepcopy(hf.config)
    try:
        with no_init_weights(), torch.device(model.device):
            clean = type(hf)._from_config(config, dtype=model.dtype)
    except Exception as exc:  # noqa: BLE001 - report any construction failure uniformly
        raise ConfigError(
            f"could not rebuild {type(hf).__name__} from its config to hold the edited weights "
            f"({exc}); orthogonalize needs a standard transformers architecture"
        ) from exc
    src = {_strip(k): v for k, v in _full_state_dict(hf).items()}
    src_buffers = {_strip(k): v for k, v in hf.named_buffers()}
    params = dict(clean.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, p in params.items():
            if name not in src:
                raise ConfigError(
                    f"weight {name} of {type(hf).__name__} was not found in the loaded model; "
                    "orthogonalize cannot copy this architecture"
                )
            p.copy_(src[name])
        for name, b in clean.named_buffers():
            if name in src_buffers and src_buffers[name].shape == b.shape:
                b.data = src_buffers[name].detach().clone()  # keeps the source's dtype (RoPE: fp32)
    clean.generation_config = copy.deepcopy(hf.generation_config)
    return clean.eval()


def _full_state_dict(hf: Any) -> dict[str, Tensor]:
    """The model's weights; those accelerate offloaded (``meta`` placeholders) are read back
    from CPU memory or disk."""
    state: dict[str, Tensor] = hf.state_dict(keep_vars=False)
    if not any(t.device.type == "meta" for t in state.values()):
        return state
    from accelerate.utils.modeling import get_state_dict_offloaded_model

    full: dict[str, Tensor] = get_state_dict_offloaded_model(hf)
    return full


def _linear(module: Any, names: tuple[str, ...], d_model: int) -> Any:
    for n in names:
        lin = getattr(module, n, None)
        if lin is not None and hasattr(lin, "weight") and lin.weight.shape[0] == d_model:
            return lin
    return None


def _is_tied(clean: Any) -> bool:
    out = clean.get_output_embeddings()
    inp = clean.get_input_embeddings()
    if out is None or inp is None:
        return False
    return out.weight is inp.weight or out.weight.data_ptr() == inp.weight.data_ptr()


def _untie(clean: Any) -> None:
    """Give the output embedding its own copy of the weights and record that in the config."""
    out = clean.get_output_embeddings()
    out.weight = torch.nn.Parameter(out.weight.detach().clone(), requires_grad=False)
    for cfg in (clean.config, getattr(clean.config, "text_config", None)):
        if cfg is not None and hasattr(cfg, "tie_word_embeddings"):
            cfg.tie_word_embeddings = False
    if hasattr(clean, "_tied_weights_keys") and isinstance(clean._tied_weights_keys, dict):
        clean._tied_weights_keys = {}


def work_dtype(device: torch.device) -> torch.dtype:
    """The dtype the weight edit is computed in: float64, or float32 where the device has no
    float64 (Apple MPS). The result is cast back to each weight's own dtype."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


@torch.no_grad()
def project_along(
    t: Tensor,
    out_axis: int,
    basis: Float[Tensor, "d_model k"],
    weight: float = 1.0,
    *,
    preserve_norm: bool = False,
    chunk: int = 8192,
) -> None:
    """Remove ``weight`` × the component along the orthonormal ``basis`` from every vector
    ``t`` writes into the residual stream, in place.

    ``out_axis`` is the axis of ``t`` that indexes ``d_model`` (``0`` for a ``Linear`` weight
    ``(d_model, d_in)``, ``1`` for an embedding ``(vocab, d_model)``, any axis of a fused
    expert tensor); every index of the other axes is one input unit, and the vector it writes
    is ``m ← m - weight · Q Qᵀ m``. ``preserve_norm`` rescales each such vector back to its
    norm before the edit (a per-input-unit scale, so with ``weight=1`` the result is still
    exactly orthogonal to the basis; renormalising the ``d_model`` rows instead would not be).
    Computed in ``basis``'s dtype, block by block, on ``t``'s device; cast back to ``t``'s dtype.
    """
    q = basis.to(device=t.device)
    m = t.movedim(out_axis, -1)
    flat = m.reshape(-1, m.shape[-1]) if m.is_contiguous() else None
    view = flat if flat is not None else m
    rows = view.shape[0]
    for s in range(0, rows, chunk):
        block = view[s : s + chunk].to(q.dtype)
        before = block.norm(dim=-1, keepdim=True) if preserve_norm else None
        block = block - weight * (block @ q) @ q.T
        if before is not None:
            block = block * (before / block.norm(dim=-1, keepdim=True).clamp_min(1e-30))
        view[s : s + chunk] = block.to(t.dtype)


@dataclass(frozen=True, eq=False)
class Writer:
    """One parameter that writes into the residual stream (see :func:`residual_writers`).

    ``point`` is ``"embed"`` (``layer=-1``), ``"attn_out"`` or ``"mlp_out"``; ``out_axis`` is
    the axis of ``weight`` that indexes ``d_model``; ``gain`` is the effective gain of a norm
    applied to the writer's output before it joins the residual stream (``None``: none).
    """

    name: str
    layer: int
    point: str
    weight: Tensor
    out_axis: int
    bias: Tensor | None = None
    gain: Tensor | None = None

    def project(self, basis: Float[Tensor, "d_model k"], weight: float = 1.0, *,
                preserve_norm: bool = False) -> None:
        """Project this writer's weight (and bias) off ``basis`` in place (see :func:`project_along`)."""
        project_along(self.weight, self.out_axis, basis, weight, preserve_norm=preserve_norm)
        if self.bias is not None:
            project_along(self.bias.unsqueeze(0), 1, basis, weight)

    def vectors(self) -> Float[Tensor, "units d_model"]:
        """What each input unit writes (a copy, float32), e.g. to check ``rᵀW = 0``."""
        return self.weight.detach().movedim(self.out_axis, -1).reshape(-1, self.weight.shape[self.out_axis]).float()


def residual_writers(clean: Any) -> list[Writer]:
    """Every parameter of a plain ``transformers`` model that writes into the residual stream:
    the input embedding, then per layer the attention output and the MLP output projections.

    Raises :class:`~refusaldir.errors.ConfigError` for architectures whose writes this does not
    recognise (a weight edit there would not equal directional ablation).
    """
    emb = clean.get_input_embeddings()
    d_model = emb.weight.shape[1]
    by_id = {id(p): n for n, p in clean.named_parameters(remove_duplicate=False)}
    writers = [Writer(by_id.get(id(emb.weight), "embed_tokens.weight").removesuffix(".weight"), -1, "embed",
                      emb.weight, 1)]
    for i, layer in enumerate(_decoder_layers(clean)):
        bad = [n for n in POST_NORM_NAMES if getattr(layer, n, None) is not None]
        if bad:
            raise ConfigError(
                f"{type(clean).__name__} normalises sublayer outputs ({bad[0]}) before adding them "
                "to the residual stream, so weight orthogonalization would not equal directional "
                "ablation; use refusaldir.steer.ablate (hooks) for this model"
            )
        attn = getattr(layer, "self_attn", None) or getattr(layer, "attn", None)
        mlp = getattr(layer, "mlp", None) or getattr(layer, "feed_forward", None)
        o = _linear(attn, ATTN_OUT_NAMES, d_model) if attn is not None else None
        down = _linear(mlp, MLP_OUT_NAMES, d_model) if mlp is not None else None
        if o is None or down is None:
            raise ConfigError(
                f"layer {i} of {type(clean).__name__} has no recognised attention output "
                f"({'/'.join(ATTN_OUT_NAMES)}) or MLP output ({'/'.join(MLP_OUT_NAMES)}) "
                "projection (mixture-of-experts layers are not supported); use hook ablation"
            )
        for point, lin in (("attn_out", o), ("mlp_out", down)):
            bias = getattr(lin, "bias", None)
            writers.append(Writer(by_id[id(lin.weight)].removesuffix(".weight"), i, point,
                                  lin.weight, 0, bias))
    return writers


def edited_copy(
    model: ChatModel, plan: Callable[[Writer], tuple[Tensor | None, float]], *,
    preserve_norm: bool = False,
) -> tuple[Any, bool, list[Writer]]:
    """A plain copy of ``model.hf`` with every residual writer projected as ``plan`` says.

    ``plan(writer)`` returns ``(basis (d_model, k) or None, weight)``; ``None`` or a zero
    weight leaves the writer as it is. Tied embeddings are untied first (the unembedding is
    never edited). Returns ``(model, untied, edited writers)``.
    """
    clean = plain_copy(model)
    untie = _is_tied(clean) or bool(getattr(clean.config, "tie_word_embeddings", False))
    writers = residual_writers(clean)  # raises before anything is untied or edited
    if untie:
        _untie(clean)
        writers = residual_writers(clean)
    device = clean.get_input_embeddings().weight.device
    edited: list[Writer] = []
    for w in writers:
        basis, weight = plan(w)
        if basis is None or weight == 0:
            continue
        w.project(basis.to(device=device, dtype=work_dtype(device)), weight, preserve_norm=preserve_norm)
        edited.append(w)
    return clean, untie, edited


def orthogonalize(model: ChatModel, direction: Direction | Tensor) -> Any:
    """A modified copy of ``model.hf`` with ``direction`` removed from every residual write.

    Returns a plain ``transformers`` model (``model`` itself is left untouched) whose input
    embedding, attention output and MLP output weights (and biases) are orthogonal to the
    direction. Tied embeddings are untied so the unembedding stays as it was. For per-layer
    strengths, several directions or norm-preserving edits see :class:`refusaldir.steer.Edit`.

    Example:
        >>> ortho = orthogonalize(model, ds.refusal_direction(12, -1))  # doctest: +SKIP
        >>> ortho(**model.template.encode(["Hi"])).logits.shape  # doctest: +SKIP
    """
    return orthogonalize_with_info(model, direction)[0]


def orthogonalize_with_info(model: ChatModel, direction: Direction | Tensor) -> tuple[Any, bool]:
    """:func:`orthogonalize`, plus whether tied embeddings had to be untied."""
    d = as_direction(direction)
    check_direction(model, d)
    u = d.unit.to(work_dtype(model.device))[:, None]
    clean, untie, _ = edited_copy(model, lambda w: (u, 1.0))
    return clean, untie


def _decoder_layers(clean: Any) -> Any:
    decoder = clean.get_decoder() if hasattr(clean, "get_decoder") else None
    layers = getattr(decoder, "layers", None) if decoder is not None else None
    if layers is None:
        raise ConfigError(
            f"{type(clean).__name__} has no decoder `.layers`; orthogonalize supports "
            "Llama/Qwen/Mistral-style decoder-only models"
        )
    return layers


def edited_parameters(ortho: Any) -> list[str]:
    """Names of the parameters :func:`orthogonalize` edits in ``ortho`` (for the model card)."""
    by_id = {id(p): n for n, p in ortho.named_parameters()}
    return [by_id[id(t)] for w in residual_writers(ortho) for t in (w.weight, w.bias) if t is not None]
