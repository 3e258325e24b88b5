"""Conditional steering: an ablation or addition applied only to the prompts a detector flags.

:class:`ConditionalSteering` applies an :class:`~refusaldir.steer.Ablation` or
:class:`~refusaldir.steer.Addition` only to the prompts whose harmfulness projection at
``t_inst`` crosses a threshold calibrated on harmless validation prompts
(:func:`refusaldir.evaluate.calibrate_conditional`). The decision is made on the prompt's
forward pass and held for the tokens generated after it.

:func:`intervention_from_dict` rebuilds any intervention (it lives here because it has to
know every type, and conditional steering wraps the others).

Example:
    >>> cs = ConditionalSteering(Addition(ds.refusal_direction(12, -1), coeff=2.0),  # doctest: +SKIP
    ...                          ds.harmfulness_direction(10), threshold=1.5)
    >>> with steer_if(model, cs.intervention, cs.detector, cs.threshold) as applied:  # doctest: +SKIP
    ...     model.hf(**batch)
    >>> applied.mask  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeAlias

import torch
from torch import Tensor

from refusaldir.directions import Direction, DirectionSet
from refusaldir.errors import ArtifactError, ConfigError, HookError
from refusaldir.hooks import StopForward, check_layers, hook_name
from refusaldir.steer.directions_io import (
    as_direction,
    check_coeff,
    check_direction,
    direction_from_dict,
    direction_to_dict,
)
from refusaldir.steer.edit import Edit
from refusaldir.steer.interventions import (
    Ablation,
    Addition,
    Applied,
    expect_type,
    placed,
    scoped,
)

if TYPE_CHECKING:
    from refusaldir.models import ChatModel

__all__ = ["ConditionalSteering", "Intervention", "intervention_from_dict", "steer_if"]


@dataclass(frozen=True, eq=False)
class ConditionalSteering:
    """Apply ``intervention`` only to prompts whose ``detector`` projection crosses ``threshold``.

    The projection is read at ``resid_pre`` of ``layer`` (default: the detector's layer) at
    position ``pos`` (default: the detector's position, ``t_inst`` for harmfulness
    directions), on an extra partial forward pass over the prompt made before the prompt's
    own forward pass. That pass runs without this intervention, so the decision never sees
    its own effect, and stops at ``layer``; the per-row decision is then held for every
    generated token. Rows that do not trigger are left bitwise untouched.

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
        object.__setattr__(self, "threshold", check_coeff(self.threshold, "threshold"))
        object.__setattr__(self, "calibration", dict(self.calibration))

    def apply(self, model: ChatModel) -> AbstractContextManager[Applied]:
        """Context manager: detection + gated intervention hooks inside the block only."""
        check_direction(model, self.detector, "detector direction")
        layer, pos, thr, above = int(self.layer or 0), int(self.pos or 0), self.threshold, self.above
        check_layers(model, [layer])
        applied = Applied(self)
        unit = placed(self.detector.unit, model.device, torch.float32, fixed_dtype=True)
        reached = [False]  # whether the current detection pass got to the detector layer

        def detect(act: Tensor, hook: Any) -> None:
            if not applied.detecting:
                return None
            if act.shape[1] < -pos:
                raise HookError(
                    f"the prompt has {act.shape[1]} tokens, too short for detector position {pos}"
                )
            scores = act[:, pos, :].float() @ unit(act)
            applied.scores = scores.detach().cpu()
            applied.mask = (scores > thr) if above else (scores < thr)
            reached[0] = True
            raise StopForward  # the layers above the detector are not needed

        def gate(new: Tensor, old: Tensor) -> Tensor:
            mask = applied.mask
            if applied.detecting or mask is None:
                return old
            if mask.shape[0] != old.shape[0]:
                raise HookError(
                    f"conditional steering decided for {mask.shape[0]} rows but the batch has "
                    f"{old.shape[0]}; beam search and batch changes mid-generation are not supported"
                )
            mask = mask.to(old.device)  # a no-op unless the model is split across devices
            return torch.where(mask.view(-1, *([1] * (old.ndim - 1))), new, old)

        decoder = model.hf.get_decoder() if hasattr(model.hf, "get_decoder") else model.hf

        def pre_forward(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if applied.detecting:
                return None
            ids: Any = kwargs.get("input_ids", args[0] if args else None)
            emb: Any = kwargs.get("inputs_embeds")
            cache: Any = kwargs.get("cache", kwargs.get("past_key_values"))
            past = int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0
            am = kwargs.get("attention_mask")
            seq = (ids if ids is not None else emb).shape[1]
            if isinstance(am, Tensor) and am.ndim == 2 and am.shape[-1] > seq:
                past = max(past, am.shape[-1] - seq)
            if past > 0 and applied.mask is not None:
                return None  # a decoding step: keep the decision made on the prompt
            applied.detecting = True
            reached[0] = False
            try:
                decoder(input_ids=ids, inputs_embeds=emb,
                        attention_mask=kwargs.get("attention_mask"),
                        position_ids=kwargs.get("position_ids"), use_cache=False)
            except StopForward:
                if not reached[0]:
                    raise  # someone else's early stop (below the detector): theirs to catch
            finally:
                applied.detecting = False
            return None

        fwd = [(hook_name("resid_pre", layer), detect),
               *self.intervention.hook_list(model, gate=gate)]
        return scoped(model, self, fwd, applied=applied, pre_hook=(decoder, pre_forward))

    def to_dict(self, include_vector: bool = False) -> dict[str, Any]:
        return {
            "type": self.type,
            "intervention": self.intervention.to_dict(include_vector),
            "detector": direction_to_dict(self.detector, include_vector),
            "threshold": self.threshold,
            "layer": self.layer,
            "pos": self.pos,
            "above": self.above,
            "calibration": self.calibration,
        }

    @classmethod
    def from_dict(
        cls, d: dict[str, Any], directions: DirectionSet | None = None
    ) -> ConditionalSteering:
        expect_type(d, cls.type)
        inner = intervention_from_dict(d["intervention"], directions)
        if not isinstance(inner, (Ablation, Addition)):
            raise ArtifactError(
                f"conditional steering wraps an ablation or an addition, not a {inner.type!r} record"
            )
        return cls(inner, direction_from_dict(d["detector"], directions), d["threshold"],
                   d.get("layer"), d.get("pos"), bool(d.get("above", True)),
                   d.get("calibration", {}))


Intervention: TypeAlias = Ablation | Addition | ConditionalSteering | Edit
_TYPES: dict[str, Any] = {c.type: c for c in (Ablation, Addition, ConditionalSteering)}


def intervention_from_dict(
    d: dict[str, Any], directions: DirectionSet | None = None
) -> Intervention:
    """Rebuild any intervention from its ``to_dict()`` record (run metadata)."""
    kind = d.get("type") if isinstance(d, dict) else None
    if kind not in _TYPES:
        raise ArtifactError(
            f"unknown intervention type {kind!r}; expected one of {sorted(_TYPES)}"
        )
    return _TYPES[kind].from_dict(d, directions)  # type: ignore[no-any-return]


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
