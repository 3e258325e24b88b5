"""One-command audit: how is refusal implemented, how easily is it removed, and does the model
still know what is harmful?

:func:`audit` runs extract → select → latent guard → projections → evaluate (baseline,
ablation, addition, orthogonalized weights) → behaviour → concentration on one model and
writes a folder with

- ``report.html``: self-contained (plotly.js inlined once, every figure a ``<div>``), viewable
  offline; an auditor's verdict first, then the evidence;
- ``report.json``: every number behind the report (the HTML is rendered from it, see
  :func:`~refusaldir.audit.render_html`);
- ``directions/`` (the direction set with the selection recorded), ``selection.json``,
  ``evaluation/`` (``results.json``, ``completions.jsonl``, ``results.md``) and ``guard/``.

The folder is written into a temporary sibling and swapped into place at the end under a lock
file (:func:`refusaldir.io.staged_dir`), so a failed or interrupted audit, or a full disk,
leaves nothing behind and any previous report intact. Verdict rules: :mod:`refusaldir.audit.verdict`; concentration:
:func:`~refusaldir.audit.concentration_curve`.

Example:
    >>> import refusaldir as rd  # doctest: +SKIP
    >>> from refusaldir.audit import audit  # doctest: +SKIP
    >>> rep = audit(rd.load_model("demo"), "runs/demo/audit", mode="cosine", limit=32)  # doctest: +SKIP
    >>> rep.verdict["removable"]["answer"]  # doctest: +SKIP
    'yes'
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from rich.console import Console

from refusaldir.audit.concentration import candidate_order, concentration_curve
from refusaldir.audit.config import REPORT_HTML, REPORT_JSON, SETS, AuditConfig, resolve_config
from refusaldir.audit.figures import make_figures
from refusaldir.audit.html import render_html
from refusaldir.audit.inputs import AuditInputs, check_out, gather_inputs, prompt_set
from refusaldir.audit.measure import (
    Projections,
    behaviour_scores,
    guard_summary,
    layer_table,
    project_sets,
)
from refusaldir.audit.optimized import optimized_condition
from refusaldir.audit.summary import (
    directions_summary,
    model_summary,
    sample_completions,
    selection_summary,
)
from refusaldir.audit.verdict import headline_markdown, verdict
from refusaldir.data import check_prompts
from refusaldir.directions import DirectionSet, extract
from refusaldir.errors import ArtifactError, ConfigError
from refusaldir.evaluate import Condition, EvaluationResult, build_conditions, evaluate
from refusaldir.guard import LatentGuard
from refusaldir.io import atomic_write_files, atomic_write_text, dumps, staged_dir, to_jsonable
from refusaldir.models import ChatModel, load_model
from refusaldir.select import SelectionResult, select_direction
from refusaldir.version import __version__

__all__ = ["AuditReport", "audit"]


# ----------------------------------------------------------------------------- result
@dataclass
class AuditReport:
    """What :func:`audit` produced. ``data`` is ``report.json``; the rest are live objects
    (``None`` after :meth:`load`)."""

    data: dict[str, Any]
    out: Path | None = None
    directions: DirectionSet | None = None
    selection: SelectionResult | None = None
    evaluation: EvaluationResult | None = None
    guard: LatentGuard | None = None

    @property
    def verdict(self) -> dict[str, Any]:
        return self.data["verdict"]

    def figures(self) -> dict[str, go.Figure]:
        """The report's plotly figures (see :func:`~refusaldir.audit.make_figures`)."""
        return make_figures(self.data)

    def html(self) -> str:
        return render_html(self.data)

    def headline(self) -> str:
        """The verdict as a few lines of Markdown (for READMEs and terminals)."""
        return headline_markdown(self.data)

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``report.html`` and ``report.json`` into ``folder`` as one unit
        (:func:`refusaldir.io.atomic_write_files`)."""
        out = Path(folder)
        atomic_write_files(out, {REPORT_HTML: self.html().encode(), REPORT_JSON: dumps(self.data).encode()})
        return out / REPORT_HTML

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> AuditReport:
        """Read ``report.json`` back (figures and HTML can be rebuilt from it)."""
        path = Path(folder)
        path = path / REPORT_JSON if path.is_dir() else path
        if not path.is_file():
            raise ArtifactError(f"{path} does not exist; run `refusaldir audit --out {path.parent}` first")
        try:
            return cls(json.loads(path.read_text()), out=path.parent)
        except ValueError as exc:
            raise ArtifactError(f"{path} is not valid JSON ({exc}); re-run the audit") from exc


# ----------------------------------------------------------------------------- progress
class _Stages:
    """Prints ``[i/n] stage …`` lines with timings (inner work shows its own rich bars)."""

    def __init__(self, console: Console | None, total: int) -> None:
        self.console = console
        self.total = total
        self.i = 0
        self.timings: dict[str, float] = {}
        self.t0 = time.perf_counter()

    @contextmanager
    def stage(self, name: str, what: str) -> Iterator[None]:
        self.i += 1
        if self.console is not None:
            self.console.print(f"[bold cyan]audit[/] [{self.i}/{self.total}] {what} …", highlight=False)
        t = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - t, 2)
        if self.console is not None:
            self.console.print(f"[dim]      {name} done in {self.timings[name]:.1f}s[/]", highlight=False)

    def total_seconds(self) -> float:
        return round(time.perf_counter() - self.t0, 2)


@dataclass
class _Run:
    """One audit in progress: the model, settings, checked inputs and the temporary folder."""

    model: ChatModel
    cfg: AuditConfig
    inp: AuditInputs
    tmp: Path
    progress: bool

    @property
    def harmful_val(self) -> list[str]:
        """The first ``n_val`` harmful validation prompts."""
        return self.inp.h_val[: self.cfg.n_val]

    @property
    def harmless_val(self) -> list[str]:
        """The first ``n_val`` harmless validation prompts."""
        return self.inp.l_val[: self.cfg.n_val]


# ----------------------------------------------------------------------------- stages
def _extract(run: _Run, harmful: Sequence[str] | None, harmless: Sequence[str] | None) -> DirectionSet:
    n = run.cfg.n_train
    return extract(run.model, prompt_set(harmful, "harmful", "train")[:n],
                   prompt_set(harmless, "harmless", "train")[:n], batch_size=run.cfg.batch_size,
                   seed=run.cfg.seed, progress=run.progress)


def _select(run: _Run, ds: DirectionSet) -> SelectionResult:
    cfg = run.cfg
    return select_direction(run.model, ds, run.inp.h_val, run.inp.l_val, **{
        "mode": cfg.mode, "n_val": cfg.n_val, "batch_size": cfg.batch_size, "seed": cfg.seed,
        "progress": run.progress, **cfg.select_options})


def _record_selection(run: _Run, ds: DirectionSet, sel: dict[str, Any]) -> None:
    """Mark a reused selection in ``ds``; save the directions and ``selection.json``."""
    if run.inp.reused is not None and ds.selected is None:
        ds.select(int(sel["selected"]["pos"]), int(sel["selected"]["layer"]),
                  method=f"{sel['mode']} (reused selection.json)", mode=sel["mode"])
    ds.save(run.tmp / "directions")
    atomic_write_text(run.tmp / "selection.json", dumps(sel))


def _fit_guard(run: _Run, ds: DirectionSet) -> LatentGuard:
    cfg = run.cfg
    guard = LatentGuard.fit(run.model, ds, run.inp.h_val, run.inp.l_val, layers=cfg.guard_layers,
                            method=cfg.guard_method, target_fpr=cfg.target_fpr, n_layers=cfg.guard_n_layers,
                            batch_size=cfg.batch_size, progress=run.progress)
    guard.save(run.tmp / "guard")
    return guard


def _evaluate(run: _Run, ds: DirectionSet, extra: Condition | None = None) -> tuple[EvaluationResult, list[str]]:
    """Evaluate every condition; without a given ``add_coeff``, a failed addition calibration
    drops the addition conditions with a note instead of failing the audit."""
    cfg, bs = run.cfg, run.cfg.batch_size
    conditions, notes = list(cfg.conditions), []
    h_val, l_val = run.harmful_val, run.harmless_val
    try:
        conds = build_conditions(run.model, ds, conditions, add_coeff=cfg.add_coeff, harmless_val=l_val,
                                 harmful_val=h_val, target_fpr=cfg.target_fpr, batch_size=bs,
                                 progress=run.progress)
    except ConfigError as exc:
        if not cfg.addition_conditions or cfg.add_coeff is not None:
            raise
        notes.append(f"addition conditions skipped: {exc}")
        conditions = [c for c in conditions if c not in cfg.addition_conditions]
        conds = build_conditions(run.model, ds, conditions, harmless_val=l_val, harmful_val=h_val,
                                 batch_size=bs, progress=run.progress)
    res = evaluate(run.model, ds, datasets=run.inp.tests, judge=cfg.judge, cross_judges=cfg.cross_judges,
                   max_new_tokens=cfg.max_new_tokens,
                   batch_size=bs, limit=cfg.limit, harmless_val=l_val, harmful_val=h_val,
                   progress=run.progress, prebuilt=conds + ([extra] if extra is not None else []))
    del conds
    res.save(run.tmp / "evaluation")
    return res, notes


def _concentration(run: _Run, ds: DirectionSet, sel: dict[str, Any]) -> dict[str, Any]:
    cfg = run.cfg
    return concentration_curve(
        run.model, ds, run.inp.cap["harmful"][: cfg.concentration_n], candidate_order(sel),
        threshold=cfg.refusal_threshold, k_max=cfg.k_max, min_residual=cfg.min_residual,
        max_new_tokens=cfg.concentration_tokens or cfg.max_new_tokens, batch_size=cfg.batch_size,
        progress=run.progress)


# ----------------------------------------------------------------------------- report data
@dataclass
class _Measured:
    """What the stages measured, before it becomes ``report.json``."""

    ds: DirectionSet
    sel: dict[str, Any]
    selection: SelectionResult
    guard: LatentGuard
    proj: Projections
    layers: list[dict[str, Any]]
    guard_metrics: dict[str, Any]
    res: EvaluationResult
    notes: list[str]
    behaviour: dict[str, Any]
    conc: dict[str, Any]
    optimized: dict[str, Any] | None = None


def _report_data(run: _Run, m: _Measured, timings: dict[str, float]) -> dict[str, Any]:
    inp, ds = run.inp, m.ds
    data: dict[str, Any] = {
        "refusaldir_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": run.cfg.to_dict(),
        "model": model_summary(run.model),
        "directions": directions_summary(ds, inp.source),
        "prompts": {"val": {"harmful": len(inp.h_val), "harmless": len(inp.l_val)},
                    "capture": {s: len(inp.cap[s]) for s in SETS},
                    "evaluation": m.res.results["datasets"]},
        "layers": m.layers,
        "projections": {"refusal_pos": int(m.sel["selected"]["pos"]), "t_inst": ds.t_inst, "layers": ds.layers,
                        "refusal": m.proj.refusal, "harmfulness": m.proj.harmfulness},
        "selection": {**selection_summary(m.sel), "reused": inp.reused is not None},
        "evaluation": m.res.results,
        "samples": sample_completions(m.res.completions, run.cfg.n_samples),
        "concentration": m.conc,
        "guard": {**m.guard.to_dict(), **m.guard_metrics, "behaviour": m.behaviour},
        "notes": m.notes,
    }
    data["optimized"] = m.optimized
    data["verdict"] = verdict(data, run.cfg)
    data["timings"] = timings
    return to_jsonable(data)


# ----------------------------------------------------------------------------- the audit
def _run_stages(
    run: _Run, st: _Stages, harmful_train: Sequence[str] | None, harmless_train: Sequence[str] | None
) -> _Measured:
    cfg, cm, inp = run.cfg, run.model, run.inp
    ds = inp.ds
    if ds is None:
        with st.stage("extract", "extracting refusal and harmfulness directions"):
            ds = _extract(run, harmful_train, harmless_train)
    sel_result = inp.reused
    if sel_result is None:
        with st.stage("select", f"selecting the refusal direction ({cfg.mode} mode)"):
            sel_result = _select(run, ds)
    sel = to_jsonable(sel_result.to_dict())
    _record_selection(run, ds, sel)
    sel_pos, sel_layer = int(sel["selected"]["pos"]), int(sel["selected"]["layer"])
    with st.stage("guard", f"fitting the latent guard ({cfg.guard_method}, t_inst)"):
        guard = _fit_guard(run, ds)
    with st.stage("projections", "projecting test prompts on every layer"):
        proj = project_sets(cm, ds, guard, inp.cap, sel_pos, batch_size=cfg.batch_size, progress=run.progress)
        layers = layer_table(ds, proj, sel_pos)
        g_metrics = guard_summary(cm, guard, proj.guard_scores, ds.refusal_direction(sel_layer, sel_pos),
                                  inp.cap, cfg)
    opt_cond, opt_info = None, None
    if cfg.front is not None or cfg.optimize_trials:
        with st.stage("optimize", "the cheapest optimised edit under the refusal threshold"):
            opt_cond, opt_info = optimized_condition(
                cm, ds, front=cfg.front, trials=cfg.optimize_trials, threshold=cfg.refusal_threshold,
                folder=run.tmp / "optimize", seed=cfg.seed, progress=run.progress)
    with st.stage("evaluate", f"evaluating {', '.join(cfg.conditions)}"):
        res, notes = _evaluate(run, ds, opt_cond)
    with st.stage("behaviour", "behavioural refusal as a harmfulness classifier"):
        behaviour = behaviour_scores(cm, res, guard, proj.guard_scores, inp.cap, sel, (inp.h_val, inp.l_val),
                                     cfg, run.progress)
    with st.stage("concentration", "how many directions must be ablated"):
        conc = _concentration(run, ds, sel)
    return _Measured(ds, sel, sel_result, guard, proj, layers, g_metrics, res, notes, behaviour, conc, opt_info)


def audit(
    model: ChatModel | str,
    out: str | os.PathLike[str],
    *,
    directions: DirectionSet | str | os.PathLike[str] | None = None,
    selection: SelectionResult | dict[str, Any] | str | os.PathLike[str] | None = None,
    config: AuditConfig | None = None,
    force: bool = False,
    harmful_train: Sequence[str] | None = None,
    harmless_train: Sequence[str] | None = None,
    harmful_val: Sequence[str] | None = None,
    harmless_val: Sequence[str] | None = None,
    datasets: Mapping[str, Sequence[str]] | None = None,
    progress: bool = True,
    console: Console | None = None,
    **overrides: Any,
) -> AuditReport:
    """Audit ``model``'s refusal mechanism and write ``report.html`` + ``report.json`` to ``out``.

    Args:
        directions: a direction set (or its folder) to reuse instead of extracting; it must
            come from these exact weights (weights-hash check).
        selection: reuse a finished selection (a ``SelectionResult`` or its ``selection.json``)
            for ``directions`` instead of running the selection again (the slowest step on CPU).
        config: an :class:`AuditConfig`; keyword ``overrides`` build or update one, e.g.
            ``mode="cosine"``, ``limit=16``, ``max_new_tokens=32``.
        force: replace an existing ``out`` folder (otherwise an existing one is an error).
        harmful_train, harmless_train: extraction prompts (default: shipped ``train`` splits).
        harmful_val, harmless_val: selection, calibration and guard-fitting prompts (default:
            shipped ``val`` splits).
        datasets: ``{"harmful", "harmless", "borderline"}`` test prompts (default: shipped
            ``test`` splits and the borderline-safe set).

    Example:
        >>> rep = audit(load_model("demo"), "runs/demo/audit", limit=16, max_new_tokens=32)  # doctest: +SKIP
        >>> print(rep.headline())  # doctest: +SKIP
    """
    cfg = resolve_config(config, overrides)
    if cfg.front is not None and (directions is None or selection is None):
        raise ConfigError("front= holds edits built on a direction set and its selection; pass the directions= "
                          "and selection= they were made with (--directions, --selection)")
    target = Path(out).expanduser()
    check_out(target, force)  # fail before any heavy work
    harmful_train = None if harmful_train is None else check_prompts(harmful_train, "harmful_train")
    harmless_train = None if harmless_train is None else check_prompts(harmless_train, "harmless_train")
    con = (console if console is not None else Console(stderr=True)) if progress else None
    cm: ChatModel = model if hasattr(model, "template") else load_model(model)  # type: ignore[assignment]
    inp = gather_inputs(cm, cfg, directions=directions, selection=selection, harmful_val=harmful_val,
                        harmless_val=harmless_val, datasets=datasets)
    st = _Stages(con, 6 + (inp.ds is None) + (inp.reused is None) + bool(cfg.front or cfg.optimize_trials))
    with staged_dir(target, force=force) as tmp:
        run = _Run(cm, cfg, inp, tmp, progress)
        measured = _run_stages(run, st, harmful_train, harmless_train)
        with st.stage("report", "writing report.json and report.html"):
            data = _report_data(run, measured, {**st.timings, "total": st.total_seconds()})
            report = AuditReport(data, target, measured.ds, measured.selection, measured.res, measured.guard)
            report.save(tmp)
    if con is not None:
        con.print(f"[bold green]audit written:[/] {target / REPORT_HTML} "
                  f"({data['timings']['total']:.0f}s)", highlight=False)
    return report
