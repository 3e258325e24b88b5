"""Which layer to intervene at (refusal) or to detect at (harmfulness).

:func:`layer_scores` tabulates, per candidate layer, how well the projection onto that
layer's own direction separates harmful from harmless validation prompts
(:func:`refusaldir.stats.separation_table`); :func:`default_layer` applies the rule.

Example:
    >>> layer = default_layer(model, ds)  # doctest: +SKIP
    >>> direction = ds.refusal_direction(layer, -1)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from refusaldir.batching import AUTO, BatchSize
from refusaldir.capture import project
from refusaldir.data import check_prompts, load_prompts
from refusaldir.directions import DirectionSet
from refusaldir.errors import ArtifactError, ConfigError
from refusaldir.stats import separation_table

if TYPE_CHECKING:
    from refusaldir.models import ChatModel

__all__ = ["default_layer", "layer_scores"]


def layer_scores(
    model: ChatModel,
    ds: DirectionSet,
    harmful: Sequence[str] | None = None,
    harmless: Sequence[str] | None = None,
    *,
    kind: str = "refusal",
    pos: int = -1,
    max_frac: float = 0.8,
    batch_size: BatchSize = AUTO,
    progress: bool = False,
) -> list[dict[str, float]]:
    """AUROC (harmful vs harmless) and standardized separation of each candidate layer's
    projection onto its own direction; candidates are the set's layers ``< max_frac·n_layers``.

    ``kind="refusal"`` projects onto the refusal direction at ``pos``; ``kind="harmfulness"``
    onto the harmfulness direction at ``t_inst``. Prompts default to the shipped ``val`` splits.
    Each row is :func:`refusaldir.stats.separation_table`'s: ``layer``, ``auroc``,
    ``separation`` (``(mean_harmful - mean_harmless) / pooled std``) and both means.
    """
    if not 0 < max_frac <= 1:
        raise ConfigError(f"max_frac={max_frac} must be in (0, 1]")
    harmful = check_prompts(harmful if harmful is not None else load_prompts("harmful", "val"), "harmful")
    harmless = check_prompts(harmless if harmless is not None else load_prompts("harmless", "val"), "harmless")
    if not harmful or not harmless:
        raise ConfigError("layer_scores needs harmful and harmless validation prompts")
    ds.check_model(model)
    cands = [layer for layer in ds.layers if layer < max_frac * model.n_layers]
    if not cands:
        raise ConfigError(
            f"no layer of this direction set is below {max_frac}·n_layers "
            f"({max_frac * model.n_layers:.1f}); raise max_frac"
        )
    if kind == "refusal":
        dirs = torch.stack([ds.refusal_direction(layer, pos).vector for layer in cands])
        positions = [pos]
    elif kind == "harmfulness":
        if ds.harmfulness is None or ds.t_inst is None:
            raise ArtifactError(
                "this direction set has no harmfulness directions; run `refusaldir extract`"
            )
        dirs = torch.stack([ds.harmfulness_direction(layer).vector for layer in cands])
        positions = [int(ds.t_inst)]
    else:
        raise ConfigError(f"kind={kind!r} must be 'refusal' or 'harmfulness'")
    proj = {
        name: project(model, texts, dirs.unsqueeze(0), layers=cands, positions=positions,
                      hook_point=ds.hook_point, batch_size=batch_size, progress=progress,
                      description=f"project {name}")[:, 0]
        for name, texts in (("harmful", harmful), ("harmless", harmless))
    }
    return separation_table(proj["harmful"], proj["harmless"], cands)


def default_layer(
    model: ChatModel,
    ds: DirectionSet,
    harmful: Sequence[str] | None = None,
    harmless: Sequence[str] | None = None,
    *,
    kind: str = "refusal",
    pos: int = -1,
    max_frac: float = 0.8,
    tol: float = 0.02,
    use_selected: bool = True,
    batch_size: BatchSize = AUTO,
    progress: bool = False,
) -> int:
    """The layer to intervene at (refusal) or to detect at (harmfulness).

    Rule (until ``refusaldir select`` has recorded a choice, which wins for
    ``kind="refusal"``): among the set's layers ``< max_frac·n_layers`` (Arditi et al.'s
    cut-off, away from the unembedding), score each layer by the AUROC with which the
    projection onto its own direction separates **validation** harmful from harmless prompts
    (shipped ``val`` splits by default, so the test split stays out of the choice). Take the
    earliest layer whose AUROC is within ``tol`` of the best: AUROC keeps creeping up with
    depth, differences below ~0.02 are within sampling noise for ~60+60 prompts, and an
    earlier layer leaves more layers downstream for an addition to act through. (On the demo
    model this picks layer 15 of 24; the single best AUROC, layer 18, ablates as well but
    induces refusal by addition poorly.)

    Example:
        >>> layer = default_layer(model, ds)  # doctest: +SKIP
        >>> direction = ds.refusal_direction(layer, -1)  # doctest: +SKIP
    """
    if use_selected and kind == "refusal" and ds.selected is not None:
        return ds.selected[1]
    if not 0 <= tol < 1:
        raise ConfigError(f"tol={tol} must be in [0, 1)")
    rows = layer_scores(model, ds, harmful, harmless, kind=kind, pos=pos, max_frac=max_frac,
                        batch_size=batch_size, progress=progress)
    best = max(r["auroc"] for r in rows)
    return int(min(r["layer"] for r in rows if r["auroc"] >= best - tol - 1e-12))
