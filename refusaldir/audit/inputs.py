"""What the audit starts from: the output folder check, the direction set to reuse, the
validation and test prompts, and a finished selection to reuse. Everything here fails fast,
before any model work.

Example:
    >>> import tempfile, pathlib
    >>> check_out(pathlib.Path(tempfile.mkdtemp()) / "audit", force=False)
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refusaldir.audit.config import SETS, AuditConfig
from refusaldir.data import PromptSet, check_prompts, load_prompts
from refusaldir.directions import DirectionSet
from refusaldir.errors import ArtifactError, ConfigError
from refusaldir.io import prepare_out
from refusaldir.models import ChatModel
from refusaldir.select import SelectionResult

__all__ = ["AuditInputs", "check_out", "gather_inputs", "load_directions", "prompt_set"]


@dataclass
class AuditInputs:
    """The audit's inputs, checked: directions to reuse (``None``: extract them), where they
    came from, validation prompts, test prompts, the capture subsets and a reused selection."""

    ds: DirectionSet | None
    source: str
    h_val: list[str]
    l_val: list[str]
    tests: dict[str, PromptSet]
    cap: dict[str, list[str]]
    reused: SelectionResult | None


def check_out(out: Path, force: bool) -> None:
    """Refuse an existing ``out`` folder (even an empty one) unless ``force``; never a file."""
    if out.is_dir() and not force:
        raise ArtifactError(
            f"output folder {out} already exists; pass --force (force=True) to replace it, or "
            "choose another --out"
        )
    prepare_out(out, force)


def load_directions(
    directions: DirectionSet | str | os.PathLike[str], model: ChatModel
) -> tuple[DirectionSet, str]:
    """A private copy of ``directions`` (or the set saved in that folder) and its source,
    checked against ``model``'s exact weights and for the harmfulness directions."""
    if isinstance(directions, DirectionSet):
        ds, source = copy.deepcopy(directions), "given DirectionSet"
    else:
        ds, source = DirectionSet.load(directions), str(directions)
    ds.check_model(model, strict_hash=True)
    if ds.harmfulness is None or ds.t_inst is None:
        raise ArtifactError(
            f"the direction set {source} has no harmfulness directions (t_inst), which the "
            "latent guard needs; run `refusaldir extract` for this model, or omit --directions"
        )
    return ds, source


def prompt_set(prompts: Sequence[str] | None, name: str, split: str | None) -> PromptSet:
    """``prompts`` (checked: non-empty strings), or the shipped ``name``/``split`` set."""
    if prompts is None:
        return load_prompts(name, split)
    if isinstance(prompts, PromptSet):
        return prompts
    return PromptSet(check_prompts(prompts, f"{name}_{split}" if split else name))


def _test_sets(datasets: Mapping[str, Sequence[str]] | None) -> dict[str, PromptSet]:
    if datasets is None:
        return {"harmful": load_prompts("harmful", "test"), "harmless": load_prompts("harmless", "test"),
                "borderline": load_prompts("borderline")}
    if not isinstance(datasets, Mapping):
        raise ConfigError(
            f"datasets has type {type(datasets).__name__}; pass a dict of harmful, harmless and "
            "borderline prompts"
        )
    missing = [s for s in SETS if s not in datasets]
    if missing:
        raise ConfigError(f"datasets lacks {missing}; pass harmful, harmless and borderline prompts")
    return {s: p if isinstance(p := datasets[s], PromptSet) else PromptSet(check_prompts(p, f"datasets[{s!r}]"))
            for s in SETS}


def _reuse_selection(
    selection: SelectionResult | dict[str, Any] | str | os.PathLike[str],
    ds: DirectionSet | None,
    model: ChatModel,
) -> SelectionResult:
    """The selection to reuse (a result, its ``to_dict()`` or its ``selection.json``), checked
    against ``model``'s weights and ``ds``'s own pick."""
    if ds is None:
        raise ConfigError("selection= reuses a selection of given directions; pass directions= too")
    if isinstance(selection, SelectionResult):
        sel = selection
    elif isinstance(selection, dict):
        sel = SelectionResult.from_dict(selection)
    else:
        sel = SelectionResult.load(selection)
    saved_hash = sel.model.get("weights_hash")
    if saved_hash and saved_hash != model.weights_hash:
        raise ArtifactError(
            f"the selection was made on weights {saved_hash[:16]}… but {model.spec} has weights "
            f"{model.weights_hash[:16]}…; run the selection for this model"
        )
    pick = (sel.pos, sel.layer)
    _ = ds[pick]  # raises when the pair is not in the set
    if ds.selected is not None and ds.selected != pick:
        raise ArtifactError(
            f"the directions record the selection {ds.selected} but the selection file picked "
            f"{pick}; pass the matching pair"
        )
    return sel


def gather_inputs(
    model: ChatModel,
    cfg: AuditConfig,
    *,
    directions: DirectionSet | str | os.PathLike[str] | None,
    selection: SelectionResult | dict[str, Any] | str | os.PathLike[str] | None,
    harmful_val: Sequence[str] | None,
    harmless_val: Sequence[str] | None,
    datasets: Mapping[str, Sequence[str]] | None,
) -> AuditInputs:
    """Load and check every input of :func:`refusaldir.audit.audit` (see its arguments)."""
    ds, source = (None, "extracted by this audit") if directions is None else load_directions(directions, model)
    h_val = [str(p) for p in prompt_set(harmful_val, "harmful", "val")]
    l_val = [str(p) for p in prompt_set(harmless_val, "harmless", "val")]
    tests = _test_sets(datasets)
    cap = {s: [str(p) for p in tests[s]][: cfg.capture_limit] for s in SETS}
    reused = None if selection is None else _reuse_selection(selection, ds, model)
    tpl = model.template  # every prompt must fit the context window before any work
    tpl.check_lengths(h_val, reserve=cfg.max_new_tokens, what="harmful_val")
    tpl.check_lengths(l_val, reserve=cfg.max_new_tokens, what="harmless_val")
    for s in SETS:
        tpl.check_lengths(list(tests[s])[: cfg.limit], reserve=cfg.max_new_tokens, what=f"{s} test prompts")
    return AuditInputs(ds, source, h_val, l_val, tests, cap, reused)
