"""What a selection found: per-candidate scores (:class:`CandidateScore`) and the whole
outcome (:class:`SelectionResult`), which saves itself as ``selection.json`` +
``selection.html`` and loads itself back.

Example:
    >>> res = SelectionResult.load("runs/demo")  # doctest: +SKIP
    >>> res.pos, res.layer, res.selected.status  # doctest: +SKIP
    (-2, 15, 'selected')
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from refusaldir.errors import ArtifactError, ConfigError
from refusaldir.io import (
    atomic_write_files,
    dumps,
    field_error,
    folder_lock,
    read_json,
    to_jsonable,
)
from refusaldir.judges import RefusalTokens
from refusaldir.select import figures
from refusaldir.select.config import FIGURES_FILE, SELECTION_FILE, SelectionConfig

if TYPE_CHECKING:
    import plotly.graph_objects as go

__all__ = ["CandidateScore", "SelectionResult", "check_record", "score_fields"]

SCORE_FIELDS = ("bypass", "induce", "kl", "cosine", "proxy", "status", "rank")
NUMBER_FIELDS = ("bypass", "induce", "kl", "cosine", "cos_ablation", "cos_addition", "proxy", "norm")
MALFORMED = "the selection record is malformed"
FIX = "pass a selection.json written by `refusaldir select` or an audit"


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return x is None or (isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x))


def check_record(d: dict[str, Any]) -> None:
    """Raise :class:`ArtifactError` naming the field unless a selection record (``selection.json``
    parsed) has the types :meth:`SelectionResult.from_dict` relies on: integer positions and
    layers, finite numbers (or ``null``) for scores, the pick and ``top_k`` among the candidates."""
    def pair(name: str, x: Any) -> tuple[int, int]:
        if not (isinstance(x, dict) and _is_int(x.get("pos")) and _is_int(x.get("layer"))):
            raise field_error(MALFORMED, name, x, "an object with integer pos and layer", FIX)
        return (x["pos"], x["layer"])

    if not isinstance(d["mode"], str):
        raise field_error(MALFORMED, "mode", d["mode"], "a string", FIX)
    if not isinstance(d["candidates"], list) or not d["candidates"]:
        raise field_error(MALFORMED, "candidates", d["candidates"], "a non-empty list", FIX)
    keys = set()
    for i, c in enumerate(d["candidates"]):
        keys.add(pair(f"candidates[{i}]", c))
        for k in NUMBER_FIELDS:
            if not _is_number(c.get(k)):
                raise field_error(MALFORMED, f"candidates[{i}].{k}", c.get(k), "a finite number or null", FIX)
        if not isinstance(c.get("status", ""), str) or not (c.get("rank") is None or _is_int(c["rank"])):
            raise field_error(MALFORMED, f"candidates[{i}]", c, "a string status and an integer rank", FIX)
    picks = [("selected", d["selected"])] + [(f"top_k[{i}]", t) for i, t in enumerate(d.get("top_k") or [])]
    for name, x in picks:
        if pair(name, x) not in keys:
            raise field_error(MALFORMED, name, x, "one of the candidates", FIX)
    for k in ("relaxation", "stability", "timings", "baseline", "model", "prompts", "work", "config"):
        if not isinstance(d.get(k) or {}, dict):
            raise field_error(MALFORMED, k, d[k], "an object", FIX)
    if not all(_is_number(v) for v in (d.get("timings") or {}).values()):
        raise field_error(MALFORMED, "timings", d["timings"], "finite numbers of seconds", FIX)


@dataclass
class CandidateScore:
    """Scores and verdict of one candidate ``(pos, layer)``.

    ``status``: ``selected``, ``passed`` (passes the filters in force), ``rejected`` (fails
    them), ``not scored`` (rejected before the remaining scores were computed, or, in cosine
    mode, ranked below the candidates whose KL was checked). ``reasons`` names every failed
    filter, judged against the configured (unrelaxed) bounds.
    """

    pos: int
    layer: int
    bypass: float | None = None
    induce: float | None = None
    kl: float | None = None
    cosine: float | None = None
    cos_ablation: float | None = None
    cos_addition: float | None = None
    proxy: float | None = None
    status: str = "not scored"
    reasons: list[str] = field(default_factory=list)
    rank: int | None = None
    norm: float | None = None
    details: dict[str, float] = field(default_factory=dict)

    @property
    def key(self) -> tuple[int, int]:
        return (self.pos, self.layer)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CandidateScore:
        """Inverse of :meth:`to_dict` (unknown keys are ignored)."""
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["pos"], kw["layer"] = int(d["pos"]), int(d["layer"])
        kw["reasons"] = list(kw.get("reasons") or [])
        kw["details"] = dict(kw.get("details") or {})
        return cls(**kw)


def score_fields(c: CandidateScore) -> dict[str, Any]:
    """The headline scores of a candidate (``selected`` / ``top_k`` entries of the report)."""
    return {k: getattr(c, k) for k in SCORE_FIELDS}


@dataclass
class SelectionResult:
    """What :func:`~refusaldir.select.select_direction` found, and why (see :meth:`to_dict`,
    :meth:`save`, :meth:`load`)."""

    pos: int
    layer: int
    mode: str
    method: str
    candidates: list[CandidateScore]
    relaxation: dict[str, Any]
    top_k: list[tuple[int, int]]
    stability: dict[str, Any]
    timings: dict[str, float]
    refusal_tokens: RefusalTokens | None
    config: SelectionConfig
    baseline: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    prompts: dict[str, Any] = field(default_factory=dict)
    cosine_layers: list[int] = field(default_factory=list)
    work: dict[str, int] = field(default_factory=dict)

    @property
    def selected(self) -> CandidateScore:
        return self.candidate(self.pos, self.layer)

    def candidate(self, pos: int, layer: int) -> CandidateScore:
        for c in self.candidates:
            if c.key == (pos, layer):
                return c
        raise ConfigError(f"({pos}, {layer}) is not a candidate of this selection")

    def to_dict(self) -> dict[str, Any]:
        sel = self.selected
        return {
            "selected": {"pos": self.pos, "layer": self.layer, **score_fields(sel)},
            "mode": self.mode,
            "method": self.method,
            "relaxation": self.relaxation,
            "top_k": [{"pos": p, "layer": layer, **score_fields(self.candidate(p, layer))}
                      for p, layer in self.top_k],
            "stability": self.stability,
            "refusal_tokens": self.refusal_tokens.to_dict() if self.refusal_tokens else None,
            "baseline": self.baseline,
            "cosine_layers": self.cosine_layers,
            "timings": self.timings,
            "work": self.work,
            "config": self.config.to_dict(),
            "model": self.model,
            "prompts": self.prompts,
            "candidates": [c.to_dict() for c in self.candidates],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SelectionResult:
        """Rebuild a result from :meth:`to_dict` output (e.g. a parsed ``selection.json``).

        Example:
            >>> again = SelectionResult.from_dict(res.to_dict())  # doctest: +SKIP
            >>> again.to_dict() == res.to_dict()  # doctest: +SKIP
            True
        """
        if not isinstance(d, dict) or not {"selected", "mode", "candidates"} <= set(d):
            raise ArtifactError(
                "the selection lacks 'selected', 'mode' or 'candidates'; pass a selection.json "
                "written by `refusaldir select` or an audit"
            )
        d = to_jsonable(d)  # NaN/inf → None, as when it was saved
        check_record(d)
        try:
            names = {f.name for f in fields(SelectionConfig)}
            saved = {k: v for k, v in (d.get("config") or {}).items() if k in names}
            saved.setdefault("mode", d["mode"])
            saved.setdefault("method", d.get("method", "shared"))
            config = SelectionConfig(**saved)
            tokens = d.get("refusal_tokens")
            names = {f.name for f in fields(RefusalTokens)}
            return cls(
                pos=int(d["selected"]["pos"]), layer=int(d["selected"]["layer"]), mode=d["mode"],
                method=d.get("method", config.method),
                candidates=[CandidateScore.from_dict(c) for c in d["candidates"]],
                relaxation=dict(d.get("relaxation") or {}),
                top_k=[(int(t["pos"]), int(t["layer"])) for t in d.get("top_k") or []],
                stability=dict(d.get("stability") or {}), timings=dict(d.get("timings") or {}),
                refusal_tokens=RefusalTokens(**{k: v for k, v in tokens.items() if k in names})
                if tokens else None,
                config=config, baseline=dict(d.get("baseline") or {}),
                model=dict(d.get("model") or {}), prompts=dict(d.get("prompts") or {}),
                cosine_layers=[int(x) for x in d.get("cosine_layers") or []],
                work=dict(d.get("work") or {}),
            )
        except (ConfigError, KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(
                f"the selection record is malformed ({type(exc).__name__}: {exc}); pass a "
                "selection.json written by `refusaldir select` or an audit"
            ) from exc

    @classmethod
    def load(cls, source: str | os.PathLike[str]) -> SelectionResult:
        """Load ``selection.json`` (a file, or the folder holding it).

        Example:
            >>> SelectionResult.load("runs/demo").layer  # doctest: +SKIP
            15
        """
        path = Path(source)
        path = path / SELECTION_FILE if path.is_dir() else path
        if not path.is_file():
            raise ArtifactError(
                f"{path} does not exist; pass a selection.json written by a selection or audit"
            )
        return cls.from_dict(read_json(path, "re-run the selection"))

    def metadata(self) -> dict[str, Any]:
        """The compact record stored in ``DirectionSet.metadata["selected"]``."""
        return {
            "method": f"{self.mode}" + (f"/{self.method}" if self.mode == "exact" else ""),
            "mode": self.mode,
            "scores": score_fields(self.selected),
            "relaxation": self.relaxation["step"],
            "stability": self.stability.get("top1_share"),
            "refusal_token_ids": self.refusal_tokens.ids if self.refusal_tokens else None,
            "selection_file": SELECTION_FILE,
        }

    def figures(self) -> dict[str, go.Figure]:
        """Plotly figures: ``scores`` (per layer and position), ``kl`` and ``stability``."""
        return figures.selection_figures(self)

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``selection.json`` (strict JSON) and ``selection.html`` (offline, plotly.js
        inlined) as one unit (:func:`refusaldir.io.atomic_write_files`, under the folder's lock,
        so a full disk or a signal leaves the previous pair); returns the JSON file's path."""
        out = Path(folder).expanduser()
        html = figures.figures_html(self.figures()).encode("utf-8")
        with folder_lock(out):
            atomic_write_files(out, {FIGURES_FILE: html, SELECTION_FILE: dumps(self.to_dict()).encode()},
                               lock=False)
        return out / SELECTION_FILE
