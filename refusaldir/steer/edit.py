"""A parametrised edit: per-layer strengths over layers, any direction source, exact variants.

An :class:`Edit` removes, from each residual-stream write, ``w`` × its component in a
per-layer orthonormal basis ``Q_l`` (:func:`refusaldir.steer.edit_bases`): the attention
output of layer ``l`` with ``w = attn.at(l)``, the MLP output with ``w = mlp.at(l)``, the
embedding with ``w = embed``. Each :class:`Kernel` is a smooth bump over layers (peak layer,
peak weight, width, floor). It applies itself like the other interventions, as hooks inside
a ``with`` block, and bakes itself into weights (:meth:`Edit.orthogonalize`); on
architectures without sublayer output norms the two agree to float rounding.

``preserve_norm=True`` keeps the norm of every vector an input unit writes (each column of
an output projection, each embedding row): ``W' = (I - w Q Qᵀ) W diag(s)``. With ``w = 1``
the direction is still removed exactly (``Qᵀ W' = 0``), unlike renormalising the ``d_model``
rows. As hooks, the per-unit scale ``s`` multiplies the projection's input.

Example:
    >>> edit = Edit.from_directions(ds, model.n_layers, source="per_layer",  # doctest: +SKIP
    ...                             attn=Kernel(14, 1.0, 4), mlp=Kernel(14, 0.8, 3))
    >>> with edit.apply(model):  # doctest: +SKIP
    ...     out = generate(model, ["How do I pick a lock?"])
    >>> hf = edit.orthogonalize(model)[0]  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import math
import weakref
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from refusaldir.directions import DirectionSet, Subspaces
from refusaldir.errors import ArtifactError, ConfigError, HookError
from refusaldir.hooks import get_hook_point, hook_name
from refusaldir.steer.bases import edit_bases
from refusaldir.steer.interventions import Applied, HookList, expect_type, placed, scoped
from refusaldir.steer.orthogonalize import Writer, edited_copy, live_writers, work_dtype

if TYPE_CHECKING:
    from refusaldir.models import ChatModel

__all__ = ["MAX_WEIGHT", "Edit", "Kernel"]

#: Largest strength accepted: ``w > 1`` over-removes (reflects part of the component).
MAX_WEIGHT = 1.5
#: Hook points (after the point's layer) that feed each writer, for ``preserve_norm`` hooks.
UNIT_INPUTS = {"attn_out": "blocks.{}.attn.o.hook_in", "mlp_out": "blocks.{}.mlp.out.hook_in"}


def _num(x: Any, name: str, lo: float, hi: float) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or not lo <= x <= hi:
        raise ConfigError(f"{name}={x!r} must be a number in [{lo:g}, {hi:g}]")
    return float(x)


@dataclass(frozen=True)
class Kernel:
    """Strength per layer: ``floor + (weight - floor) · exp(-½ ((layer - peak) / width)²)``.

    Example:
        >>> [round(w, 2) for w in Kernel(peak=2, weight=1.0, width=1.0, floor=0.1).weights(5)]
        [0.22, 0.65, 1.0, 0.65, 0.22]
    """

    peak: float
    weight: float
    width: float
    floor: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "peak", _num(self.peak, "kernel peak", -1e6, 1e6))
        object.__setattr__(self, "weight", _num(self.weight, "kernel weight", 0.0, MAX_WEIGHT))
        object.__setattr__(self, "width", _num(self.width, "kernel width", 1e-3, 1e6))
        object.__setattr__(self, "floor", _num(self.floor, "kernel floor", 0.0, MAX_WEIGHT))

    def at(self, layer: float) -> float:
        return self.floor + (self.weight - self.floor) * math.exp(-0.5 * ((layer - self.peak) / self.width) ** 2)

    def weights(self, n_layers: int) -> list[float]:
        return [self.at(layer) for layer in range(n_layers)]

    def check(self, n_layers: int, what: str) -> None:
        if not 0 <= self.peak <= n_layers - 1:
            raise ConfigError(
                f"{what} kernel peak {self.peak:g} is outside the model's layers; expected a "
                f"layer in [0, {n_layers - 1}]"
            )

    @classmethod
    def full(cls) -> Kernel:
        """Strength 1 at every layer (the rank-1 recipe)."""
        return cls(0.0, 1.0, 1.0, 1.0)


def _sha(t: Tensor) -> str:
    return hashlib.sha256(t.detach().to(torch.float64).cpu().contiguous().numpy().tobytes()).hexdigest()


@dataclass(frozen=True, eq=False)
class Edit:
    """Remove per-layer weighted components along per-layer bases ``[layer, d_model, k]``."""

    bases: Float[Tensor, "layer d_model k"]
    attn: Kernel
    mlp: Kernel
    embed: float = 0.0
    preserve_norm: bool = False
    spec: dict[str, Any] = field(default_factory=dict)
    type: ClassVar[str] = "edit"

    def __post_init__(self) -> None:
        b = self.bases
        if not isinstance(b, Tensor) or b.ndim != 3 or not bool(torch.isfinite(b).all()):
            raise ConfigError("Edit.bases must be a finite (layer, d_model, k) tensor; build it with edit_bases")
        gram = b.to(torch.float64).transpose(1, 2) @ b.to(torch.float64)
        diag = torch.diagonal(gram, dim1=1, dim2=2)
        if float((gram - torch.diag_embed(diag)).abs().max()) > 1e-6 or \
                not bool(((diag - 1).abs() < 1e-6).logical_or(diag.abs() < 1e-12).all()):
            raise ConfigError("Edit.bases columns must be orthonormal (or zero); build them with edit_bases")
        object.__setattr__(self, "bases", b.detach().to(torch.float64).cpu())
        object.__setattr__(self, "embed", _num(self.embed, "embed weight", 0.0, MAX_WEIGHT))
        object.__setattr__(self, "preserve_norm", bool(self.preserve_norm))
        self.attn.check(self.n_layers, "attention")  # before any model is involved
        self.mlp.check(self.n_layers, "MLP")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_directions(
        cls, ds: DirectionSet, n_layers: int, *, source: str | float = "selected",
        pos: int | None = None, projected: bool = False, subspace: str = "refusal", k: int = 1,
        extra: Subspaces | None = None, attn: Kernel | None = None, mlp: Kernel | None = None,
        embed: float = 1.0, preserve_norm: bool = False,
    ) -> Edit:
        """Build the bases from ``ds`` (see :func:`refusaldir.steer.edit_bases`); kernels
        default to full strength everywhere."""
        bases = edit_bases(ds, n_layers, source=source, pos=pos, projected=projected,
                           subspace=subspace, k=k, extra=extra)
        spec = {"source": source, "pos": pos, "projected": bool(projected), "subspace": subspace,
                "k": int(bases.shape[2]), "uses_subspaces": subspace in ("categories", "pca")}
        return cls(bases, attn or Kernel.full(), mlp or Kernel.full(), embed, preserve_norm, spec)

    @property
    def n_layers(self) -> int:
        return int(self.bases.shape[0])

    def check(self, model: ChatModel) -> None:
        """Raise unless the edit fits ``model`` (layers, ``d_model``, kernel peaks)."""
        if self.n_layers != model.n_layers or self.bases.shape[1] != model.d_model:
            raise ConfigError(
                f"this edit is for {self.n_layers} layers × d_model {self.bases.shape[1]}, but "
                f"{model.spec} has {model.n_layers} × {model.d_model}; build it from this model's directions"
            )
        self.attn.check(model.n_layers, "attention")
        self.mlp.check(model.n_layers, "MLP")

    def weight_of(self, point: str, layer: int) -> float:
        if point == "embed":
            return self.embed
        return (self.attn if point == "attn_out" else self.mlp).at(layer)

    def basis_of(self, point: str, layer: int) -> Float[Tensor, "d_model k"]:
        return self.bases[max(layer, 0)]

    # ------------------------------------------------------------------ hooks
    def hook_list(self, model: ChatModel) -> HookList:
        """``(hook name, fn)`` pairs equal to :meth:`orthogonalize` on plain architectures."""
        self.check(model)
        out: HookList = []
        scales = self._unit_scales(model) if self.preserve_norm else {}
        points = [("embed", 0)] + [(p, layer) for layer in range(model.n_layers) for p in ("attn_out", "mlp_out")]
        for point, layer in points:
            w = self.weight_of(point, layer)
            if w == 0:
                continue
            q = placed(self.basis_of(point, layer), model.device, model.dtype)
            renorm = point == "embed" and self.preserve_norm
            out.append((hook_name("resid_pre" if point == "embed" else point, layer),
                        _project_fn(q, w, renorm)))
            if (point, layer) in scales:
                name = UNIT_INPUTS[point].format(layer)
                get_hook_point(model, name)
                out.append((name, _scale_fn(placed(scales[point, layer], model.device, model.dtype))))
        return out

    @staticmethod
    def preserve_norm_hookable(model: ChatModel) -> bool:
        """Whether ``preserve_norm=True`` has a hook form on ``model``: every attention/MLP
        writer a plain output projection with a hook point on its input (no output norm, no
        fused experts)."""
        names = model.bridge.hook_dict
        return all(wr.point == "embed" or (wr.out_axis == 0 and wr.weight.ndim == 2 and wr.gain is None
                                           and UNIT_INPUTS[wr.point].format(wr.layer) in names)
                   for wr in _writers(model))

    def _unit_scales(self, model: ChatModel) -> dict[tuple[str, int], Tensor]:
        """Per input unit ``‖W_j‖ / ‖(I - w Q Qᵀ) W_j‖`` of every attention/MLP output writer."""
        if not self.preserve_norm_hookable(model):
            raise HookError(
                f"the norm-preserving edit has no hook form on {model.spec} (output norms, fused experts "
                "or another token mixer): apply it to the weights (Edit.orthogonalize) or use "
                "preserve_norm=False"
            )
        scales: dict[tuple[str, int], Tensor] = {}
        for wr in _writers(model):
            if wr.point == "embed" or (w := self.weight_of(wr.point, wr.layer)) == 0:
                continue
            dev = wr.weight.device if wr.weight.device.type != "meta" else torch.device("cpu")
            cols = wr.weight.detach().to(dev, work_dtype(dev)).T  # (d_in, d_model)
            q = self.basis_of(wr.point, wr.layer).to(dev, cols.dtype)
            edited = cols - w * (cols @ q) @ q.T
            scales[wr.point, wr.layer] = (cols.norm(dim=1) / edited.norm(dim=1).clamp_min(1e-30)).float().cpu()
        return scales

    def apply(self, model: ChatModel) -> AbstractContextManager[Applied]:
        """Context manager: hooks are active inside the ``with`` block only."""
        return scoped(model, self, self.hook_list(model))

    # ------------------------------------------------------------------ weights
    def orthogonalize(self, model: ChatModel) -> tuple[Any, bool, list[Writer]]:
        """A plain ``transformers`` copy of ``model`` with the edit in its weights:
        ``(model, untied embeddings?, edited writers)``."""
        self.check(model)

        def plan(wr: Writer) -> tuple[Tensor | None, float]:
            return self.basis_of(wr.point, wr.layer), self.weight_of(wr.point, wr.layer)

        return edited_copy(model, plan, preserve_norm=self.preserve_norm)

    # ------------------------------------------------------------------ records
    def params(self) -> dict[str, Any]:
        """The searchable parameters (what the optimiser varies)."""
        return {"attn": vars(self.attn).copy(), "mlp": vars(self.mlp).copy(), "embed": self.embed,
                "preserve_norm": self.preserve_norm}

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **self.params(), "bases": dict(self.spec),
                "bases_sha256": _sha(self.bases), "n_layers": self.n_layers}

    @classmethod
    def from_dict(cls, d: dict[str, Any], directions: DirectionSet, *, extra: Subspaces | None = None) -> Edit:
        """Rebuild from :meth:`to_dict` and the direction set (and subspaces) it came from."""
        expect_type(d, cls.type)
        try:
            b = d["bases"]
            bases = edit_bases(directions, int(d["n_layers"]), source=b["source"], pos=b.get("pos"),
                               projected=bool(b["projected"]), subspace=b["subspace"], k=int(b["k"]),
                               extra=extra)
            edit = cls(bases, Kernel(**d["attn"]), Kernel(**d["mlp"]), d["embed"],
                       bool(d["preserve_norm"]), dict(b))
        except (KeyError, TypeError) as exc:
            raise ArtifactError(f"edit record is incomplete or malformed ({exc!r}); re-run `refusaldir optimize`") from exc
        if d.get("bases_sha256") != _sha(edit.bases):
            raise ArtifactError(
                "the edit's directions do not match the direction set given (bases sha256 differs); "
                "pass the directions the edit was optimised on"
            )
        return edit


_WRITERS: weakref.WeakKeyDictionary[Any, list[Writer]] = weakref.WeakKeyDictionary()


def _writers(model: ChatModel) -> list[Writer]:
    """:func:`~refusaldir.steer.live_writers` of ``model``, once per loaded model (an optimiser
    builds hooks for hundreds of edits on the same weights). Offloaded models are read afresh,
    not cached: their writers are copies of weights kept off the device on purpose."""
    hit = _WRITERS.get(model.hf)
    if hit is None:
        hit = live_writers(model)
        if not any(p.device.type == "meta" for p in model.hf.parameters()):
            _WRITERS[model.hf] = hit
    return hit


def _project_fn(q: Any, w: float, renorm: bool) -> Any:
    def fn(act: Tensor, hook: Any) -> Tensor:
        basis = q(act)
        new = act - w * (act @ basis) @ basis.T
        if renorm:
            new = new * (act.norm(dim=-1, keepdim=True) / new.norm(dim=-1, keepdim=True).clamp_min(1e-30))
        return new

    return fn


def _scale_fn(s: Any) -> Any:
    def fn(act: Tensor, hook: Any) -> Tensor:
        scale = s(act)
        if act.shape[-1] != scale.numel():  # per-head input (batch, pos, head, d_head)
            scale = scale.view(act.shape[-2], act.shape[-1])
        return act * scale

    return fn
