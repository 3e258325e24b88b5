"""Reading prompt files: TXT (one prompt a line), JSON, JSONL and CSV, refusing the
malformations that would silently merge, split or mangle prompts (unbalanced CSV quotes,
rows with the wrong number of fields, non-text prompt values, binary files).

In a TXT file a line whose first non-blank character is ``#`` is a comment: it is skipped
and counted, with a :class:`PromptCommentWarning` naming the file, the count and the first
lines (a prompt that must start with ``#`` belongs in a JSONL, JSON or CSV file).

Example:
    >>> merged_row("Say hi\\n2,harmless", 2)
    1
"""

from __future__ import annotations

import csv
import io
import json
import warnings
from pathlib import Path
from typing import Any

from refusaldir.errors import PromptFileError

__all__ = ["PromptCommentWarning", "csv_rows", "merged_row", "prompt_text", "read_rows", "txt_lines"]


class PromptCommentWarning(RuntimeWarning):
    """Comment lines (``#``) of a TXT prompt file were skipped; the message counts them."""


def txt_lines(path: Path, text: str) -> list[str]:
    """The prompts of a TXT file: one a line, blank lines and ``#`` comment lines skipped (the
    comments counted in a :class:`PromptCommentWarning`)."""
    lines = [line.strip() for line in text.split("\n")]
    comments = [n for n, line in enumerate(lines, 1) if line.startswith("#")]
    if comments:
        shown = ", ".join(map(str, comments[:5])) + (", …" if len(comments) > 5 else "")
        warnings.warn(
            f"{path}: skipped {len(comments)} comment line(s) starting with '#' (line{'s' if len(comments) > 1 else ''} {shown}); a TXT "
            "prompt file treats them as comments — put a prompt that starts with '#' in a JSONL, "
            "JSON or CSV file", PromptCommentWarning, stacklevel=4)
    return [line for line in lines if line and not line.startswith("#")]


def csv_rows(path: Path, text: str) -> tuple[list[dict[str, Any]], list[int]]:
    """Records of a CSV file, refusing the malformations that would merge or split rows.

    Parsed in the csv module's strict mode; every record must have as many fields as the
    header, and a prompt that spans lines whose later line looks like a row of its own (the
    mark of an unbalanced quote) is refused with the line where it starts.
    """
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
        if header is None:
            return [], []
        width = len(header)
        rows: list[dict[str, Any]] = []
        lines: list[int] = []
        start = reader.line_num + 1
        for record in reader:
            if record and any(f.strip() for f in record):
                if len(record) != width:
                    raise PromptFileError(
                        f"{path}:{start} has {len(record)} fields but the header has {width}; "
                        "quote fields that contain commas (\"a, b\") and close every quote"
                    )
                rows.append(dict(zip(header, record)))
                lines.append(start)
            start = reader.line_num + 1
    except csv.Error as exc:
        raise PromptFileError(
            f"{path}:{reader.line_num} is not valid CSV ({exc}); close every quote, and double "
            "quotes inside quoted fields (\"say \"\"hi\"\"\")"
        ) from exc
    return rows, lines


def merged_row(value: str, width: int) -> int | None:
    """Index of the first line after the first in ``value`` that parses as a complete row of
    ``width`` non-empty fields (rows swallowed by an unbalanced quote), else ``None``."""
    if width < 2 or "\n" not in value:
        return None
    for k, line in enumerate(value.splitlines()[1:], 1):
        try:
            fields = next(csv.reader([line], strict=True), [])
        except csv.Error:
            continue
        if len(fields) == width and all(f.strip() for f in fields):
            return k
    return None


def read_rows(path: Path) -> tuple[list[Any], list[int] | None]:
    """The file's records (dicts) or plain prompts, and for CSV/JSONL each one's line number."""
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PromptFileError(f"{path} is not UTF-8 text ({exc}); convert it to UTF-8") from exc
    except OSError as exc:
        raise PromptFileError(f"prompt file {path} cannot be read ({exc.strerror or exc}); check the path and its permissions") from exc
    if "\x00" in text:
        raise PromptFileError(f"{path} contains NUL bytes, so it is not a text file; pass a TXT, CSV, JSON or JSONL file")
    if suffix == ".csv":
        return csv_rows(path, text)
    if suffix == ".jsonl":
        rows, lines = [], []
        for n, line in enumerate(text.split("\n"), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except (ValueError, RecursionError) as exc:
                    raise PromptFileError(f"{path}:{n} is not valid JSON ({exc}); fix that line") from exc
                lines.append(n)
        return rows, lines
    if suffix == ".json":
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:
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
        return data, None
    return txt_lines(path, text), None


def prompt_text(value: Any, path: Path, where: str) -> str:
    """A record's prompt as text: strings as they are, numbers printed; anything else refused."""
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise PromptFileError(
            f"{path}{where}: the prompt is a JSON {type(value).__name__}, not text; "
            "store each prompt as a string"
        )
    return str(value).strip()
