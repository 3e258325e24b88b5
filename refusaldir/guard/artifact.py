"""The on-disk form of a :class:`~refusaldir.guard.LatentGuard`: ``guard.safetensors`` +
``guard.json`` (strict JSON recording the tensor file's sha256), encoded here and read back
with every field checked against the tensors.

Example:
    >>> import torch
    >>> t = {"directions": torch.ones(1, 2), "centroid_harmful": torch.ones(1, 2),
    ...      "centroid_harmless": torch.zeros(1, 2), "loc": torch.zeros(1), "scale": torch.ones(1)}
    >>> meta = {"format_version": 1, "method": "projection", "layers": [1], "t_inst": -6,
    ...         "threshold": 0.5, "target_fpr": 0.05, "hook_point": "resid_pre", "d_model": 2}
    >>> check_guard(meta, t, "guard")
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from refusaldir.errors import ArtifactError
from refusaldir.hooks import RESID_POINTS
from refusaldir.io import field_error
from refusaldir.tensorio import encode_folder, read_folder

__all__ = [
    "FORMAT_VERSION", "GUARD_METHODS", "META_FILE", "TENSORS_FILE", "TENSOR_NAMES", "check_guard",
    "encode", "read",
]

GUARD_METHODS = ("projection", "centroid")
TENSORS_FILE = "guard.safetensors"
META_FILE = "guard.json"
FORMAT_VERSION = 1
TENSOR_NAMES = ("directions", "centroid_harmful", "centroid_harmless", "loc", "scale")
FIX = "fit and save the guard again (LatentGuard.save or `refusaldir guard --save`)"


def encode(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, bytes]:
    """The two files of a guard folder, in the order they are renamed into place."""
    return encode_folder({k: v.float() for k, v in tensors.items()}, meta, tensors_file=TENSORS_FILE,
                         meta_file=META_FILE, header={"format": "refusaldir-guard"})


def read(src: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``guard.json`` and the tensors of the guard folder ``src``, checked."""
    meta, tensors, _ = read_folder(
        src, tensors_file=TENSORS_FILE, meta_file=META_FILE, fix=FIX,
        missing_fix="save a guard there with LatentGuard.save or `refusaldir guard --save`")
    check_guard(meta, tensors, src / META_FILE)
    return meta, tensors


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_guard(meta: Any, tensors: dict[str, Tensor], source: str | os.PathLike[str]) -> None:
    """Raise :class:`ArtifactError` naming the field unless ``guard.json`` is complete, well
    formed and agrees with the tensors (shapes, finite values, positive scales)."""
    if not isinstance(meta, dict):
        raise field_error(source, "the guard record", type(meta).__name__, "a JSON object", FIX)
    missing = [k for k in ("format_version", "method", "layers", "t_inst", "threshold", "target_fpr",
                           "hook_point", "d_model") if k not in meta]
    if missing:
        raise ArtifactError(f"{source} lacks the key(s) {missing}; {FIX}")
    layers = meta["layers"]
    checks = [
        ("format_version", meta["format_version"] == FORMAT_VERSION, str(FORMAT_VERSION)),
        ("method", meta["method"] in GUARD_METHODS, f"one of {', '.join(GUARD_METHODS)}"),
        ("layers", isinstance(layers, list) and bool(layers) and all(map(_is_int, layers))
         and layers[0] >= 0 and all(a < b for a, b in zip(layers, layers[1:])),
         "distinct layer indices >= 0 in increasing order"),
        ("t_inst", _is_int(meta["t_inst"]) and meta["t_inst"] < 0, "a negative integer"),
        ("threshold", _finite(meta["threshold"]), "a finite number"),
        ("target_fpr", _finite(meta["target_fpr"]) and 0 <= meta["target_fpr"] < 1, "a number in [0, 1)"),
        ("hook_point", meta["hook_point"] in RESID_POINTS, f"one of {', '.join(RESID_POINTS)}"),
        ("d_model", _is_int(meta["d_model"]) and meta["d_model"] > 0, "a positive integer"),
        ("model", isinstance(meta.get("model", {}), dict), "an object"),
        ("calibration", isinstance(meta.get("calibration", {}), dict), "an object"),
    ]
    for name, ok, expected in checks:
        if not ok:
            raise field_error(source, name, meta.get(name), expected, FIX)
    n, d = len(layers), meta["d_model"]
    if set(tensors) != set(TENSOR_NAMES):
        raise field_error(source, "tensors", sorted(tensors), f"exactly {list(TENSOR_NAMES)}", FIX)
    for name, t in tensors.items():
        want = (n,) if name in ("loc", "scale") else (n, d)
        if tuple(t.shape) != want:
            raise ArtifactError(
                f"{source}: tensor {name} has shape {tuple(t.shape)}, expected {want} for layers "
                f"{layers} and d_model {d}; {FIX}"
            )
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            raise ArtifactError(f"{source}: tensor {name} holds NaN/inf or non-float values; {FIX}")
    if not bool((tensors["scale"] > 0).all()):
        raise ArtifactError(f"{source}: tensor scale has values <= 0, expected positive scales; {FIX}")
