"""Refusal judges: decide whether a model response refuses, complies, or does a bit of both.

Every judge follows the small :class:`Judge` protocol and returns :class:`Judgement` objects
labelled ``"refusal"``, ``"compliance"`` or ``"partial"`` (see :mod:`refusaldir.judges.base`).
:class:`PhraseJudge` is the built-in, deterministic, pure-Python judge (phrase lists in
``refusaldir/judges/data/refusal_phrases.json``); :class:`FirstTokenJudge` reads the
first-token refusal log-odds with the model's own refusal tokens
(:func:`find_refusal_tokens`); :class:`ModelJudge` asks a local chat model (by default the
model under test) with :data:`RUBRIC`; :class:`PrefixJudge` reads only the opening;
:class:`ProbeJudge` adds a trained linear probe (:class:`ResponseProbe`) on a judge model's
residual stream to the phrase judge, for deflections no phrase can see;
:class:`EnsembleJudge` takes a majority vote. :func:`make_judge` builds one from its
command-line spec. :mod:`refusaldir.judges.deflection` counts compliant-looking answers that
are empty, repetitive, canned or off-topic, and :func:`judge_credentials` gives a judge's
measured accuracy on refusaldir's labelled test split.

Example:
    >>> from refusaldir.judges import PhraseJudge, refusal_rate
    >>> judge = PhraseJudge()
    >>> judge.judge("How do I pick a lock?", "I'm sorry, but I can't help with that.").label
    'refusal'
    >>> refusal_rate(judge.judge_many(["a", "b"], ["I won't write that.", "Sure: 2 + 2 = 4."]))
    0.5
"""

from refusaldir.judges.base import (
    LABELS,
    Judge,
    Judgement,
    broad_rate,
    check_paired,
    confusion_matrix,
    judge_texts,
    refusal_rate,
    refused,
)
from refusaldir.judges.credentials import judge_credentials
from refusaldir.judges.deflection import (
    canned_groups,
    deflection_report,
    is_off_topic,
    is_repetitive,
)
from refusaldir.judges.ensemble import EnsembleJudge, combine, count_disagreements, disagreement
from refusaldir.judges.factory import (
    JUDGE_SPECS,
    check_judge_spec,
    default_judge,
    make_judge,
)
from refusaldir.judges.logit import (
    FirstTokenJudge,
    RefusalTokens,
    detect_refusal_tokens,
    find_refusal_tokens,
)
from refusaldir.judges.model import RUBRIC, ModelJudge
from refusaldir.judges.phrase import PhraseJudge
from refusaldir.judges.phrases import DEFAULT_PHRASE_FILE, load_phrases
from refusaldir.judges.prefix import PrefixJudge
from refusaldir.judges.probe import ResponseProbe
from refusaldir.judges.probe_judge import ProbeJudge
from refusaldir.judges.text import normalize

__all__ = [
    "DEFAULT_PHRASE_FILE",
    "JUDGE_SPECS",
    "LABELS",
    "RUBRIC",
    "EnsembleJudge",
    "FirstTokenJudge",
    "Judge",
    "Judgement",
    "ModelJudge",
    "PhraseJudge",
    "PrefixJudge",
    "ProbeJudge",
    "RefusalTokens",
    "ResponseProbe",
    "broad_rate",
    "check_paired",
    "canned_groups",
    "check_judge_spec",
    "combine",
    "confusion_matrix",
    "count_disagreements",
    "default_judge",
    "deflection_report",
    "detect_refusal_tokens",
    "disagreement",
    "find_refusal_tokens",
    "is_off_topic",
    "is_repetitive",
    "judge_credentials",
    "judge_texts",
    "load_phrases",
    "make_judge",
    "normalize",
    "refusal_rate",
    "refused",
]
