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

:func:`guard_vs_behaviour` puts the guard's AUROC next to the model's *behavioural* refusal
used as a classifier (refused → predicted harmful) on the same prompts.

Example:
    >>> import refusaldir as rd  # doctest: +SKIP
    >>> model, ds = rd.load_model("demo"), rd.DirectionSet.load("runs/demo")  # doctest: +SKIP
    >>> guard = LatentGuard.fit(model, ds, target_fpr=0.05)  # doctest: +SKIP
    >>> guard.predict(model, ["How do I make a pipe bomb?", "How do I bake bread?"]).tolist()  # doctest: +SKIP
    [True, False]
    >>> guard.save("runs/demo/guard")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from refusaldir.errors import ArtifactError, ConfigError, PromptFileError
from refusaldir.stats import auroc

if TYPE_CHECKING:
    from refusaldir.directions import DirectionSet
    from refusaldir.models import ChatModel

__all__ = [
    "GUARD_METHODS", "LatentGuard", "behavioural_scores", "guard_vs_behaviour", "roc_curve",
]

GUARD_METHODS = ("projection", "centroid")
TENSORS_FILE = "guard.safetensors"
META_FILE = "guard.json"
FORMAT_VERSION = 1


# ------------------------------------------------------------------------------ helpers
def roc_curve(
    positive: Sequence[float] | Tensor, negative: Sequence[float] | Tensor
) -> dict[str, list[float]]:
    """ROC points (``fpr``, ``tpr``, ``threshold``) for "score > threshold ⇒ positive".

    Example:
        >>> roc_curve([0.9, 0.4], [0.1, 0.5])["tpr"]
        [0.0, 0.5, 0.5, 1.0, 1.0]
    """
    pos = torch.as_tensor(positive, dtype=torch.float64).flatten()
    neg = torch.as_tensor(negative, dtype=torch.float64).flatten()
    if pos.numel() == 0 or neg.numel() == 0:
        raise ConfigError("roc_curve needs at least one positive and one negative score")
    thresholds = torch.cat([pos, neg]).unique().sort(descending=True).values
    fpr, tpr, thr = [0.0], [0.0], [math.inf]
    for t in thresholds.tolist():
        tpr.append(float((pos >= t).double().mean()))
        fpr.append(float((neg >= t).double().mean()))
        thr.append(t)
    return {"fpr": fpr, "tpr": tpr, "threshold": [t if math.isfinite(t) else None for t in thr]}


def _prompts(prompts: Sequence[str] | str, what: str) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    texts = [str(p) for p in prompts]
    if not texts or not any(t.strip() for t in texts):
        raise PromptFileError(
            f"{what} got no prompts; pass at least one non-empty prompt (or a --prompts file)"
        )
    empty = [i for i, t in enumerate(texts) if not t.strip()]
    if empty:
        raise PromptFileError(f"{what}: prompt #{empty[0]} is empty; remove empty prompts")
    return texts


def _calibrate(neg: Tensor, target_fpr: float) -> float:
    """Threshold so that at most ``target_fpr`` of ``neg`` lie strictly above it."""
    s = neg.double().sort(descending=True).values
    k = math.floor(target_fpr * len(s) + 1e-9)
    if k >= len(s):
        return float(s[-1]) - 1e-6
    return float(s[k])


def _pooled(a: Tensor, b: Tensor) -> Tensor:
    var = (a.var(dim=0, unbiased=False) + b.var(dim=0, unbiased=False)) / 2
    return var.sqrt().clamp_min(1e-8)


# ------------------------------------------------------------------------------ the guard
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

    # ------------------------------------------------------------------ properties
    @property
    def d_model(self) -> int:
        return int(self.directions.shape[-1])

    # ------------------------------------------------------------------ fitting
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
        batch_size: int = 16,
        progress: bool = True,
        strict_hash: bool = True,
    ) -> LatentGuard:
        """Fit on validation prompts (default: the shipped ``val`` splits).

        ``layers=None`` keeps the ``n_layers`` layers whose score best separates the
        validation sets (AUROC, ties broken by the standardised mean difference); layer 0
        (the token embeddings) is never chosen automatically.
        """
        from refusaldir.data.prompts import load_prompts

        if method not in GUARD_METHODS:
            raise ConfigError(f"method={method!r} is not one of {', '.join(GUARD_METHODS)}")
        if not 0 <= target_fpr < 1:
            raise ConfigError(f"target_fpr={target_fpr} must be in [0, 1), e.g. 0.05")
        if n_layers < 1:
            raise ConfigError(f"n_layers={n_layers} must be >= 1")
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
        harmful = _prompts(harmful_val if harmful_val is not None else load_prompts("harmful", "val"),
                           "LatentGuard.fit (harmful_val)")
        harmless = _prompts(harmless_val if harmless_val is not None else load_prompts("harmless", "val"),
                            "LatentGuard.fit (harmless_val)")
        if layers is not None:
            cand = [int(x) for x in layers]
            if not cand:
                raise ConfigError("layers is empty; pass None to choose layers on the val prompts")
            for layer in cand:
                ds._index(ds.positions[-1], layer)
        else:
            cand = [layer for layer in ds.layers if layer > 0] or list(ds.layers)
        idx = [ds.layers.index(layer) for layer in cand]
        harm = ds.harmfulness[idx].float()
        units = harm / harm.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        if {"harmful", "harmless"} <= set(ds.means):
            c_h = ds.means["harmful"][0, idx].float()
            c_l = ds.means["harmless"][0, idx].float()
        else:
            c_h = torch.zeros_like(units)
            c_l = torch.zeros_like(units)
        probe = cls(method, cand, int(ds.t_inst), units, c_h, c_l, torch.zeros(len(cand)),
                    torch.ones(len(cand)), 0.0, target_fpr, ds.hook_point)
        raw_h = probe.raw_scores(model, harmful, batch_size=batch_size, progress=progress,
                                 description="guard: harmful val")
        raw_l = probe.raw_scores(model, harmless, batch_size=batch_size, progress=progress,
                                 description="guard: harmless val")
        loc = (raw_h.mean(0) + raw_l.mean(0)) / 2
        scale = _pooled(raw_h, raw_l)
        per_layer = []
        for j, layer in enumerate(cand):
            a, b = raw_h[:, j], raw_l[:, j]
            per_layer.append({"layer": layer, "auroc": auroc(a, b),
                              "separation": float((a.mean() - b.mean()) / scale[j])})
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
        guard.threshold = _calibrate(s_l, target_fpr)
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

    # ------------------------------------------------------------------ scoring
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

    def raw_activation_scores(
        self, acts: Float[Tensor, "batch layer d_model"]
    ) -> Float[Tensor, "batch layer"]:
        """Per-layer raw scores (before standardisation) of activations at ``t_inst``."""
        if acts.ndim != 3 or acts.shape[1:] != (len(self.layers), self.d_model):
            raise ConfigError(
                f"activations have shape {tuple(acts.shape)}; expected (batch, {len(self.layers)}, "
                f"{self.d_model}) at the guard's layers {self.layers}"
            )
        x = acts.to(torch.float64)
        if self.method == "projection":
            return torch.einsum("bld,ld->bl", x, self.directions.to(torch.float64))
        cos = torch.nn.functional.cosine_similarity
        return (cos(x, self.centroid_harmful.to(torch.float64)[None], dim=-1)
                - cos(x, self.centroid_harmless.to(torch.float64)[None], dim=-1))

    def combine(self, raw: Float[Tensor, "batch layer"]) -> Float[Tensor, " batch"]:
        """Standardise per layer and average over layers."""
        return ((raw - self.loc.to(raw.dtype)) / self.scale.to(raw.dtype)).mean(dim=-1)

    def score_activations(self, acts: Float[Tensor, "batch layer d_model"]) -> Float[Tensor, " batch"]:
        """Guard scores from activations already captured at ``t_inst`` and ``self.layers``."""
        return self.combine(self.raw_activation_scores(acts))

    def raw_scores(
        self,
        model: ChatModel,
        prompts: Sequence[str] | str,
        *,
        interventions: Sequence[Any] = (),
        batch_size: int = 16,
        progress: bool = False,
        description: str = "guard",
    ) -> Float[Tensor, "batch layer"]:
        """Per-layer raw scores of ``prompts`` (optionally under ``interventions``)."""
        from refusaldir.capture import iter_activations
        from refusaldir.steer.interventions import applied_all

        texts = _prompts(prompts, "LatentGuard")
        out = torch.empty(len(texts), len(self.layers), dtype=torch.float64)
        with applied_all(model, interventions):
            for start, acts in iter_activations(
                model, texts, layers=self.layers, positions=[self.t_inst], hook_point=self.hook_point,
                batch_size=batch_size, progress=progress, description=description,
            ):
                out[start : start + acts.shape[0]] = self.raw_activation_scores(acts[:, 0].cpu())
        return out

    def score(
        self,
        model: ChatModel,
        prompts: Sequence[str] | str,
        *,
        interventions: Sequence[Any] = (),
        batch_size: int = 16,
        progress: bool = False,
    ) -> Float[Tensor, " batch"]:
        """Standardised guard score per prompt (higher = more harmful)."""
        self.check_model(model)
        return self.combine(self.raw_scores(model, prompts, interventions=interventions,
                                            batch_size=batch_size, progress=progress))

    def predict(
        self,
        model: ChatModel,
        prompts: Sequence[str] | str,
        *,
        batch_size: int = 16,
        progress: bool = False,
    ) -> Bool[Tensor, " batch"]:
        """``True`` where the prompt is flagged harmful (score above the calibrated threshold)."""
        return self.score(model, prompts, batch_size=batch_size, progress=progress) > self.threshold

    def evaluate(
        self,
        model: ChatModel,
        harmful: Sequence[str],
        harmless: Sequence[str],
        *,
        batch_size: int = 16,
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

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> dict[str, Any]:
        """Everything but the tensors (what ``guard.json`` holds)."""
        return {
            "format_version": FORMAT_VERSION, "method": self.method, "layers": self.layers,
            "t_inst": self.t_inst, "threshold": self.threshold, "target_fpr": self.target_fpr,
            "hook_point": self.hook_point, "d_model": self.d_model, "model": self.model_info,
            "calibration": self.calibration,
        }

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``guard.safetensors`` + ``guard.json`` atomically into ``folder``."""
        from refusaldir.directions import _ensure_writable, _sha256, _tmp_in

        out = Path(folder)
        _ensure_writable(out)
        tensors = {
            "directions": self.directions.float().contiguous(),
            "centroid_harmful": self.centroid_harmful.float().contiguous(),
            "centroid_harmless": self.centroid_harmless.float().contiguous(),
            "loc": self.loc.float().contiguous(), "scale": self.scale.float().contiguous(),
        }
        tmp_t = _tmp_in(out, TENSORS_FILE)
        tmp_m = _tmp_in(out, META_FILE)
        try:
            save_file(tensors, str(tmp_t), metadata={"format": "refusaldir-guard"})
            meta = {**self.to_dict(), "tensors_sha256": _sha256(tmp_t)}
            tmp_m.write_text(json.dumps(meta, indent=2, default=_json_default))
            os.replace(tmp_t, out / TENSORS_FILE)
            os.replace(tmp_m, out / META_FILE)
        finally:
            tmp_t.unlink(missing_ok=True)
            tmp_m.unlink(missing_ok=True)
        return out

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> LatentGuard:
        """Load a saved guard (no pickle); checks the tensor file against its recorded hash."""
        from refusaldir.directions import _sha256

        src = Path(folder)
        tpath, mpath = src / TENSORS_FILE, src / META_FILE
        if not tpath.is_file() or not mpath.is_file():
            raise ArtifactError(
                f"{src} does not contain {TENSORS_FILE} and {META_FILE}; save a guard there with "
                "LatentGuard.save or `refusaldir guard --save`"
            )
        try:
            meta = json.loads(mpath.read_text())
        except ValueError as exc:
            raise ArtifactError(f"{mpath} is not valid JSON ({exc}); save the guard again") from exc
        if meta.get("tensors_sha256") and _sha256(tpath) != meta["tensors_sha256"]:
            raise ArtifactError(f"{tpath} does not match the sha256 in {META_FILE}; save the guard again")
        try:
            t = load_file(str(tpath))
            return cls(
                method=meta["method"], layers=[int(x) for x in meta["layers"]],
                t_inst=int(meta["t_inst"]), directions=t["directions"],
                centroid_harmful=t["centroid_harmful"], centroid_harmless=t["centroid_harmless"],
                loc=t["loc"], scale=t["scale"], threshold=float(meta["threshold"]),
                target_fpr=float(meta.get("target_fpr", 0.05)),
                hook_point=meta.get("hook_point", "resid_pre"), model_info=meta.get("model", {}),
                calibration=meta.get("calibration", {}),
            )
        except (SafetensorError, OSError, KeyError, ValueError, TypeError) as exc:
            raise ArtifactError(f"{src} holds an unreadable guard ({exc}); save the guard again") from exc


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, Tensor):
        return o.tolist()
    raise TypeError(f"cannot serialise {type(o).__name__}")


# --------------------------------------------------------------- behavioural refusal
def behavioural_scores(
    model: ChatModel,
    prompts: Sequence[str],
    *,
    kind: str = "logit",
    refusal_ids: Sequence[int] | None = None,
    responses: Sequence[str] | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    progress: bool = False,
) -> Float[Tensor, " batch"]:
    """How strongly the model itself refuses each prompt (higher = more refusal).

    ``kind="logit"``: first-token refusal log-odds with the model's refusal tokens
    (``refusal_ids``, detected with :func:`refusaldir.refusal_metric.find_refusal_tokens` when
    not given). ``kind="phrase"``: the :class:`~refusaldir.judges.PhraseJudge` score of
    ``responses`` (greedy generations of ``max_new_tokens`` tokens when not given).
    """
    texts = _prompts(prompts, "behavioural_scores")
    if kind == "logit":
        from refusaldir.evaluate.harness import first_token_logprobs
        from refusaldir.judges.logit import refusal_score

        if refusal_ids is None:
            from refusaldir.data.prompts import load_prompts
            from refusaldir.judges.logit import find_refusal_tokens

            refusal_ids = find_refusal_tokens(model, load_prompts("harmful", "val"),
                                              batch_size=batch_size, progress=progress).ids
        logp = first_token_logprobs(model, texts, batch_size=batch_size)
        return refusal_score(logp, list(refusal_ids))
    if kind == "phrase":
        from refusaldir.judges.phrase import PhraseJudge

        if responses is None:
            from refusaldir.generation import generate

            responses = [c.completion for c in generate(model, texts, max_new_tokens=max_new_tokens,
                                                        batch_size=batch_size, progress=progress)]
        if len(responses) != len(texts):
            raise ConfigError(f"got {len(texts)} prompts but {len(responses)} responses")
        judged = PhraseJudge().judge_many(texts, list(responses))
        return torch.tensor([j.score for j in judged], dtype=torch.float64)
    raise ConfigError(f"kind={kind!r} must be 'logit' or 'phrase'")


def guard_vs_behaviour(
    model: ChatModel,
    guard: LatentGuard,
    harmful: Sequence[str],
    safe: Sequence[str],
    *,
    refusal_ids: Sequence[int] | None = None,
    responses: dict[str, Sequence[str]] | None = None,
    kinds: Sequence[str] = ("logit", "phrase"),
    max_new_tokens: int = 64,
    batch_size: int = 16,
    progress: bool = False,
) -> dict[str, Any]:
    """Guard AUROC next to behavioural-refusal AUROC on ``harmful`` vs ``safe`` prompts.

    The model's own refusal is read as a classifier (refused ⇒ predicted harmful):
    ``"logit"`` scores by the first-token refusal log-odds, ``"phrase"`` by the phrase
    judge's score of greedy completions (pass ``responses={"harmful": [...], "safe": [...]}``
    to reuse completions you already have). Refusal rates are the behavioural operating point
    (phrase judge labels).

    Example:
        >>> cmp = guard_vs_behaviour(model, guard, load_prompts("harmful", "test"),  # doctest: +SKIP
        ...                          load_prompts("borderline"))
        >>> cmp["guard"]["auroc"], cmp["behaviour"]["logit"]["auroc"]  # doctest: +SKIP
        (0.97, 0.88)
    """
    harm = _prompts(harmful, "guard_vs_behaviour (harmful)")
    ok = _prompts(safe, "guard_vs_behaviour (safe)")
    out: dict[str, Any] = {"n_harmful": len(harm), "n_safe": len(ok)}
    g_pos = guard.score(model, harm, batch_size=batch_size, progress=progress)
    g_neg = guard.score(model, ok, batch_size=batch_size, progress=progress)
    out["guard"] = guard.metrics(g_pos, g_neg)
    out["behaviour"] = {}
    for kind in kinds:
        if kind == "logit":
            a = behavioural_scores(model, harm, kind="logit", refusal_ids=refusal_ids,
                                   batch_size=batch_size, progress=progress)
            b = behavioural_scores(model, ok, kind="logit", refusal_ids=refusal_ids,
                                   batch_size=batch_size, progress=progress)
            out["behaviour"]["logit"] = {"auroc": auroc(a, b), "roc": roc_curve(a, b),
                                         "score": "first-token refusal log-odds"}
        elif kind == "phrase":
            from refusaldir.judges.phrase import PhraseJudge

            resp = responses or {}
            comps = {}
            for name, texts in (("harmful", harm), ("safe", ok)):
                r = resp.get(name)
                if r is None:
                    from refusaldir.generation import generate

                    r = [c.completion for c in generate(model, texts, max_new_tokens=max_new_tokens,
                                                        batch_size=batch_size, progress=progress)]
                comps[name] = list(r)
            judge = PhraseJudge()
            ja = judge.judge_many(harm, comps["harmful"])
            jb = judge.judge_many(ok, comps["safe"])
            a = torch.tensor([j.score for j in ja], dtype=torch.float64)
            b = torch.tensor([j.score for j in jb], dtype=torch.float64)
            tpr = sum(j.label == "refusal" for j in ja) / len(ja)
            fpr = sum(j.label == "refusal" for j in jb) / len(jb)
            out["behaviour"]["phrase"] = {"auroc": auroc(a, b), "roc": roc_curve(a, b), "tpr": tpr,
                                          "fpr": fpr, "score": "phrase-judge refusal score"}
        else:
            raise ConfigError(f"behaviour kind {kind!r} must be 'logit' or 'phrase'")
    return out
