"""Export a parametrised :class:`~refusaldir.steer.Edit` (e.g. an optimiser front member) as a
plain Hugging Face folder whose model card states what was edited, how strongly at each
layer, and the numbers it was chosen on.

Example:
    >>> save_edited(model, edit, "out/demo-edit", directions=ds, numbers=member)  # doctest: +SKIP
    PosixPath('out/demo-edit')
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from refusaldir.directions import DirectionSet
from refusaldir.io import dumps, prepare_out, staged_dir
from refusaldir.models import stop_token_ids
from refusaldir.steer.edit import Edit
from refusaldir.steer.export import PROVENANCE_FILE, edit_records, exactness
from refusaldir.version import __version__

if TYPE_CHECKING:
    from refusaldir.models import ChatModel

__all__ = ["save_edited"]


def save_edited(model: ChatModel, edit: Edit, out: str | os.PathLike[str], *,
                directions: DirectionSet | None = None, numbers: dict[str, Any] | None = None,
                force: bool = False) -> Path:
    """Bake ``edit`` into a copy of ``model``'s weights and write a standalone model folder
    (weights, config, tokenizer with its chat template, generation config, ``README.md`` and
    :data:`~refusaldir.steer.PROVENANCE_FILE`), staged and swapped in whole like
    :func:`~refusaldir.steer.save_orthogonalized`. ``numbers`` (a front member's record) goes
    into the provenance and the model card."""
    target = Path(out).expanduser()
    prepare_out(target, force)
    edit.check(model)
    with staged_dir(target, force=force) as tmp:
        hf, untied, edited = edit.orthogonalize(model)
        hf.generation_config.eos_token_id = stop_token_ids(model)
        if hf.generation_config.pad_token_id is None and model.tokenizer.pad_token_id is not None:
            hf.generation_config.pad_token_id = model.tokenizer.pad_token_id
        hf.save_pretrained(tmp)
        tok = copy.copy(model.tokenizer)
        if model.chat_template:
            tok.chat_template = model.chat_template
        tok.save_pretrained(tmp)
        names = {(w.point, w.layer) for w in edited}
        records = [r for r in edit_records(hf) if (r["point"], r["layer"]) in names]
        for r in records:
            r["weight"] = round(edit.weight_of(r["point"], r["layer"]), 6)
        meta = directions.metadata if directions is not None else {}
        info = {
            "refusaldir_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "operation": "parametrised edit (per-layer weighted projection of residual writes)",
            "source_model": model.describe(), "edit": edit.to_dict(), "edits": records,
            "edited_parameters": [p for r in records for p in r["parameters"]],
            "untied_embeddings": untied, "numbers": numbers,
            "direction_set": {"selected": meta.get("selected"), "tensors_sha256": meta.get("tensors_sha256"),
                              "extracted_from": meta.get("model")} if directions is not None else None,
            "template": {"hash": model.template.hash, "system_prompt": model.template.system_prompt},
        }
        (tmp / PROVENANCE_FILE).write_text(dumps(info))
        (tmp / "README.md").write_text(_card(info, edit))
    return target


def _rate(r: dict[str, Any] | None) -> str:
    if not r or r.get("rate") is None:
        return "not measured"
    lo, hi = r.get("ci95", [None, None])
    return f"{100 * r['rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] (n={r.get('n')})"


def _card(info: dict[str, Any], edit: Edit) -> str:
    src = info["source_model"]
    num = info.get("numbers") or {}
    conf = num.get("confirmed") or {}
    spec = edit.spec
    attn = [edit.weight_of("attn_out", i) for i in range(edit.n_layers)]
    mlp = [edit.weight_of("mlp_out", i) for i in range(edit.n_layers)]
    lines = [
        "---", "library_name: transformers", "tags:", "- refusaldir", "- refusal-direction", "- abliterated", "---", "",
        f"# {src['spec']} with a refusaldir edit", "",
        f"Written by refusaldir {info['refusaldir_version']} on {info['created']}: the source model with "
        "weighted components along refusal-related directions removed from the writes into the residual "
        "stream. It loads with plain `transformers` (`AutoModelForCausalLM.from_pretrained(PATH)`).", "",
        "**Safety note:** this edit makes the model comply with harmful requests it would otherwise refuse. "
        "Use it for research on refusal mechanisms only.", "",
        "## The edit", "",
        f"- directions: {spec.get('subspace')} subspace (k={spec.get('k')}), source `{spec.get('source')}`, "
        f"{'projected off the harmless mean' if spec.get('projected') else 'not projected'}, "
        f"{'norm-preserving (each input unit keeps its output norm)' if edit.preserve_norm else 'plain projection'}",
        f"- attention-output strength per layer: {', '.join(f'{w:.2f}' for w in attn)}",
        f"- MLP-output strength per layer: {', '.join(f'{w:.2f}' for w in mlp)}",
        f"- embedding strength: {edit.embed:.2f}",
        f"- {len(info['edited_parameters'])} parameters edited; the unembedding is unchanged"
        + (" (untied from the input embedding)." if info["untied_embeddings"] else "."), "",
        *exactness(info["edits"]),
        "## Measured", "",
    ]
    if num:
        over = num.get("over_refusal")
        over_s = "–" if over is None else f"{100 * over:.1f}%"
        lines += [f"- search (validation prompts, first token): refusal rate {100 * num.get('refusal_rate', 0):.1f}%, "
                  f"KL {num.get('kl', 0):.4f}, over-refusal {over_s}"]
    if conf:
        lines += [f"- test split, generated and judged: harmful refusal {_rate(conf['harmful']['refusal'])}; "
                  f"borderline over-refusal {_rate((conf.get('borderline') or {}).get('refusal'))}; "
                  f"KL over {conf.get('kl_tokens')} tokens on harmless test prompts {conf.get('kl', 0):.4f}; "
                  f"judge `{(conf.get('judges') or {}).get('primary')}`"]
    if not num:
        lines.append("- no measurements were attached to this export")
    lines += ["", f"- source: `{src['spec']}` ({src['architecture']}, weights sha256 `{src['weights_hash']}`)",
              f"- everything above, machine-readable: `{PROVENANCE_FILE}`", ""]
    return "\n".join(lines)
