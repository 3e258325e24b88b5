"""Weight orthogonalization: bake directional ablation into a plain Hugging Face model.

For a unit direction ``u`` every matrix that writes into the residual stream is projected:
the input embedding ``E ← E - (E u) uᵀ``, each attention output ``W_O ← W_O - u (uᵀ W_O)`` and
each MLP output ``W_down ← W_down - u (uᵀ W_down)`` (biases ``b ← b - (b·u) u``); for a mixture
of experts every expert's and shared expert's output projection (fused 3-D tensors included; the
router is untouched), for hybrid models the linear-attention output. The residual stream then
never holds a component along ``u``, which is what :class:`~refusaldir.steer.Ablation` does with
hooks at every layer: the weights equal the hooks. Where a sublayer's output passes an RMS norm
before the residual add (Gemma 2/3, OLMo 2) the writer is edited so the norm's output has no
``u`` component (:func:`through_gain`): exact removal, but the norm's rescaling makes the
outputs differ from hook ablation (the export's model card says which edits are which). The unembedding is not edited (the
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
    "ATTN_OUT_NAMES", "MLP_OUT_NAMES", "POST_NORM_NAMES", "Writer", "edited_copy", "through_gain",
    "orthogonalize", "orthogonalize_with_info", "plain_copy", "project_along",
    "live_writers", "residual_writers", "work_dtype",
]

ATTN_OUT_NAMES = ("o_proj", "out_proj", "dense", "c_proj")
MLP_OUT_NAMES = ("down_proj", "fc2", "c_proj", "dense_4h_to_h", "w2")
# Norms applied to a sublayer's output before it joins the residual stream (Gemma 2/3, OLMo 2):
# (attention-side, MLP-side) names. A layer with an MLP-side one has post-norms on both sides;
# elsewhere ``post_attention_layernorm`` is the MLP's *pre*-norm (Llama naming).
POST_NORM_NAMES = (("post_attention_layernorm", "post_feedforward_layernorm"),
                   ("post_attention_norm", "post_ffw_norm"), ("post_attention_norm", "post_mlp_norm"))
ATTN_NAMES = ("self_attn", "attn", "linear_attn")  # linear_attn: Qwen3.5 gated-delta-net layers
MLP_NAMES = ("mlp", "feed_forward", "block_sparse_moe")
SHARED_EXPERT_NAMES = ("shared_expert", "shared_experts", "shared_mlp")


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
    along: Float[Tensor, "d_model k"] | None = None,
    chunk: int = 8192,
) -> None:
    """Remove ``weight`` × the component along the orthonormal ``basis`` from every vector
    ``t`` writes into the residual stream, in place (``along``: remove ``along · basisᵀ m``
    instead, an oblique projection when ``basisᵀ along = I``; see :func:`through_gain`).

    ``out_axis`` is the axis of ``t`` that indexes ``d_model`` (``0`` for a ``Linear`` weight
    ``(d_model, d_in)``, ``1`` for an embedding ``(vocab, d_model)``, any axis of a fused
    expert tensor); every index of the other axes is one input unit, and the vector it writes
    is ``m ← m - weight · Q Qᵀ m``. ``preserve_norm`` rescales each such vector back to its
    norm before the edit (a per-input-unit scale, so with ``weight=1`` the result is still
    exactly orthogonal to the basis; renormalising the ``d_model`` rows instead would not be).
    Computed in ``basis``'s dtype, block by block, on ``t``'s device; cast back to ``t``'s dtype.
    """
    q = basis.to(device=t.device)
    a = q if along is None else along.to(device=t.device, dtype=q.dtype)
    m = t.movedim(out_axis, -1)
    flat = m.reshape(-1, m.shape[-1]) if m.is_contiguous() else None
    view = flat if flat is not None else m
    rows = view.shape[0]
    for s in range(0, rows, chunk):
        block = view[s : s + chunk].to(q.dtype)
        before = block.norm(dim=-1, keepdim=True) if preserve_norm else None
        block = block - weight * (block @ q) @ a.T
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
        along = None
        if self.gain is not None:  # what reaches the residual is gain ⊙ y / rms(y)
            wide = self.weight.dtype in (torch.float32, torch.float64)  # 16-bit weights: well-conditioned only
            basis, along = through_gain(basis, self.gain, OBLIQUE_MAX_COND if wide else 1e2)
        project_along(self.weight, self.out_axis, basis, weight, preserve_norm=preserve_norm, along=along)
        if self.bias is not None:  # (d_model,) or one row per expert (experts, d_model)
            project_along(self.bias, self.bias.dim() - 1, basis, weight, along=along)

    def vectors(self) -> Float[Tensor, "units d_model"]:
        """What each input unit writes (a copy, float32), e.g. to check ``rᵀW = 0``."""
        return self.weight.detach().movedim(self.out_axis, -1).reshape(-1, self.weight.shape[self.out_axis]).float()


#: Largest ‖Q ⊘ γ‖·‖γ ⊙ Q‖ for which the oblique projection is used on float32 weights (else
#: the orthogonal one); gemma3-270m needs up to ~1e4 for its smallest quantized gains.
OBLIQUE_MAX_COND = 1e5


def through_gain(
    basis: Float[Tensor, "d_model k"], gain: Float[Tensor, " d_model"], max_cond: float = OBLIQUE_MAX_COND,
) -> tuple[Float[Tensor, "d_model k"], Float[Tensor, "d_model k"] | None]:
    """``(read, along)`` for a writer followed by an RMS norm with per-channel ``gain``: projecting
    it as ``m ← m - along · readᵀ m`` leaves the norm's output with no component along ``basis``.

    The norm writes ``z = γ ⊙ y / rms(y)``, so ``Qᵀz = (γ ⊙ Q)ᵀy / rms(y)``: any edit that makes
    ``y ⊥ γ ⊙ Q`` removes ``Q`` exactly from what reaches the residual stream, whatever ``rms(y)``
    is. The one used is the oblique projection ``y ← y - (Q ⊘ γ)(γ ⊙ Q)ᵀ y``, which gives
    ``γ ⊙ ŷ = z·rms(y) - Q Qᵀ z·rms(y)``: the hook ablation's output up to one scale per token
    (``rms(y) / rms(ŷ)``), apart from ``Q``'s share in channels whose gain is exactly zero. Where
    small gains make it ill-conditioned (above ``max_cond``), the orthogonal projection off
    ``γ ⊙ Q`` is used instead (``along`` is ``None``); both remove ``Q`` exactly.
    """
    g = gain.to(device=basis.device, dtype=basis.dtype)[:, None]
    read = g * basis
    # A channel whose gain is exactly zero (quantized Gemma weights of -1) never reaches the
    # residual stream: it takes no share of the removal, and the rest is rescaled so that
    # readᵀ along = I, which keeps the removal exact.
    along = torch.where(g != 0, basis / torch.where(g != 0, g, torch.ones_like(g)), torch.zeros_like(basis))
    gram = read.T @ along
    if float(torch.linalg.matrix_norm(gram, -2)) > 1e-6:
        along = along @ torch.linalg.inv(gram)
        if float(torch.linalg.matrix_norm(read, 2) * torch.linalg.matrix_norm(along, 2)) <= max_cond:
            return read, along
    q, r = torch.linalg.qr(read)
    keep = r.diagonal().abs() > 1e-12 * max(float(read.abs().max()), 1e-300)
    return q[:, keep], None


def _gain(norm: Any, d_model: int, where: str) -> Tensor:
    """The per-channel gain of an RMS norm (Gemma's ``1 + weight`` included), read by running it
    on a constant vector: any overall scale is irrelevant to :func:`through_gain`."""
    w = getattr(norm, "weight", None)
    if w is None or getattr(norm, "bias", None) is not None or tuple(w.shape) != (d_model,):
        raise ConfigError(
            f"{where} ({type(norm).__name__}) is not an RMS norm with one gain per channel, so the "
            "direction cannot be removed exactly from what it writes; use hook ablation"
        )
    if w.device.type == "meta":  # a skeleton (live_writers): the gain's presence is what counts
        return torch.ones(d_model, dtype=torch.float64, device="meta")
    with torch.no_grad():
        g = norm(torch.ones(1, d_model, dtype=w.dtype, device=w.device))[0].double()
    if g.device.type == "meta":  # a skeleton: the gain only marks the writer
        return g
    if not bool(torch.isfinite(g).all()) or float(g.abs().max()) == 0:
        raise ConfigError(f"{where} has a zero or non-finite gain; use hook ablation for this model")
    return g


def _out_axis(t: Tensor, d_model: int, gate_up: Tensor | None, name: str) -> int:
    """The axis of a fused expert tensor ``(experts, a, b)`` that indexes ``d_model``."""
    axes = [a for a in (1, 2) if t.shape[a] == d_model]
    if len(axes) == 2 and gate_up is not None and gate_up.dim() == 3:
        ins = [a for a in (1, 2) if gate_up.shape[a] == d_model]
        axes = [3 - ins[0]] if len(ins) == 1 else axes  # down reads what gate_up writes
    if len(axes) != 1:
        raise ConfigError(f"cannot tell which axis of {name} {tuple(t.shape)} is d_model={d_model}")
    return axes[0]


def _mlp_writers(mlp: Any, i: int, d_model: int, by_id: dict[int, str], gain: Tensor | None) -> list[Writer]:
    """The MLP's output projection, or for a mixture of experts every expert's (fused 3-D
    tensors or one module per expert) and the shared experts'; the router is never edited."""
    found: list[tuple[Tensor, int, Tensor | None]] = []
    down = _linear(mlp, MLP_OUT_NAMES, d_model)
    if down is not None:
        found.append((down.weight, 0, getattr(down, "bias", None)))
    experts = getattr(mlp, "experts", None)
    if down is None and experts is not None:
        if isinstance(experts, torch.nn.ModuleList):
            for e in experts:
                lin = _linear(e, MLP_OUT_NAMES, d_model)
                if lin is None:
                    return []
                found.append((lin.weight, 0, getattr(lin, "bias", None)))
        else:
            t = next((getattr(experts, n) for n in MLP_OUT_NAMES
                      if isinstance(getattr(experts, n, None), torch.Tensor)), None)
            if t is None or t.dim() != 3:
                return []
            axis = _out_axis(t, d_model, getattr(experts, "gate_up_proj", None), by_id[id(t)])
            bias = next((b for n in MLP_OUT_NAMES if isinstance(b := getattr(experts, f"{n}_bias", None), torch.Tensor)), None)
            found.append((t, axis, bias))
        for n in SHARED_EXPERT_NAMES:
            shared = getattr(mlp, n, None)
            lin = _linear(shared, MLP_OUT_NAMES, d_model) if shared is not None else None
            if lin is not None:
                found.append((lin.weight, 0, getattr(lin, "bias", None)))
    return [Writer(by_id[id(w)].removesuffix(".weight"), i, "mlp_out", w, axis, b, gain) for w, axis, b in found]


def residual_writers(clean: Any) -> list[Writer]:
    """Every parameter of a plain ``transformers`` model that writes into the residual stream:
    the input embedding, then per layer the attention (or linear-attention) output and the MLP
    output projections — for a mixture of experts every expert's and shared expert's output
    projection. A sublayer whose output passes an RMS norm before the residual add (Gemma 2/3,
    OLMo 2) carries that norm's gain (:attr:`Writer.gain`), so projecting it removes the
    direction exactly from what the norm adds to the residual stream.

    Raises :class:`~refusaldir.errors.ConfigError` for architectures whose writes this does not
    recognise (a weight edit there would not equal directional ablation).
    """
    emb = clean.get_input_embeddings()
    d_model = emb.weight.shape[1]
    by_id = {id(p): n for n, p in clean.named_parameters(remove_duplicate=False)}
    writers = [Writer(by_id.get(id(emb.weight), "embed_tokens.weight").removesuffix(".weight"), -1, "embed",
                      emb.weight, 1)]
    for i, layer in enumerate(_decoder_layers(clean)):
        gains: tuple[Tensor | None, Tensor | None] = (None, None)
        for a_name, m_name in POST_NORM_NAMES:
            a_norm, m_norm = getattr(layer, a_name, None), getattr(layer, m_name, None)
            if m_norm is not None:
                where = f"layer {i} {{}} of {type(clean).__name__}"
                gains = (_gain(a_norm, d_model, where.format(a_name)) if a_norm is not None else None,
                         _gain(m_norm, d_model, where.format(m_name)))
                break
        attn = next((m for n in ATTN_NAMES if (m := getattr(layer, n, None)) is not None), None)
        mlp = next((m for n in MLP_NAMES if (m := getattr(layer, n, None)) is not None), None)
        o = _linear(attn, ATTN_OUT_NAMES, d_model) if attn is not None else None
        mlp_w = _mlp_writers(mlp, i, d_model, by_id, gains[1]) if mlp is not None else []
        if o is None or not mlp_w:
            raise ConfigError(
                f"layer {i} of {type(clean).__name__} has no recognised attention output "
                f"({'/'.join(ATTN_OUT_NAMES)}) or MLP / expert output ({'/'.join(MLP_OUT_NAMES)}) "
                "projection, so the weights cannot be edited to match directional ablation; use "
                "hook ablation (refusaldir.steer.ablate)"
            )
        writers.append(Writer(by_id[id(o.weight)].removesuffix(".weight"), i, "attn_out", o.weight, 0,
                              getattr(o, "bias", None), gains[0]))
        writers += mlp_w
    return writers


def live_writers(model: ChatModel) -> list[Writer]:
    """:func:`residual_writers` of the running (bridged) model: the same names, holding the
    model's own parameters (no copy; offloaded weights are read back, on the CPU). A writer
    followed by a norm keeps a placeholder ``gain`` (on the meta device) that marks it."""
    hf = model.hf
    with torch.device("meta"):
        try:
            skeleton = type(hf)._from_config(copy.deepcopy(hf.config))
        except Exception as exc:  # noqa: BLE001 - report any construction failure uniformly
            raise ConfigError(
                f"could not rebuild {type(hf).__name__} from its config ({exc}); the edit needs a "
                "standard transformers architecture"
            ) from exc
    params = {_strip(n): p for n, p in hf.named_parameters(remove_duplicate=False)}
    if any(p.device.type == "meta" for p in params.values()):
        params = {_strip(n): p for n, p in _full_state_dict(hf).items()}
    names = {id(p): n for n, p in skeleton.named_parameters(remove_duplicate=False)}
    return [Writer(w.name, w.layer, w.point, params[names[id(w.weight)]], w.out_axis,
                   None if w.bias is None else params[names[id(w.bias)]], w.gain)
            for w in residual_writers(skeleton)]


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
