"""Which directions a parametrised edit removes: one orthonormal basis ``(d_model, k)`` per layer.

:func:`edit_bases` builds them from a :class:`~refusaldir.directions.DirectionSet`:

- ``source``: ``"selected"`` (the set's selected direction, everywhere), a float layer index
  (two neighbouring layers' unit directions interpolated, everywhere) or ``"per_layer"`` (each
  layer's own direction at that layer);
- ``projected``: orthogonalise each direction against the harmless mean at its layer (float64),
  so removing it leaves the mean harmless activation's norm alone;
- ``subspace``: ``"refusal"`` (k = 1), ``"harmfulness"`` (the refusal and the harmfulness
  direction together, k = 2), ``"categories"`` (the refusal direction plus the top k - 1
  singular directions of the per-category harmful means, off the refusal direction) or
  ``"pca"`` (plus the top k - 1 principal directions of the per-prompt harmful activations).
  The last two need :class:`~refusaldir.directions.Subspaces` (per-category means and
  per-prompt principal directions captured once).

Example:
    >>> q = edit_bases(ds, model.n_layers, source="per_layer", subspace="harmfulness")  # doctest: +SKIP
    >>> q.shape  # (layer, d_model, k)  # doctest: +SKIP
    torch.Size([24, 896, 2])
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor

from refusaldir.directions import DirectionSet, Subspaces
from refusaldir.errors import ArtifactError, ConfigError

__all__ = ["SOURCES", "SUBSPACES", "check_source", "edit_bases", "orthonormal"]

SUBSPACES = ("refusal", "harmfulness", "categories", "pca")
SOURCES = ("selected", "per_layer")


def orthonormal(vectors: Float[Tensor, "d_model k"], *, tol: float = 1e-6) -> Float[Tensor, "d_model r"]:
    """Gram–Schmidt in float64, in the given order; vectors (nearly) in the span of earlier
    ones are dropped, so the first column is always the first vector's direction. All-zero
    input (e.g. ``resid_pre`` of layer 0 at a template token, the same for every prompt) gives
    one zero column: nothing to remove there."""
    out: list[Tensor] = []
    for v in vectors.to(torch.float64).T:
        norm0 = v.norm()
        for q in out:
            v = v - (v @ q) * q
        if norm0 > 0 and v.norm() > tol * norm0:
            out.append(v / v.norm())
    if not out:
        return torch.zeros(vectors.shape[0], 1, dtype=torch.float64)
    return torch.stack(out, dim=1)


def check_source(source: str | float, n_layers: int) -> str | float:
    """``"selected"``, ``"per_layer"`` or a layer index in ``[0, n_layers - 1]`` (a float)."""
    if isinstance(source, str):
        if source in SOURCES:
            return source
        try:
            source = float(source)
        except ValueError:
            raise ConfigError(
                f"direction source {source!r} is not one of {SOURCES} or a layer index "
                f"(e.g. 12.5 interpolates layers 12 and 13)"
            ) from None
    if isinstance(source, bool) or not isinstance(source, (int, float)) or not math.isfinite(source) \
            or not 0 <= float(source) <= n_layers - 1:
        raise ConfigError(
            f"direction source {source!r} is outside the model's layers; expected a layer index "
            f"in [0, {n_layers - 1}], 'selected' or 'per_layer'"
        )
    return float(source)


def _layer_dirs(ds: DirectionSet, pos: int) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Refusal ``[layer, d]`` at ``pos``, harmfulness ``[layer, d]`` and harmless means
    ``[layer, d]`` at ``pos`` (float64), over every layer of the set."""
    p = ds.positions.index(pos) if pos in ds.positions else None
    if p is None:
        raise ConfigError(f"pos {pos} is not one of the direction set's positions {ds.positions}")
    r = ds.refusal[p].to(torch.float64)
    h = ds.harmfulness.to(torch.float64) if ds.harmfulness is not None else None
    m = ds.means.get("harmless")
    mean = m[1 + p].to(torch.float64) if m is not None else None
    return r, h, mean


def edit_bases(
    ds: DirectionSet,
    n_layers: int,
    *,
    source: str | float = "selected",
    pos: int | None = None,
    projected: bool = False,
    subspace: str = "refusal",
    k: int = 1,
    extra: Subspaces | None = None,
) -> Float[Tensor, "layer d_model k"]:
    """Per-layer orthonormal bases (float64) for :class:`refusaldir.steer.Edit`.

    ``pos`` defaults to the selected position (else -1). Every layer ``0 … n_layers - 1`` must
    be in the set for ``"per_layer"``; otherwise one basis serves every layer.
    """
    source = check_source(source, n_layers)
    if subspace not in SUBSPACES:
        raise ConfigError(f"subspace {subspace!r} is not one of {SUBSPACES}")
    if subspace == "refusal":
        k = 1
    elif subspace == "harmfulness":
        k = 2
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 16:
        raise ConfigError(f"k={k!r} must be an integer in [1, 16] (directions ablated together)")
    sel = ds.selected
    if pos is None:
        pos = sel[0] if sel is not None else -1
    r, h, mean = _layer_dirs(ds, pos)
    index = {layer: j for j, layer in enumerate(ds.layers)}

    def at(t: Tensor, layer: float) -> Tensor:
        lo, hi = math.floor(layer), math.ceil(layer)
        if lo not in index or hi not in index:
            raise ConfigError(
                f"layer {layer:g} is not in the direction set (layers {ds.layers[0]}…{ds.layers[-1]}); "
                "extract every layer (`refusaldir extract` does by default)"
            )
        a, b = t[index[lo]], t[index[hi]]
        if lo == hi:
            return a
        f = layer - lo
        return (1 - f) * a / a.norm().clamp_min(1e-30) + f * b / b.norm().clamp_min(1e-30)

    if source == "selected":
        if sel is None:
            raise ArtifactError(
                "this direction set has no selected direction; run `refusaldir select` first or "
                "pass a layer index or 'per_layer' as the direction source"
            )
        where = [float(sel[1])] * n_layers
    elif source == "per_layer":
        where = [float(layer) for layer in range(n_layers)]
    else:
        where = [float(source)] * n_layers
    bases: list[Tensor] = []
    cache: dict[float, Tensor] = {}
    for layer in where:
        if layer not in cache:
            cache[layer] = _basis(at, layer, r, h, mean, projected, subspace, k, extra, index)
        bases.append(cache[layer])
    width = max(b.shape[1] for b in bases)
    return torch.stack([torch.nn.functional.pad(b, (0, width - b.shape[1])) for b in bases])


def _basis(at, layer: float, r: Tensor, h: Tensor | None, mean: Tensor | None, projected: bool,  # type: ignore[no-untyped-def]
           subspace: str, k: int, extra: Subspaces | None, index: dict[int, int]) -> Tensor:
    vecs = [at(r, layer)]
    if subspace == "harmfulness":
        if h is None:
            raise ArtifactError("this direction set has no harmfulness directions; re-run `refusaldir extract`")
        vecs.append(at(h, layer))
    elif subspace in ("categories", "pca"):
        if extra is None:
            raise ConfigError(
                f"subspace {subspace!r} needs captured per-category means and principal "
                "directions (refusaldir.directions.subspaces(model, ds)); pass extra="
            )
        table = extra.categories if subspace == "categories" else extra.components
        layer_i = round(layer)
        if layer_i not in extra.layers:
            raise ConfigError(f"layer {layer_i} has no captured subspace (layers {extra.layers})")
        cand = table[:, extra.layers.index(layer_i)].to(torch.float64)  # (n, d)
        if vecs[0].norm() > 0:
            u = vecs[0] / vecs[0].norm()
            cand = cand - (cand @ u)[:, None] * u  # off the refusal direction
        sv, vh = torch.linalg.svd(cand, full_matrices=False)[1:]
        keep = sv > 1e-6 * sv.max().clamp_min(1e-300)  # no noise directions (e.g. what is left of r)
        vecs += list(vh[keep][: k - 1])
    if projected:
        if mean is None:
            raise ArtifactError(
                "this direction set stores no harmless means, so it cannot be projected; "
                "re-run `refusaldir extract`"
            )
        mu = at(mean, layer)
        mu = mu / mu.norm().clamp_min(1e-30)
        vecs = [v - (v @ mu) * mu for v in vecs]
    return orthonormal(torch.stack(vecs, dim=1))
