"""Candidate directions beyond the difference of means, for multi-direction edits.

:func:`subspaces` captures the harmful prompts' activations at one position for every layer
and keeps, per layer, the per-category harmful means minus the harmless mean
(``categories``) and the top principal directions of the per-prompt harmful activations
minus the harmless mean (``components``). :func:`refusaldir.steer.edit_bases` orthogonalises
them against the refusal direction and takes the leading ones.

Example:
    >>> sub = subspaces(model, ds, load_prompts("harmful", "train"))  # doctest: +SKIP
    >>> sub.categories.shape  # (category, layer, d_model)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from refusaldir.batching import AUTO, BatchSize
from refusaldir.capture import iter_activations
from refusaldir.data import PromptSet
from refusaldir.directions.set import DirectionSet
from refusaldir.errors import ArtifactError, ConfigError

if TYPE_CHECKING:
    from refusaldir.models import ChatModel

__all__ = ["Subspaces", "subspaces"]


@dataclass(frozen=True, eq=False)
class Subspaces:
    """Per-layer candidate directions: ``categories`` ``[category, layer, d_model]`` and
    ``components`` ``[k, layer, d_model]`` (principal directions, unit norm)."""

    categories: Float[Tensor, "cat layer d_model"]
    components: Float[Tensor, "k layer d_model"]
    layers: list[int]
    pos: int
    names: list[str] = field(default_factory=list)

    def tensors(self) -> dict[str, Tensor]:
        return {"categories": self.categories.float().contiguous(),
                "components": self.components.float().contiguous()}

    def record(self) -> dict[str, Any]:
        return {"layers": self.layers, "pos": self.pos, "categories": self.names,
                "sha256": self.sha256}

    @property
    def sha256(self) -> str:
        h = hashlib.sha256()
        for t in self.tensors().values():
            h.update(t.numpy().tobytes())
        return h.hexdigest()

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], record: dict[str, Any]) -> Subspaces:
        try:
            out = cls(tensors["categories"], tensors["components"], [int(x) for x in record["layers"]],
                      int(record["pos"]), [str(x) for x in record.get("categories", [])])
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"subspace record is incomplete ({exc}); re-run `refusaldir optimize`") from exc
        if out.sha256 != record.get("sha256"):
            raise ArtifactError("subspace tensors do not match their record's sha256; re-run `refusaldir optimize`")
        return out


def subspaces(
    model: ChatModel,
    ds: DirectionSet,
    harmful: PromptSet,
    *,
    pos: int = -1,
    k: int = 8,
    min_per_category: int = 3,
    batch_size: BatchSize = AUTO,
    progress: bool = True,
) -> Subspaces:
    """Capture ``harmful`` at ``pos`` over the set's layers; per-category and principal
    directions relative to the set's harmless mean (categories with fewer than
    ``min_per_category`` prompts are pooled into none)."""
    if not isinstance(harmful, PromptSet) or not len(harmful):
        raise ConfigError("subspaces needs a non-empty PromptSet of harmful prompts (with categories)")
    if pos not in ds.positions or "harmless" not in ds.means:
        raise ArtifactError(
            f"the direction set has no harmless mean at pos {pos} (positions {ds.positions}); "
            "re-run `refusaldir extract`"
        )
    mean0 = ds.means["harmless"][1 + ds.positions.index(pos)].to(torch.float64)  # (layer, d)
    rows: list[Tensor] = []
    for _, acts in iter_activations(model, list(harmful), layers=ds.layers, positions=[pos],
                                    hook_point=ds.hook_point, batch_size=batch_size,
                                    progress=progress, description="capture subspaces"):
        rows.append(acts[:, 0].to(torch.float64).cpu())  # (batch, layer, d)
    x = torch.cat(rows) - mean0  # (n, layer, d)
    cats: dict[str, list[int]] = {}
    for i, c in enumerate(harmful.categories):
        if c is not None:
            cats.setdefault(str(c), []).append(i)
    names = sorted(c for c, idx in cats.items() if len(idx) >= min_per_category)
    if names:
        cat = torch.stack([x[cats[c]].mean(0) for c in names])
    else:
        cat = x.mean(0, keepdim=True)
        names = ["all"]
    comps = []
    for j in range(x.shape[1]):
        xc = x[:, j] - x[:, j].mean(0)
        _, _, vh = torch.linalg.svd(xc, full_matrices=False)
        comps.append(vh[: min(k, vh.shape[0])])
    return Subspaces(cat, torch.stack(comps, dim=1), list(ds.layers), pos, names)
