"""Loaders for standard refusal benchmarks, read from files the user provides.

Nothing from these datasets ships with refusaldir: download them yourself and pass the path.

========== =============================================== ===========================
name       file                                            prompts / filters
========== =============================================== ===========================
advbench   ``harmful_behaviors.csv``                       ``goal``
harmbench  ``harmbench_behaviors_text_all.csv``            ``Behavior``; ``FunctionalCategory`` filter (default ``standard``)
jbb        JailbreakBench ``harmful-behaviors.csv``        ``Goal``; ``Category``
xstest     ``xstest_prompts.csv``                          ``prompt``; ``label`` filter (``safe``/``unsafe``)
strongreject ``strongreject_dataset.csv``                  ``forbidden_prompt``; ``category``
alpaca     ``alpaca_data.json``                            ``instruction`` of rows with an empty ``input``
text       ``.txt`` / ``.jsonl`` / ``.json`` / ``.csv``    column detected
========== =============================================== ===========================

Example:
    >>> load_dataset("xstest", "xstest_prompts.csv", label="safe")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import Any

from refusaldir.data.prompts import PromptSet, check_limit, load_prompts
from refusaldir.errors import PromptFileError

DATASETS: dict[str, dict[str, Any]] = {
    "advbench": {"column": "goal"},
    "harmbench": {"column": "behavior", "category_column": "semanticcategory"},
    "jbb": {"column": "goal", "category_column": "category"},
    "xstest": {"column": "prompt", "category_column": "type"},
    "strongreject": {"column": "forbidden_prompt", "category_column": "category"},
    "alpaca": {"column": "instruction"},
    "text": {},
}


def _row(row: dict[str, Any], key: str) -> Any:
    for k, v in row.items():
        if k is not None and k.lower() == key.lower():
            return v
    return None


def load_dataset(
    name: str,
    path: str | os.PathLike[str],
    *,
    functional_category: str | None = "standard",
    label: str | None = None,
    limit: int | None = None,
) -> PromptSet:
    """Load a benchmark file as a :class:`PromptSet`.

    Args:
        name: one of ``DATASETS`` (``advbench``, ``harmbench``, ``jbb``, ``xstest``,
            ``strongreject``, ``alpaca``, ``text``).
        functional_category: HarmBench ``FunctionalCategory`` to keep (``None``: all).
        label: XSTest ``label`` to keep (``safe`` / ``unsafe``; ``None``: all).
        limit: keep the first ``limit`` prompts after filtering.
    """
    limit = check_limit(limit)
    if not isinstance(name, str) or name.lower() not in DATASETS:
        raise PromptFileError(
            f"dataset {name!r} is not known; expected one of {', '.join(DATASETS)}"
        )
    key = name.lower()
    ps = load_prompts(path, **DATASETS[key])
    if key == "harmbench" and functional_category:
        want = functional_category.lower()
        ps = ps.filter(lambda p, c, r: str(_row(r, "functionalcategory") or "").lower() == want)
    elif key == "xstest" and label:
        want = label.lower()
        if not any(_row(r, "label") is not None for r in ps.extra):
            raise PromptFileError(f"{path} has no 'label' column to filter on; drop label=")
        ps = ps.filter(lambda p, c, r: str(_row(r, "label") or "").lower() == want)
    elif key == "alpaca":
        ps = ps.filter(lambda p, c, r: not str(_row(r, "input") or "").strip())
    if limit is not None:
        ps = ps[:limit]
    return ps
