"""Interventions: directional ablation, activation addition, conditional steering, weight
orthogonalization and its export as a normal model folder.

- :mod:`~refusaldir.steer.ops`: the ablation/addition math (one implementation each);
- :mod:`~refusaldir.steer.interventions`: :class:`Ablation`, :class:`Addition`, ``ablate``/``add``;
- :mod:`~refusaldir.steer.conditional`: :class:`ConditionalSteering`, ``steer_if``,
  :func:`intervention_from_dict`;
- :mod:`~refusaldir.steer.layers`: :func:`layer_scores`, :func:`default_layer`;
- :mod:`~refusaldir.steer.orthogonalize` / :mod:`~refusaldir.steer.export`: weights with the
  direction projected out, and :func:`save_orthogonalized`;
- :mod:`~refusaldir.steer.directions_io`: direction checks, hashes and records.

Calibrations that need generation and judges are in :mod:`refusaldir.evaluate`.

Example:
    >>> from refusaldir.steer import ablate  # doctest: +SKIP
    >>> with ablate(model, ds.refusal_direction(12, -1)):  # doctest: +SKIP
    ...     logits = model.hf(**batch).logits
"""

from refusaldir.steer.bases import SUBSPACES, edit_bases, orthonormal
from refusaldir.steer.conditional import (
    ConditionalSteering,
    Intervention,
    intervention_from_dict,
    steer_if,
)
from refusaldir.steer.directions_io import (
    as_direction,
    check_coeff,
    check_direction,
    direction_from_dict,
    direction_to_dict,
    norm_layers,
    vector_sha256,
)
from refusaldir.steer.edit import MAX_WEIGHT, Edit, Kernel
from refusaldir.steer.export import PROVENANCE_FILE, edited_parameters, save_orthogonalized
from refusaldir.steer.export_edit import save_edited
from refusaldir.steer.interventions import ABLATION_POINTS, Ablation, Addition, Applied, ablate, add
from refusaldir.steer.layers import default_layer, layer_scores
from refusaldir.steer.ops import add_vector, project_out, project_out_rows, unit_vector
from refusaldir.steer.orthogonalize import (
    Writer,
    edited_copy,
    live_writers,
    orthogonalize,
    plain_copy,
    project_along,
    residual_writers,
)

__all__ = [
    "save_edited",
    "MAX_WEIGHT", "SUBSPACES", "Edit", "Kernel", "edit_bases", "orthonormal", "live_writers",
    "ABLATION_POINTS", "PROVENANCE_FILE", "Ablation", "Addition", "Applied",
    "ConditionalSteering", "Intervention", "ablate", "add", "add_vector", "as_direction",
    "check_coeff", "check_direction", "default_layer", "direction_from_dict",
    "direction_to_dict", "edited_parameters", "intervention_from_dict", "layer_scores", "norm_layers",
    "orthogonalize", "plain_copy", "project_along", "project_out", "project_out_rows", "save_orthogonalized",
    "residual_writers", "steer_if", "unit_vector", "vector_sha256", "Writer", "edited_copy",
]
