"""One home for refusaldir's tensor artifacts: a folder with a ``.safetensors`` file and a
strict-JSON record that carries the tensor file's sha256. Directions, guards and probe judges
are all saved this way: written atomically (:func:`refusaldir.io.atomic_write_files`), read
without pickle from one generation of the folder, and checked against the sha before use.

Example:
    >>> import tempfile, torch
    >>> from refusaldir.io import atomic_write_files
    >>> folder = tempfile.mkdtemp()
    >>> files = encode_folder({"w": torch.ones(2)}, {"layer": 3}, tensors_file="t.safetensors",
    ...                       meta_file="t.json", header={"format": "example"})
    >>> _ = atomic_write_files(folder, files)
    >>> meta, tensors, _ = read_folder(folder, tensors_file="t.safetensors", meta_file="t.json",
    ...                                fix="save it again")
    >>> meta["layer"], tensors["w"].tolist()
    (3, [1.0, 1.0])
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import Tensor

from refusaldir.errors import ArtifactError
from refusaldir.io import dumps, loads_strict, sha256_bytes

__all__ = ["SHA_KEY", "encode_folder", "read_folder", "tensor_bytes"]

#: The record's key for the tensor file's sha256.
SHA_KEY = "tensors_sha256"


def tensor_bytes(tensors: dict[str, Tensor], header: dict[str, str]) -> bytes:
    """The safetensors bytes of CPU, contiguous copies of ``tensors`` (``header`` as metadata)."""
    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=header)


def encode_folder(tensors: dict[str, Tensor], meta: dict[str, Any], *, tensors_file: str,
                  meta_file: str, header: dict[str, str]) -> dict[str, bytes]:
    """The two files of an artifact folder, tensors first (the order they are renamed into place);
    the record gets the tensor file's sha256 under ``tensors_sha256``."""
    data = tensor_bytes(tensors, header)
    return {tensors_file: data, meta_file: dumps({**meta, SHA_KEY: sha256_bytes(data)}).encode()}


def _read_pair(src: Path, tensors_file: str, meta_file: str) -> tuple[bytes, bytes]:
    """Both files from one generation of the folder: opened through one handle on the folder,
    so a writer swapping in a new folder meanwhile cannot hand us one file of each."""
    fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    try:
        def get(name: str) -> bytes:
            with os.fdopen(os.open(name, os.O_RDONLY, dir_fd=fd), "rb") as f:
                return f.read()

        return get(meta_file), get(tensors_file)
    finally:
        os.close(fd)


def _snapshot(src: Path, tensors_file: str, meta_file: str, attempts: int = 5) -> tuple[bytes, bytes]:
    """:func:`_read_pair`, again when a concurrent save replaced the folder or a file mid-read
    (a missing file, or tensors that do not match the sha256 in the record read with them)."""
    for _ in range(attempts - 1):
        try:
            text, data = _read_pair(src, tensors_file, meta_file)
            sha = json.loads(text).get(SHA_KEY)
        except FileNotFoundError:
            continue
        except (ValueError, AttributeError):  # not JSON or not an object: read_folder reports it
            return text, data
        if sha is None or sha == sha256_bytes(data):
            return text, data
    return _read_pair(src, tensors_file, meta_file)


def read_folder(folder: str | os.PathLike[str], *, tensors_file: str, meta_file: str, fix: str,
                missing_fix: str | None = None, require_sha: bool = False,
                ) -> tuple[Any, dict[str, Tensor], bytes]:
    """``(record, tensors, tensor_bytes)`` of an artifact folder, checked.

    Raises :class:`~refusaldir.errors.ArtifactError` naming the file and ``fix`` when a file is
    missing or unreadable, the record is not strict JSON, or the tensors do not match the sha256
    it records (a record without one passes unless ``require_sha``). The record's own fields are
    the caller's to check.
    """
    src = Path(folder).expanduser()
    tpath, mpath = src / tensors_file, src / meta_file
    if not tpath.is_file() or not mpath.is_file():
        raise ArtifactError(f"{src} does not contain {tensors_file} and {meta_file}; {missing_fix or fix}")
    try:
        text, data = _snapshot(src, tensors_file, meta_file)
        meta = loads_strict(text.decode("utf-8"), mpath, fix)
    except (OSError, UnicodeDecodeError) as exc:
        name = getattr(exc, "filename", None)  # relative to the folder when read through it
        where = src / os.fsdecode(name) if isinstance(name, (str, bytes)) else src
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise ArtifactError(f"{where} could not be read ({why}); check its permissions, or {fix}") from exc
    want = meta.get(SHA_KEY) if isinstance(meta, dict) else None
    if want is None and require_sha:
        raise ArtifactError(f"{mpath} records no {SHA_KEY} for {tensors_file}; {fix}")
    if want is not None and sha256_bytes(data) != want:
        raise ArtifactError(f"{tpath} does not match the sha256 recorded in {meta_file} (truncated or "
                            f"modified); {fix}")
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, TypeError, RuntimeError) as exc:
        raise ArtifactError(f"{tpath} could not be read ({exc}); the file is truncated or corrupt — "
                            f"{fix}") from exc
    return meta, tensors, data
