"""Text normalisation for the phrase judge: Unicode quotes and dashes to ASCII, markdown
removed, contractions made canonical, and the spans of quoted material found.

Responses and phrases go through the same character and contraction rules, so one phrase
(``"i can't"``) covers ``"I cannot"``, ``"I can not"`` and ``"I can\u2019t"``.

Example:
    >>> from refusaldir.judges import normalize
    >>> normalize("**I CANNOT** help  with\\n\\n- that\u2019s it")
    "i can't help with that's it"
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

__all__ = ["mask", "normalize", "normalize_phrase", "structure"]

_CHAR_MAP = str.maketrans({
    "\u2019": "'", "\u2018": "'", "\u201b": "'", "\u2032": "'", "\u02bc": "'",
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u2033": '"', "\u00ab": '"', "\u00bb": '"',
    "\u2014": " - ", "\u2013": " - ", "\u2212": "-", "\u00a0": " ", "\u200b": "",
})

# Contractions are canonicalised so one phrase covers "cannot", "can not" and "can't".
_CONTRACTIONS = [(re.compile(p), r) for p, r in (
    (r"\bcan ?not\b", "can't"), (r"\bcant\b", "can't"), (r"\bwill not\b", "won't"),
    (r"\bwould not\b", "wouldn't"), (r"\bshould not\b", "shouldn't"), (r"\bdo not\b", "don't"),
    (r"\bdont\b", "don't"), (r"\bdoes not\b", "doesn't"), (r"\bdid not\b", "didn't"),
    (r"\bis not\b", "isn't"), (r"\bare not\b", "aren't"), (r"\bi am\b", "i'm"),
    (r"\bim\b", "i'm"), (r"\bi would\b", "i'd"), (r"\bi had\b", "i'd"), (r"\bi will\b", "i'll"),
    (r"\bthat is\b", "that's"), (r"\bit is\b", "it's"), (r"\blet us\b", "let's"),
    (r"\bgonna\b", "going to"), (r"\bwanna\b", "want to"), (r"\bgotta\b", "have to"),
)]

_FENCE = re.compile(r"^\s*(```|~~~)")
_QUOTE_LINE = re.compile(r"^\s*>+\s?")
_TABLE_RULE = re.compile(r"^\s*\|?\s*:?-{2,}:?\s*(\|\s*:?-{2,}:?\s*)*\|?\s*$")
_HRULE = re.compile(r"^\s*([-*_])(\s*\1){2,}\s*$")
_BLOCK_START = re.compile(r"^\s*(#{1,6}\s|[-*+\u2022]\s|\d{1,3}[.)]\s|\|)")
_LINE_PREFIX = re.compile(r"^\s*(?:#{1,6}\s+|[-*+\u2022]\s+|\d{1,3}[.)]\s+)+")
_EMPHASIS = re.compile(r"\*\*|__|~~|`|(?<![\w*])\*(?=\S)|(?<=\S)\*(?![\w*])"
                       r"|(?<![\w_])_(?=\S)|(?<=\S)_(?![\w_])")
_SPACES = re.compile(r"[ \t\r\f\v]+")
_DOUBLE_QUOTED = re.compile(r'"[^"]{1,1500}"')
# Single quotes double as apostrophes, so only an *introduced* single-quoted passage
# ("something like: '...'", "say '...'") counts as quoted material.
_SPEECH = r"(?:said|says|asked|asks|replied|whispered|muttered|shouted|snapped|added|told \w+)"
_SINGLE_QUOTED = re.compile(
    r"(?::|\b(?:like|say|saying|write|writing|e\.g\.,?)|\b" + _SPEECH + r"(?:\s+\w+ly)?,?)\s+"
    r"('(?=\w).{1,800}?(?<=\S)')(?=\s|$|[.,;:!?)])",
    re.DOTALL,
)
# Dialogue: "'I won't tell you,' she said" (the quote comes before its speaker).
_DIALOGUE = re.compile(r"(?:^|(?<=[.!?]\s)|(?<=\n))('(?=\w)[^\n]{1,400}?[,.!?]')(?=\s+\w+\s+"
                       + _SPEECH + r"\b)")


def _contract(text: str) -> str:
    for pattern, repl in _CONTRACTIONS:
        text = pattern.sub(repl, text)
    return text


def _clean_line(line: str) -> str:
    line = _LINE_PREFIX.sub("", line)
    line = _EMPHASIS.sub("", line.replace("|", " "))
    line = _contract(line.lower())
    return _SPACES.sub(" ", line).strip()


def structure(text: str) -> tuple[str, list[tuple[int, int]]]:
    """Normalise ``text`` and return it with the spans that hold quoted material.

    Lines are joined with a space, except that a newline is kept before list items,
    headings, table rows and after blank lines, so sentence splitting still sees them.
    Fenced code and block quotes introduced by a colon ("Here's a template:") are quoted
    material: a refusal written *inside* an example is not the model refusing.

    >>> structure('I said "no" to that.')
    ('i said "no" to that.', [(7, 11)])
    """
    text = unicodedata.normalize("NFKC", text).translate(_CHAR_MAP)
    parts: list[str] = []
    masked: list[tuple[int, int]] = []
    length = 0
    in_fence = False
    new_block = True
    prev_line = ""
    for raw in text.split("\n"):
        if _FENCE.match(raw):
            in_fence = not in_fence
            new_block = True
            continue
        if not in_fence and (not raw.strip() or _TABLE_RULE.match(raw) or _HRULE.match(raw)):
            new_block = True
            continue
        is_quote = not in_fence and bool(_QUOTE_LINE.match(raw))
        example = in_fence or (is_quote and prev_line.endswith(":"))
        if is_quote:
            raw = _QUOTE_LINE.sub("", raw)
        line = raw.strip().lower() if in_fence else _clean_line(raw)
        if not line:
            continue
        if not is_quote and not in_fence:
            prev_line = line
        sep = "" if not parts else ("\n" if new_block or _BLOCK_START.match(raw) else " ")
        start = length + len(sep)
        parts.append(sep + line)
        length = start + len(line)
        if example:
            masked.append((start, length))
        new_block = in_fence
    full = "".join(parts)
    masked.extend(m.span() for m in _DOUBLE_QUOTED.finditer(full))
    masked.extend(m.span(1) for m in _SINGLE_QUOTED.finditer(full))
    masked.extend(m.span(1) for m in _DIALOGUE.finditer(full))
    return full, masked


def normalize(text: str) -> str:
    """Return ``text`` as the judge sees it: lower case, ASCII quotes, no markdown,
    canonical negations (``cannot`` -> ``can't``), whitespace collapsed to single spaces.

    >>> normalize("**I CANNOT** help  with\\n\\n- that\u2019s it")
    "i can't help with that's it"
    """
    return " ".join(structure(text)[0].split())


def mask(text: str, spans: Iterable[tuple[int, int]]) -> str:
    """Blank out (with spaces, keeping newlines and offsets) the ``spans`` of ``text``.

    >>> mask("a b c", [(2, 3)])
    'a   c'
    """
    chars = list(text)
    for start, end in spans:
        for i in range(start, end):
            if chars[i] != "\n":
                chars[i] = " "
    return "".join(chars)


def normalize_phrase(phrase: str) -> str:
    """Normalise a phrase-file entry with the same character and contraction rules as
    responses, leaving the phrase syntax (braces, ``...``) untouched.

    >>> normalize_phrase("I  cannot {help|assist}")
    "i can't {help|assist}"
    """
    p = _contract(unicodedata.normalize("NFKC", phrase).translate(_CHAR_MAP).lower())
    return re.sub(r" {2,}", " ", p.strip())
