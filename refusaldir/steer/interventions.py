"""Interventions on the residual stream, scoped to ``with`` blocks on the same model object.

- :class:`Ablation` (directional ablation, Arditi et al. 2024): project a direction out of
  ``resid_pre`` and of every attention and MLP output, at every position, generated tokens
  included. With ``layers="all"`` this is exactly what :func:`refusaldir.steer.orthogonalize`
  bakes into the weights.
- :class:`Addition` (activation addition): add ``coeff`` times the **raw** difference-of-means
  vector to ``resid_pre`` of the given layer(s) at every position (Arditi et al. add the raw
  vector with coefficient 1; pass ``normalize=True`` to add ``coeff`` times the unit vector
  instead). A fixed coefficient of 1 is often too weak to induce refusal on harmless
  prompts: use :func:`refusaldir.evaluate.calibrate_addition`.

Conditional steering (:class:`refusaldir.steer.ConditionalSteering`) gates either of them.
Every intervention is a small frozen dataclass with ``apply(model)`` (a context manager that
adds hooks on enter and removes them on exit, also on error), ``to_dict()`` and
``from_dict(d, directions)``. Interventions nest. The math is :mod:`refusaldir.steer.ops`;
vectors move to the model's device and dtype once, when the hooks are built.

Example:
    >>> import refusaldir as rd  # doctest: +SKIP
    >>> from refusaldir.generation import generate  # doctest: +SKIP
    >>> model, ds = rd.load_model("demo"), rd.DirectionSet.load("runs/demo")  # doctest: +SKIP
    >>> d = ds.refusal_direction(layer=default_layer(model, ds), pos=-1)  # doctest: +SKIP
    >>> with ablate(model, d):  # doctest: +SKIP
    ...     out = generate(model, ["How do I pick a lock?"])
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from refusaldir.directions import Direction, DirectionSet
from refusaldir.errors import ArtifactError, ConfigError
from refusaldir.hooks import check_layers, hook_name, hooks, module_pre_hook
from refusaldir.steer import ops
from refusaldir.steer.directions_io import (
    as_direction,
    check_coeff,
    check_direction,
    direction_from_dict,
    direction_to_dict,
    norm_layers,
)

if TYPE_CHECKING:
    from refusaldir.models import ChatModel
    from refusaldir.steer.conditional import Intervention

ABLATION_POINTS = ("resid_pre", "attn_out", "mlp_out")

__all__ = [
    "ABLATION_POINTS", "Ablation", "Addition", "Applied", "Gate", "HookList", "ablate", "add",
    "expect_type", "placed", "scoped",
]

HookList = list[tuple[str, Callable[..., Any]]]
Gate = Callable[[Tensor, Tensor], Tensor]


class Applied:
    """What ``with intervention.apply(model) as applied`` yields.

    ``mask``/``scores`` hold the last conditional decision (one entry per batch row; ``None``
    for unconditional interventions). ``mask`` stays on the model's device, ``scores`` are
    on the CPU.
    """

    def __init__(self, intervention: Intervention) -> None:
        self.intervention = intervention
        self.mask: Bool[Tensor, " batch"] | None = None
        self.scores: Float[Tensor, " batch"] | None = None
        self.detecting = False


def placed(
    v: Float[Tensor, " d_model"], device: torch.device, dtype: torch.dtype, *, fixed_dtype: bool = False
) -> Callable[[Tensor], Tensor]:
    """``on(act)``: ``v`` on ``act``'s device, in ``act``'s dtype (``fixed_dtype``: in ``dtype``).

    ``v`` is moved to ``device``/``dtype`` (the model's) right away, and to any other device (a
    model split across GPUs) or dtype the first time an activation there needs it: once per
    device, never once per forward pass.
    """
    cache = {(torch.device(device), dtype): v.detach().to(device=device, dtype=dtype)}

    def on(act: Tensor) -> Tensor:
        key = (act.device, dtype if fixed_dtype else act.dtype)
        t = cache.get(key)
        if t is None:
            t = cache[key] = v.detach().to(device=key[0], dtype=key[1])
        return t

    return on


@contextmanager
def scoped(
    model: ChatModel,
    intervention: Intervention,
    fwd: HookList,
    *,
    applied: Applied | None = None,
    pre_hook: tuple[Any, Callable[..., Any]] | None = None,
) -> Iterator[Applied]:
    """Named forward hooks ``fwd`` (and an optional raw ``(module, fn)`` pre-hook) for the block."""
    applied = applied or Applied(intervention)
    try:
        with ExitStack() as stack:
            stack.enter_context(hooks(model, fwd))
            if pre_hook is not None:
                stack.enter_context(module_pre_hook(*pre_hook))
            yield applied
    finally:
        applied.detecting = False


def expect_type(d: dict[str, Any], want: str) -> None:
    """Raise unless ``d`` is an intervention record of type ``want``."""
    if not isinstance(d, dict) or d.get("type") != want:
        got = d.get("type") if isinstance(d, dict) else type(d).__name__
        raise ArtifactError(f"expected an intervention record of type {want!r}, got {got!r}")


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
        object.__setattr__(self, "layers", norm_layers(self.layers, allow_all=True))
        object.__setattr__(self, "points", tuple(self.points))
        check_direction(None, self.direction)
        for p in self.points:
            hook_name(p, 0)  # validates the point name

    def layer_list(self, model: ChatModel) -> list[int]:
        return check_layers(model, "all" if self.layers is None else list(self.layers))

    def hook_list(self, model: ChatModel, gate: Gate | None = None) -> HookList:
        """``(hook name, fn)`` pairs; ``gate(new, old)`` selects rows (conditional steering)."""
        check_direction(model, self.direction)
        u = placed(self.direction.unit, model.device, model.dtype)

        if gate is None:
            def fn(act: Tensor, hook: Any) -> Tensor:
                return ops.project_out(act, u(act))
        else:
            def fn(act: Tensor, hook: Any) -> Tensor:
                return gate(ops.project_out(act, u(act)), act)

        return [(hook_name(p, layer), fn) for layer in self.layer_list(model) for p in self.points]

    def apply(self, model: ChatModel) -> AbstractContextManager[Applied]:
        """Context manager: hooks are active inside the ``with`` block only."""
        return scoped(model, self, self.hook_list(model))

    def to_dict(self, include_vector: bool = False) -> dict[str, Any]:
        return {
            "type": self.type,
            "direction": direction_to_dict(self.direction, include_vector),
            "layers": "all" if self.layers is None else list(self.layers),
            "points": list(self.points),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], directions: DirectionSet | None = None) -> Ablation:
        expect_type(d, cls.type)
        return cls(direction_from_dict(d["direction"], directions), d.get("layers", "all"),
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
        object.__setattr__(self, "layers", norm_layers(layers, allow_all=True))
        object.__setattr__(self, "coeff", check_coeff(self.coeff))
        object.__setattr__(self, "normalize", bool(self.normalize))
        check_direction(None, d)

    @property
    def vector(self) -> Float[Tensor, " d_model"]:
        """What is added to the residual stream (float32, on the direction's device)."""
        base = self.direction.unit if self.normalize else self.direction.vector.float()
        return self.coeff * base

    def layer_list(self, model: ChatModel) -> list[int]:
        return check_layers(model, "all" if self.layers is None else list(self.layers))

    def hook_list(self, model: ChatModel, gate: Gate | None = None) -> HookList:
        """``(hook name, fn)`` pairs; ``gate(new, old)`` selects rows (conditional steering)."""
        check_direction(model, self.direction)
        v = placed(self.vector, model.device, model.dtype)

        if gate is None:
            def fn(act: Tensor, hook: Any) -> Tensor:
                return ops.add_vector(act, v(act))
        else:
            def fn(act: Tensor, hook: Any) -> Tensor:
                return gate(ops.add_vector(act, v(act)), act)

        return [(hook_name("resid_pre", layer), fn) for layer in self.layer_list(model)]

    def apply(self, model: ChatModel) -> AbstractContextManager[Applied]:
        """Context manager: hooks are active inside the ``with`` block only."""
        return scoped(model, self, self.hook_list(model))

    def to_dict(self, include_vector: bool = False) -> dict[str, Any]:
        return {
            "type": self.type,
            "direction": direction_to_dict(self.direction, include_vector),
            "layers": "all" if self.layers is None else list(self.layers),
            "coeff": self.coeff,
            "normalize": self.normalize,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], directions: DirectionSet | None = None) -> Addition:
        expect_type(d, cls.type)
        return cls(direction_from_dict(d["direction"], directions), d.get("layers"),
                   d.get("coeff", 1.0), bool(d.get("normalize", False)))


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
    with Ablation(as_direction(direction), norm_layers(layers, allow_all=True)).apply(model) as applied:
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
    add_ = Addition(as_direction(direction), norm_layers(layers, allow_all=True), coeff, normalize)
    with add_.apply(model) as applied:
        yield applied
