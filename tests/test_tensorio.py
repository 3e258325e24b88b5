"""The one home of tensor artifacts (refusaldir/tensorio.py): directions, guards and probe
judges are written and checked through it."""

from __future__ import annotations

import doctest
import json
from pathlib import Path

import pytest
import torch

import refusaldir.tensorio as tensorio
from refusaldir.errors import ArtifactError
from refusaldir.io import atomic_write_files
from refusaldir.tensorio import SHA_KEY, encode_folder, read_folder

FILES = {"tensors_file": "t.safetensors", "meta_file": "t.json"}


def _write(folder: Path, meta: dict[str, object] | None = None) -> None:
    files = encode_folder({"w": torch.arange(3.0)}, meta or {"layer": 2}, header={"format": "x"}, **FILES)
    atomic_write_files(folder, files)


def test_round_trip_keeps_record_and_tensors(tmp_path: Path) -> None:
    _write(tmp_path)
    meta, tensors, data = read_folder(tmp_path, fix="save again", **FILES)
    assert meta["layer"] == 2 and len(meta[SHA_KEY]) == 64
    assert torch.equal(tensors["w"], torch.arange(3.0))
    assert data == (tmp_path / "t.safetensors").read_bytes()


def test_modified_tensors_are_caught_with_the_fix(tmp_path: Path) -> None:
    _write(tmp_path)
    other = encode_folder({"w": torch.zeros(3)}, {}, header={"format": "x"}, **FILES)["t.safetensors"]
    (tmp_path / "t.safetensors").write_bytes(other)
    with pytest.raises(ArtifactError, match=r"does not match the sha256.*save again"):
        read_folder(tmp_path, fix="save again", **FILES)


def test_missing_file_and_missing_sha(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="does not contain t.safetensors and t.json; make one"):
        read_folder(tmp_path, fix="save again", missing_fix="make one", **FILES)
    _write(tmp_path)
    meta = json.loads((tmp_path / "t.json").read_text())
    del meta[SHA_KEY]
    (tmp_path / "t.json").write_text(json.dumps(meta))
    read_folder(tmp_path, fix="save again", **FILES)  # older records without a sha still load
    with pytest.raises(ArtifactError, match="records no tensors_sha256 for t.safetensors; save again"):
        read_folder(tmp_path, fix="save again", require_sha=True, **FILES)


def test_non_strict_json_and_corrupt_tensors_are_artifact_errors(tmp_path: Path) -> None:
    _write(tmp_path)
    (tmp_path / "t.json").write_text('{"layer": NaN}')
    with pytest.raises(ArtifactError):
        read_folder(tmp_path, fix="save again", **FILES)
    (tmp_path / "t.json").write_text('{"layer": 1}')
    (tmp_path / "t.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(ArtifactError, match="truncated or corrupt"):
        read_folder(tmp_path, fix="save again", **FILES)


def test_module_example_runs() -> None:
    assert doctest.testmod(tensorio).failed == 0
