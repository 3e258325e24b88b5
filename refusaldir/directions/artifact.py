"""The on-disk form of a :class:`~refusaldir.directions.DirectionSet`: encoding, reading back
with every field of ``metadata.json`` checked against the tensors, and what a folder already
holds before a save.

The tensor file's own header repeats ``positions``, ``layers``, ``t_inst`` and ``hook_point``;
it is covered by the sha256 recorded in ``metadata.json``, so an edited ``layers`` list (which
would silently relabel every vector) is caught even when it is still well formed.

Example:
    >>> import torch
    >>> data, sha = encode({"refusal": torch.ones(1, 1, 2)}, [-1], [3], None, "resid_pre")
    >>> header_fields(data)["layers"]
    [3]
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load
from torch import Tensor

from refusaldir.errors import ArtifactError
from refusaldir.hooks import RESID_POINTS
from refusaldir.io import field_error, sha256_bytes, sha256_file
from refusaldir.tensorio import read_folder, tensor_bytes

__all__ = [
    "FORMAT_VERSION", "METADATA_FILE", "REQUIRED", "TENSORS_FILE", "check_metadata", "encode",
    "folder_state", "header_fields", "occupied_error", "read",
]

FORMAT_VERSION = 1
TENSORS_FILE = "directions.safetensors"
METADATA_FILE = "metadata.json"
#: Keys ``metadata.json`` must hold (``t_inst`` may be ``null`` for imported sets).
REQUIRED = ("format_version", "positions", "layers", "t_inst", "hook_point", "d_model")
HEADER_KEYS = ("positions", "layers", "t_inst", "hook_point")


def _fix(src: Path) -> str:
    return f"re-run `refusaldir extract --out {src} --force` to regenerate it"


def encode(
    tensors: dict[str, Tensor], positions: list[int], layers: list[int], t_inst: int | None,
    hook_point: str,
) -> tuple[bytes, str]:
    """The ``directions.safetensors`` bytes (CPU copies; labels repeated in the header) and
    their sha256."""
    header = {"format": "refusaldir", "positions": json.dumps(positions), "layers": json.dumps(layers),
              "t_inst": json.dumps(t_inst), "hook_point": json.dumps(hook_point)}
    data = tensor_bytes(tensors, header)
    return data, sha256_bytes(data)


def header_fields(data: bytes) -> dict[str, Any]:
    """The labels a tensor file's header repeats (empty for files written before they were)."""
    n = int.from_bytes(data[:8], "little")
    extra = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
    return {k: json.loads(extra[k]) for k in HEADER_KEYS if k in extra}


def read(src: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``metadata.json`` and the tensors of the run folder ``src``, checked (see module doc)."""
    meta, tensors, data = read_folder(
        src, tensors_file=TENSORS_FILE, meta_file=METADATA_FILE,
        fix=_fix(src),
        missing_fix=f"run `refusaldir extract --out {src}` first")
    try:
        header = header_fields(data)
    except (ValueError, TypeError, AttributeError) as exc:
        raise ArtifactError(f"{src / TENSORS_FILE} has an unreadable header ({exc}); the file is "
                            "corrupt — re-run `refusaldir extract`") from exc
    check_metadata(meta, tensors, header, src)
    return meta, tensors


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _increasing_ints(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(map(_is_int, v)) and all(
        a < b for a, b in zip(v, v[1:]))


def check_metadata(
    meta: Any, tensors: dict[str, Tensor], header: dict[str, Any], src: Path
) -> None:
    """Raise :class:`ArtifactError` (naming the field, what was expected and the fix) unless
    ``metadata.json`` is complete, well formed and agrees with the tensors and their header."""
    mpath, tpath, fix = src / METADATA_FILE, src / TENSORS_FILE, _fix(src)
    if not isinstance(meta, dict):
        raise field_error(mpath, "the metadata", type(meta).__name__, "a JSON object", fix)
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise ArtifactError(f"{mpath} lacks the key(s) {missing}; {fix}")
    if meta["format_version"] != FORMAT_VERSION:
        raise field_error(mpath, "format_version", meta["format_version"], str(FORMAT_VERSION),
                          "upgrade refusaldir if a newer version wrote it, or " + fix)
    layers, positions, t_inst = meta["layers"], meta["positions"], meta["t_inst"]
    if not _increasing_ints(layers) or layers[0] < 0:
        raise field_error(mpath, "layers", layers, "distinct layer indices >= 0 in increasing order", fix)
    if not _increasing_ints(positions) or positions[-1] >= 0:
        raise field_error(mpath, "positions", positions,
                          "distinct negative positions (from the end) in increasing order", fix)
    if not (_is_int(meta["d_model"]) and meta["d_model"] > 0):
        raise field_error(mpath, "d_model", meta["d_model"], "a positive integer", fix)
    if meta["hook_point"] not in RESID_POINTS:
        raise field_error(mpath, "hook_point", meta["hook_point"], f"one of {', '.join(RESID_POINTS)}", fix)
    if t_inst is None and "harmfulness" in tensors:
        raise field_error(mpath, "t_inst", t_inst, "the position of the harmfulness directions", fix)
    if t_inst is not None and not (_is_int(t_inst) and t_inst < positions[0]):
        raise field_error(mpath, "t_inst", t_inst, f"a negative integer before positions {positions}", fix)
    for key, saved in header.items():
        if meta[key] != saved:
            raise field_error(mpath, key, meta[key], f"{saved!r} as recorded in {TENSORS_FILE} (the "
                              "metadata was edited)", "restore the original metadata.json or " + fix)
    _check_tensors(meta, tensors, tpath, fix)
    sel = meta.get("selected")
    if sel is not None and not (isinstance(sel, dict) and sel.get("pos") in positions
                                and sel.get("layer") in layers):
        raise field_error(mpath, "selected", sel, "null or {pos, layer} from positions and layers", fix)
    model = meta.get("model", {})
    if not isinstance(model, dict) or not isinstance(model.get("weights_hash", ""), (str, type(None))):
        raise field_error(mpath, "model", model, "an object with a string weights_hash", fix)


def _check_tensors(meta: dict[str, Any], tensors: dict[str, Tensor], tpath: Path, fix: str) -> None:
    n_pos, n_layer, d = len(meta["positions"]), len(meta["layers"]), meta["d_model"]
    if "refusal" not in tensors:
        raise ArtifactError(f"{tpath} has no 'refusal' tensor; {fix}")
    for name, t in tensors.items():
        if name == "refusal":
            want: tuple[int, ...] = (n_pos, n_layer, d)
        elif name == "harmfulness":
            want = (n_layer, d)
        elif name.startswith("mean_"):
            want = (1 + n_pos, n_layer, d)
        else:
            raise ArtifactError(f"{tpath} holds an unknown tensor {name!r}; {fix}")
        if tuple(t.shape) != want:
            raise ArtifactError(
                f"{tpath}: tensor {name} has shape {tuple(t.shape)}, expected {want} from "
                f"metadata.json ({n_pos} positions, {n_layer} layers, d_model {d}); {fix}"
            )
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            raise ArtifactError(f"{tpath}: tensor {name} holds NaN/inf or non-float values; {fix}")
    recorded = meta.get("tensors")
    if recorded is not None:
        actual = {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                  for k, v in tensors.items()}
        if recorded != actual:
            raise field_error(tpath.parent / METADATA_FILE, "tensors", recorded,
                              f"{actual} (what {TENSORS_FILE} holds)", fix)


def folder_state(out: Path, sha: str, tensors: dict[str, Tensor], weights_hash: str | None) -> str:
    """What ``out`` holds before a save: ``"empty"`` (absent or an empty folder), ``"same"`` (these
    directions from the same weights, maybe with other metadata) or ``"other"``."""
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"{out} exists and is a file, not a folder; choose another folder")
    if not out.exists() or not any(out.iterdir()):
        return "empty"
    try:
        meta = json.loads((out / METADATA_FILE).read_text(encoding="utf-8"))
        if (meta.get("model") or {}).get("weights_hash") != weights_hash:
            return "other"
        if meta.get("tensors_sha256") == sha and sha256_file(out / TENSORS_FILE) == sha:
            return "same"
        old = load((out / TENSORS_FILE).read_bytes())
    except (OSError, ValueError, AttributeError, SafetensorError):
        return "other"
    same = old.keys() == tensors.keys() and all(
        old[k].dtype == v.dtype and torch.equal(old[k], v.detach().cpu()) for k, v in tensors.items())
    return "same" if same else "other"


def occupied_error(out: str | os.PathLike[str]) -> ArtifactError:
    """The refusal to save directions into a folder that holds something else."""
    return ArtifactError(
        f"{out} already holds other files or directions (another model, prompts or version); "
        "saving these directions there would leave its selection, guard or evaluation beside "
        "directions they do not belong to. Pass --force (in Python: overwrite=True) to replace "
        "the folder whole, or choose another folder"
    )
