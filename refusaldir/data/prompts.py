"""Prompt sets: the shipped refusaldir sets and loaders for users' TXT, JSON/JSONL and CSV files.

Columns are detected case-insensitively (``prompt``, ``goal``, ``instruction``, ``behavior``,
``forbidden_prompt`` …), so AdvBench, HarmBench, JailbreakBench, XSTest, StrongREJECT or
Alpaca files can be pointed at directly; nothing from those datasets ships with refusaldir.

Example:
    >>> harmful = load_prompts("harmful", split="train")
    >>> len(harmful) > 100, harmful.categories[0] is not None
    (True, True)
"""

from __future__ import annotations

import hashlib
import numbers
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

from refusaldir.data.readers import merged_row, prompt_text, read_rows
from refusaldir.errors import ConfigError, PromptFileError
from refusaldir.io import expand_user

PROMPT_COLUMNS = (
    "prompt", "goal", "instruction", "behavior", "forbidden_prompt", "question", "query",
    "request", "text", "input",
)
CATEGORY_COLUMNS = ("category", "semanticcategory", "semantic_category", "type", "functionalcategory")
SHIPPED = ("harmful", "harmless", "borderline")
SPLITS = ("train", "val", "test")


def prompts_dir() -> Path:
    """Folder of the shipped prompt files (inside the package, or the repo's ``prompts/``)."""
    here = Path(__file__).resolve().parent.parent
    for cand in (here / "prompts", here.parent / "prompts"):
        if (cand / "harmful_train.jsonl").is_file():
            return cand
    raise PromptFileError(
        f"the shipped prompt files were not found next to {here}; reinstall refusaldir"
    )


@dataclass
class PromptSet(Sequence[str]):
    """A list of instructions with optional categories and where they came from."""

    prompts: list[str]
    categories: list[str | None] = field(default_factory=list)
    source: str = "in-memory"
    extra: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.prompts, (str, bytes)):
            raise PromptFileError(
                f"PromptSet got the single string {self.prompts[:60]!r}; expected a list of "
                "prompts (load_prompts(path) reads a file, [text] is one prompt)"
            )
        self.prompts = list(self.prompts)
        if not self.categories:
            self.categories = [None] * len(self.prompts)

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> PromptSet: ...
    def __getitem__(self, i: int | slice) -> str | PromptSet:
        if isinstance(i, slice):
            return PromptSet(
                self.prompts[i], self.categories[i], self.source, self.extra[i] if self.extra else []
            )
        return self.prompts[i]

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self) -> Iterator[str]:
        return iter(self.prompts)

    @property
    def sha256(self) -> str:
        return hashlib.sha256("\n".join(self.prompts).encode()).hexdigest()

    def info(self) -> dict[str, Any]:
        """Provenance for artifact metadata."""
        return {"source": self.source, "count": len(self), "sha256": self.sha256}

    def filter(self, keep: Callable[[str, str | None, dict[str, Any]], bool]) -> PromptSet:
        """Keep prompts for which ``keep(prompt, category, row)`` is true."""
        rows = self.extra or [{} for _ in self.prompts]
        idx = [i for i, (p, c, r) in enumerate(zip(self.prompts, self.categories, rows)) if keep(p, c, r)]
        if not idx:
            raise PromptFileError(
                f"no prompts from {self.source} are left after filtering; loosen the filter"
            )
        return PromptSet(
            [self.prompts[i] for i in idx],
            [self.categories[i] for i in idx],
            self.source,
            [rows[i] for i in idx] if self.extra else [],
        )


def _pick(columns: Sequence[str], wanted: str | None, candidates: Sequence[str], path: Path) -> str | None:
    lower = {c.lower().strip(): c for c in columns if c is not None}
    if wanted is not None:
        if wanted.lower() not in lower:
            raise PromptFileError(
                f"{path} has no column {wanted!r}; its columns are {list(columns)}"
            )
        return lower[wanted.lower()]
    for cand in candidates:
        if cand in lower:
            return lower[cand]
    return None


def check_limit(limit: Any, name: str = "limit") -> int | None:
    """``limit`` as an int >= 1, or ``None`` (no limit); anything else is a :class:`ConfigError`.

    Example:
        >>> check_limit(5), check_limit(None)
        (5, None)
    """
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, numbers.Integral):
        raise ConfigError(f"{name}={limit!r} must be a whole number >= 1 (or None for all prompts)")
    if int(limit) < 1:
        raise ConfigError(
            f"{name}={limit} is not a number of prompts to keep (zero or a negative limit would "
            "silently drop prompts); pass a number >= 1, or None for all prompts"
        )
    return int(limit)


def load_prompts(
    source: str | os.PathLike[str],
    split: str | None = None,
    *,
    column: str | None = None,
    category_column: str | None = None,
    limit: int | None = None,
) -> PromptSet:
    """Load a shipped set (``"harmful"``, ``"harmless"``, ``"borderline"``) or a user file.

    Args:
        source: shipped set name or a ``.txt`` / ``.json`` / ``.jsonl`` / ``.csv`` path.
        split: ``train`` / ``val`` / ``test`` for the shipped harmful and harmless sets.
        column: prompt column (default: detected among ``PROMPT_COLUMNS``).
        category_column: category column (default: detected among ``CATEGORY_COLUMNS``).
        limit: keep only the first ``limit`` prompts.
    """
    if isinstance(source, bool) or not isinstance(source, (str, os.PathLike)):
        raise PromptFileError(
            f"prompt source {source!r} has type {type(source).__name__}; pass a shipped set name "
            f"({', '.join(SHIPPED)}) or the path of a TXT, CSV, JSON or JSONL file"
        )
    limit = check_limit(limit)
    if str(source) in SHIPPED:
        name = str(source)
        if name == "borderline":
            if split not in (None, "all"):
                raise PromptFileError(f"the borderline set has no splits (got {split!r}); drop the split: 'borderline', split=None")
            path = prompts_dir() / "borderline.jsonl"
        else:
            split = split or "train"
            if split not in SPLITS:
                raise PromptFileError(f"split {split!r} is not one of {SPLITS}")
            path = prompts_dir() / f"{name}_{split}.jsonl"
    else:
        path = expand_user(source)
        if split is not None:
            raise PromptFileError(
                f"split={split!r} only applies to the shipped sets {SHIPPED}; for {path} omit it"
            )
    if path.is_dir():
        raise PromptFileError(f"{path} is a folder; pass a prompt file (TXT, CSV, JSON or JSONL)")
    if not path.is_file():
        raise PromptFileError(f"prompt file {path} does not exist; check the path")
    rows, lines = read_rows(path)
    prompts: list[str] = []
    cats: list[str | None] = []
    extra: list[dict[str, Any]] = []
    if rows and isinstance(rows[0], dict):
        columns = list(rows[0].keys())
        pcol = _pick(columns, column, PROMPT_COLUMNS, path)
        if pcol is None:
            raise PromptFileError(
                f"{path} has no usable prompt column (columns: {columns}); expected one of "
                f"{', '.join(PROMPT_COLUMNS)} — or pass column=NAME / --column NAME"
            )
        ccol = _pick(columns, category_column, CATEGORY_COLUMNS, path)
        csv_width = len(columns) if path.suffix.lower() == ".csv" else 0
        for k, record in enumerate(rows):
            where = f":{lines[k]}" if lines is not None else f" (record {k})"
            if not isinstance(record, dict):
                raise PromptFileError(f"{path}{where} mixes records and plain values; use one kind")
            row: dict[str, Any] = record
            text = prompt_text(row.get(pcol), path, where)
            merged = merged_row(text, csv_width)
            if merged is not None and lines is not None:
                raise PromptFileError(
                    f"{path}:{lines[k]}: the {pcol!r} value runs over {merged + 1} lines and line "
                    f"{lines[k] + merged} looks like a separate row, so a quote is probably "
                    "unbalanced; close the quote (if the line breaks are meant, store the "
                    "prompts as JSONL)"
                )
            if text:
                prompts.append(text)
                cats.append(str(row[ccol]) if ccol and row.get(ccol) not in (None, "") else None)
                extra.append(row)
    else:
        for k, line in enumerate(rows):
            if not isinstance(line, str):
                where = f":{lines[k]}" if lines is not None else f" (item {k})"
                raise PromptFileError(
                    f"{path}{where} holds a {type(line).__name__}; expected every item to be a "
                    "prompt string (or every item a record with a prompt column)"
                )
            if line.strip():
                prompts.append(line.strip())
                cats.append(None)
    if not prompts:
        raise PromptFileError(
            f"prompt file {path} contains no prompts; add one instruction per line (TXT) or "
            "records with a prompt column (CSV/JSON/JSONL)"
        )
    if limit is not None:
        prompts, cats, extra = prompts[:limit], cats[:limit], extra[:limit]
    return PromptSet(prompts, cats, str(path), extra)


def check_prompts(prompts: Any, what: str, *, single: bool = False) -> list[str]:
    """``prompts`` checked and returned as a list of strings: the one helper every public
    function uses for its prompt arguments.

    A plain string is one prompt when ``single`` is true (``generate``, the guard's
    ``score``); for a prompt *set* (extraction, selection, evaluation, audit) it is refused,
    since it is almost always a file path or one prompt given where a list belongs and would
    otherwise become one prompt per character. Raises :class:`PromptFileError` naming
    ``what`` when the value is not a sequence of strings, is empty, or holds an empty prompt.

    Example:
        >>> check_prompts(["a", "b"], "harmful")
        ['a', 'b']
        >>> check_prompts("hi", "prompts", single=True)
        ['hi']
    """
    if isinstance(prompts, (str, bytes)):
        if single and isinstance(prompts, str):
            prompts = [prompts]
        else:
            shown = repr(prompts[:57]) + ("…" if len(prompts) > 57 else "")
            raise PromptFileError(
                f"{what} got the single string {shown}; expected a list of prompts. Pass "
                f"load_prompts({shown}) to read a file, or [text] for one prompt"
            )
    if isinstance(prompts, Mapping) or not isinstance(prompts, Iterable):
        raise PromptFileError(
            f"{what} got a {type(prompts).__name__}; expected a list of prompt strings "
            "(or a PromptSet from load_prompts)"
        )
    texts = list(prompts)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise PromptFileError(
            f"{what}[{bad[0]}] is a {type(texts[bad[0]]).__name__}, not a string; pass prompts as text"
        )
    if not texts or not any(t.strip() for t in texts):
        raise PromptFileError(
            f"{what} got no prompts; pass at least one non-empty prompt (or a --prompts file)"
        )
    empty = [i for i, t in enumerate(texts) if not t.strip()]
    if empty:
        raise PromptFileError(f"{what}: prompt #{empty[0]} is empty; remove empty prompts")
    return texts


def as_prompt_list(prompts: Sequence[str] | str, what: str) -> list[str]:
    """``prompts`` as a list of strings; a single string is one prompt
    (:func:`check_prompts` with ``single=True``).

    Raises :class:`PromptFileError` (naming ``what``) when there are no prompts or one of them
    is empty or whitespace only.

    Example:
        >>> as_prompt_list(["a", "b"], "guard")
        ['a', 'b']
    """
    return check_prompts(prompts, what, single=True)
