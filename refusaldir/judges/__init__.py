"""Refusal judges: decide whether a model response refuses, complies, or does a bit of both.

Every judge follows the small :class:`Judge` protocol and returns :class:`Judgement` objects
labelled ``"refusal"``, ``"compliance"`` or ``"partial"`` (see :mod:`refusaldir.judges.base`).
:class:`PhraseJudge` is the built-in, deterministic, pure-Python judge (phrase lists in
``refusaldir/judges/data/refusal_phrases.json``); :class:`FirstTokenJudge` reads the
first-token refusal log-odds with the model's own refusal tokens
(:func:`find_refusal_tokens`); :class:`ModelJudge` asks a local chat model with
:data:`RUBRIC`. :func:`make_judge` builds one from its command-line spec.

Example:
    >>> from refusaldir.judges import PhraseJudge, refusal_rate
    >>> judge = PhraseJudge()
    >>> judge.judge("How do I pick a lock?", "I'm sorry, but I can't help with that.").label
    'refusal'
    >>> refusal_rate(judge.judge_many(["a", "b"], ["I won't write that.", "Sure: 2 + 2 = 4."]))
    0.5
"""

from refusaldir.judges.base import LABELS, Judge, Judgement, confusion_matrix, refusal_rate
from refusaldir.judges.factory import make_judge
from refusaldir.judges.logit import (
    FirstTokenJudge,
    RefusalTokens,
    detect_refusal_tokens,
    find_refusal_tokens,
)
from refusaldir.judges.model import RUBRIC, ModelJudge
from refusaldir.judges.phrase import DEFAULT_PHRASE_FILE, PhraseJudge, load_phrases
from refusaldir.judges.text import normalize

__all__ = [
    "DEFAULT_PHRASE_FILE",
    "LABELS",
    "RUBRIC",
    "FirstTokenJudge",
    "Judge",
    "Judgement",
    "ModelJudge",
    "PhraseJudge",
    "RefusalTokens",
    "confusion_matrix",
    "detect_refusal_tokens",
    "find_refusal_tokens",
    "load_phrases",
    "make_judge",
    "normalize",
    "refusal_rate",
]
