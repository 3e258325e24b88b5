"""Difference-of-means extraction: refusal directions at every post-instruction position and
harmfulness directions at ``t_inst``, for every layer, plus the per-layer separation table.

Example:
    >>> from refusaldir import load_model, load_prompts, extract  # doctest: +SKIP
    >>> model = load_model("demo")  # doctest: +SKIP
    >>> ds = extract(model, load_prompts("harmful", "train"), load_prompts("harmless", "train"))  # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from refusaldir.batching import AUTO, BatchSize
from refusaldir.capture import iter_activations, project
from refusaldir.data import check_prompts
from refusaldir.directions.set import DirectionSet
from refusaldir.errors import ConfigError
from refusaldir.hooks import RESID_POINTS, check_layers
from refusaldir.io import sha256_bytes, versions
from refusaldir.stats import separation_table
from refusaldir.version import __version__

if TYPE_CHECKING:
    from refusaldir.data import PromptSet
    from refusaldir.models import ChatModel

__all__ = ["extract", "layer_stats"]


def extract(
    model: ChatModel,
    harmful: Sequence[str] | PromptSet,
    harmless: Sequence[str] | PromptSet,
    *,
    layers: Sequence[int] | str | None = None,
    hook_point: str = "resid_pre",
    batch_size: BatchSize = AUTO,
    seed: int = 0,
    progress: bool = True,
) -> DirectionSet:
    """Difference-of-means refusal (post-instruction) and harmfulness (``t_inst``) directions.

    Example:
        >>> from refusaldir import load_model, load_prompts, extract  # doctest: +SKIP
        >>> model = load_model("demo")  # doctest: +SKIP
        >>> ds = extract(model, load_prompts("harmful", "train"), load_prompts("harmless", "train"))  # doctest: +SKIP
    """
    if hook_point not in RESID_POINTS:
        raise ConfigError(f"hook_point {hook_point!r} must be one of {RESID_POINTS}")
    layer_list = check_layers(model, layers)
    sets = {"harmful": check_prompts(harmful, "harmful"), "harmless": check_prompts(harmless, "harmless")}
    if sorted(sets["harmful"]) == sorted(sets["harmless"]):
        raise ConfigError(
            f"the harmful and harmless prompt sets are the same {len(sets['harmful'])} prompts, so "
            "every difference of means would be zero; pass two different sets, e.g. the shipped "
            "'harmful' and 'harmless' ones"
        )
    tpl = model.template
    for name, texts in sets.items():  # every prompt must fit before any forward pass
        tpl.check_lengths(texts, what=name)
    positions = tpl.positions
    all_pos = [tpl.t_inst, *positions]
    start = time.perf_counter()
    means = {}
    for name, texts in sets.items():
        total: Tensor | None = None
        for _, acts in iter_activations(
            model, texts, layers=layer_list, positions=all_pos, hook_point=hook_point,
            batch_size=batch_size, progress=progress, description=f"capture {name}",
        ):
            s = acts.to(torch.float64).sum(dim=0)
            total = s if total is None else total + s
        if total is None:
            raise ConfigError(f"the {name} prompt set produced no activations; pass at least one prompt")
        means[name] = (total / len(texts)).cpu()
    diff = means["harmful"] - means["harmless"]
    if not bool(torch.isfinite(diff).all()):
        raise ConfigError(
            "the activations contain NaN or inf values, so the directions would be meaningless; "
            "load the model in float32 (dtype='float32') or check its weights"
        )
    if float(diff.abs().max()) == 0.0:
        raise ConfigError(
            "the harmful and harmless prompts give identical mean activations at every layer and "
            "position, so every direction would be zero; pass two sets that differ"
        )
    meta = {
        "model": model.describe(),
        "template": {
            "hash": tpl.hash,
            "system_prompt": tpl.system_prompt,
            "post_instruction_tokens": tpl.post_instruction_tokens,
            "post_instruction_ids": list(tpl.post_instruction_ids),
        },
        "prompts": {
            "harmful": _prompt_info(harmful),
            "harmless": _prompt_info(harmless),
        },
        "versions": versions(),
        "seed": seed,
        "dtype": str(model.dtype).removeprefix("torch."),
        "refusaldir_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "extract_seconds": round(time.perf_counter() - start, 2),
    }
    return DirectionSet(
        refusal=diff[1:].float(),
        positions=positions,
        layers=layer_list,
        harmfulness=diff[0].float(),
        t_inst=tpl.t_inst,
        hook_point=hook_point,
        means={k: v.float() for k, v in means.items()},
        metadata=meta,
    )


def layer_stats(
    model: ChatModel,
    ds: DirectionSet,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    pos: int = -1,
    batch_size: BatchSize = AUTO,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Per layer: ‖refusal‖, ‖harmfulness‖, their cosine, and the AUROC with which the refusal
    projection at ``pos`` separates held-out ``harmful`` from ``harmless`` prompts."""
    sets = {"harmful": check_prompts(harmful, "harmful"), "harmless": check_prompts(harmless, "harmless")}
    i, _ = ds._index(pos, ds.layers[0])
    dirs = ds.refusal[i : i + 1]
    for name, texts in sets.items():
        model.template.check_lengths(texts, what=name)
    proj = {
        name: project(model, list(texts), dirs, layers=ds.layers, positions=[pos],
                      hook_point=ds.hook_point, batch_size=batch_size, progress=progress,
                      description=f"project {name}")[:, 0]
        for name, texts in sets.items()
    }
    cos = ds.cosine_refusal_harmfulness(pos) if ds.harmfulness is not None else None
    table = separation_table(proj["harmful"], proj["harmless"], ds.layers)
    rows = []
    for j, sep in enumerate(table):
        rows.append({
            "layer": sep["layer"],
            "refusal_norm": float(ds.refusal[i, j].float().norm()),
            "harmfulness_norm": float(ds.harmfulness[j].float().norm()) if ds.harmfulness is not None else float("nan"),
            "cosine": float(cos[j]) if cos is not None else float("nan"),
            "auroc": sep["auroc"],
            "mean_proj_harmful": sep["mean_positive"],
            "mean_proj_harmless": sep["mean_negative"],
        })
    return rows



def _prompt_info(prompts: Any) -> dict[str, Any]:
    info = getattr(prompts, "info", None)
    if callable(info):
        return info()
    texts = list(prompts)
    return {
        "source": "in-memory",
        "count": len(texts),
        "sha256": sha256_bytes("\n".join(texts)),
    }
