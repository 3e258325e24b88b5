"""The search: Optuna over the edit space, two objectives (refusal, damage), resumable.

:func:`optimize_edit` minimises the harmful refusal score and the multi-token KL of each
trial's :class:`~refusaldir.steer.Edit` (:class:`~refusaldir.optimize.TrialScorer`), with
over-refusal on borderline-safe prompts as a constraint. Trials live in a SQLite study in the
output folder, so ``resume=True`` adds trials to the same study; the study records the model's
weights hash, the directions and the scoring settings, and refuses to continue with others.
Trial 0 is the rank-1 edit (the selected direction at full strength), so the front is always
compared with it. The front is then confirmed by generation (:mod:`~refusaldir.optimize.confirm`).

Example:
    >>> rec = search_front(model, ds, OptimizeConfig(n_trials=40), out="runs/demo/optimize")  # doctest: +SKIP
    >>> rec["front"][0]["describe"]  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from refusaldir.data import load_prompts
from refusaldir.directions import DirectionSet, Subspaces, subspaces
from refusaldir.errors import ArtifactError, ConfigError
from refusaldir.io import atomic_write_files, ensure_writable
from refusaldir.judges import find_refusal_tokens
from refusaldir.optimize.config import OptimizeConfig, make_sampler
from refusaldir.optimize.objective import TrialScorer
from refusaldir.optimize.prompts import borderline_half
from refusaldir.optimize.space import build_edit, describe, in_space, rank1_params, suggest
from refusaldir.progress import progress_bar
from refusaldir.stats import rate
from refusaldir.steer import Edit
from refusaldir.tensorio import encode_folder, read_folder

if TYPE_CHECKING:
    import optuna

    from refusaldir.models import ChatModel

__all__ = ["OWN_FILES", "STUDY_FILE", "check_sources", "check_study", "directions_sha256", "read_subspaces", "open_study", "pareto", "search_front"]

log = logging.getLogger(__name__)
STUDY_FILE = "study.db"
STUDY_NAME = "refusaldir-optimize"
SUBSPACE_FILES = ("subspaces.safetensors", "subspaces.json")
#: Everything the optimiser writes into its folder (``--force`` removes these, nothing else).
OWN_FILES = (STUDY_FILE, *SUBSPACE_FILES, "front.json", "front.html", "results.md", "completions.jsonl")


def _storage(out: Path) -> str:
    return f"sqlite:///{(out / STUDY_FILE).resolve()}"


def directions_sha256(ds: DirectionSet) -> str:
    """The identity of a direction set as edits use it: its refusal and harmfulness tensors and
    the selected (pos, layer) — the same however often its metadata is saved again, different
    after a new selection (edits built from "the selected direction" would change)."""
    h = hashlib.sha256(str(ds.selected).encode())
    for t in (ds.refusal, ds.harmfulness):
        if t is not None:
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def study_identity(ds: DirectionSet, cfg: OptimizeConfig) -> dict[str, Any]:
    """What a study must agree on to be continued: model weights, directions, scoring."""
    model = ds.metadata.get("model", {}) if isinstance(ds.metadata, dict) else {}
    return {"weights_hash": model.get("weights_hash"), "directions_sha256": directions_sha256(ds),
            "scoring": cfg.scoring()}


def check_sources(ds: DirectionSet, cfg: OptimizeConfig) -> None:
    """Raise when the direction sources searched need a selection the set does not have."""
    if ds.selected is None and set(cfg.sources) == {"selected"}:
        raise ConfigError(
            "sources=['selected'] needs a selected direction, and these directions have none; run "
            "`refusaldir select` first or add per_layer/index to the sources (--sources)"
        )


def check_study(out: str | os.PathLike[str], ds: DirectionSet, cfg: OptimizeConfig,
                refusal_ids: Sequence[int] | None = None) -> int:
    """Trials already in the study at ``out`` (0 when there is none); raises when it was made
    for another model, other directions or other scoring settings. Loads no model."""
    import optuna

    path = Path(out) / STUDY_FILE
    if not path.exists():
        return 0
    try:
        study = optuna.load_study(study_name=STUDY_NAME, storage=_storage(Path(out)))
    except Exception as exc:  # noqa: BLE001 - any storage failure is an unreadable study
        raise ArtifactError(f"{path} is not a readable refusaldir study ({exc}); remove it or pass --force") from exc
    have = study.user_attrs.get("identity", {})
    want = study_identity(ds, cfg)
    if refusal_ids is not None:
        want["refusal_ids"] = [int(i) for i in refusal_ids]
    for key, what in (("weights_hash", "model (weights hash)"), ("directions_sha256", "directions (or selection)"),
                      ("scoring", "scoring settings"), ("refusal_ids", "refusal tokens")):
        if key in want and key in have and have.get(key) != want[key]:
            raise ArtifactError(
                f"the study in {path} was made for another {what}: {str(have.get(key))[:80]} vs "
                f"{str(want[key])[:80]}; use the same {what.split(' ')[0]} to resume, or pass --force "
                "to start a new study"
            )
    return len(study.trials)


def open_study(out: Path, ds: DirectionSet, cfg: OptimizeConfig, *, resume: bool,
               refusal_ids: Sequence[int] | None = None) -> optuna.Study:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    exists = (out / STUDY_FILE).exists()
    if exists and not resume:
        raise ConfigError(f"{out} already holds a study; pass resume=True (--resume) to add trials or force a new one")
    done = check_study(out, ds, cfg, refusal_ids)  # 0 for a new study
    study = optuna.create_study(study_name=STUDY_NAME, storage=_storage(out), load_if_exists=exists,
                                directions=["minimize", "minimize"], sampler=make_sampler(cfg.sampler, cfg.seed + done))
    if not exists:
        ident = study_identity(ds, cfg)
        if refusal_ids is not None:
            ident["refusal_ids"] = [int(i) for i in refusal_ids]
        study.set_user_attr("identity", ident)
    return study


def pareto(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The feasible rows no other feasible row beats on both ``refusal`` and ``kl``, by KL."""
    ok = [r for r in rows if r["feasible"] and not r["skipped"]]
    front = [r for r in ok if not any(
        (o["refusal"] <= r["refusal"] and o["kl"] <= r["kl"]) and (o["refusal"] < r["refusal"] or o["kl"] < r["kl"])
        for o in ok)]
    return sorted(front, key=lambda r: (r["kl"], r["refusal"], r["trial"]))


def read_subspaces(folder: str | os.PathLike[str]) -> tuple[Subspaces, dict[str, Any]] | None:
    """The subspaces an optimiser run captured in ``folder`` (with their record), if any."""
    if not (Path(folder) / SUBSPACE_FILES[0]).exists():
        return None
    meta, tensors, _ = read_folder(folder, tensors_file=SUBSPACE_FILES[0], meta_file=SUBSPACE_FILES[1],
                                   fix="re-run `refusaldir optimize` (or pass --force)")
    return Subspaces.from_tensors(tensors, meta), meta


def _load_subspaces(model: ChatModel, ds: DirectionSet, cfg: OptimizeConfig, out: Path) -> Subspaces | None:
    if not {"categories", "pca"} & set(cfg.subspaces):
        return None
    have = read_subspaces(out)
    if have is not None:
        if have[1].get("directions_sha256") != directions_sha256(ds):
            raise ArtifactError(f"{out / SUBSPACE_FILES[0]} was captured for other directions; pass --force to start over")
        return have[0]
    sel = ds.selected
    sub = subspaces(model, ds, load_prompts("harmful", "train"), pos=sel[0] if sel else -1,
                    k=cfg.max_k, batch_size=cfg.batch_size, progress=cfg.progress)
    record = {**sub.record(), "directions_sha256": directions_sha256(ds)}
    atomic_write_files(out, encode_folder(sub.tensors(), record, tensors_file=SUBSPACE_FILES[0],
                                          meta_file=SUBSPACE_FILES[1], header={"format": "refusaldir.subspaces"}))
    return sub


def _supported_variants(model: ChatModel, cfg: OptimizeConfig) -> OptimizeConfig:
    """``cfg`` without the norm-preserving variant where this model's writers have no hook form
    for it (output norms, fused experts, other token mixers), with a warning."""
    if "norm_preserving" not in cfg.variants or Edit.preserve_norm_hookable(model):
        return cfg
    rest = tuple(v for v in cfg.variants if v != "norm_preserving")
    if not rest:
        raise ConfigError(
            f"the norm-preserving variant has no hook form on {model.spec} (output norms or fused "
            "experts), so it cannot be searched; pass variants plain,projected (--variants)"
        )
    log.warning("norm-preserving edits have no hook form on %s; searching %s only", model.spec, rest)
    return replace(cfg, variants=rest, extra={**cfg.extra, "dropped_variants": ["norm_preserving"]})


def search_front(
    model: ChatModel,
    ds: DirectionSet,
    cfg: OptimizeConfig | None = None,
    *,
    out: str | os.PathLike[str],
    resume: bool = False,
    harmful: Sequence[str] | None = None,
    harmless: Sequence[str] | None = None,
    borderline: Sequence[str] | None = None,
    refusal_ids: Sequence[int] | None = None,
    warm_start: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """Run ``cfg.n_trials`` trials (more on a resumed study) and return the search record:
    ``{"trials": [...], "front": [...], "baseline": {...}, "rank1": {...}, ...}``.

    Prompts default to the shipped *validation* splits and the borderline set's search half;
    ``refusal_ids`` to the tokens :func:`refusaldir.judges.find_refusal_tokens` detects there.
    ``warm_start``: parameter dicts (:func:`~refusaldir.optimize.warm_start`) tried first, after
    the rank-1 edit, within the ``n_trials``; only for a new study.
    """
    import optuna

    cfg = cfg or OptimizeConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ensure_writable(out)
    ds.check_model(model)
    n_layers = model.n_layers
    harmful = list(harmful if harmful is not None else load_prompts("harmful", "val"))[: cfg.n_harmful]
    harmless = list(harmless if harmless is not None else load_prompts("harmless", "val"))[: cfg.n_harmless]
    borderline = list(borderline if borderline is not None else borderline_half("search"))[: cfg.n_borderline]
    t0 = time.perf_counter()
    check_sources(ds, cfg)
    cfg = _supported_variants(model, cfg)
    if cfg.gen_tokens and cfg.gen_below < 1:
        log.warning("gen_below=%g: trials whose first tokens refuse more than that are compared by their first "
                    "token only, and can hide generated-token-judged trials from the front; gate the "
                    "generated stage by gen_max_kl with gen_below=1 for a front measured one way", cfg.gen_below)
    if (out / STUDY_FILE).exists() and not resume:  # before the refusal-token passes below
        raise ConfigError(f"{out} already holds a study; pass resume=True (--resume) to add trials or force a new one")
    if warm_start and resume:
        raise ConfigError("a warm start seeds a new study; a resumed study already has its trials, so drop one of them")
    for p in warm_start:
        if not in_space(p, cfg):
            raise ConfigError(f"warm-start trial {describe(p)!r} lies outside this search space; "
                              "filter the starts with refusaldir.optimize.warm_start")
    if refusal_ids is None:
        try:
            refusal_ids = find_refusal_tokens(model, harmful, harmless, n=min(32, len(harmful)),
                                              batch_size=cfg.batch_size).ids
        except ConfigError as exc:
            raise ConfigError(
                f"the optimiser scores refusal by the tokens refusals start with, and they could not be "
                f"detected ({str(exc).split(';')[0]}); pass them: refusal_ids=[...] (--refusal-tokens ID,...), "
                "e.g. the ids of 'I' and 'Sorry' in this tokenizer"
            ) from exc
    study = open_study(out, ds, cfg, resume=resume, refusal_ids=refusal_ids)
    extra = _load_subspaces(model, ds, cfg, out)
    scorer = TrialScorer(model, cfg, harmful, harmless, borderline, refusal_ids)
    base = scorer.baseline_scores()
    study.set_user_attr("n_harmful", len(harmful))
    limit = base.get("over_refusal", 0.0) + cfg.over_refusal_margin
    done = optuna.trial.TrialState.COMPLETE
    if not any(t.user_attrs.get("rank1") and t.state == done for t in study.trials):
        study.enqueue_trial({}, user_attrs={"rank1": True})  # again, if an interrupted run lost it
    for p in warm_start:
        study.enqueue_trial(dict(p), user_attrs={"warm_start": True})
    setup_s = time.perf_counter() - t0

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        if trial.user_attrs.get("rank1", False):
            p = rank1_params(n_layers, ds.selected)
        else:
            p = suggest(trial, cfg, n_layers, ds.selected is not None)
        s = scorer.score(build_edit(p, ds, n_layers, extra))
        over = float(s.get("over_refusal", 0.0))
        trial.set_user_attr("params", p)
        trial.set_user_attr("scores", s)
        trial.set_user_attr("constraints", [over - limit])
        if hasattr(trial, "set_constraint"):  # optuna >= 5; older versions read constraints_func
            trial.set_constraint("over_refusal", over - limit)
        return float(s["refusal"]), float(s["kl"])

    bar = progress_bar(cfg.progress)
    t1 = time.perf_counter()
    with bar:
        task = bar.add_task("optimize", total=cfg.n_trials)

        def tick(study: optuna.Study, trial: Any) -> None:
            rows = _rows(study)
            front = pareto(rows)
            best = min((r["refusal_rate"] for r in front), default=float("nan"))
            bar.update(task, advance=1, description=f"optimize (front {len(front)}, best refusal {best:.0%})")

        study.optimize(objective, n_trials=cfg.n_trials, callbacks=[tick], gc_after_trial=False)
    rows = _rows(study)
    rank1 = next((r for r in rows if r.get("rank1")), None)
    return {"trials": rows, "front": pareto(rows), "baseline": base, "rank1": rank1, "n_layers": n_layers,
            "over_refusal_limit": limit, "refusal_ids": list(refusal_ids),
            "prompts": {"harmful": len(harmful), "harmless": len(harmless), "borderline": len(borderline)},
            "timings": {"setup_s": round(setup_s, 2), "search_s": round(time.perf_counter() - t1, 2)},
            "n_trials": len(rows), "config": cfg.to_dict(), "subspaces": extra.record() if extra else None,
            "scorer_calls": scorer.calls}


def _rows(study: optuna.Study) -> list[dict[str, Any]]:
    import optuna

    n_harmful = int(study.user_attrs.get("n_harmful", 0)) or 1
    rows = []
    for t in study.trials:
        if t.state != optuna.trial.TrialState.COMPLETE:
            continue
        s = t.user_attrs["scores"]
        p = t.user_attrs["params"]
        k = round(float(s["refusal_rate"]) * n_harmful)
        rows.append({"trial": t.number, "params": p, "describe": describe(p), "refusal": s["refusal"],
                     "refusal_rate": s["refusal_rate"], "refusal_search": rate(k, n_harmful, digits=4), "kl": s["kl"], "over_refusal": s.get("over_refusal"),
                     "skipped": bool(s["skipped"]), "feasible": t.user_attrs["constraints"][0] <= 0,
                     "rank1": bool(t.user_attrs.get("rank1", False)),
                     "generated": "late_refusal" in s,
                     **({"warm_start": True} if t.user_attrs.get("warm_start") else {})})
    return rows
