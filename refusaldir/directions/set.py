"""Difference-of-means refusal and harmfulness directions, and their on-disk artifacts.

- **refusal** directions: ``mean(harmful) - mean(harmless)`` at every post-instruction
  position and layer (Arditi et al. 2024);
- **harmfulness** directions: the same difference at ``t_inst``, the last instruction token
  (Zhao et al. 2025).

Artifacts are a folder with ``directions.safetensors`` and ``metadata.json``, written
atomically (a new folder is swapped in whole, under a lock file) and loaded without pickle,
with every field of the metadata checked against the tensors
(:mod:`refusaldir.directions.artifact`).

Example:
    >>> ds = extract(model, harmful, harmless)  # doctest: +SKIP
    >>> ds.save("runs/demo")  # doctest: +SKIP
    >>> DirectionSet.load("runs/demo").refusal_direction(layer=12, pos=-1).shape  # doctest: +SKIP
    torch.Size([896])
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from refusaldir.directions import artifact
from refusaldir.directions.artifact import FORMAT_VERSION, METADATA_FILE, TENSORS_FILE
from refusaldir.directions.direction import Direction
from refusaldir.errors import ArtifactError, ConfigError, HookError
from refusaldir.io import (
    atomic_write,
    atomic_write_files,
    dumps,
    folder_lock,
    remove_stale,
    sha256_file,
    staged_dir,
)

if TYPE_CHECKING:
    from refusaldir.models import ChatModel

__all__ = ["FORMAT_VERSION", "METADATA_FILE", "TENSORS_FILE", "DirectionSet", "weights_kind"]


def weights_kind(weights_hash: str) -> str:
    """How a weights hash was made: ``"fingerprint"`` (an in-memory model, ``fp:…``) or
    ``"file hash"`` (a model folder or GGUF file)."""
    return "fingerprint" if weights_hash.startswith("fp:") else "file hash"


@dataclass
class DirectionSet:
    """Per-layer refusal (×position) and harmfulness directions with their provenance.

    ``refusal[i, j]`` is the raw difference of means at ``positions[i]`` and ``layers[j]``;
    ``harmfulness[j]`` the raw difference at ``t_inst``. Index with ``ds[pos, layer]``.
    """

    refusal: Float[Tensor, "pos layer d_model"]
    positions: list[int]
    layers: list[int]
    harmfulness: Float[Tensor, "layer d_model"] | None = None
    t_inst: int | None = None
    hook_point: str = "resid_pre"
    means: dict[str, Float[Tensor, "pos layer d_model"]] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.refusal.ndim != 3 or self.refusal.shape[:2] != (len(self.positions), len(self.layers)):
            raise ArtifactError(
                f"refusal tensor has shape {tuple(self.refusal.shape)}; expected "
                f"({len(self.positions)}, {len(self.layers)}, d_model) for positions "
                f"{self.positions} and layers {self.layers}"
            )
        if self.harmfulness is not None and self.harmfulness.shape != self.refusal.shape[1:]:
            raise ArtifactError(
                f"harmfulness tensor has shape {tuple(self.harmfulness.shape)}; expected "
                f"{tuple(self.refusal.shape[1:])}"
            )

    # ------------------------------------------------------------------ access
    @property
    def d_model(self) -> int:
        return int(self.refusal.shape[-1])

    @property
    def selected(self) -> tuple[int, int] | None:
        """The chosen ``(pos, layer)``, if selection has been run or recorded."""
        sel = self.metadata.get("selected")
        return (int(sel["pos"]), int(sel["layer"])) if sel else None

    def select(self, pos: int, layer: int, **info: Any) -> None:
        """Record ``(pos, layer)`` as the chosen refusal direction (saved with the set)."""
        self._index(pos, layer)
        self.metadata["selected"] = {"pos": int(pos), "layer": int(layer), **info}

    def _index(self, pos: int, layer: int) -> tuple[int, int]:
        if layer not in self.layers:
            raise HookError(
                f"layer {layer} is not in this direction set (layers {self.layers[0]}.."
                f"{self.layers[-1]}); pick one of {self.layers}"
            )
        if pos not in self.positions:
            raise ConfigError(
                f"position {pos} is not in this direction set; pick one of {self.positions}"
            )
        return self.positions.index(pos), self.layers.index(layer)

    def __getitem__(self, key: tuple[int, int]) -> Direction:
        pos, layer = key
        return self.refusal_direction(layer, pos)

    def refusal_direction(self, layer: int | None = None, pos: int | None = None) -> Direction:
        """The raw refusal direction at ``(pos, layer)``; defaults to the selected one."""
        if layer is None or pos is None:
            sel = self.selected
            if sel is None and layer is None:
                raise ConfigError(
                    "no layer given and no direction selected yet; pass layer=… or run "
                    "`refusaldir select` first"
                )
            pos = pos if pos is not None else (sel[0] if sel else self.positions[-1])
            layer = layer if layer is not None else sel[1]  # type: ignore[index]
        i, j = self._index(pos, layer)
        return Direction(self.refusal[i, j].clone(), layer, pos, "refusal", self.hook_point)

    def harmfulness_direction(self, layer: int) -> Direction:
        if self.harmfulness is None:
            raise ArtifactError(
                "this direction set has no harmfulness directions (imported from a single "
                "refusal direction); run `refusaldir extract` to compute them"
            )
        _, j = self._index(self.positions[-1], layer)
        return Direction(self.harmfulness[j].clone(), layer, self.t_inst, "harmfulness", self.hook_point)

    def unit(self) -> Float[Tensor, "pos layer d_model"]:
        r = self.refusal.float()
        return r / r.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def norms(self) -> Float[Tensor, "pos layer"]:
        return self.refusal.float().norm(dim=-1)

    def cosine_refusal_harmfulness(self, pos: int = -1) -> Float[Tensor, " layer"]:
        """cos(refusal at ``pos``, harmfulness at ``t_inst``) for every layer."""
        if self.harmfulness is None:
            raise ArtifactError("no harmfulness directions in this set; run `refusaldir extract`")
        i, _ = self._index(pos, self.layers[0])
        return torch.nn.functional.cosine_similarity(
            self.refusal[i].float(), self.harmfulness.float(), dim=-1
        )

    # ------------------------------------------------------------ arithmetic
    def _combine(self, other: DirectionSet | float, op: Any) -> DirectionSet:
        if isinstance(other, DirectionSet):
            if (other.positions, other.layers, other.d_model) != (self.positions, self.layers, self.d_model):
                raise ConfigError(
                    "direction sets differ in positions, layers or d_model "
                    f"({self.positions}/{len(self.layers)}/{self.d_model} vs "
                    f"{other.positions}/{len(other.layers)}/{other.d_model}); combine matching sets"
                )
            harm = (
                op(self.harmfulness, other.harmfulness)
                if self.harmfulness is not None and other.harmfulness is not None
                else None
            )
            return replace(self, refusal=op(self.refusal, other.refusal), harmfulness=harm, means={},
                           metadata={**self.metadata, "derived": True})
        harm = op(self.harmfulness, other) if self.harmfulness is not None else None
        return replace(self, refusal=op(self.refusal, other), harmfulness=harm, means={},
                       metadata={**self.metadata, "derived": True})

    def __add__(self, other: DirectionSet) -> DirectionSet:
        return self._combine(other, torch.add)

    def __sub__(self, other: DirectionSet) -> DirectionSet:
        return self._combine(other, torch.sub)

    def __mul__(self, k: float) -> DirectionSet:
        return self._combine(float(k), torch.mul)

    __rmul__ = __mul__

    # --------------------------------------------------------------- checks
    def check_model(self, model: ChatModel, *, strict_hash: bool = False) -> None:
        """Raise when these directions cannot belong to ``model`` (d_model, layers, weights).

        ``strict_hash=True`` also requires the recorded weights hash to be ``model``'s (the
        command line does, unless ``--allow-model-mismatch``). Hashes of different kinds (an
        in-memory model's ``fp:`` fingerprint and a model folder's file hash) cannot be
        compared, which is an error too, naming both kinds.
        """
        if self.d_model != model.d_model:
            raise ArtifactError(
                f"directions have d_model={self.d_model} but {model.spec} has d_model="
                f"{model.d_model}; extract directions for this model"
            )
        if self.layers[-1] >= model.n_layers:
            raise ArtifactError(
                f"directions go up to layer {self.layers[-1]} but {model.spec} has "
                f"{model.n_layers} layers; extract directions for this model"
            )
        saved = (self.metadata.get("model") or {}).get("weights_hash")
        if not strict_hash or not saved or saved == model.weights_hash:
            return
        spec = self.metadata["model"].get("spec")
        kinds = (weights_kind(saved), weights_kind(model.weights_hash))
        if kinds[0] != kinds[1]:
            raise ArtifactError(
                f"directions record a {kinds[0]} of their model's weights ({spec}: {saved[:19]}…) "
                f"but {model.spec} is identified by a {kinds[1]} ({model.weights_hash[:19]}…), "
                "so they cannot be compared; load the model the way it was loaded for extraction "
                "(a model folder, or in memory), or pass --allow-model-mismatch "
                "(in Python: strict_hash=False) if you know the weights are the same"
            )
        raise ArtifactError(
            f"directions were extracted from weights {saved[:16]}… ({spec}) but {model.spec} "
            f"has weights {model.weights_hash[:16]}…; extract directions for this model, pass "
            "the matching --model, or pass --allow-model-mismatch (in Python: "
            "strict_hash=False) if this is deliberate"
        )

    # ------------------------------------------------------------------ I/O
    def tensors(self) -> dict[str, Tensor]:
        out = {"refusal": self.refusal.contiguous()}
        if self.harmfulness is not None:
            out["harmfulness"] = self.harmfulness.contiguous()
        for k, v in self.means.items():
            out[f"mean_{k}"] = v.contiguous()
        return out

    def save(self, folder: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write ``directions.safetensors`` + ``metadata.json`` into ``folder``.

        - an absent or empty ``folder`` is written into a temporary sibling and swapped in;
        - one that holds these same directions (same tensors from the same weights, e.g.
          re-saved after :meth:`select`) gets the new ``metadata.json``; everything beside it
          (``selection.json``, ``guard/``, evaluations) stays, as it still applies;
        - anything else is refused unless ``overwrite=True``, which replaces the folder whole,
          so no artifact of other directions is left beside these.

        Writers of one folder are serialised by a lock file; a failure (full disk, signal)
        leaves the previous contents as they were.
        """
        out = Path(folder).expanduser()
        tensors = self.tensors()
        data, sha = artifact.encode(tensors, self.positions, self.layers, self.t_inst, self.hook_point)
        meta = {
            **self.metadata,
            "format_version": FORMAT_VERSION,
            "positions": self.positions,
            "layers": self.layers,
            "t_inst": self.t_inst,
            "hook_point": self.hook_point,
            "d_model": self.d_model,
            "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                        for k, v in tensors.items()},
            "tensors_sha256": sha,
        }
        files = {TENSORS_FILE: data, METADATA_FILE: dumps(meta, sort_keys=True).encode()}
        weights = (self.metadata.get("model") or {}).get("weights_hash")
        with folder_lock(out):
            remove_stale(out)  # what a writer killed mid-save left beside the folder
            state = artifact.folder_state(out, sha, tensors, weights)
            if state == "same" and not overwrite:
                if sha256_file(out / TENSORS_FILE) == sha:
                    del files[TENSORS_FILE]
                atomic_write_files(out, files, lock=False)
            elif state == "other" and not overwrite:
                raise artifact.occupied_error(out)
            else:
                with staged_dir(out, locked=True) as tmp:
                    atomic_write_files(tmp, files, lock=False)
        self.metadata = dict(meta)
        return out

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> DirectionSet:
        """Load a saved set (no pickle), checked: the tensor file against its recorded sha256,
        and every field of ``metadata.json`` against the tensors (shapes, layers, positions,
        ``d_model``, ``t_inst``, hook point, finite values); see
        :func:`refusaldir.directions.artifact.check_metadata`."""
        src = Path(folder).expanduser()
        if src.is_file() and src.name in (TENSORS_FILE, METADATA_FILE):
            src = src.parent
        meta, tensors = artifact.read(src)
        means = {k.removeprefix("mean_"): v for k, v in tensors.items() if k.startswith("mean_")}
        return cls(
            refusal=tensors["refusal"],
            positions=list(meta["positions"]),
            layers=list(meta["layers"]),
            harmfulness=tensors.get("harmfulness"),
            t_inst=meta["t_inst"],
            hook_point=meta["hook_point"],
            means=means,
            metadata=meta,
        )

    @classmethod
    def from_andyrdt(cls, folder: str | os.PathLike[str]) -> DirectionSet:
        """Import ``direction.pt`` + ``direction_metadata.json`` from andyrdt/refusal_direction."""
        src = Path(folder)
        pt, mj = src / "direction.pt", src / "direction_metadata.json"
        if not pt.is_file() or not mj.is_file():
            raise ArtifactError(
                f"{src} must contain direction.pt and direction_metadata.json (the output of "
                "andyrdt/refusal_direction's pipeline)"
            )
        try:
            vec = torch.load(pt, map_location="cpu", weights_only=True)
            info = json.loads(mj.read_text())
            pos, layer = int(info["pos"]), int(info["layer"])
        except Exception as exc:
            raise ArtifactError(f"could not read {src} as a refusal_direction export: {exc}") from exc
        if not isinstance(vec, Tensor) or vec.ndim != 1:
            raise ArtifactError(f"{pt} holds {type(vec).__name__}; expected a 1-D tensor of size d_model")
        ds = cls(
            refusal=vec.float().reshape(1, 1, -1),
            positions=[pos],
            layers=[layer],
            metadata={"source": {"andyrdt": str(src), "sha256": sha256_file(pt)}},
        )
        ds.select(pos, layer, method="imported")
        return ds

    def to_gguf_control_vector(
        self,
        path: str | os.PathLike[str],
        *,
        layer: int | None = None,
        pos: int | None = None,
        layers: Sequence[int] | None = None,
        coeff: float = 1.0,
        model_hint: str = "",
    ) -> Path:
        """Export a llama.cpp control vector (GGUF).

        llama.cpp adds ``direction.{k}`` to the output of block ``k``, i.e. ``resid_pre`` of
        block ``k + 1``: the direction is written as ``direction.{L-1}`` for each target
        ``resid_pre`` layer ``L``. The vector comes from ``(pos, layer)`` (default: selected)
        and is applied at ``layers`` (default: just ``layer``), scaled by ``coeff``.
        """
        import gguf

        d = self.refusal_direction(layer, pos)
        if self.hook_point != "resid_pre":
            raise ConfigError(
                f"GGUF control vectors act on resid_pre; this set was captured at {self.hook_point}"
            )
        targets = list(layers) if layers is not None else [d.layer]
        n_layers = (self.metadata.get("model") or {}).get("n_layers")
        n_layers = n_layers if isinstance(n_layers, int) else self.layers[-1] + 1
        outside = [t for t in targets if isinstance(t, bool) or not isinstance(t, int) or t >= n_layers]
        if outside or len(set(targets)) != len(targets) or not targets:
            raise ConfigError(
                f"layers={list(targets)} must be distinct whole layer indices of the model, 1 to "
                f"{n_layers - 1} (it has {n_layers} layers); a control vector for a layer outside it "
                "would act on a wrong or missing layer — pass layers inside the model"
            )
        for t in targets:
            if t < 1:
                raise ConfigError(
                    f"layer {t}: llama.cpp control vectors cannot act on resid_pre of layer 0 "
                    "(the embeddings); choose layers >= 1"
                )
        if not math.isfinite(coeff):
            raise ConfigError(f"coeff={coeff} is not finite; pass a real number")
        out = Path(path)
        vec = (d.vector.float() * coeff).numpy()

        def write(tmp: Path) -> None:
            writer = gguf.GGUFWriter(str(tmp), arch="controlvector")
            writer.add_string("controlvector.model_hint", model_hint or str(self.metadata.get("model", {}).get("architecture", "")))
            writer.add_uint32("controlvector.layer_count", len(targets))
            for t in targets:
                writer.add_tensor(f"direction.{t - 1}", vec)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()

        atomic_write(out, write)
        return out
