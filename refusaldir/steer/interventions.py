"""Interventions on the residual stream, scoped to ``with`` blocks on the same model object.

- :class:`Ablation` (directional ablation, Arditi et al. 2024): project a direction out of
  ``resid_pre`` and of every attention and MLP output, at every position, generated tokens
  included. With ``layers="all"`` this is exactly what :func:`refusaldir.orthogonalize.orthogonalize`
  bakes into the weights.
- :class:`Addition` (activation addition): add ``coeff`` times the **raw** difference-of-means
  vector to ``resid_pre`` of the given layer(s) at every position (Arditi et al. add the raw
  vector with coefficient 1; pass ``normalize=True`` to add ``coeff`` times the unit vector
  instead). A fixed coefficient of 1 is often too weak to induce refusal on harmless
  prompts: use :func:`calibrate_addition`.
- :class:`ConditionalSteering`: apply an ablation or addition only to the prompts whose
  harmfulness projection at ``t_inst`` crosses a threshold calibrated on harmless validation
  prompts (:func:`calibrate_conditional`). The decision is made on the prompt's forward pass
  and held for the tokens generated after it.

Every intervention is a small frozen dataclass with ``apply(model)`` (a context manager that
adds hooks on enter and removes them on exit, also on error), ``to_dict()`` and
``from_dict(d, directions)``. Interventions nest.

Example:
    >>> import refusaldir as rd  # doctest: +SKIP
    >>> from refusaldir.generation import generate  # doctest: +SKIP
    >>> model, ds = rd.load_model("demo"), rd.DirectionSet.load("runs/demo")  # doctest: +SKIP
    >>> d = ds.refusal_direction(layer=default_layer(model, ds), pos=-1)  # doctest: +SKIP
    >>> with ablate(model, d):  # doctest: +SKIP
    ...     out = generate(model, ["How do I pick a lock?"])
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Union

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from refusaldir.directions import Direction, DirectionSet
from refusaldir.errors import ArtifactError, ConfigError, HookError
from refusaldir.hooks import check_layers, hook_name, hooks

if TYPE_CHECKING:
    from refusaldir.generation import Completion
    from refusaldir.judges.phrase import Judge
    from refusaldir.models import ChatModel

log = logging.getLogger(__name__)

ABLATION_POINTS = ("resid_pre", "attn_out", "mlp_out")

__all__ = [
    "ABLATION_POINTS", "Ablation", "Addition", "AdditionCalibration", "Applied",
    "ConditionalSteering", "Intervention", "ablate", "add", "calibrate_addition",
    "calibrate_conditional", "default_layer", "intervention_from_dict", "layer_scores",
    "steer_if",
]


# ----------------------------------------------------------------------------- helpers
def as_direction(direction: Direction | Tensor, *, kind: str = "custom") -> Direction:
    """Wrap a bare 1-D tensor as a :class:`Direction` (layer ``-1``: provenance unknown)."""
    if isinstance(direction, Direction):
        return direction
    if isinstance(direction, Tensor):
        return Direction(direction.detach(), layer=-1, pos=None, kind=kind)
    raise ConfigError(
        f"direction has type {type(direction).__name__}; pass a refusaldir.Direction "
        "(e.g. DirectionSet.refusal_direction(layer, pos)) or a 1-D tensor of size d_model"
    )


def check_direction(model: ChatModel | None, direction: Direction, what: str = "direction") -> None:
    """Raise a clear error unless ``direction`` is a finite, non-zero vector of ``model``'s size."""
    v = direction.vector
    if v.ndim != 1:
        raise ConfigError(
            f"{what} has shape {tuple(v.shape)}; expected a 1-D vector of size d_model"
        )
    if model is not None and v.shape[0] != model.d_model:
        raise ArtifactError(
            f"{what} has d_model={v.shape[0]} but {model.spec} has d_model={model.d_model}; "
            "use directions extracted from this model"
        )
    vf = v.float()
    if not bool(torch.isfinite(vf).all()):
        raise ConfigError(f"{what} contains NaN or inf values; re-extract the directions")
    if float(vf.norm()) == 0.0:
        raise ConfigError(f"{what} is the zero vector and has no direction; pick another layer")


def _check_coeff(coeff: Any, name: str = "coeff") -> float:
    try:
        c = float(coeff)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={coeff!r} is not a number; pass e.g. {name}=4.0") from None
    if not math.isfinite(c):
        raise ConfigError(
            f"{name}={coeff} is not finite; pass a real number such as 4.0, or find one with "
            "refusaldir.interventions.calibrate_addition"
        )
    return c


def _norm_layers(layers: Any, *, allow_all: bool) -> tuple[int, ...] | None:
    """``"all"``/``None`` → ``None`` (every layer); an int or ints → a sorted tuple."""
    if layers is None or (isinstance(layers, str) and layers == "all"):
        if not allow_all:
            raise ConfigError("pass the layer(s) to act on, e.g. layers=[13]")
        return None
    if isinstance(layers, str):
        raise ConfigError(f"layers={layers!r} is not valid; pass 'all', an int or a list of ints")
    seq = [layers] if isinstance(layers, (int,)) else list(layers)
    try:
        out = tuple(sorted({int(x) for x in seq}))
    except (TypeError, ValueError):
        raise ConfigError(f"layers={layers!r} is not valid; pass 'all', an int or a list of ints") from None
    if not out:
        raise ConfigError("no layers selected; pass at least one layer index")
    if out[0] < 0:
        raise HookError(f"layer {out[0]} is negative; layers are numbered from 0")
    return out


def vector_sha256(vector: Tensor) -> str:
    """sha256 of a vector's float32 bytes (identifies a direction in run metadata)."""
    t = vector.detach().to("cpu", torch.float32).contiguous()
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


def _direction_to_dict(d: Direction, include_vector: bool) -> dict[str, Any]:
    out: dict[str, Any] = {**d.to_dict(), "norm": d.norm, "sha256": vector_sha256(d.vector)}
    if include_vector or not _rebuildable(d):
        out["vector"] = [float(x) for x in d.vector.float().tolist()]
    return out


def _rebuildable(d: Direction) -> bool:
    return d.layer >= 0 and (d.kind == "harmfulness" or (d.kind == "refusal" and d.pos is not None))


def _direction_from_dict(dd: dict[str, Any], directions: DirectionSet | None) -> Direction:
    try:
        layer = int(dd["layer"])
        kind = str(dd.get("kind", "refusal"))
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"direction record {dd!r} lacks 'layer'/'kind' ({exc})") from None
    pos = dd.get("pos")
    if "vector" in dd:
        d = Direction(torch.tensor(dd["vector"], dtype=torch.float32), layer,
                      None if pos is None else int(pos), kind, dd.get("hook_point", "resid_pre"))
    elif directions is None:
        raise ConfigError(
            f"the {kind} direction (layer {layer}, pos {pos}) is stored by reference; pass the "
            "DirectionSet it came from: from_dict(d, DirectionSet.load(RUN_FOLDER))"
        )
    elif kind == "refusal":
        d = directions.refusal_direction(layer, None if pos is None else int(pos))
    elif kind == "harmfulness":
        d = directions.harmfulness_direction(layer)
    else:
        raise ArtifactError(
            f"direction kind {kind!r} cannot be rebuilt from a DirectionSet and the record has no "
            "'vector'; save it with to_dict(include_vector=True)"
        )
    want = dd.get("sha256")
    if want and vector_sha256(d.vector) != want:
        raise ArtifactError(
            f"the {kind} direction at layer {layer}, pos {pos} in this DirectionSet does not match "
            f"the recorded one (sha256 {want[:12]}…); pass the direction set the run used, or "
            "save the intervention with to_dict(include_vector=True)"
        )
    return d


class Applied:
    """What ``with intervention.apply(model) as applied`` yields.

    ``mask``/``scores`` hold the last conditional decision (one entry per batch row; ``None``
    for unconditional interventions).
    """

    def __init__(self, intervention: Intervention) -> None:
        self.intervention = intervention
        self.mask: Bool[Tensor, " batch"] | None = None
        self.scores: Float[Tensor, " batch"] | None = None
        self.detecting = False


HookList = list[tuple[str, Callable[..., Any]]]
Gate = Callable[[Tensor, Tensor], Tensor]


# ----------------------------------------------------------------------------- ablation
@dataclass(frozen=True, eq=False)
class Ablation:
    """Project ``direction`` out of ``resid_pre``, attention and MLP outputs of ``layers``.

    ``layers=None`` means every layer (equivalent to weight orthogonalization).

    Example:
        >>> with Ablation(ds.refusal_direction(12, -1)).apply(model):  # doctest: +SKIP
        ...     logits = model.hf(**batch).logits
    """

    direction: Direction
    layers: tuple[int, ...] | None = None
    points: tuple[str, ...] = ABLATION_POINTS
    type: ClassVar[str] = "ablation"

    def __post_init__(self) -> None:
        object.__setattr__(self, "direction", as_direction(self.direction))
        object.__setattr__(self, "layers", _norm_layers(self.layers, allow_all=True))
        object.__setattr__(self, "points", tuple(self.points))
        check_direction(None, self.direction)
        for p in self.points:
            hook_name(p, 0)  # validates the point name

    def layer_list(self, model: ChatModel) -> list[int]:
        return check_layers(model, "all" if self.layers is None else list(self.layers))

    def hook_list(self, model: ChatModel, gate: Gate | None = None) -> HookList:
        """``(hook name, fn)`` pairs; ``gate(new, old)`` selects rows (conditional steering)."""
        check_direction(model, self.direction)
        u = self.direction.unit.to(device=model.device, dtype=model.dtype)

        if gate is None:
            def fn(act: Tensor, hook: Any) -> Tensor:
                return act - (act @ u).unsqueeze(-1) * u
        else:
            def fn(act: Tensor, hook: Any) -> Tensor:
                return gate(act - (act @ u).unsqueeze(-1) * u, act)

        return [(hook_name(p, layer), fn) for layer in self.layer_list(model) for p in self.points]

    def apply(self, model: ChatModel) -> AbstractContextManager[Applied]:
        """Context manager: hooks are active inside the ``with`` block only."""
        return _scoped(model, self, self.hook_list(model))

    def to_dict(self, include_vector: bool = False) -> dict[str, Any]:
        return {
            "type": self.type,
            "direction": _direction_to_dict(self.direction, include_vector),
            "layers": "all" if self.layers is None else list(self.layers),
            "points": list(self.points),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], directions: DirectionSet | None = None) -> Ablation:
        _expect_type(d, cls.type)
        return cls(_direction_from_dict(d["direction"], directions), d.get("layers", "all"),
                   tuple(d.get("points", ABLATION_POINTS)))


# ----------------------------------------------------------------------------- addition
@dataclass(frozen=True, eq=False)
class Addition:
    """Add ``coeff`` × the raw direction (``normalize=True``: × the unit direction) to
    ``resid_pre`` of ``layers`` (default: the direction's own layer) at every position.

    Example:
        >>> with Addition(ds.refusal_direction(12, -1), coeff=4.0).apply(model):  # doctest: +SKIP
        ...     out = generate(model, ["Write a poem about the sea."])
    """

    direction: Direction
    layers: tuple[int, ...] | None = None
    coeff: float = 1.0
    normalize: bool = False
    type: ClassVar[str] = "addition"

    def __post_init__(self) -> None:
        d = as_direction(self.direction)
        object.__setattr__(self, "direction", d)
        layers = self.layers
        if layers is None:
            if d.layer < 0:
                raise ConfigError(
                    "this direction has no layer of its own; pass layers=[L] to Addition/add"
                )
            layers = (d.layer,)
        object.__setattr__(self, "layers", _norm_layers(layers, allow_all=True))
        object.__setattr__(self, "coeff", _check_coeff(self.coeff))
        object.__setattr__(self, "normalize", bool(self.normalize))
        check_direction(None, d)

    @property
    def vector(self) -> Float[Tensor, " d_model"]:
        """What is added to the residual stream (float32)."""
        base = self.direction.unit if self.normalize else self.direction.vector.float()
        return self.coeff * base

    def layer_list(self, model: ChatModel) -> list[int]:
        return check_layers(model, "all" if self.layers is None else list(self.layers))

    def hook_list(self, model: ChatModel, gate: Gate | None = None) -> HookList:
        check_direction(model, self.direction)
        v = self.vector.to(device=model.device, dtype=model.dtype)

        if gate is None:
            def fn(act: Tensor, hook: Any) -> Tensor:
                return act + v
        else:
            def fn(act: Tensor, hook: Any) -> Tensor:
                return gate(act + v, act)

        return [(hook_name("resid_pre", layer), fn) for layer in self.layer_list(model)]

    def apply(self, model: ChatModel) -> AbstractContextManager[Applied]:
        """Context manager: hooks are active inside the ``with`` block only."""
        return _scoped(model, self, self.hook_list(model))

    def to_dict(self, include_vector: bool = False) -> dict[str, Any]:
        return {
            "type": self.type,
            "direction": _direction_to_dict(self.direction, include_vector),
            "layers": "all" if self.layers is None else list(self.layers),
            "coeff": self.coeff,
            "normalize": self.normalize,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], directions: DirectionSet | None = None) -> Addition:
        _expect_type(d, cls.type)
        return cls(_direction_from_dict(d["direction"], directions), d.get("layers"),
                   d.get("coeff", 1.0), bool(d.get("normalize", False)))


# ----------------------------------------------------------------- conditional steering
class _StopDetect(Exception):
    """Raised by the detector hook so the detection pass stops at the detector layer."""


@dataclass(frozen=True, eq=False)
class ConditionalSteering:
    """Apply ``intervention`` only to prompts whose ``detector`` projection crosses ``threshold``.

    The projection is read at ``resid_pre`` of ``layer`` (default: the detector's layer) at
    position ``pos`` (default: the detector's position, ``t_inst`` for harmfulness
    directions), on an extra partial forward pass over the prompt made before the prompt's
    own forward pass. That pass runs without this intervention, so the decision never sees
    its own effect; the per-row decision is then held for every generated token. Rows that
    do not trigger are left bitwise untouched.

    ``above=True`` triggers when ``projection > threshold``.

    Example:
        >>> cs = calibrate_conditional(model, ds, act)  # doctest: +SKIP
        >>> with cs.apply(model) as applied:  # doctest: +SKIP
        ...     out = generate(model, prompts)
    """

    intervention: Ablation | Addition
    detector: Direction
    threshold: float
    layer: int | None = None
    pos: int | None = None
    above: bool = True
    calibration: dict[str, Any] = field(default_factory=dict)
    type: ClassVar[str] = "conditional"

    def __post_init__(self) -> None:
        if not isinstance(self.intervention, (Ablation, Addition)):
            raise ConfigError(
                f"ConditionalSteering acts with an Ablation or Addition, got "
                f"{type(self.intervention).__name__}"
            )
        det = as_direction(self.detector, kind="harmfulness")
        object.__setattr__(self, "detector", det)
        check_direction(None, det, "detector direction")
        layer = self.layer if self.layer is not None else det.layer
        if layer is None or int(layer) < 0:
            raise ConfigError("the detector direction has no layer; pass layer=L")
        object.__setattr__(self, "layer", int(layer))
        pos = self.pos if self.pos is not None else det.pos
        if pos is None or int(pos) >= 0:
            raise ConfigError(
                f"detector position {pos} must be a negative offset from the prompt end "
                "(e.g. model.template.t_inst); pass pos=…"
            )
        object.__setattr__(self, "pos", int(pos))
        object.__setattr__(self, "threshold", _check_coeff(self.threshold, "threshold"))
        object.__setattr__(self, "calibration", dict(self.calibration))

    def apply(self, model: ChatModel) -> AbstractContextManager[Applied]:
        """Context manager: detection + gated intervention hooks inside the block only."""
        check_direction(model, self.detector, "detector direction")
        check_layers(model, [self.layer])
        applied = Applied(self)
        unit = self.detector.unit.to(device=model.device, dtype=torch.float32)
        pos, thr, above = self.pos, self.threshold, self.above

        def detect(act: Tensor, hook: Any) -> None:
            if not applied.detecting:
                return None
            if act.shape[1] < -pos:
                raise HookError(
                    f"the prompt has {act.shape[1]} tokens, too short for detector position {pos}"
                )
            scores = act[:, pos, :].float() @ unit
            applied.scores = scores.detach().cpu()
            applied.mask = (scores > thr) if above else (scores < thr)
            raise _StopDetect

        def gate(new: Tensor, old: Tensor) -> Tensor:
            mask = applied.mask
            if applied.detecting or mask is None:
                return old
            if mask.shape[0] != old.shape[0]:
                raise HookError(
                    f"conditional steering decided for {mask.shape[0]} rows but the batch has "
                    f"{old.shape[0]}; beam search and batch changes mid-generation are not supported"
                )
            return torch.where(mask.view(-1, *([1] * (old.ndim - 1))), new, old)

        decoder = model.hf.get_decoder() if hasattr(model.hf, "get_decoder") else model.hf

        def pre_forward(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if applied.detecting:
                return None
            ids = kwargs.get("input_ids", args[0] if args else None)
            emb = kwargs.get("inputs_embeds")
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            past = int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0
            am = kwargs.get("attention_mask")
            seq = (ids if ids is not None else emb).shape[1]
            if isinstance(am, Tensor) and am.ndim == 2 and am.shape[-1] > seq:
                past = max(past, am.shape[-1] - seq)
            if past > 0 and applied.mask is not None:
                return None  # a decoding step: keep the decision made on the prompt
            applied.detecting = True
            try:
                decoder(input_ids=ids, inputs_embeds=emb,
                        attention_mask=kwargs.get("attention_mask"),
                        position_ids=kwargs.get("position_ids"), use_cache=False)
            except _StopDetect:
                pass
            finally:
                applied.detecting = False
            return None

        fwd = [(hook_name("resid_pre", self.layer), detect),
               *self.intervention.hook_list(model, gate=gate)]
        return _scoped(model, self, fwd, applied=applied,
                       pre_hook=(decoder, pre_forward))

    def to_dict(self, include_vector: bool = False) -> dict[str, Any]:
        return {
            "type": self.type,
            "intervention": self.intervention.to_dict(include_vector),
            "detector": _direction_to_dict(self.detector, include_vector),
            "threshold": self.threshold,
            "layer": self.layer,
            "pos": self.pos,
            "above": self.above,
            "calibration": self.calibration,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], directions: DirectionSet | None = None) -> ConditionalSteering:
        _expect_type(d, cls.type)
        inner = intervention_from_dict(d["intervention"], directions)
        if isinstance(inner, ConditionalSteering):
            raise ArtifactError("conditional steering cannot wrap another conditional steering")
        return cls(inner, _direction_from_dict(d["detector"], directions), d["threshold"],
                   d.get("layer"), d.get("pos"), bool(d.get("above", True)),
                   d.get("calibration", {}))


Intervention = Union[Ablation, Addition, ConditionalSteering]
_TYPES: dict[str, Any] = {c.type: c for c in (Ablation, Addition, ConditionalSteering)}


def _expect_type(d: dict[str, Any], want: str) -> None:
    if not isinstance(d, dict) or d.get("type") != want:
        got = d.get("type") if isinstance(d, dict) else type(d).__name__
        raise ArtifactError(f"expected an intervention record of type {want!r}, got {got!r}")


def intervention_from_dict(d: dict[str, Any], directions: DirectionSet | None = None) -> Intervention:
    """Rebuild any intervention from its ``to_dict()`` record (run metadata)."""
    kind = d.get("type") if isinstance(d, dict) else None
    if kind not in _TYPES:
        raise ArtifactError(
            f"unknown intervention type {kind!r}; expected one of {sorted(_TYPES)}"
        )
    return _TYPES[kind].from_dict(d, directions)  # type: ignore[no-any-return]


@contextmanager
def _scoped(
    model: ChatModel,
    intervention: Intervention,
    fwd: HookList,
    *,
    applied: Applied | None = None,
    pre_hook: tuple[Any, Any] | None = None,
) -> Iterator[Applied]:
    applied = applied or Applied(intervention)
    handle = None
    try:
        with hooks(model, fwd):
            if pre_hook is not None:
                module, fn = pre_hook
                handle = module.register_forward_pre_hook(fn, with_kwargs=True)
            yield applied
    finally:
        if handle is not None:
            handle.remove()
        applied.detecting = False


# ------------------------------------------------------------------ convenience managers
@contextmanager
def ablate(
    model: ChatModel, direction: Direction | Tensor, layers: Sequence[int] | str | None = "all"
) -> Iterator[Applied]:
    """Directional ablation of ``direction`` inside the block (see :class:`Ablation`).

    Example:
        >>> with ablate(model, ds.refusal_direction(12, -1)):  # doctest: +SKIP
        ...     completions = generate(model, prompts)
    """
    with Ablation(as_direction(direction), layers).apply(model) as applied:
        yield applied


@contextmanager
def add(
    model: ChatModel,
    direction: Direction | Tensor,
    layers: int | Sequence[int] | None = None,
    coeff: float = 1.0,
    *,
    normalize: bool = False,
) -> Iterator[Applied]:
    """Activation addition inside the block (see :class:`Addition`).

    Example:
        >>> with add(model, ds.refusal_direction(12, -1), 12, coeff=4.0):  # doctest: +SKIP
        ...     completions = generate(model, ["Write a poem about the sea."])
    """
    with Addition(as_direction(direction), layers, coeff, normalize).apply(model) as applied:
        yield applied


@contextmanager
def steer_if(
    model: ChatModel,
    intervention: Ablation | Addition,
    detector: Direction,
    threshold: float,
    *,
    above: bool = True,
) -> Iterator[Applied]:
    """Conditional steering inside the block (see :class:`ConditionalSteering`)."""
    with ConditionalSteering(intervention, detector, threshold, above=above).apply(model) as applied:
        yield applied


@contextmanager
def applied_all(model: ChatModel, interventions: Sequence[Intervention]) -> Iterator[list[Applied]]:
    """Enter several interventions at once (they compose in the given order)."""
    with ExitStack() as stack:
        yield [stack.enter_context(i.apply(model)) for i in interventions]


# ------------------------------------------------------------------------ layer choice
def layer_scores(
    model: ChatModel,
    ds: DirectionSet,
    harmful: Sequence[str] | None = None,
    harmless: Sequence[str] | None = None,
    *,
    kind: str = "refusal",
    pos: int = -1,
    max_frac: float = 0.8,
    batch_size: int = 16,
    progress: bool = False,
) -> list[dict[str, float]]:
    """AUROC (harmful vs harmless) and standardized separation of each candidate layer's
    projection onto its own direction; candidates are the set's layers ``< max_frac·n_layers``.

    ``kind="refusal"`` projects onto the refusal direction at ``pos``; ``kind="harmfulness"``
    onto the harmfulness direction at ``t_inst``. Prompts default to the shipped ``val`` splits.
    """
    from refusaldir.capture import project
    from refusaldir.stats import auroc
    from refusaldir.data.prompts import load_prompts

    if not 0 < max_frac <= 1:
        raise ConfigError(f"max_frac={max_frac} must be in (0, 1]")
    harmful = list(harmful) if harmful is not None else list(load_prompts("harmful", "val"))
    harmless = list(harmless) if harmless is not None else list(load_prompts("harmless", "val"))
    if not harmful or not harmless:
        raise ConfigError("layer_scores needs harmful and harmless validation prompts")
    ds.check_model(model)
    cands = [layer for layer in ds.layers if layer < max_frac * model.n_layers]
    if not cands:
        raise ConfigError(
            f"no layer of this direction set is below {max_frac}·n_layers "
            f"({max_frac * model.n_layers:.1f}); raise max_frac"
        )
    idx = [ds.layers.index(layer) for layer in cands]
    if kind == "refusal":
        i, _ = ds._index(pos, ds.layers[0])
        dirs = ds.refusal[i, idx].unsqueeze(0)
        positions = [pos]
    elif kind == "harmfulness":
        if ds.harmfulness is None or ds.t_inst is None:
            raise ArtifactError("this direction set has no harmfulness directions; run `refusaldir extract`")
        dirs = ds.harmfulness[idx].unsqueeze(0)
        positions = [int(ds.t_inst)]
    else:
        raise ConfigError(f"kind={kind!r} must be 'refusal' or 'harmfulness'")
    proj = {
        name: project(model, texts, dirs, layers=cands, positions=positions,
                      hook_point=ds.hook_point, batch_size=batch_size, progress=progress,
                      description=f"project {name}")[:, 0]
        for name, texts in (("harmful", harmful), ("harmless", harmless))
    }
    rows = []
    for j, layer in enumerate(cands):
        a, b = proj["harmful"][:, j], proj["harmless"][:, j]
        pooled = math.sqrt((float(a.var(unbiased=False)) + float(b.var(unbiased=False))) / 2) or 1e-12
        rows.append({"layer": layer, "auroc": auroc(a, b),
                     "separation": float(a.mean() - b.mean()) / pooled})
    return rows


def default_layer(
    model: ChatModel,
    ds: DirectionSet,
    harmful: Sequence[str] | None = None,
    harmless: Sequence[str] | None = None,
    *,
    kind: str = "refusal",
    pos: int = -1,
    max_frac: float = 0.8,
    tol: float = 0.02,
    use_selected: bool = True,
    batch_size: int = 16,
    progress: bool = False,
) -> int:
    """The layer to intervene at (refusal) or to detect at (harmfulness).

    Rule (until ``refusaldir select`` has recorded a choice, which wins for
    ``kind="refusal"``): among the set's layers ``< max_frac·n_layers`` (Arditi et al.'s
    cut-off, away from the unembedding), score each layer by the AUROC with which the
    projection onto its own direction separates **validation** harmful from harmless prompts
    (shipped ``val`` splits by default, so the test split stays out of the choice). Take the
    earliest layer whose AUROC is within ``tol`` of the best: AUROC keeps creeping up with
    depth, differences below ~0.02 are within sampling noise for ~60+60 prompts, and an
    earlier layer leaves more layers downstream for an addition to act through. (On the demo
    model this picks layer 15 of 24; the single best AUROC, layer 18, ablates as well but
    induces refusal by addition poorly.)

    Example:
        >>> layer = default_layer(model, ds)  # doctest: +SKIP
        >>> direction = ds.refusal_direction(layer, -1)  # doctest: +SKIP
    """
    if use_selected and kind == "refusal" and ds.selected is not None:
        return ds.selected[1]
    if not 0 <= tol < 1:
        raise ConfigError(f"tol={tol} must be in [0, 1)")
    rows = layer_scores(model, ds, harmful, harmless, kind=kind, pos=pos, max_frac=max_frac,
                        batch_size=batch_size, progress=progress)
    best = max(r["auroc"] for r in rows)
    return int(min(r["layer"] for r in rows if r["auroc"] >= best - tol - 1e-12))


# ---------------------------------------------------------------- conditional calibration
def calibrate_conditional(
    model: ChatModel,
    ds: DirectionSet,
    intervention: Ablation | Addition,
    harmless_val: Sequence[str] | None = None,
    *,
    target_fpr: float = 0.05,
    layer: int | None = None,
    harmful_val: Sequence[str] | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> ConditionalSteering:
    """Steering that triggers on prompts whose harmfulness projection (``t_inst``) exceeds a
    threshold set so that at most ``target_fpr`` of ``harmless_val`` prompts trigger.

    ``layer`` defaults to :func:`default_layer` with ``kind="harmfulness"`` on the val splits.
    The harmfulness direction decides; ``intervention`` (typically an :class:`Addition` of
    the refusal direction) acts. The returned object's ``calibration`` records the val FPR,
    and the TPR on ``harmful_val`` (shipped val split by default).

    Example:
        >>> act = Addition(ds.refusal_direction(12, -1), coeff=2.0)  # doctest: +SKIP
        >>> cs = calibrate_conditional(model, ds, act, target_fpr=0.05)  # doctest: +SKIP
    """
    from refusaldir.capture import project
    from refusaldir.data.prompts import load_prompts

    if not 0 <= target_fpr < 1:
        raise ConfigError(f"target_fpr={target_fpr} must be in [0, 1), e.g. 0.05")
    harmless = list(harmless_val) if harmless_val is not None else list(load_prompts("harmless", "val"))
    harmful = list(harmful_val) if harmful_val is not None else list(load_prompts("harmful", "val"))
    if not harmless:
        raise ConfigError("calibrate_conditional needs harmless validation prompts")
    if layer is None:
        layer = default_layer(model, ds, harmful, harmless, kind="harmfulness",
                              batch_size=batch_size, progress=progress)
    det = ds.harmfulness_direction(layer)
    if det.pos is None:
        raise ArtifactError("this direction set does not record t_inst; re-run `refusaldir extract`")

    def scores(texts: list[str]) -> Tensor:
        return project(model, texts, det.vector.reshape(1, 1, -1), layers=[layer],
                       positions=[det.pos], hook_point=ds.hook_point, batch_size=batch_size,
                       progress=progress, description="detector")[:, 0, 0]

    neg = scores(harmless).sort(descending=True).values
    k = int(math.floor(target_fpr * len(neg)))
    # trigger when score > threshold: at most k harmless val prompts lie strictly above neg[k]
    threshold = float(neg[min(k, len(neg) - 1)])
    if k >= len(neg):
        threshold = float(neg[-1]) - 1e-6
    info: dict[str, Any] = {
        "target_fpr": target_fpr,
        "val_fpr": float((neg > threshold).double().mean()),
        "n_harmless_val": len(neg),
        "layer": layer,
    }
    if harmful:
        pos_scores = scores(harmful)
        info["val_tpr"] = float((pos_scores > threshold).double().mean())
        info["n_harmful_val"] = len(pos_scores)
    return ConditionalSteering(intervention, det, threshold, layer, det.pos, True, info)


# ------------------------------------------------------------------ addition calibration
@dataclass
class AdditionCalibration:
    """Result of :func:`calibrate_addition`: the coefficient and every trial made."""

    coeff: float
    rate: float
    layers: list[int]
    target_rate: float
    addition: Addition
    trials: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"coeff": self.coeff, "rate": self.rate, "layers": self.layers,
                "target_rate": self.target_rate, "trials": self.trials,
                "addition": self.addition.to_dict()}


def _is_refusal(judge: Any, prompts: Sequence[str], responses: Sequence[str]) -> list[bool]:
    return [j.label == "refusal" for j in judge.judge_many(list(prompts), list(responses))]


def calibrate_addition(
    model: ChatModel,
    direction: Direction,
    harmless_val: Sequence[str] | None = None,
    target_rate: float = 0.8,
    *,
    layers: int | Sequence[int] | None = None,
    normalize: bool = False,
    start: float = 1.0,
    max_coeff: float = 64.0,
    rel_tol: float = 0.1,
    max_new_tokens: int = 12,
    batch_size: int = 16,
    judge: Judge | None = None,
    progress: bool = False,
) -> AdditionCalibration:
    """Smallest activation-addition coefficient that makes at least ``target_rate`` of
    ``harmless_val`` prompts refused (greedy generations of ``max_new_tokens`` tokens judged
    by ``judge``, default :class:`refusaldir.judges.PhraseJudge`).

    Search: double the coefficient from ``start`` until the target is reached (halving first
    if ``start`` already reaches it), then bisect the bracket until it is within ``rel_tol``;
    the returned coefficient is the smallest *tested* one that reached the target. Each trial
    stops early once the verdict is certain, so failing trials are cheap. Too large a
    coefficient derails the model (gibberish is not a refusal), so the rate is not monotonic:
    the search gives up with a :class:`ConfigError` listing every trial when two doublings in
    a row fall below the best rate, or past ``max_coeff``. ``layers`` (default:
    the direction's layer) may list several layers, which then all receive the addition.

    Example:
        >>> cal = calibrate_addition(model, ds.refusal_direction(12, -1), target_rate=0.8)  # doctest: +SKIP
        >>> with cal.addition.apply(model):  # doctest: +SKIP
        ...     out = generate(model, ["Write a poem about the sea."])
    """
    from refusaldir.generation import generate
    from refusaldir.data.prompts import load_prompts

    if not 0 < target_rate <= 1:
        raise ConfigError(f"target_rate={target_rate} must be in (0, 1], e.g. 0.8")
    start = _check_coeff(start, "start")
    if start <= 0 or max_coeff < start:
        raise ConfigError(f"need 0 < start ({start}) <= max_coeff ({max_coeff})")
    texts = list(harmless_val) if harmless_val is not None else list(load_prompts("harmless", "val"))
    if not texts:
        raise ConfigError("calibrate_addition needs harmless validation prompts")
    if judge is None:
        from refusaldir.judges.phrase import PhraseJudge

        judge = PhraseJudge()
    base = Addition(as_direction(direction), layers, 1.0, normalize)
    check_direction(model, base.direction)
    layer_list = base.layer_list(model)
    n = len(texts)
    need = math.ceil(target_rate * n - 1e-9)
    trials: list[dict[str, float]] = []
    cache: dict[float, bool] = {}

    def reaches(c: float) -> bool:
        if c in cache:
            return cache[c]
        add_c = Addition(base.direction, tuple(layer_list), c, normalize)
        yes = done = 0
        for s in range(0, n, batch_size):
            chunk = texts[s : s + batch_size]
            comps: list[Completion] = generate(model, chunk, [add_c], max_new_tokens=max_new_tokens,
                                               batch_size=batch_size, progress=False)
            yes += sum(_is_refusal(judge, chunk, [x.completion for x in comps]))
            done += len(chunk)
            if yes >= need or (done - yes) > n - need:
                break
        ok = yes >= need
        trials.append({"coeff": c, "refused": yes, "judged": done, "rate": yes / done, "reached": ok})
        log.info("calibrate_addition: coeff %g → %d/%d refused (%s)", c, yes, done,
                 "reached" if ok else "not reached")
        cache[c] = ok
        return ok

    def give_up(why: str) -> ConfigError:
        best = max(trials, key=lambda t: t["rate"])
        tried = ", ".join(f"{t['coeff']:g}: {t['refused']:.0f}/{t['judged']:.0f}" for t in trials)
        return ConfigError(
            f"no coefficient {why} made {target_rate:.0%} of the harmless prompts refused (best "
            f"{best['rate']:.0%} at {best['coeff']:g}; refused/judged per coefficient: {tried}); "
            "try another layer (an earlier one often needs less), several layers, or a lower "
            "target_rate"
        )

    lo, hi = 0.0, None
    c = start
    if reaches(c):
        hi = c
        while c / 2 >= start / 16 and reaches(c / 2):
            c /= 2
            hi = c
        lo = c / 2 if c / 2 >= start / 16 else 0.0
    else:
        lo = c
        falling = 0
        while hi is None:
            c *= 2
            if c > max_coeff:
                raise give_up(f"up to max_coeff={max_coeff:g}")
            if reaches(c):
                hi = c
                break
            # Large coefficients push the model off-distribution and the refusal rate drops
            # again: stop once two doublings in a row fall below the best rate seen.
            falling = falling + 1 if trials[-1]["rate"] < max(t["rate"] for t in trials[:-1]) else 0
            if falling >= 2:
                raise give_up(f"up to {c:g} (the rate is falling again)")
            lo = c
    while hi - lo > rel_tol * hi:
        mid = (lo + hi) / 2
        if reaches(mid):
            hi = mid
        else:
            lo = mid
    final = next(t for t in reversed(trials) if t["coeff"] == hi)
    return AdditionCalibration(
        coeff=hi, rate=final["rate"], layers=layer_list, target_rate=target_rate,
        addition=Addition(base.direction, tuple(layer_list), hi, normalize), trials=trials,
    )
