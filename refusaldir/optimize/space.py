"""The search space: what one trial of the optimiser chooses, and the :class:`Edit` it means.

Per trial: the direction source (selected / a fractional layer index / each layer's own),
the variant (plain / projected against the harmless mean / norm-preserving), the subspace
(refusal alone, with the harmfulness direction, per-category or principal directions, k),
and two kernels over layers (attention and MLP writes: peak layer, peak weight, width,
floor as a fraction of the peak) plus the embedding weight.

Example:
    >>> p = rank1_params(24, (-1, 14))
    >>> p["source"], p["attn_weight"]
    ('selected', 1.0)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from refusaldir.directions import DirectionSet, Subspaces
from refusaldir.errors import ArtifactError
from refusaldir.optimize.config import OptimizeConfig
from refusaldir.steer import Edit, Kernel

if TYPE_CHECKING:
    import optuna

__all__ = ["build_edit", "describe", "in_space", "rank1_params", "suggest"]


def suggest(trial: optuna.Trial, cfg: OptimizeConfig, n_layers: int, has_selected: bool) -> dict[str, Any]:
    """Sample one trial's parameters (a flat dict of plain values)."""
    sources = [s for s in cfg.sources if s != "selected" or has_selected]
    p: dict[str, Any] = {"source": trial.suggest_categorical("source", sources)}
    if p["source"] == "index":
        p["index"] = trial.suggest_float("index", 0.2 * (n_layers - 1), 0.85 * (n_layers - 1))
    p["variant"] = trial.suggest_categorical("variant", list(cfg.variants))
    p["subspace"] = trial.suggest_categorical("subspace", list(cfg.subspaces))
    if p["subspace"] in ("categories", "pca"):
        p["k"] = trial.suggest_int("k", 2, cfg.max_k)
    for part in ("attn", "mlp"):
        p[f"{part}_peak"] = trial.suggest_float(f"{part}_peak", 0.0, n_layers - 1.0)
        p[f"{part}_weight"] = trial.suggest_float(f"{part}_weight", 0.3, 1.5)
        p[f"{part}_width"] = trial.suggest_float(f"{part}_width", 1.0, float(n_layers))
        p[f"{part}_floor"] = trial.suggest_float(f"{part}_floor", 0.0, 1.0)
    p["embed"] = trial.suggest_float("embed", 0.0, 1.0)
    return p


def in_space(p: dict[str, Any], cfg: OptimizeConfig) -> bool:
    """Whether ``cfg``'s search space can draw the trial ``p`` (its source, subspace, variant, k)."""
    return (p.get("source") in cfg.sources and p.get("subspace") in cfg.subspaces
            and p.get("variant") in cfg.variants and int(p.get("k", 2)) <= cfg.max_k)


def rank1_params(n_layers: int, selected: tuple[int, int] | None) -> dict[str, Any]:
    """The 2024 recipe in this space: the selected direction, full strength everywhere."""
    return {"source": "selected" if selected is not None else "index",
            **({} if selected is not None else {"index": 0.6 * (n_layers - 1)}),
            "variant": "plain", "subspace": "refusal",
            "attn_peak": 0.0, "attn_weight": 1.0, "attn_width": 1.0, "attn_floor": 1.0,
            "mlp_peak": 0.0, "mlp_weight": 1.0, "mlp_width": 1.0, "mlp_floor": 1.0, "embed": 1.0}


def build_edit(p: dict[str, Any], ds: DirectionSet, n_layers: int, extra: Subspaces | None) -> Edit:
    """The :class:`Edit` a parameter dict stands for (``floor`` is a fraction of the peak weight)."""
    try:
        source = p["index"] if p["source"] == "index" else p["source"]
        kernels = [Kernel(p[f"{k}_peak"], p[f"{k}_weight"], p[f"{k}_width"], p[f"{k}_floor"] * p[f"{k}_weight"])
                   for k in ("attn", "mlp")]
        return Edit.from_directions(
            ds, n_layers, source=source, projected=p["variant"] == "projected",
            subspace=p["subspace"], k=int(p.get("k", 1)), extra=extra, attn=kernels[0],
            mlp=kernels[1], embed=p["embed"], preserve_norm=p["variant"] == "norm_preserving")
    except KeyError as exc:
        raise ArtifactError(f"edit parameters lack {exc}; the record is not an optimiser trial") from exc


def describe(p: dict[str, Any]) -> str:
    """One line a reader can act on: which layers, what weight, which directions."""
    src = {"selected": "selected direction", "per_layer": "each layer's own direction"}.get(
        p["source"], f"direction at layer {p.get('index', 0):.2f}")
    sub = {"refusal": "", "harmfulness": " + harmfulness", "categories": f" + {p.get('k', 2) - 1} category dirs",
           "pca": f" + {p.get('k', 2) - 1} principal dirs"}[p["subspace"]]
    if p["attn_floor"] >= 1 and p["mlp_floor"] >= 1 and p["attn_weight"] == p["mlp_weight"]:
        where = f"weight {p['attn_weight']:.2f} at every layer"
    else:
        where = "; ".join(
            f"{k} peak {p[f'{k}_weight']:.2f} at layer {p[f'{k}_peak']:.1f} (width {p[f'{k}_width']:.1f}, "
            f"floor {p[f'{k}_floor'] * p[f'{k}_weight']:.2f})" for k in ("attn", "mlp"))
    return f"{src}{sub}, {p['variant'].replace('_', '-')}; {where}; embedding {p['embed']:.2f}"
