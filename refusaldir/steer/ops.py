"""The intervention math, one implementation each, for one direction or one per batch row.

- :func:`project_out`: directional ablation ``x - (x·û) û``;
- :func:`project_out_rows`: the same with a different unit direction per batch row
  (selection scores several candidates in one batch);
- :func:`add_vector`: activation addition ``x + v``.

Directions arrive as unit vectors already on the activation's device and dtype (move them
once, outside the hot loop).

Example:
    >>> import torch
    >>> x = torch.tensor([[[1.0, 2.0]]])
    >>> project_out(x, torch.tensor([1.0, 0.0])).tolist()
    [[[0.0, 2.0]]]
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["add_vector", "project_out", "project_out_rows", "unit_vector"]


def unit_vector(v: Float[Tensor, " d_model"], dtype: torch.dtype = torch.float32) -> Float[Tensor, " d_model"]:
    """``v / ‖v‖`` in ``dtype`` (a zero vector stays zero)."""
    v = v.to(dtype)
    return v / v.norm().clamp_min(1e-12)


def project_out(
    act: Float[Tensor, "batch pos d_model"], u: Float[Tensor, " d_model"]
) -> Float[Tensor, "batch pos d_model"]:
    """Remove the component of ``act`` along the unit vector ``u``."""
    return act - (act @ u).unsqueeze(-1) * u


def project_out_rows(
    act: Float[Tensor, "batch pos d_model"], u: Float[Tensor, "batch d_model"]
) -> Float[Tensor, "batch pos d_model"]:
    """Remove, from row ``b`` of ``act``, its component along the unit vector ``u[b]``."""
    return act - torch.einsum("btd,bd->bt", act, u).unsqueeze(-1) * u[:, None, :]


def add_vector(
    act: Float[Tensor, "batch pos d_model"], v: Float[Tensor, " d_model"]
) -> Float[Tensor, "batch pos d_model"]:
    """Activation addition."""
    return act + v
