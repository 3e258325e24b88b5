"""Difference-of-means refusal and harmfulness directions, and their on-disk artifacts.

- **refusal** directions: ``mean(harmful) - mean(harmless)`` at every post-instruction
  position and layer (Arditi et al. 2024);
- **harmfulness** directions: the same difference at ``t_inst``, the last instruction token
  (Zhao et al. 2025).

Artifacts are a folder with ``directions.safetensors`` and ``metadata.json``, written
atomically and loaded without pickle.

Example:
    >>> ds = extract(model, harmful, harmless)  # doctest: +SKIP
    >>> ds.save("runs/demo")  # doctest: +SKIP
    >>> DirectionSet.load("runs/demo").refusal_direction(layer=12, pos=-1).shape  # doctest: +SKIP
    torch.Size([896])
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from refusaldir.capture import iter_activations, project
from refusaldir.errors import ArtifactError, ConfigError, HookError
from refusaldir.hooks import RESID_POINTS, check_layers
from refusaldir.metrics import auroc

if TYPE_CHECKING:
    from refusaldir.models import ChatModel
    from refusaldir.prompts import PromptSet

FORMAT_VERSION = 1
TENSORS_FILE = "directions.safetensors"
METADATA_FILE = "metadata.json"


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
        """Raise when these directions cannot belong to ``model`` (d_model, layers, weights)."""
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
        saved = self.metadata.get("model", {}).get("weights_hash")
        if strict_hash and saved and saved != model.weights_hash:
            raise ArtifactError(
                f"directions were extracted from weights {saved[:16]}… "
                f"({self.metadata['model'].get('spec')}) but {model.spec} has weights "
                f"{model.weights_hash[:16]}…; extract directions for this model or pass the "
                "matching --model"
            )

    # ------------------------------------------------------------------ I/O
    def tensors(self) -> dict[str, Tensor]:
        out = {"refusal": self.refusal.contiguous()}
        if self.harmfulness is not None:
            out["harmfulness"] = self.harmfulness.contiguous()
        for k, v in self.means.items():
            out[f"mean_{k}"] = v.contiguous()
        return out

    def save(self, folder: str | os.PathLike[str], *, overwrite: bool = True) -> Path:
        """Write ``directions.safetensors`` + ``metadata.json`` atomically into ``folder``."""
        out = Path(folder)
        _ensure_writable(out)
        tensors = self.tensors()
        meta = {
            **self.metadata,
            "format_version": FORMAT_VERSION,
            "positions": self.positions,
            "layers": self.layers,
            "t_inst": self.t_inst,
            "hook_point": self.hook_point,
            "d_model": self.d_model,
        }
        tmp_t = _tmp_in(out, TENSORS_FILE)
        try:
            save_file(tensors, str(tmp_t), metadata={"format": "refusaldir"})
            meta["tensors_sha256"] = _sha256(tmp_t)
            meta["tensors"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                               for k, v in tensors.items()}
            tmp_m = _tmp_in(out, METADATA_FILE)
            tmp_m.write_text(json.dumps(meta, indent=2, sort_keys=True))
            if not overwrite and (out / TENSORS_FILE).exists():
                raise ArtifactError(f"{out / TENSORS_FILE} exists; pass overwrite=True or --force")
            os.replace(tmp_t, out / TENSORS_FILE)
            os.replace(tmp_m, out / METADATA_FILE)
        finally:
            for p in out.glob(".*.tmp"):
                p.unlink(missing_ok=True)
        self.metadata = {k: v for k, v in meta.items()}
        return out

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> DirectionSet:
        """Load a saved set (no pickle); checks the tensor file against its recorded hash."""
        src = Path(folder)
        if src.is_file() and src.name in (TENSORS_FILE, METADATA_FILE):
            src = src.parent
        tpath, mpath = src / TENSORS_FILE, src / METADATA_FILE
        if not tpath.is_file() or not mpath.is_file():
            raise ArtifactError(
                f"{src} does not contain {TENSORS_FILE} and {METADATA_FILE}; run "
                f"`refusaldir extract --out {src}` first"
            )
        try:
            meta = json.loads(mpath.read_text())
        except ValueError as exc:
            raise ArtifactError(f"{mpath} is not valid JSON ({exc}); re-run `refusaldir extract`") from exc
        expected = meta.get("tensors_sha256")
        if expected and _sha256(tpath) != expected:
            raise ArtifactError(
                f"{tpath} does not match the sha256 recorded in {mpath.name} (truncated or "
                "modified); re-run `refusaldir extract` to regenerate it"
            )
        try:
            tensors = load_file(str(tpath))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ArtifactError(
                f"{tpath} could not be read ({exc}); the file is truncated or corrupt — re-run "
                "`refusaldir extract`"
            ) from exc
        if "refusal" not in tensors:
            raise ArtifactError(f"{tpath} has no 'refusal' tensor; re-run `refusaldir extract`")
        means = {k.removeprefix("mean_"): v for k, v in tensors.items() if k.startswith("mean_")}
        return cls(
            refusal=tensors["refusal"],
            positions=[int(p) for p in meta["positions"]],
            layers=[int(x) for x in meta["layers"]],
            harmfulness=tensors.get("harmfulness"),
            t_inst=meta.get("t_inst"),
            hook_point=meta.get("hook_point", "resid_pre"),
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
            metadata={"source": {"andyrdt": str(src), "sha256": _sha256(pt)}},
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
        for t in targets:
            if t < 1:
                raise ConfigError(
                    f"layer {t}: llama.cpp control vectors cannot act on resid_pre of layer 0 "
                    "(the embeddings); choose layers >= 1"
                )
        if not math.isfinite(coeff):
            raise ConfigError(f"coeff={coeff} is not finite; pass a real number")
        out = Path(path)
        _ensure_writable(out.parent)
        tmp = _tmp_in(out.parent, out.name)
        try:
            writer = gguf.GGUFWriter(str(tmp), arch="controlvector")
            writer.add_string("controlvector.model_hint", model_hint or str(self.metadata.get("model", {}).get("architecture", "")))
            writer.add_uint32("controlvector.layer_count", len(targets))
            vec = (d.vector.float() * coeff).numpy()
            for t in targets:
                writer.add_tensor(f"direction.{t - 1}", vec)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
        return out


# ----------------------------------------------------------------- extraction
def extract(
    model: ChatModel,
    harmful: Sequence[str] | PromptSet,
    harmless: Sequence[str] | PromptSet,
    *,
    layers: Sequence[int] | str | None = None,
    hook_point: str = "resid_pre",
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> DirectionSet:
    """Difference-of-means refusal (post-instruction) and harmfulness (``t_inst``) directions.

    Example:
        >>> from refusaldir import load_model, load_prompts, extract  # doctest: +SKIP
        >>> model = load_model("demo")  # doctest: +SKIP
        >>> ds = extract(model, load_prompts("harmful", "train"), load_prompts("harmless", "train"))  # doctest: +SKIP
    """
    import refusaldir

    if hook_point not in RESID_POINTS:
        raise ConfigError(f"hook_point {hook_point!r} must be one of {RESID_POINTS}")
    torch.manual_seed(seed)
    layer_list = check_layers(model, layers)
    tpl = model.template
    positions = tpl.positions
    all_pos = [tpl.t_inst, *positions]
    start = time.perf_counter()
    means = {}
    for name, prompts in (("harmful", harmful), ("harmless", harmless)):
        texts = list(prompts)
        if not texts:
            raise ConfigError(f"the {name} prompt set is empty; pass at least one prompt")
        total = None
        for _, acts in iter_activations(
            model, texts, layers=layer_list, positions=all_pos, hook_point=hook_point,
            batch_size=batch_size, progress=progress, description=f"capture {name}",
        ):
            s = acts.to(torch.float64).sum(dim=0)
            total = s if total is None else total + s
        means[name] = (total / len(texts)).cpu()  # type: ignore[operator]
    diff = means["harmful"] - means["harmless"]
    meta = {
        "model": model.describe(),
        "template": {
            "hash": tpl.hash,
            "system_prompt": tpl.system_prompt,
            "post_instruction_tokens": tpl.post_instruction_tokens,
            "post_instruction_ids": list(tpl.post_instruction_ids),
        },
        "prompts": {
            "harmful": _prompt_info(harmful),
            "harmless": _prompt_info(harmless),
        },
        "versions": _versions(),
        "seed": seed,
        "dtype": str(model.dtype).removeprefix("torch."),
        "refusaldir_version": refusaldir.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "extract_seconds": round(time.perf_counter() - start, 2),
    }
    return DirectionSet(
        refusal=diff[1:].float(),
        positions=positions,
        layers=layer_list,
        harmfulness=diff[0].float(),
        t_inst=tpl.t_inst,
        hook_point=hook_point,
        means={k: v.float() for k, v in means.items()},
        metadata=meta,
    )


def layer_stats(
    model: ChatModel,
    ds: DirectionSet,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    pos: int = -1,
    batch_size: int = 16,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Per layer: ‖refusal‖, ‖harmfulness‖, their cosine, and the AUROC with which the refusal
    projection at ``pos`` separates held-out ``harmful`` from ``harmless`` prompts."""
    i, _ = ds._index(pos, ds.layers[0])
    dirs = ds.refusal[i : i + 1]
    proj = {
        name: project(model, list(texts), dirs, layers=ds.layers, positions=[pos],
                      hook_point=ds.hook_point, batch_size=batch_size, progress=progress,
                      description=f"project {name}")[:, 0]
        for name, texts in (("harmful", harmful), ("harmless", harmless))
    }
    cos = ds.cosine_refusal_harmfulness(pos) if ds.harmfulness is not None else None
    rows = []
    for j, layer in enumerate(ds.layers):
        rows.append({
            "layer": layer,
            "refusal_norm": float(ds.refusal[i, j].float().norm()),
            "harmfulness_norm": float(ds.harmfulness[j].float().norm()) if ds.harmfulness is not None else float("nan"),
            "cosine": float(cos[j]) if cos is not None else float("nan"),
            "auroc": auroc(proj["harmful"][:, j], proj["harmless"][:, j]),
            "mean_proj_harmful": float(proj["harmful"][:, j].mean()),
            "mean_proj_harmless": float(proj["harmless"][:, j].mean()),
        })
    return rows


# -------------------------------------------------------------------- helpers
def _prompt_info(prompts: Any) -> dict[str, Any]:
    info = getattr(prompts, "info", None)
    if callable(info):
        return info()
    texts = list(prompts)
    return {
        "source": "in-memory",
        "count": len(texts),
        "sha256": hashlib.sha256("\n".join(texts).encode()).hexdigest(),
    }


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("refusaldir", "torch", "transformers", "transformer-lens", "safetensors"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _ensure_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=folder, prefix=".probe.", delete=True)
        probe.close()
    except OSError as exc:
        raise ArtifactError(
            f"output folder {folder} is not writable ({exc.strerror}); choose another --out"
        ) from exc


def _tmp_in(folder: Path, name: str) -> Path:
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)
