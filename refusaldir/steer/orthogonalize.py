"""Weight orthogonalization: bake directional ablation into a plain Hugging Face model.

For a unit direction ``u`` every matrix that writes into the residual stream is projected:
the input embedding ``E ← E - (E u) uᵀ``, each attention output ``W_O ← W_O - u (uᵀ W_O)`` and
each MLP output ``W_down ← W_down - u (uᵀ W_down)`` (biases ``b ← b - (b·u) u``). The residual
stream then never holds a component along ``u``, which is what :class:`~refusaldir.
interventions.Ablation` does with hooks at every layer. The unembedding is not edited (the
hook ablation never touches it either): when the input and output embeddings are tied they
are untied first, and only the input embedding is edited.

The result is a normal ``transformers`` model: :func:`save_orthogonalized` writes a folder
that ``AutoModelForCausalLM.from_pretrained`` loads without refusaldir.

Example:
    >>> import refusaldir as rd  # doctest: +SKIP
    >>> model, ds = rd.load_model("demo"), rd.DirectionSet.load("runs/demo")  # doctest: +SKIP
    >>> save_orthogonalized(model, ds.refusal_direction(12, -1), "out/demo-ortho", directions=ds)  # doctest: +SKIP
    >>> from transformers import AutoModelForCausalLM  # doctest: +SKIP
    >>> hf = AutoModelForCausalLM.from_pretrained("out/demo-ortho")  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from refusaldir.directions import Direction, DirectionSet
from refusaldir.errors import ArtifactError, ConfigError
from refusaldir.steer.interventions import as_direction, check_direction, vector_sha256

if TYPE_CHECKING:
    from refusaldir.models import ChatModel

__all__ = ["orthogonalize", "plain_copy", "save_orthogonalized"]

ATTN_OUT_NAMES = ("o_proj", "out_proj", "dense", "c_proj")
MLP_OUT_NAMES = ("down_proj", "fc2", "c_proj", "dense_4h_to_h", "w2")
# Norms applied to a sublayer's output before it joins the residual stream break the
# equivalence between weight editing and activation ablation (e.g. Gemma 2/3).
POST_NORM_NAMES = ("post_feedforward_layernorm", "pre_feedforward_layernorm", "post_attention_norm",
                   "post_mlp_norm", "post_ffw_norm")
PROVENANCE_FILE = "refusaldir_orthogonalization.json"


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
    src = {_strip(k): v for k, v in hf.state_dict(keep_vars=False).items()}
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


@torch.no_grad()
def _project_rows(w: Float[Tensor, "rows d"], u: Float[Tensor, " d"], chunk: int = 8192) -> None:
    """``w ← w - (w u) uᵀ`` in place, computed in float64 chunk by chunk."""
    u64 = u.to(device=w.device, dtype=torch.float64)
    for s in range(0, w.shape[0], chunk):
        block = w[s : s + chunk].to(torch.float64)
        block -= (block @ u64).unsqueeze(-1) * u64
        w[s : s + chunk] = block.to(w.dtype)


@torch.no_grad()
def _project_out_cols(w: Float[Tensor, "d cols"], u: Float[Tensor, " d"]) -> None:
    """``w ← w - u (uᵀ w)`` in place for a ``Linear`` weight that writes into ``d``."""
    u64 = u.to(device=w.device, dtype=torch.float64)
    w64 = w.to(torch.float64)
    w64 -= torch.outer(u64, u64 @ w64)
    w.copy_(w64.to(w.dtype))


def orthogonalize(model: ChatModel, direction: Direction | Tensor) -> Any:
    """A modified copy of ``model.hf`` with ``direction`` removed from every residual write.

    Returns a plain ``transformers`` model (``model`` itself is left untouched) whose input
    embedding, attention output and MLP output weights (and biases) are orthogonal to the
    direction. Tied embeddings are untied so the unembedding stays as it was.

    Example:
        >>> ortho = orthogonalize(model, ds.refusal_direction(12, -1))  # doctest: +SKIP
        >>> ortho(**model.template.encode(["Hi"])).logits.shape  # doctest: +SKIP
    """
    return _orthogonalize(model, direction)[0]


def _orthogonalize(model: ChatModel, direction: Direction | Tensor) -> tuple[Any, bool]:
    d = as_direction(direction)
    check_direction(model, d)
    clean = plain_copy(model)
    d_model = model.d_model
    u = d.unit
    layers = _decoder_layers(clean)
    targets: list[tuple[str, Any]] = []
    for i, layer in enumerate(layers):
        bad = [n for n in POST_NORM_NAMES if getattr(layer, n, None) is not None]
        if bad:
            raise ConfigError(
                f"{type(clean).__name__} normalises sublayer outputs ({bad[0]}) before adding them "
                "to the residual stream, so weight orthogonalization would not equal directional "
                "ablation; use refusaldir.interventions.ablate (hooks) for this model"
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
        targets += [(f"layers.{i}.attn_out", o), (f"layers.{i}.mlp_out", down)]
    untie = _is_tied(clean) or bool(getattr(clean.config, "tie_word_embeddings", False))
    if untie:
        _untie(clean)
    emb = clean.get_input_embeddings()
    _project_rows(emb.weight.data, u)
    for _, lin in targets:
        _project_out_cols(lin.weight.data, u)
        if getattr(lin, "bias", None) is not None:
            _project_rows(lin.bias.data.unsqueeze(0), u)
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
    d_model = ortho.get_input_embeddings().weight.shape[1]
    names = [n for n, p in ortho.named_parameters() if p is ortho.get_input_embeddings().weight]
    by_id = {id(p): n for n, p in ortho.named_parameters()}
    for layer in _decoder_layers(ortho):
        attn = getattr(layer, "self_attn", None) or getattr(layer, "attn", None)
        mlp = getattr(layer, "mlp", None) or getattr(layer, "feed_forward", None)
        for lin in (_linear(attn, ATTN_OUT_NAMES, d_model), _linear(mlp, MLP_OUT_NAMES, d_model)):
            for p in (lin.weight, getattr(lin, "bias", None)):
                if p is not None:
                    names.append(by_id[id(p)])
    return names


# ------------------------------------------------------------------------------ export
def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"{out} exists and is a file, not a folder; choose another --out")
    if out.exists() and not force:
        raise ArtifactError(
            f"{out} already exists; pass --force (force=True) to replace it, or choose another --out"
        )


def _mkdtemp(parent: Path, name: str) -> Path:
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=parent))
    except OSError as exc:
        raise ArtifactError(
            f"cannot write to {parent} ({exc.strerror or exc}); choose a writable --out folder"
        ) from exc


def save_orthogonalized(
    model: ChatModel,
    direction: Direction | Tensor,
    out: str | os.PathLike[str],
    *,
    directions: DirectionSet | None = None,
    force: bool = False,
) -> Path:
    """Orthogonalize ``model`` against ``direction`` and write a standalone model folder.

    The folder holds safetensors weights, ``config.json``, the tokenizer (with its chat
    template), ``generation_config.json`` (EOS ids include the template's end-of-turn token),
    ``README.md`` (a model card saying what was edited, with which direction, and where the
    direction came from) and ``refusaldir_orthogonalization.json`` (the same, machine readable,
    with the direction vector). Everything is written to a temporary sibling folder that is
    renamed into place at the end, so an error never leaves a half-written ``out``. An existing
    ``out`` is refused unless ``force=True``.

    Example:
        >>> save_orthogonalized(model, ds.refusal_direction(12, -1), "demo-ortho", directions=ds)  # doctest: +SKIP
        PosixPath('demo-ortho')
    """
    from refusaldir.generation import stop_token_ids

    target = Path(out).expanduser()
    _prepare_out(target, force)
    d = as_direction(direction)
    check_direction(model, d)
    tmp = _mkdtemp(target.parent, target.name)
    trash: Path | None = None
    try:
        ortho, untied = _orthogonalize(model, d)
        ortho.generation_config.eos_token_id = stop_token_ids(model)
        if ortho.generation_config.pad_token_id is None and model.tokenizer.pad_token_id is not None:
            ortho.generation_config.pad_token_id = model.tokenizer.pad_token_id
        ortho.save_pretrained(tmp)
        tok = copy.copy(model.tokenizer)
        if model.chat_template:
            tok.chat_template = model.chat_template
        tok.save_pretrained(tmp)
        info = _provenance(model, d, ortho, directions, untied)
        (tmp / PROVENANCE_FILE).write_text(json.dumps(info, indent=2))
        (tmp / "README.md").write_text(_model_card(info))
        if target.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, trash / "old")
        os.replace(tmp, target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if trash is not None and (trash / "old").exists() and not target.exists():
            os.replace(trash / "old", target)
        raise ArtifactError(
            f"could not write {target} ({exc.strerror or exc}); nothing was left behind — check "
            "free disk space and permissions"
        ) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if trash is not None and (trash / "old").exists() and not target.exists():
            os.replace(trash / "old", target)
        raise
    finally:
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    return target


def _provenance(
    model: ChatModel, d: Direction, ortho: Any, ds: DirectionSet | None, untied: bool
) -> dict[str, Any]:
    import refusaldir

    meta = ds.metadata if ds is not None else {}
    return {
        "refusaldir_version": refusaldir.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "operation": "weight orthogonalization (directional ablation at every layer)",
        "source_model": model.describe(),
        "direction": {
            **d.to_dict(),
            "norm": d.norm,
            "sha256": vector_sha256(d.vector),
            "unit_vector": [float(x) for x in d.unit.tolist()],
        },
        "direction_set": {
            "selected": meta.get("selected"),
            "extracted_from": meta.get("model"),
            "prompts": meta.get("prompts"),
            "created": meta.get("created"),
            "refusaldir_version": meta.get("refusaldir_version"),
            "tensors_sha256": meta.get("tensors_sha256"),
        } if ds is not None else None,
        "edited_parameters": edited_parameters(ortho),
        "untied_embeddings": untied,
        "template": {"hash": model.template.hash, "system_prompt": model.template.system_prompt},
    }


def _model_card(info: dict[str, Any]) -> str:
    src = info["source_model"]
    d = info["direction"]
    ds = info.get("direction_set") or {}
    edited = info["edited_parameters"]
    prompts = ds.get("prompts") or {}
    lines = [
        "---",
        "library_name: transformers",
        "tags:",
        "- refusaldir",
        "- orthogonalized",
        "- refusal-direction",
        "---",
        "",
        f"# {src['spec']} with the {d['kind']} direction orthogonalized out",
        "",
        "This model was written by refusaldir "
        f"{info['refusaldir_version']} on {info['created']}. It is the source model with one "
        "direction in the residual stream removed from every weight matrix that writes into "
        "the residual stream (Arditi et al. 2024, *Refusal in Language Models Is Mediated by a "
        "Single Direction*). It behaves like the source model under directional ablation of "
        "that direction at every layer, and it loads with plain `transformers`:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained(\"PATH\")",
        "tokenizer = AutoTokenizer.from_pretrained(\"PATH\")",
        "```",
        "",
        "**Safety note:** removing the refusal direction makes the model comply with harmful "
        "requests it would otherwise refuse. Use it for research on refusal mechanisms only.",
        "",
        "## What was edited",
        "",
        "For the unit direction `u`: input embedding `E <- E - (E u) u^T`; every attention output "
        "and MLP output projection `W <- W - u (u^T W)`; their biases `b <- b - (b.u) u`. "
        "The unembedding (`lm_head`) is unchanged"
        + (" (it was tied to the input embedding and has been untied)." if info["untied_embeddings"] else "."),
        "",
        f"{len(edited)} parameters edited: `{edited[0]}`, … `{edited[-1]}`.",
        "",
        "## Source model",
        "",
        f"- spec: `{src['spec']}` ({src['architecture']}, {src['n_layers']} layers, "
        f"d_model {src['d_model']}, {src['dtype']})",
        f"- weights sha256: `{src['weights_hash']}`",
        "",
        "## Direction",
        "",
        f"- kind: {d['kind']}; layer {d['layer']}, position {d['pos']} (from the end of the prompt), "
        f"hook point `{d['hook_point']}`",
        f"- norm of the raw difference of means: {d['norm']:.4f}; sha256 of the float32 vector: "
        f"`{d['sha256']}`",
    ]
    if ds:
        ext = ds.get("extracted_from") or {}
        lines += [
            f"- extracted by refusaldir {ds.get('refusaldir_version')} on {ds.get('created')} from "
            f"`{ext.get('spec')}` (weights `{str(ext.get('weights_hash'))[:16]}…`)",
            f"- direction set tensors sha256: `{ds.get('tensors_sha256')}`",
            f"- selection: {json.dumps(ds.get('selected'))}",
        ]
        for name, p in prompts.items():
            if isinstance(p, dict):
                lines.append(f"- {name} prompts: {p.get('source')} ({p.get('count')} prompts, "
                             f"sha256 `{str(p.get('sha256'))[:16]}…`)")
    lines += [
        "",
        f"The unit vector and all of the above are in `{PROVENANCE_FILE}`.",
        "",
    ]
    return "\n".join(lines)
