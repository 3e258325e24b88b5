"""Evaluation conditions: the named ways of running the model that :func:`evaluate` compares.

``baseline`` (unmodified), ``ablate`` (directional ablation at every layer), ``add`` /
``subtract`` (activation addition ±, coefficient calibrated on harmless val prompts unless
given), ``ortho`` (weights orthogonalized to the direction, a second model) and
``conditional`` (addition only where the harmfulness projection crosses a calibrated
threshold).

Example:
    >>> conds = build_conditions(model, ds, ["baseline", "ablate"])  # doctest: +SKIP
    >>> [c.name for c in conds]  # doctest: +SKIP
    ['baseline', 'ablate']
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from refusaldir.batching import AUTO, BatchSize
from refusaldir.directions import DirectionSet
from refusaldir.errors import ConfigError
from refusaldir.evaluate.calibrate import calibrate_addition, calibrate_conditional
from refusaldir.models import ChatModel, load_model
from refusaldir.steer import Ablation, Addition, Intervention, default_layer, orthogonalize

__all__ = ["CONDITIONS", "NEEDS_DIRECTIONS", "Condition", "build_conditions"]

CONDITIONS = ("baseline", "ablate", "add", "subtract", "ortho", "conditional")
NEEDS_DIRECTIONS = frozenset(CONDITIONS) - {"baseline"}


@dataclass
class Condition:
    """A named way of running the model: interventions on it, or another model (``ortho``)."""

    name: str
    interventions: tuple[Intervention, ...] = ()
    model: ChatModel | None = None
    description: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """What ``results.json`` records about the condition (description, interventions, info)."""
        return {"description": self.description,
                "interventions": [i.to_dict() for i in self.interventions], **self.info}


def build_conditions(
    model: ChatModel,
    directions: DirectionSet | None,
    names: Sequence[str],
    *,
    add_coeff: float | None = None,
    harmless_val: Sequence[str] | None = None,
    harmful_val: Sequence[str] | None = None,
    target_rate: float = 0.8,
    target_fpr: float = 0.05,
    batch_size: BatchSize = AUTO,
    progress: bool = False,
) -> list[Condition]:
    """Turn condition names into :class:`Condition` objects (calibrating where needed).

    The refusal direction is the set's selected one, else the layer chosen by
    :func:`refusaldir.steer.default_layer` at the last post-instruction position.
    ``add_coeff=None`` calibrates the addition coefficient on ``harmless_val`` for
    ``target_rate`` induced refusal (:func:`refusaldir.evaluate.calibrate_addition`).
    """
    unknown = [n for n in names if n not in CONDITIONS]
    if unknown:
        raise ConfigError(
            f"unknown condition(s) {unknown}; choose from {', '.join(CONDITIONS)}"
        )
    if not names:
        raise ConfigError(f"no conditions given; choose from {', '.join(CONDITIONS)}")
    needing = [n for n in names if n in NEEDS_DIRECTIONS]
    if needing and directions is None:
        raise ConfigError(
            f"condition(s) {needing} need refusal directions; pass --directions RUN_DIR "
            "(from `refusaldir extract`)"
        )
    out: list[Condition] = []
    direction = None
    coeff = add_coeff
    calib: dict[str, Any] | None = None
    if needing:
        assert directions is not None
        directions.check_model(model)
        if directions.selected is not None:
            direction = directions.refusal_direction()
            how = "selected"
        else:
            layer = default_layer(model, directions, harmful_val, harmless_val,
                                  batch_size=batch_size, progress=progress)
            direction = directions.refusal_direction(layer, directions.positions[-1])
            how = "default_layer (best val AUROC below 0.8·n_layers)"
        if coeff is None and any(n in ("add", "subtract", "conditional") for n in names):
            cal = calibrate_addition(model, direction, harmless_val, target_rate,
                                     batch_size=batch_size, progress=progress)
            coeff = cal.coeff
            calib = cal.to_dict()
            calib.pop("addition", None)
        if coeff is not None and not math.isfinite(coeff):
            raise ConfigError(f"add_coeff={coeff} is not finite; pass a real number")
    for name in names:
        if name == "baseline":
            out.append(Condition(name, description="unmodified model"))
            continue
        assert direction is not None
        src = {"direction": direction.to_dict(), "direction_choice": how}
        if name == "ablate":
            out.append(Condition(name, (Ablation(direction),),
                                 description=f"directional ablation (layer {direction.layer}, pos {direction.pos}) at every layer",
                                 info=src))
        elif name in ("add", "subtract"):
            assert coeff is not None
            c = (1.0 if name == "add" else -1.0) * float(coeff)
            out.append(Condition(name, (Addition(direction, coeff=c),),
                                 description=f"activation addition ×{c:+.3g} at layer {direction.layer}",
                                 info={**src, "coeff": c, "calibration": calib}))
        elif name == "ortho":
            ortho = load_model(orthogonalize(model, direction), tokenizer=model.tokenizer,
                               system_prompt=model.system_prompt, chat_template=model.chat_template)
            out.append(Condition(name, model=ortho, info=src,
                                 description="weights orthogonalized to the refusal direction"))
        elif name == "conditional":
            assert directions is not None and coeff is not None
            cs = calibrate_conditional(model, directions, Addition(direction, coeff=float(coeff)),
                                       harmless_val, target_fpr=target_fpr, harmful_val=harmful_val,
                                       batch_size=batch_size, progress=progress)
            out.append(Condition(name, (cs,), info={**src, "calibration": cs.calibration},
                                 description=f"addition ×{float(coeff):+.3g} only where the harmfulness "
                                             f"projection (layer {cs.layer}) exceeds {cs.threshold:.3g}"))
    return out
