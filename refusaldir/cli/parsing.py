"""Parsing and checking command-line option values before any work: batch sizes, layer and
integer lists, ``--device-map`` / ``--max-memory``, ``--add`` specs and output folders.
Every bad value is a :class:`~refusaldir.errors.ConfigError` naming the option.

Example:
    >>> parse_layers("8-10,12"), parse_add("10-11:2.5")
    ([8, 9, 10, 12], ([10, 11], 2.5))
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from refusaldir.errors import ArtifactError, ConfigError, RefusalDirError
from refusaldir.io import expand_user
from refusaldir.judges import check_judge_spec as judge_spec
from refusaldir.judges.model import check_judge_model

__all__ = [
    "check_judge_spec", "check_writable", "parse_add", "parse_batch_size", "parse_device_map", "parse_ints", "parse_layers",
    "parse_max_memory", "writable",
]


def parse_batch_size(value: str | int) -> int | str:
    """``--batch-size``: ``auto`` or a positive integer.

    Example:
        >>> parse_batch_size("8"), parse_batch_size("auto")
        (8, 'auto')
    """
    text = str(value).strip().lower()
    if text == "auto":
        return "auto"
    if not re.fullmatch(r"[0-9]+", text) or int(text) < 1:
        raise ConfigError(f"--batch-size {value!r} is not 'auto' or a whole number >= 1")
    return int(text)


def parse_device_map(text: str | None) -> str | dict[str, Any] | None:
    """``auto``/``balanced``/``sequential`` or a JSON file mapping module names to devices."""
    if text is None or text in ("auto", "balanced", "balanced_low_0", "sequential"):
        return text
    path = expand_user(text)
    if not path.is_file():
        raise ConfigError(
            f"--device-map {text!r} is neither 'auto', 'balanced', 'sequential' nor a JSON file; "
            "pass one of those"
        )
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise ConfigError(f"--device-map file {path} is not valid JSON ({exc}); fix the file") from exc
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"--device-map file {path} must hold a JSON object {{module: device}}")
    return value


def parse_max_memory(text: str | None) -> dict[int | str, str] | None:
    """``'0=70GiB,1=70GiB,cpu=200GiB'`` → ``{0: '70GiB', 1: '70GiB', 'cpu': '200GiB'}``.

    Example:
        >>> parse_max_memory("0=70GiB,cpu=200GiB")
        {0: '70GiB', 'cpu': '200GiB'}
    """
    if text is None:
        return None
    out: dict[int | str, str] = {}
    for part in text.split(","):
        key, sep, size = part.strip().partition("=")
        if not sep or not key or not re.fullmatch(r"\d+(\.\d+)?\s*[KMGT]i?B", size.strip()):
            raise ConfigError(
                f"--max-memory part {part.strip()!r} is not DEVICE=SIZE; expected e.g. "
                "'0=70GiB,1=70GiB,cpu=200GiB'"
            )
        out[int(key) if key.isdigit() else key] = size.strip()
    return out


def parse_layers(text: str) -> list[int]:
    """Parse ``"10,12,14"`` or ``"8-14"`` into layer indices.

    Example:
        >>> parse_layers("8-10,12")
        [8, 9, 10, 12]
    """
    layers: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if m := re.fullmatch(r"([0-9]+)-([0-9]+)", part):
            if int(m[2]) < int(m[1]):
                raise ConfigError(f"layer range {part!r} in {text!r} runs backwards; write e.g. '8-14'")
            layers.extend(range(int(m[1]), int(m[2]) + 1))
        elif re.fullmatch(r"-?[0-9]+", part):
            layers.append(int(part))
        else:
            raise ConfigError(f"{text!r} is not a list of layers; write e.g. '10,12,14' or '8-14'")
    return layers


def parse_ints(text: str | None, flag: str, example: str) -> list[int] | None:
    """Comma-separated integers (``None`` stays ``None``); ``flag`` and ``example`` go into the error."""
    if text is None:
        return None
    parts = [x.strip() for x in text.split(",") if x.strip()]
    if not parts or not all(re.fullmatch(r"-?[0-9]+", x) for x in parts):
        raise ConfigError(f"{flag} {text!r} must be comma-separated integers, e.g. {example}")
    return [int(x) for x in parts]


def parse_add(spec: str) -> tuple[list[int], float]:
    """``--add LAYER:COEFF`` (``13:4``, ``10-14:2``) → ``(layers, coeff)``; the coefficient
    must be a finite number."""
    layers, sep, coeff = spec.rpartition(":")
    if not sep or not layers:
        raise ConfigError(f"--add {spec!r} must look like LAYER:COEFF, e.g. 13:4 or 10-14:2")
    try:
        c = float(coeff)
    except ValueError:
        raise ConfigError(f"--add {spec!r}: coefficient {coeff!r} is not a number; write e.g. 13:4") from None
    if not math.isfinite(c):
        raise ConfigError(f"--add {spec!r}: coefficient {coeff!r} is not finite; write a real number, e.g. 13:4")
    try:
        return parse_layers(layers), c
    except ConfigError:
        raise ConfigError(f"--add {spec!r}: {layers!r} is not a layer or range; write e.g. 13:4 or 10-14:2") from None


def writable(folder: Path) -> bool:
    """Whether files can be created in the existing ``folder``."""
    return os.access(folder, os.W_OK | os.X_OK)


def check_writable(path: str | os.PathLike[str], flag: str = "--out") -> None:
    """Check, before any work and without creating anything, that ``path`` (a folder to
    write, existing or not) can be created or written: its nearest existing ancestor must
    be a writable folder."""
    target = expand_user(path)
    probe = target
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ArtifactError(f"cannot write {flag} {target}: {probe} is a file, not a folder; choose another {flag}")
    if not writable(probe):
        raise ArtifactError(
            f"cannot write {flag} {target}: {probe} is read-only or not yours; choose another {flag}"
        )


def check_judge_spec(spec: str, flag: str = "--judge") -> None:
    """``--judge``/``--cross-judge``: a spec :func:`refusaldir.judges.check_judge_spec` knows,
    whose ``model:PATH`` parts name an existing model folder or ``.gguf`` file (checked
    before any model loads)."""
    try:
        s = judge_spec(spec)
    except ConfigError as exc:
        raise ConfigError(f"{flag}: {exc}") from None
    parts = s.removeprefix("ensemble:").split(",") if s.startswith("ensemble:") else [s]
    for part in (p.strip() for p in parts):
        if part.startswith("model:"):
            try:
                check_judge_model(expand_user(part.removeprefix("model:")))
            except RefusalDirError as exc:
                raise ConfigError(f"{flag} {spec!r}: {exc}") from None
