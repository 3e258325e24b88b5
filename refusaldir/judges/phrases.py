"""The phrase file behind :class:`~refusaldir.judges.PhraseJudge`: loading, validation and
compilation of its small pattern syntax into regular expressions.

Syntax (phrases are matched against text normalised by :func:`refusaldir.judges.normalize`):
a space matches any run of whitespace, ``{a|b|}`` one alternative (an empty one makes the
group optional), `` ... `` a gap of up to four words. Phrases match whole words only, except
phrases in scripts written without spaces (Chinese, Japanese), which match anywhere.

Example:
    >>> from refusaldir.judges.phrases import compile_phrases
    >>> bool(compile_phrases(["i {can't|won't} help"], "demo", "x").search("i won't help you"))
    True
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

from refusaldir.errors import RefusalDirError
from refusaldir.judges.text import normalize_phrase

__all__ = ["DEFAULT_PHRASE_FILE", "OPTIONAL_KEYS", "REQUIRED_KEYS", "compile_phrases",
           "load_phrases"]

DEFAULT_PHRASE_FILE = Path(__file__).resolve().parent / "data" / "refusal_phrases.json"
REQUIRED_KEYS = ("start", "anywhere")
OPTIONAL_KEYS = ("negation", "soft", "capability", "lecture", "deliver", "alternative", "offer",
                 "compliance_override")
_RENAMED = {"partial": "'deliver' (pivots that hand over the requested content) and "
                       "'alternative' (pivots to something else)"}
_GAP = r"(?:\s+\S+){0,4}\s+"
_UNSPACED = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af\uff00-\uffef]")


def _compile_phrase(phrase: str) -> str:
    """Translate the phrase syntax (``{a|b}``, ``...``, spaces) into a regex."""
    if phrase.count("{") != phrase.count("}") or re.search(r"\{[^}]*\{", phrase):
        raise ValueError("unbalanced or nested braces")

    def literal(piece: str) -> str:
        return r"\s+".join(re.escape(w) for w in piece.split(" "))

    def part(chunk: str) -> str:
        out = []
        for token in re.split(r"(\{[^{}]*\})", chunk):
            if token.startswith("{"):
                out.append("(?:" + "|".join(literal(a) for a in token[1:-1].split("|")) + ")")
            elif token:
                out.append(literal(token))
        return "".join(out)

    chunks = [c.strip() for c in phrase.split("...")]
    if any(not c for c in chunks):
        raise ValueError("'...' needs words on both sides")
    return _GAP.join(part(c) for c in chunks)


def load_phrases(path: str | os.PathLike[str] | None = None) -> dict[str, list[str]]:
    """Load and validate a refusal phrase file (default: the bundled one).

    Raises:
        RefusalDirError: the file is missing, is not valid JSON, has an unknown key, or lacks
            non-empty ``"start"`` / ``"anywhere"`` lists of strings.
    """
    file = Path(path) if path is not None else DEFAULT_PHRASE_FILE
    fix = ("Pass an existing JSON file with non-empty \"start\" and \"anywhere\" lists of "
           f"strings, or omit the path to use the bundled {DEFAULT_PHRASE_FILE.name}.")
    if not file.is_file():
        raise RefusalDirError(f"Refusal phrase file not found: {file}. {fix}")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise RefusalDirError(f"Cannot read refusal phrase file {file}: {exc}. {fix}") from exc
    except json.JSONDecodeError as exc:
        raise RefusalDirError(
            f"Refusal phrase file {file} is not valid JSON (line {exc.lineno}, column "
            f"{exc.colno}: {exc.msg}). {fix}") from exc
    if not isinstance(data, Mapping):
        raise RefusalDirError(f"Refusal phrase file {file} must hold a JSON object. {fix}")
    for old, new in _RENAMED.items():
        if old in data:
            raise RefusalDirError(
                f"Refusal phrase file {file} uses the key {old!r}, which is now split into {new}; "
                "rename it (see the bundled file for examples).")
    unknown = sorted(k for k in data if not str(k).startswith("_")
                     and k not in REQUIRED_KEYS + OPTIONAL_KEYS)
    if unknown:
        raise RefusalDirError(
            f"Refusal phrase file {file} has unknown key(s) {unknown}; expected "
            f"{list(REQUIRED_KEYS + OPTIONAL_KEYS)} (keys starting with '_' are ignored).")
    phrases: dict[str, list[str]] = {}
    for key in REQUIRED_KEYS + OPTIONAL_KEYS:
        value = data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip()
                                                  for v in value):
            raise RefusalDirError(
                f"Refusal phrase file {file}: {key!r} must be a list of non-empty strings. {fix}")
        if key in REQUIRED_KEYS and not value:
            raise RefusalDirError(f"Refusal phrase file {file}: {key!r} is empty. {fix}")
        phrases[key] = [normalize_phrase(v) for v in value]
    return phrases


def compile_phrases(phrases: list[str], key: str, file: Path | str) -> re.Pattern[str] | None:
    """One regex matching any of ``phrases`` (None for an empty list); longest first, so the
    reported match is the most specific one.

    Raises:
        RefusalDirError: a phrase is malformed (names the phrase, its key and the file).
    """
    if not phrases:
        return None
    spaced: list[str] = []
    unspaced: list[str] = []
    for phrase in phrases:
        try:
            piece = _compile_phrase(phrase)
            re.compile(piece)
        except (ValueError, re.error) as exc:
            raise RefusalDirError(
                f"Refusal phrase file {file}: bad phrase {phrase!r} in {key!r} ({exc}). "
                "Use '{a|b}' for alternatives and ' ... ' for a short gap.") from exc
        (unspaced if _UNSPACED.search(phrase) else spaced).append(piece)
    alts = []
    if spaced:
        alts.append(r"(?<![\w'])(?:" + "|".join(sorted(spaced, key=len, reverse=True)) + r")(?!\w)")
    if unspaced:
        alts.append("(?:" + "|".join(sorted(unspaced, key=len, reverse=True)) + ")")
    return re.compile("|".join(alts))
