"""Export an orthogonalized model as a standalone Hugging Face folder, with its provenance.

:func:`save_orthogonalized` writes safetensors weights, config, tokenizer (with the chat
template), generation config, a model card (``README.md``) and :data:`PROVENANCE_FILE`, all
into a temporary sibling folder that replaces ``out`` only once complete, under a lock file
(:func:`refusaldir.io.staged_dir`).

Example:
    >>> import refusaldir as rd  # doctest: +SKIP
    >>> model, ds = rd.load_model("demo"), rd.DirectionSet.load("runs/demo")  # doctest: +SKIP
    >>> save_orthogonalized(model, ds.refusal_direction(12, -1), "out/demo-ortho", directions=ds)  # doctest: +SKIP
    PosixPath('out/demo-ortho')
    >>> from transformers import AutoModelForCausalLM  # doctest: +SKIP
    >>> hf = AutoModelForCausalLM.from_pretrained("out/demo-ortho")  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from refusaldir.directions import Direction, DirectionSet
from refusaldir.io import dumps, prepare_out, staged_dir
from refusaldir.models import stop_token_ids
from refusaldir.steer.directions_io import as_direction, check_direction, vector_sha256
from refusaldir.steer.orthogonalize import orthogonalize_with_info, residual_writers
from refusaldir.version import __version__

if TYPE_CHECKING:
    from refusaldir.models import ChatModel

__all__ = ["PROVENANCE_FILE", "exactness", "model_card", "provenance", "save_orthogonalized"]

PROVENANCE_FILE = "refusaldir_orthogonalization.json"


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
    renamed into place at the end, so an error, a full disk or a signal never leaves a
    half-written ``out``. An existing, non-empty ``out`` is refused unless ``force=True`` (and
    kept if writing fails); a concurrent writer of ``out`` waits for the lock. The weights
    keep the model's dtype; they are written from the device the model is on.

    Example:
        >>> save_orthogonalized(model, ds.refusal_direction(12, -1), "demo-ortho", directions=ds)  # doctest: +SKIP
        PosixPath('demo-ortho')
    """
    target = Path(out).expanduser()
    prepare_out(target, force)
    d = as_direction(direction)
    check_direction(model, d)
    with staged_dir(target, force=force) as tmp:
        ortho, untied = orthogonalize_with_info(model, d)
        ortho.generation_config.eos_token_id = stop_token_ids(model)
        if ortho.generation_config.pad_token_id is None and model.tokenizer.pad_token_id is not None:
            ortho.generation_config.pad_token_id = model.tokenizer.pad_token_id
        ortho.save_pretrained(tmp)
        tok = copy.copy(model.tokenizer)  # never touch the caller's tokenizer
        if model.chat_template:
            tok.chat_template = model.chat_template
        tok.save_pretrained(tmp)
        info = provenance(model, d, ortho, directions, untied)
        (tmp / PROVENANCE_FILE).write_text(dumps(info))
        (tmp / "README.md").write_text(model_card(info))
    return target


def provenance(
    model: ChatModel, d: Direction, ortho: Any, ds: DirectionSet | None, untied: bool
) -> dict[str, Any]:
    """What :data:`PROVENANCE_FILE` records: source model, direction (with its unit vector),
    the direction set it came from, the edited parameters and the template."""
    meta = ds.metadata if ds is not None else {}
    return {
        "refusaldir_version": __version__,
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
        "edits": edit_records(ortho),
        "untied_embeddings": untied,
        "template": {"hash": model.template.hash, "system_prompt": model.template.system_prompt},
    }


def exactness(edits: list[dict[str, Any]]) -> list[str]:
    """The model card's statement of which edits equal hook ablation exactly and which do not."""
    normed = [e for e in edits if e.get("through_norm")]
    if not normed:
        return ["**Exactness:** every edit is exact: this model's outputs equal directional "
                "ablation of the direction at every layer (refusaldir's hooks), to float rounding.", ""]
    layers = sorted({e["layer"] for e in normed})
    return [
        f"**Exactness:** {len(normed)} of the {len(edits)} edited writers (layers {layers[0]}–{layers[-1]}) "
        "pass an RMS output norm before the residual stream (`z = γ ⊙ y / rms(y)`). They were "
        "edited so that `y ⊥ γ ⊙ u` (the oblique projection `y - (u ⊘ γ)(γ ⊙ u)^T y`), which "
        "removes the direction exactly from what each sublayer adds to the residual stream, so "
        "the residual stream never carries it, and points each write where hook ablation's "
        "points. The norm's `rms(y)` changes with the edit, so the size of each write, and so "
        "the outputs, approximate and do not equal hook ablation (which projects the norm's "
        "output); the embedding and every other writer are exact.", ""]


def model_card(info: dict[str, Any]) -> str:
    """The exported folder's ``README.md``, written from :func:`provenance`'s record."""
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
        f"{len(edited)} parameters edited: `{edited[0]}`, … `{edited[-1]}`"
        " (for a mixture of experts: every expert's and shared expert's output projection; the "
        "router is unchanged).",
        "",
        *exactness(info.get("edits") or []),
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


def edit_records(ortho: Any) -> list[dict[str, Any]]:
    """One record per edited writer of ``ortho``, for the export's provenance: its parameter
    names, layer and point, whether it writes through an output norm (``through_norm``: projected
    off ``gain ⊙ u``, which removes ``u`` exactly from what reaches the residual stream while the
    norm's scale changes) and whether the result equals hook ablation exactly (``exact``)."""
    by_id = {id(p): n for n, p in ortho.named_parameters()}
    return [{"parameters": [by_id[id(t)] for t in (w.weight, w.bias) if t is not None], "layer": w.layer,
             "point": w.point, "through_norm": w.gain is not None, "exact": w.gain is None}
            for w in residual_writers(ortho)]


def edited_parameters(ortho: Any) -> list[str]:
    """Names of the parameters :func:`orthogonalize` edits in ``ortho`` (for the model card)."""
    by_id = {id(p): n for n, p in ortho.named_parameters()}
    return [by_id[id(t)] for w in residual_writers(ortho) for t in (w.weight, w.bias) if t is not None]
