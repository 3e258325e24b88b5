"""Build a judge from its command-line spec (``"phrase"``, ``"logit"``, ``"model:PATH"``).

Example:
    >>> from refusaldir.judges import make_judge
    >>> make_judge("phrase").name
    'phrase'
"""

from __future__ import annotations

from collections.abc import Sequence

from refusaldir.errors import RefusalDirError
from refusaldir.judges.logit import FirstTokenJudge
from refusaldir.judges.model import ModelJudge
from refusaldir.judges.phrase import PhraseJudge

__all__ = ["make_judge"]


def make_judge(spec: str, *, model: object = None, harmful_val: Sequence[str] | None = None) -> object:
    """``"phrase"`` → :class:`PhraseJudge`; ``"logit"`` → :class:`FirstTokenJudge` detected on
    ``model``; ``"model:PATH"`` → :class:`ModelJudge`."""
    if spec == "phrase":
        return PhraseJudge()
    if spec == "logit":
        if model is None:
            raise RefusalDirError("the logit judge needs the model to detect its refusal tokens")
        return FirstTokenJudge.detect(model, harmful_val)
    if spec.startswith("model:"):
        return ModelJudge(spec.removeprefix("model:"))
    raise RefusalDirError(f"judge {spec!r} is not known; use phrase, logit or model:PATH")
