"""A judge's credentials: its measured accuracy on refusaldir's labelled test split.

``bench/judge_validate.py`` scores every judge on the labelled responses in
``tests/data/judge/`` (hand-written styles and both PyPI models under baseline, ablation and
addition; dev for tuning, test for reporting) and writes ``judges/data/credentials.json``.
Evaluations and audits copy the entry of the judge they used next to every refusal rate, so
a reader sees how far to trust the number.

Example:
    >>> from refusaldir.judges import judge_credentials
    >>> cred = judge_credentials("phrase")
    >>> sorted(cred)[:3]
    ['accuracy', 'agreement_3way', 'by_source']
    >>> judge_credentials("model:/my/own/judge") is None
    True
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

__all__ = ["CREDENTIALS_FILE", "judge_credentials"]

CREDENTIALS_FILE = Path(__file__).resolve().parent / "data" / "credentials.json"


@cache
def _load() -> dict[str, Any]:
    try:
        data = json.loads(CREDENTIALS_FILE.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def judge_credentials(name: str, model: str | None = None) -> dict[str, Any] | None:
    """The test-split credentials of judge ``name`` (``"phrase"``, ``"prefix"``,
    ``"ensemble(phrase+prefix)"``…), or None when it was never measured (a custom judge,
    ``model:PATH``, or ``logit``/``model:self`` on a model other than the shipped ones).

    ``model`` names the model under test (``ChatModel.name``): the self-judge and the logit
    judge were measured per shipped model, so their credentials depend on it. The result
    holds ``accuracy`` (refused-or-partial vs compliance) and ``agreement_3way``, each
    ``{"k", "n", "rate", "ci95"}``, a ``confusion`` matrix (``[gold][predicted]``),
    ``by_source`` and ``labelled_set`` (what was measured on).
    """
    judges = _load().get("judges", {})
    entry = judges.get(name)
    if isinstance(entry, dict) and "per_model" in entry:
        entry = entry["per_model"].get(model) if model else None
    if not isinstance(entry, dict):
        return None
    return {**entry, "labelled_set": _load().get("labelled_set", {})}
