"""Directions as interventions see them: wrapping, checks, hashes and run-metadata records.

- :func:`as_direction`: accept a :class:`~refusaldir.directions.Direction` or a bare tensor;
- :func:`check_direction`: a finite, non-zero vector of the model's size, or a clear error;
- :func:`vector_sha256`: identifies a direction in run metadata;
- :func:`direction_to_dict` / :func:`direction_from_dict`: the record stored in an
  intervention's ``to_dict()`` (by reference to the direction set when it can be rebuilt);
- :func:`check_coeff` / :func:`norm_layers`: argument checks shared by the interventions.

Example:
    >>> import torch
    >>> d = as_direction(torch.ones(4))
    >>> d.layer, d.kind
    (-1, 'custom')
    >>> direction_from_dict(direction_to_dict(d, include_vector=False), None).vector.tolist()
    [1.0, 1.0, 1.0, 1.0]
"""

from __future__ import annotations

import hashlib
import math
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from refusaldir.directions import Direction, DirectionSet
from refusaldir.errors import ArtifactError, ConfigError, HookError

if TYPE_CHECKING:
    from refusaldir.models import ChatModel

__all__ = [
    "as_direction", "check_coeff", "check_direction", "direction_from_dict", "direction_to_dict",
    "norm_layers", "vector_sha256",
]


def as_direction(direction: Direction | Tensor, *, kind: str = "custom") -> Direction:
    """Wrap a bare 1-D tensor as a :class:`Direction` (layer ``-1``: provenance unknown)."""
    if isinstance(direction, Direction):
        return direction
    if isinstance(direction, Tensor):
        return Direction(direction.detach(), layer=-1, pos=None, kind=kind)
    raise ConfigError(
        f"direction has type {type(direction).__name__}; pass a refusaldir.Direction "
        "(e.g. DirectionSet.refusal_direction(layer, pos)) or a 1-D tensor of size d_model"
    )


def check_direction(model: ChatModel | None, direction: Direction, what: str = "direction") -> None:
    """Raise a clear error unless ``direction`` is a finite, non-zero vector of ``model``'s size."""
    v = direction.vector
    if v.ndim != 1:
        raise ConfigError(
            f"{what} has shape {tuple(v.shape)}; expected a 1-D vector of size d_model"
        )
    if model is not None and v.shape[0] != model.d_model:
        raise ArtifactError(
            f"{what} has d_model={v.shape[0]} but {model.spec} has d_model={model.d_model}; "
            "use directions extracted from this model"
        )
    vf = v.float()
    if not bool(torch.isfinite(vf).all()):
        raise ConfigError(f"{what} contains NaN or inf values; re-extract the directions")
    if float(vf.norm()) == 0.0:
        raise ConfigError(f"{what} is the zero vector and has no direction; pick another layer")


def check_coeff(coeff: Any, name: str = "coeff") -> float:
    """``coeff`` as a finite float, or a :class:`ConfigError` naming ``name``."""
    try:
        c = float(coeff)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={coeff!r} is not a number; pass e.g. {name}=4.0") from None
    if not math.isfinite(c):
        raise ConfigError(
            f"{name}={coeff} is not finite; pass a real number such as 4.0, or find one with "
            "refusaldir.evaluate.calibrate_addition"
        )
    return c


def norm_layers(layers: Any, *, allow_all: bool) -> tuple[int, ...] | None:
    """``"all"``/``None`` → ``None`` (every layer); an int or ints → a sorted tuple."""
    if layers is None or (isinstance(layers, str) and layers == "all"):
        if not allow_all:
            raise ConfigError("pass the layer(s) to act on, e.g. layers=[13]")
        return None
    if isinstance(layers, str):
        raise ConfigError(f"layers={layers!r} is not valid; pass 'all', an int or a list of ints")
    seq = [layers] if isinstance(layers, (int,)) else list(layers)
    try:
        out = tuple(sorted({int(x) for x in seq}))
    except (TypeError, ValueError):
        raise ConfigError(
            f"layers={layers!r} is not valid; pass 'all', an int or a list of ints"
        ) from None
    if not out:
        raise ConfigError("no layers selected; pass at least one layer index")
    if out[0] < 0:
        raise HookError(f"layer {out[0]} is negative; layers are numbered from 0")
    return out


def vector_sha256(vector: Float[Tensor, " d_model"]) -> str:
    """sha256 of a vector's float32 bytes (identifies a direction in run metadata)."""
    t = vector.detach().to("cpu", torch.float32).contiguous()
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


def rebuildable(d: Direction) -> bool:
    """Whether a :class:`DirectionSet` can rebuild ``d`` from its layer/pos/kind alone."""
    return d.layer >= 0 and (d.kind == "harmfulness" or (d.kind == "refusal" and d.pos is not None))


def direction_to_dict(d: Direction, include_vector: bool) -> dict[str, Any]:
    """Provenance, norm and sha256 of ``d``; the vector too when asked or not rebuildable."""
    out: dict[str, Any] = {**d.to_dict(), "norm": d.norm, "sha256": vector_sha256(d.vector)}
    if include_vector or not rebuildable(d):
        out["vector"] = [float(x) for x in d.vector.float().tolist()]
    return out


def direction_from_dict(dd: dict[str, Any], directions: DirectionSet | None) -> Direction:
    """Rebuild a :func:`direction_to_dict` record (checking the recorded sha256)."""
    try:
        layer = int(dd["layer"])
        kind = str(dd.get("kind", "refusal"))
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"direction record {dd!r} lacks 'layer'/'kind' ({exc})") from None
    pos = dd.get("pos")
    if "vector" in dd:
        d = Direction(torch.tensor(dd["vector"], dtype=torch.float32), layer,
                      None if pos is None else int(pos), kind, dd.get("hook_point", "resid_pre"))
    elif directions is None:
        raise ConfigError(
            f"the {kind} direction (layer {layer}, pos {pos}) is stored by reference; pass the "
            "DirectionSet it came from: from_dict(d, DirectionSet.load(RUN_FOLDER))"
        )
    elif kind == "refusal":
        d = directions.refusal_direction(layer, None if pos is None else int(pos))
    elif kind == "harmfulness":
        d = directions.harmfulness_direction(layer)
    else:
        raise ArtifactError(
            f"direction kind {kind!r} cannot be rebuilt from a DirectionSet and the record has no "
            "'vector'; save it with to_dict(include_vector=True)"
        )
    want = dd.get("sha256")
    if want and vector_sha256(d.vector) != want:
        raise ArtifactError(
            f"the {kind} direction at layer {layer}, pos {pos} in this DirectionSet does not match "
            f"the recorded one (sha256 {want[:12]}…); pass the direction set the run used, or "
            "save the intervention with to_dict(include_vector=True)"
        )
    return d
