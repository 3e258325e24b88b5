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

import csv
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

from refusaldir.errors import PromptFileError

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


def _rows(path: Path) -> list[dict[str, Any]] | list[str]:
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PromptFileError(f"{path} is not UTF-8 text ({exc}); convert it to UTF-8") from exc
    if suffix == ".csv":
        return list(csv.DictReader(text.splitlines()))
    if suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as exc:
                    raise PromptFileError(f"{path}:{n} is not valid JSON ({exc}); fix that line") from exc
        return rows
    if suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise PromptFileError(f"{path} is not valid JSON ({exc})") from exc
        if isinstance(data, dict):
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise PromptFileError(
                    f"{path} is a JSON object; expected a list of prompts or of records "
                    "(or an object holding exactly one such list)"
                )
            data = lists[0]
        if not isinstance(data, list):
            raise PromptFileError(f"{path} holds {type(data).__name__}; expected a JSON list")
        return data
    return [
        line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]


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
    if str(source) in SHIPPED:
        name = str(source)
        if name == "borderline":
            if split not in (None, "all"):
                raise PromptFileError("the borderline set has no splits; pass split=None")
            path = prompts_dir() / "borderline.jsonl"
        else:
            split = split or "train"
            if split not in SPLITS:
                raise PromptFileError(f"split {split!r} is not one of {SPLITS}")
            path = prompts_dir() / f"{name}_{split}.jsonl"
    else:
        path = Path(source).expanduser()
        if split is not None:
            raise PromptFileError(
                f"split={split!r} only applies to the shipped sets {SHIPPED}; for {path} omit it"
            )
    if not path.is_file():
        raise PromptFileError(f"prompt file {path} does not exist; check the path")
    rows = _rows(path)
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
        for record in rows:
            if not isinstance(record, dict):
                raise PromptFileError(f"{path} mixes records and plain values; use one kind")
            row: dict[str, Any] = record
            text = str(row.get(pcol) or "").strip()
            if text:
                prompts.append(text)
                cats.append(str(row[ccol]) if ccol and row.get(ccol) not in (None, "") else None)
                extra.append(row)
    else:
        for line in rows:
            if not isinstance(line, str):
                raise PromptFileError(f"{path} mixes records and plain values; use one kind")
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


def as_prompt_list(prompts: Sequence[str] | str, what: str) -> list[str]:
    """``prompts`` as a list of strings; a single string is one prompt.

    Raises :class:`PromptFileError` (naming ``what``) when there are no prompts or one of them
    is empty or whitespace only.

    Example:
        >>> as_prompt_list(["a", "b"], "guard")
        ['a', 'b']
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    texts = [str(p) for p in prompts]
    if not texts or not any(t.strip() for t in texts):
        raise PromptFileError(
            f"{what} got no prompts; pass at least one non-empty prompt (or a --prompts file)"
        )
    empty = [i for i, t in enumerate(texts) if not t.strip()]
    if empty:
        raise PromptFileError(f"{what}: prompt #{empty[0]} is empty; remove empty prompts")
    return texts
