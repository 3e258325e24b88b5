"""Build a judge from its command-line spec.

Specs: ``phrase``, ``prefix``, ``probe`` (the phrase judge, plus a trained probe on the
``demo`` model's residual stream for responses with no refusal phrase), ``probe:coder-1.5b``
(the default: the same on the larger embedded ``coder-1.5b`` judge model), ``probe:PATH`` (a probe folder
you trained), ``logit`` (first-token log-odds of the model under test),
``model`` (the unedited model under test judges the responses), ``model:PATH`` (another local
chat model judges), ``ensemble:A,B,...`` (majority vote of those specs).

Example:
    >>> from refusaldir.judges import make_judge
    >>> make_judge("phrase").name
    'phrase'
    >>> make_judge("ensemble:phrase,prefix").name
    'ensemble(phrase+prefix)'
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from refusaldir.errors import ConfigError, RefusalDirError
from refusaldir.judges.ensemble import EnsembleJudge
from refusaldir.judges.logit import FirstTokenJudge
from refusaldir.judges.model import ModelJudge
from refusaldir.judges.phrase import PhraseJudge
from refusaldir.judges.prefix import PrefixJudge
from refusaldir.judges.probe_judge import ProbeJudge
from refusaldir.judges.shipped import SHIPPED_PROBES

__all__ = ["DEFAULT_JUDGE", "JUDGE_SPECS", "check_judge_spec", "default_judge", "make_judge"]

DEFAULT_JUDGE = "probe:coder-1.5b"

JUDGE_SPECS = "probe, probe:coder-1.5b, probe:PATH, phrase, prefix, logit, model, model:PATH or ensemble:A,B,..."


def default_judge() -> str:
    """The judge ``evaluate`` and ``audit`` use when none is named: :data:`DEFAULT_JUDGE`
    (``probe:coder-1.5b``, the most accurate judge on refusaldir's labelled test split; ``probe``
    reads the smaller demo model; ``phrase`` is the fast, model-free alternative)."""
    return DEFAULT_JUDGE


def check_judge_spec(spec: str) -> str:
    """Validate a judge spec without loading anything; returns it stripped.

    Raises:
        ConfigError: the spec is not one of :data:`JUDGE_SPECS`.
    """
    s = spec.strip() if isinstance(spec, str) else spec
    if not isinstance(s, str) or not s:
        raise ConfigError(f"judge {spec!r} is not known; use {JUDGE_SPECS}")
    if s in ("phrase", "prefix", "probe", "logit", "model"):
        return s
    if s.startswith("probe:"):
        if not s.removeprefix("probe:").strip():
            raise ConfigError("judge 'probe:' needs a folder after the colon, e.g. probe:runs/my_probe "
                              "(written by ResponseProbe.save), or a shipped probe: "
                              f"{', '.join('probe:' + n for n in SHIPPED_PROBES)}")
        if s.removeprefix("probe:").strip() in SHIPPED_PROBES:
            return s
        folder = Path(s.removeprefix("probe:").strip()).expanduser()
        if not (folder / "probe.json").is_file():
            raise ConfigError(f"judge {spec!r}: {folder} holds no probe.json; pass a folder "
                              "written by ResponseProbe.save, or a shipped probe: "
                              f"{', '.join('probe:' + n for n in SHIPPED_PROBES)}")
        return s
    if s.startswith("model:"):
        if not s.removeprefix("model:").strip():
            raise ConfigError("judge 'model:' needs a path after the colon, e.g. model:/models/judge")
        return s
    if s.startswith("ensemble:"):
        parts = [p.strip() for p in s.removeprefix("ensemble:").split(",") if p.strip()]
        if len(parts) < 2 or any(p.startswith("ensemble") for p in parts):
            raise ConfigError(
                f"judge {spec!r}: an ensemble needs two or more judges and cannot nest; "
                "e.g. ensemble:phrase,prefix,logit")
        for p in parts:
            check_judge_spec(p)
        return s
    raise ConfigError(f"judge {spec!r} is not known; use {JUDGE_SPECS}")


def make_judge(spec: str, *, model: Any = None, harmful_val: Sequence[str] | None = None) -> Any:
    """Build the judge ``spec`` names (see :data:`JUDGE_SPECS`); ``logit`` and ``model``
    use ``model``, the model under test.

    Raises:
        RefusalDirError: the spec is unknown, or it needs ``model`` and none was given.
    """
    s = check_judge_spec(spec)
    if s == "phrase":
        return PhraseJudge()
    if s == "prefix":
        return PrefixJudge()
    if s in ("logit", "model") and model is None:
        raise RefusalDirError(f"the {s} judge needs the model under test; pass model=...")
    if s == "logit":
        return FirstTokenJudge.detect(model, harmful_val)
    if s == "model":
        return ModelJudge(model)
    if s == "probe" or s.startswith("probe:"):
        folder = s.removeprefix("probe:").strip() if s.startswith("probe:") else None
        return ProbeJudge(model, folder)
    if s.startswith("model:"):
        return ModelJudge(s.removeprefix("model:").strip())
    parts = [p.strip() for p in s.removeprefix("ensemble:").split(",") if p.strip()]
    return EnsembleJudge([make_judge(p, model=model, harmful_val=harmful_val) for p in parts])
