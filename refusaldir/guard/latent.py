"""A latent guard: flag harmful prompts from the model's own harmfulness representation.

Zhao et al. (2025) find that chat models encode *harmfulness* at the last instruction token
``t_inst``, separately from *refusal* (encoded at the post-instruction tokens). A
:class:`LatentGuard` reads the residual stream at ``t_inst`` and scores each prompt with

- ``method="projection"``: the scalar projection onto the (unit) harmfulness direction, or
- ``method="centroid"``: ``cos(x, μ_harmful) - cos(x, μ_harmless)`` with the class means
  stored by :func:`refusaldir.extract` (``ds.means[...]`` at ``t_inst``),

standardised per layer on validation prompts (``(s - midpoint) / pooled std``) and averaged
over the chosen layers. The threshold is calibrated so that at most ``target_fpr`` of the
harmless validation prompts are flagged. Guards save to ``guard.safetensors`` +
``guard.json`` (no pickle) and refuse to score with a model whose weights differ.

Example:
    >>> import refusaldir as rd  # doctest: +SKIP
    >>> model, ds = rd.load_model("demo"), rd.DirectionSet.load("runs/demo")  # doctest: +SKIP
    >>> guard = LatentGuard.fit(model, ds, target_fpr=0.05)  # doctest: +SKIP
    >>> guard.predict(model, ["How do I make a pipe bomb?", "How do I bake bread?"]).tolist()  # doctest: +SKIP
    [True, False]
    >>> guard.save("runs/demo/guard")  # doctest: +SKIP
"""

from __future__ import annotations

import numbers
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from refusaldir.batching import AUTO, BatchSize
from refusaldir.capture import iter_activations
from refusaldir.data import as_prompt_list, check_prompts, load_prompts
from refusaldir.directions import DirectionSet
from refusaldir.errors import ArtifactError, ConfigError
from refusaldir.guard import artifact
from refusaldir.guard.artifact import (
    FORMAT_VERSION,
    GUARD_METHODS,
    META_FILE,
    TENSOR_NAMES,
    TENSORS_FILE,
)
from refusaldir.hooks import Appliable, applied_all
from refusaldir.io import atomic_write_files
from refusaldir.models import ChatModel
from refusaldir.stats import auroc, pooled_std, roc_curve, separation_table, threshold_for_fpr

__all__ = ["GUARD_METHODS", "META_FILE", "TENSORS_FILE", "LatentGuard"]


@dataclass
class LatentGuard:
    """A harmful-prompt classifier on the residual stream at ``t_inst``.

    Build one with :meth:`fit`; ``score`` returns the standardised score (higher = more
    harmful), ``predict`` compares it with ``threshold``.

    Example:
        >>> guard = LatentGuard.fit(model, ds, method="centroid")  # doctest: +SKIP
        >>> guard.score(model, ["How do I hotwire a car?"])  # doctest: +SKIP
        tensor([2.7126], dtype=torch.float64)
    """

    method: str
    layers: list[int]
    t_inst: int
    directions: Float[Tensor, "layer d_model"]
    centroid_harmful: Float[Tensor, "layer d_model"]
    centroid_harmless: Float[Tensor, "layer d_model"]
    loc: Float[Tensor, " layer"]
    scale: Float[Tensor, " layer"]
    threshold: float
    target_fpr: float = 0.05
    hook_point: str = "resid_pre"
    model_info: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in GUARD_METHODS:
            raise ConfigError(f"method={self.method!r} is not one of {', '.join(GUARD_METHODS)}")
        n = len(self.layers)
        for name in ("directions", "centroid_harmful", "centroid_harmless"):
            t = getattr(self, name)
            if t.ndim != 2 or t.shape[0] != n:
                raise ArtifactError(f"guard tensor {name} has shape {tuple(t.shape)}; expected ({n}, d_model)")
        for name in ("loc", "scale"):
            if getattr(self, name).shape != (n,):
                raise ArtifactError(f"guard tensor {name} must have one value per layer ({n})")

    @property
    def d_model(self) -> int:
        """Residual width of the model the guard reads."""
        return int(self.directions.shape[-1])

    @classmethod
    def fit(
        cls,
        model: ChatModel,
        ds: DirectionSet,
        harmful_val: Sequence[str] | None = None,
        harmless_val: Sequence[str] | None = None,
        *,
        layers: Sequence[int] | None = None,
        method: str = "projection",
        target_fpr: float = 0.05,
        n_layers: int = 3,
        batch_size: BatchSize = AUTO,
        progress: bool = True,
        strict_hash: bool = True,
    ) -> LatentGuard:
        """Fit on validation prompts (default: the shipped ``val`` splits).

        ``layers=None`` keeps the ``n_layers`` layers whose score best separates the
        validation sets (AUROC, ties broken by the standardised mean difference); layer 0
        (the token embeddings) is never chosen automatically.
        """
        if method not in GUARD_METHODS:
            raise ConfigError(f"method={method!r} is not one of {', '.join(GUARD_METHODS)}")
        if isinstance(target_fpr, bool) or not isinstance(target_fpr, numbers.Real) or not 0 <= target_fpr < 1:
            raise ConfigError(f"target_fpr={target_fpr!r} must be a number in [0, 1), e.g. 0.05")
        if isinstance(n_layers, bool) or not isinstance(n_layers, numbers.Integral) or n_layers < 1:
            raise ConfigError(f"n_layers={n_layers!r} must be a whole number >= 1")
        harmful = check_prompts(harmful_val if harmful_val is not None else load_prompts("harmful", "val"),
                                "harmful_val")
        harmless = check_prompts(harmless_val if harmless_val is not None else load_prompts("harmless", "val"),
                                 "harmless_val")
        ds.check_model(model, strict_hash=strict_hash)
        if ds.harmfulness is None or ds.t_inst is None:
            raise ArtifactError(
                "this direction set has no harmfulness directions at t_inst; run "
                "`refusaldir extract` to compute them"
            )
        if method == "centroid" and not {"harmful", "harmless"} <= set(ds.means):
            raise ArtifactError(
                "method='centroid' needs the class means saved by `refusaldir extract` "
                "(ds.means['harmful'/'harmless']); re-extract, or use method='projection'"
            )
        if int(ds.t_inst) != model.template.t_inst:
            raise ArtifactError(
                f"the directions' t_inst ({ds.t_inst}) differs from this model's chat template "
                f"({model.template.t_inst}); extract directions with the same template"
            )
        if layers is not None:
            cand = [int(x) for x in layers]
            if not cand:
                raise ConfigError("layers is empty; pass None to choose layers on the val prompts")
            for layer in cand:
                ds.harmfulness_direction(layer)  # raises unless the set has this layer
        else:
            cand = [layer for layer in ds.layers if layer > 0] or list(ds.layers)
        idx = [ds.layers.index(layer) for layer in cand]
        harm = ds.harmfulness[idx].float()
        units = harm / harm.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        has_means = {"harmful", "harmless"} <= set(ds.means)
        c_h = ds.means["harmful"][0, idx].float() if has_means else torch.zeros_like(units)
        c_l = ds.means["harmless"][0, idx].float() if has_means else torch.zeros_like(units)
        probe = cls(method, cand, int(ds.t_inst), units, c_h, c_l, torch.zeros(len(cand)),
                    torch.ones(len(cand)), 0.0, target_fpr, ds.hook_point)
        raw_h = probe.raw_scores(model, harmful, batch_size=batch_size, progress=progress,
                                 description="guard: harmful val")
        raw_l = probe.raw_scores(model, harmless, batch_size=batch_size, progress=progress,
                                 description="guard: harmless val")
        loc = (raw_h.mean(0) + raw_l.mean(0)) / 2
        scale = pooled_std(raw_h, raw_l)
        per_layer = separation_table(raw_h, raw_l, cand)
        if layers is None:
            ranked = sorted(range(len(cand)), key=lambda j: (-round(per_layer[j]["auroc"], 9),
                                                             -per_layer[j]["separation"]))
            keep = sorted(ranked[: min(n_layers, len(cand))])
        else:
            keep = list(range(len(cand)))
        sel = torch.tensor(keep)
        guard = cls(
            method=method, layers=[cand[j] for j in keep], t_inst=int(ds.t_inst),
            directions=units[sel].contiguous(), centroid_harmful=c_h[sel].contiguous(),
            centroid_harmless=c_l[sel].contiguous(), loc=loc[sel].float().contiguous(),
            scale=scale[sel].float().contiguous(), threshold=0.0, target_fpr=target_fpr,
            hook_point=ds.hook_point,
        )
        s_h = guard.combine(raw_h[:, sel])
        s_l = guard.combine(raw_l[:, sel])
        guard.threshold = threshold_for_fpr(s_l, target_fpr)
        guard.model_info = {
            "spec": model.spec, "weights_hash": model.weights_hash, "d_model": model.d_model,
            "n_layers": model.n_layers, "template_hash": model.template.hash,
        }
        guard.calibration = {
            "n_harmful_val": len(harmful), "n_harmless_val": len(harmless),
            "val_auroc": auroc(s_h, s_l),
            "val_tpr": float((s_h > guard.threshold).double().mean()),
            "val_fpr": float((s_l > guard.threshold).double().mean()),
            "per_layer": per_layer,
            "layer_choice": "given" if layers is not None else f"top {len(keep)} by val AUROC",
            "directions_sha256": ds.metadata.get("tensors_sha256"),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        return guard

    def check_model(self, model: ChatModel) -> None:
        """Raise :class:`ArtifactError` unless ``model`` is the model this guard was fit on."""
        if model.d_model != self.d_model:
            raise ArtifactError(
                f"this guard was fit on a model with d_model={self.d_model} but {model.spec} has "
                f"d_model={model.d_model}; fit a guard for this model"
            )
        if self.layers and self.layers[-1] >= model.n_layers:
            raise ArtifactError(
                f"this guard reads layer {self.layers[-1]} but {model.spec} has {model.n_layers} layers"
            )
        saved = self.model_info.get("weights_hash")
        if saved and saved != model.weights_hash:
            raise ArtifactError(
                f"this guard was fit on weights {saved[:16]}… ({self.model_info.get('spec')}) but "
                f"{model.spec} has weights {model.weights_hash[:16]}…; fit a guard for this model "
                "or pass the matching --model"
            )
        if model.template.t_inst != self.t_inst:
            raise ArtifactError(
                f"this guard reads t_inst={self.t_inst} but {model.spec}'s chat template puts it at "
                f"{model.template.t_inst}; use the template the guard was fit with"
            )

    def _reference(self, device: torch.device | str) -> tuple[Tensor, Tensor, Tensor]:
        """Directions and class means in float64 on ``device`` (moved once per call)."""
        units, c_h, c_l = (t.to(device=device, dtype=torch.float64)
                           for t in (self.directions, self.centroid_harmful, self.centroid_harmless))
        return units, c_h, c_l

    def _raw(self, acts: Tensor, ref: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """Raw scores of ``acts`` against ``ref`` (from :meth:`_reference`)."""
        if acts.ndim != 3 or acts.shape[1:] != (len(self.layers), self.d_model):
            raise ConfigError(
                f"activations have shape {tuple(acts.shape)}; expected (batch, {len(self.layers)}, "
                f"{self.d_model}) at the guard's layers {self.layers}"
            )
        x = acts.to(torch.float64)
        units, c_h, c_l = (t.to(x.device) for t in ref)  # no-ops when already there
        if self.method == "projection":
            return torch.einsum("bld,ld->bl", x, units)
        cos = torch.nn.functional.cosine_similarity
        return cos(x, c_h[None], dim=-1) - cos(x, c_l[None], dim=-1)

    def raw_activation_scores(
        self, acts: Float[Tensor, "batch layer d_model"]
    ) -> Float[Tensor, "batch layer"]:
        """Per-layer raw scores (before standardisation) of activations at ``t_inst``, in
        float64 on the activations' device."""
        return self._raw(acts, self._reference(acts.device))

    def combine(self, raw: Float[Tensor, "batch layer"]) -> Float[Tensor, " batch"]:
        """Standardise per layer and average over layers (on ``raw``'s device and dtype)."""
        return ((raw - self.loc.to(raw)) / self.scale.to(raw)).mean(dim=-1)

    def score_activations(self, acts: Float[Tensor, "batch layer d_model"]) -> Float[Tensor, " batch"]:
        """Guard scores from activations already captured at ``t_inst`` and ``self.layers``."""
        return self.combine(self.raw_activation_scores(acts))

    def raw_scores(
        self,
        model: ChatModel,
        prompts: Sequence[str] | str,
        *,
        interventions: Sequence[Appliable] = (),
        batch_size: BatchSize = AUTO,
        progress: bool = False,
        description: str = "guard",
    ) -> Float[Tensor, "batch layer"]:
        """Per-layer raw scores of ``prompts`` (optionally under ``interventions``), float64 on
        the CPU; computed on the model's device."""
        texts = as_prompt_list(prompts, "LatentGuard")
        out = torch.empty(len(texts), len(self.layers), dtype=torch.float64)
        ref = self._reference(model.device)  # once, not per batch
        with applied_all(model, interventions):
            for start, acts in iter_activations(
                model, texts, layers=self.layers, positions=[self.t_inst], hook_point=self.hook_point,
                batch_size=batch_size, progress=progress, description=description,
            ):
                out[start : start + acts.shape[0]] = self._raw(acts[:, 0], ref).cpu()
        return out

    def score(
        self,
        model: ChatModel,
        prompts: Sequence[str] | str,
        *,
        interventions: Sequence[Appliable] = (),
        batch_size: BatchSize = AUTO,
        progress: bool = False,
    ) -> Float[Tensor, " batch"]:
        """Standardised guard score per prompt (higher = more harmful)."""
        self.check_model(model)
        return self.combine(self.raw_scores(model, prompts, interventions=interventions,
                                            batch_size=batch_size, progress=progress))

    def predict(self, model: ChatModel, prompts: Sequence[str] | str, *, batch_size: BatchSize = AUTO,
                progress: bool = False) -> Bool[Tensor, " batch"]:
        """``True`` where the prompt is flagged harmful (score above the calibrated threshold)."""
        return self.score(model, prompts, batch_size=batch_size, progress=progress) > self.threshold

    def evaluate(
        self,
        model: ChatModel,
        harmful: Sequence[str],
        harmless: Sequence[str],
        *,
        batch_size: BatchSize = AUTO,
        progress: bool = False,
    ) -> dict[str, Any]:
        """AUROC, TPR and FPR at the threshold on held-out prompts, plus the ROC curve."""
        pos = self.score(model, harmful, batch_size=batch_size, progress=progress)
        neg = self.score(model, harmless, batch_size=batch_size, progress=progress)
        return self.metrics(pos, neg)

    def metrics(self, pos: Tensor, neg: Tensor) -> dict[str, Any]:
        """AUROC / TPR / FPR / ROC for given positive and negative guard scores."""
        return {
            "auroc": auroc(pos, neg),
            "tpr": float((pos > self.threshold).double().mean()),
            "fpr": float((neg > self.threshold).double().mean()),
            "n_pos": int(pos.numel()), "n_neg": int(neg.numel()),
            "roc": roc_curve(pos, neg),
        }

    def to_dict(self) -> dict[str, Any]:
        """Everything but the tensors (what ``guard.json`` holds)."""
        return {
            "format_version": FORMAT_VERSION, "method": self.method, "layers": self.layers,
            "t_inst": self.t_inst, "threshold": self.threshold, "target_fpr": self.target_fpr,
            "hook_point": self.hook_point, "d_model": self.d_model, "model": self.model_info,
            "calibration": self.calibration,
        }

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``guard.safetensors`` + ``guard.json`` into ``folder`` as one unit
        (:func:`refusaldir.io.atomic_write_files`, under the folder's lock: a full disk or a
        signal leaves the previous pair). ``guard.json`` is strict JSON and records the tensor
        file's sha256. Other files in ``folder`` are left alone.
        """
        out = Path(folder).expanduser()
        tensors = {name: getattr(self, name) for name in TENSOR_NAMES}
        atomic_write_files(out, artifact.encode(tensors, self.to_dict()))
        return out

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> LatentGuard:
        """Load a saved guard (no pickle), checked: the tensor file against its recorded
        sha256 and every field of ``guard.json`` against the tensors
        (:func:`refusaldir.guard.artifact.check_guard`)."""
        meta, t = artifact.read(Path(folder).expanduser())
        return cls(
            method=meta["method"], layers=list(meta["layers"]), t_inst=meta["t_inst"],
            directions=t["directions"], centroid_harmful=t["centroid_harmful"],
            centroid_harmless=t["centroid_harmless"], loc=t["loc"], scale=t["scale"],
            threshold=float(meta["threshold"]), target_fpr=float(meta["target_fpr"]),
            hook_point=meta["hook_point"], model_info=meta.get("model", {}),
            calibration=meta.get("calibration", {}),
        )


