"""Model identity without reading every weight twice.

- weight files (folders, GGUF) are hashed once and the digests cached by (path, size, mtime);
- an in-memory model gets a cheap fingerprint: its config, every tensor's name, shape and
  dtype, and a fixed strided sample of each tensor's values; :func:`state_dict_hash` reads
  every byte when a full hash is wanted.

Example:
    >>> import torch
    >>> m = torch.nn.Linear(2, 2)
    >>> weights_fingerprint(m).startswith("fp:")
    True
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from refusaldir.errors import ModelLoadError, RefusalDirError
from refusaldir.io import atomic_write_json, sha256_file
from refusaldir.models.chat_model import cache_dir

__all__ = ["cached_sha256", "folder_hash", "state_dict_hash", "weights_fingerprint"]

HASH_INDEX = "hashes.json"


def cached_sha256(paths: list[Path]) -> list[str]:
    """sha256 of each file, reusing earlier results cached by (path, size, mtime)."""
    index_path = cache_dir() / HASH_INDEX
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    out, changed = [], False
    for p in paths:
        st = p.stat()
        key = f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        if key not in index:
            index[key] = sha256_file(p)
            changed = True
        out.append(index[key])
    if changed:
        try:
            atomic_write_json(index_path, index)
        except RefusalDirError:
            pass  # a read-only cache only costs a re-hash next time
    return out


def folder_hash(folder: Path) -> str:
    """Content hash of a local model folder's weight files (cached by size and mtime)."""
    files = sorted(
        p for p in folder.iterdir() if p.suffix in {".safetensors", ".bin", ".pt", ".gguf"}
    )
    if not files:
        raise ModelLoadError(
            f"{folder} has no weight files (*.safetensors, *.bin); pass a Hugging Face model "
            "folder, a .gguf file, or a hub id"
        )
    src = folder / "refusaldir_source.json"
    if src.is_file():
        return str(json.loads(src.read_text())["sha256"])
    h = hashlib.sha256()
    for p, digest in zip(files, cached_sha256(files)):
        h.update(p.name.encode() + b"\0" + digest.encode())
    return h.hexdigest()


def state_dict_hash(hf_model: Any) -> str:
    """Full sha256 over parameter names, shapes, dtypes and bytes (reads every weight)."""
    h = hashlib.sha256()
    for name, tensor in sorted(hf_model.state_dict().items()):
        if tensor.device.type == "meta":  # offloaded to disk: identified by name/shape only
            h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}:meta".encode())
            continue
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


FINGERPRINT_SAMPLES = 64


def weights_fingerprint(hf_model: Any) -> str:
    """Cheap identity of loaded weights: the config, every tensor's name, shape and dtype, and
    a fixed strided sample of ``FINGERPRINT_SAMPLES`` values from each tensor (gathered on the
    tensor's own device, one small copy per device). Prefixed ``fp:``; use
    :func:`state_dict_hash` for a full hash.
    """
    h = hashlib.sha256()
    cfg = getattr(hf_model, "config", None)
    if cfg is not None and hasattr(cfg, "to_json_string"):
        h.update(cfg.to_json_string(use_diff=False).encode())
    samples: dict[torch.device, list[Tensor]] = {}
    for name, t in sorted(hf_model.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        if t.device.type == "meta" or t.numel() == 0:
            continue
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // FINGERPRINT_SAMPLES)
        samples.setdefault(t.device, []).append(flat[::step][:FINGERPRINT_SAMPLES].float())
    for dev in sorted(samples, key=str):
        vals = torch.cat(samples[dev]).cpu()
        h.update(vals.numpy().tobytes())
    return "fp:" + h.hexdigest()
