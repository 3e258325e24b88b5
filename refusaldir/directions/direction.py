"""``Direction``: one vector in the residual stream with its provenance (layer, pos, kind).

Example:
    >>> import torch
    >>> d = Direction(torch.ones(4), layer=2, pos=-1)
    >>> float(d.unit.norm()), d.d_model
    (1.0, 4)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["Direction"]


@dataclass(frozen=True)
class Direction:
    """One direction in the residual stream, with where it came from.

    Supports ``+``, ``-`` and scalar ``*`` (provenance kept from the left operand).

    Example:
        >>> d = Direction(torch.ones(4), layer=2, pos=-1)
        >>> float(d.unit.norm())
        1.0
    """

    vector: Float[Tensor, " d_model"]
    layer: int
    pos: int | None = None
    kind: str = "refusal"
    hook_point: str = "resid_pre"

    @property
    def unit(self) -> Float[Tensor, " d_model"]:
        v = self.vector.to(torch.float32)
        return v / v.norm().clamp_min(1e-12)

    @property
    def norm(self) -> float:
        return float(self.vector.float().norm())

    @property
    def d_model(self) -> int:
        return int(self.vector.shape[-1])

    def __add__(self, other: Direction) -> Direction:
        return replace(self, vector=self.vector + other.vector)

    def __sub__(self, other: Direction) -> Direction:
        return replace(self, vector=self.vector - other.vector)

    def __mul__(self, k: float) -> Direction:
        return replace(self, vector=self.vector * k)

    __rmul__ = __mul__

    def __neg__(self) -> Direction:
        return replace(self, vector=-self.vector)

    def to_dict(self) -> dict[str, Any]:
        """Provenance without the vector (for run metadata)."""
        return {"layer": self.layer, "pos": self.pos, "kind": self.kind, "hook_point": self.hook_point}
