"""Evaluation: refusal and over-refusal rates (Wilson 95% CIs), first-token KL, loss and
coherence for each condition (baseline, ablation, addition ±, orthogonalized weights,
conditional steering), and the calibrations those conditions need.

Example:
    >>> from refusaldir.evaluate import evaluate  # doctest: +SKIP
    >>> res = evaluate(model, ds, conditions=["baseline", "ablate"], limit=20)  # doctest: +SKIP
    >>> res.save("runs/demo/eval")  # doctest: +SKIP
"""

from refusaldir.evaluate.calibrate import (
    AdditionCalibration,
    calibrate_addition,
    calibrate_conditional,
)
from refusaldir.evaluate.conditions import CONDITIONS, NEEDS_DIRECTIONS, Condition, build_conditions
from refusaldir.evaluate.harness import EvaluationResult, evaluate, is_repetitive, summarize
from refusaldir.evaluate.report import DISAGREEMENT_FLAG, judges_block, results_markdown

__all__ = [
    "CONDITIONS", "DISAGREEMENT_FLAG", "NEEDS_DIRECTIONS", "AdditionCalibration", "Condition", "EvaluationResult",
    "build_conditions", "calibrate_addition", "calibrate_conditional", "evaluate", "is_repetitive",
    "judges_block", "results_markdown", "summarize",
]
