"""Calibrations that generate or score validation prompts to set an intervention's strength:

- :func:`calibrate_addition`: the smallest activation-addition coefficient that makes a target
  share of harmless validation prompts refused (greedy generations, judged);
- :func:`calibrate_conditional`: a :class:`~refusaldir.steer.ConditionalSteering` whose
  harmfulness threshold keeps the false-positive rate on harmless validation prompts at
  ``target_fpr`` (:func:`refusaldir.stats.threshold_for_fpr`).

They live above :mod:`refusaldir.steer` because they need generation and judges.

Example:
    >>> cal = calibrate_addition(model, ds.refusal_direction(12, -1), target_rate=0.8)  # doctest: +SKIP
    >>> cs = calibrate_conditional(model, ds, cal.addition, target_fpr=0.05)  # doctest: +SKIP
    >>> cs.calibration["val_fpr"] <= 0.05  # doctest: +SKIP
    True
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from refusaldir.batching import AUTO, BatchSize, resolve_batch_size
from refusaldir.capture import project
from refusaldir.data import check_prompts, load_prompts
from refusaldir.directions import Direction, DirectionSet
from refusaldir.errors import ArtifactError, ConfigError
from refusaldir.generation import Completion, generate
from refusaldir.judges import Judge, PhraseJudge, judge_texts
from refusaldir.models import ChatModel
from refusaldir.stats import threshold_for_fpr
from refusaldir.steer import (
    Ablation,
    Addition,
    ConditionalSteering,
    as_direction,
    check_coeff,
    check_direction,
    default_layer,
    norm_layers,
)

log = logging.getLogger(__name__)

__all__ = ["AdditionCalibration", "calibrate_addition", "calibrate_conditional"]


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
    batch_size: BatchSize = AUTO,
    progress: bool = False,
) -> ConditionalSteering:
    """Steering that triggers on prompts whose harmfulness projection (``t_inst``) exceeds a
    threshold set so that at most ``target_fpr`` of ``harmless_val`` prompts trigger.

    ``layer`` defaults to :func:`refusaldir.steer.default_layer` with ``kind="harmfulness"``
    on the val splits. The harmfulness direction decides; ``intervention`` (typically an
    :class:`~refusaldir.steer.Addition` of the refusal direction) acts. The returned object's
    ``calibration`` records the val FPR, and the TPR on ``harmful_val`` (shipped val split by
    default).

    Example:
        >>> act = Addition(ds.refusal_direction(12, -1), coeff=2.0)  # doctest: +SKIP
        >>> cs = calibrate_conditional(model, ds, act, target_fpr=0.05)  # doctest: +SKIP
    """
    if not 0 <= target_fpr < 1:
        raise ConfigError(f"target_fpr={target_fpr} must be in [0, 1), e.g. 0.05")
    harmless = check_prompts(harmless_val if harmless_val is not None else load_prompts("harmless", "val"),
                             "harmless_val")
    harmful = check_prompts(harmful_val if harmful_val is not None else load_prompts("harmful", "val"),
                            "harmful_val")
    if not harmless:
        raise ConfigError("calibrate_conditional needs harmless validation prompts")
    if layer is None:
        layer = default_layer(model, ds, harmful, harmless, kind="harmfulness",
                              batch_size=batch_size, progress=progress)
    det = ds.harmfulness_direction(layer)
    if det.pos is None:
        raise ArtifactError("this direction set does not record t_inst; re-run `refusaldir extract`")
    det_layer, det_pos = layer, det.pos

    def scores(texts: list[str]) -> Tensor:
        return project(model, texts, det.vector.reshape(1, 1, -1), layers=[det_layer],
                       positions=[det_pos], hook_point=ds.hook_point, batch_size=batch_size,
                       progress=progress, description="detector")[:, 0, 0]

    neg = scores(harmless)
    # trigger when score > threshold: at most target_fpr of the harmless val prompts lie above
    threshold = threshold_for_fpr(neg, target_fpr)
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


def _is_refusal(judge: Judge, prompts: Sequence[str], comps: Sequence[Completion]) -> list[bool]:
    judged = judge_texts(judge, list(prompts), [c.completion for c in comps],
                         [c.finish_reason == "length" for c in comps])
    return [j.label == "refusal" for j in judged]


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
    batch_size: BatchSize = AUTO,
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
    if not 0 < target_rate <= 1:
        raise ConfigError(f"target_rate={target_rate} must be in (0, 1], e.g. 0.8")
    start = check_coeff(start, "start")
    if start <= 0 or max_coeff < start:
        raise ConfigError(f"need 0 < start ({start}) <= max_coeff ({max_coeff})")
    texts = check_prompts(harmless_val if harmless_val is not None else load_prompts("harmless", "val"),
                          "harmless_val")
    if not texts:
        raise ConfigError("calibrate_addition needs harmless validation prompts")
    judge = judge if judge is not None else PhraseJudge(canned_min_repeats=0)  # short completions
    base = Addition(as_direction(direction), norm_layers(layers, allow_all=True), 1.0, normalize)
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
        bs = resolve_batch_size(batch_size, model, "generate")
        for s in range(0, n, bs):
            chunk = texts[s : s + bs]
            comps: list[Completion] = generate(model, chunk, [add_c], max_new_tokens=max_new_tokens,
                                               batch_size=batch_size, progress=False)
            yes += sum(_is_refusal(judge, chunk, comps))
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
