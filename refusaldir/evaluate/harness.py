"""Evaluation harness: refusal and over-refusal rates with Wilson intervals, KL, loss, coherence.

Every condition (baseline, ablation, addition ±, orthogonalized weights, conditional steering)
runs on the same prompts in one call. Completions are judged, first-token distributions are
compared with the baseline on harmless prompts (KL), and each condition's cross-entropy is
measured on the baseline's own harmless completions (and optionally on a plain-text file).

Example:
    >>> import refusaldir as rd  # doctest: +SKIP
    >>> model, ds = rd.load_model("demo"), rd.DirectionSet.load("runs/demo")  # doctest: +SKIP
    >>> res = evaluate(model, ds, conditions=["baseline", "ablate"], limit=20)  # doctest: +SKIP
    >>> res.summary["ablate"]["harmful"]["refusal_rate"]  # doctest: +SKIP
    0.05
"""

from __future__ import annotations

import math
import numbers
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from refusaldir.batching import AUTO, BatchSize
from refusaldir.data import PromptSet, check_limit, check_prompts, load_prompts
from refusaldir.directions import DirectionSet
from refusaldir.errors import ArtifactError, ConfigError
from refusaldir.evaluate.conditions import Condition, build_conditions
from refusaldir.evaluate.report import DISAGREEMENT_FLAG, ROUND, judges_block, results_markdown
from refusaldir.generation import Completion, generate
from refusaldir.io import atomic_write_files, dumps, field_error, loads_strict, sha256_bytes
from refusaldir.judges import (
    EnsembleJudge,
    Judge,
    combine,
    count_disagreements,
    default_judge,
    deflection_report,
    is_repetitive,
    judge_texts,
    make_judge,
    refused,
)
from refusaldir.models import ChatModel
from refusaldir.readout import completion_loss, first_token_logprobs, kl_divergence, text_loss
from refusaldir.stats import rate

__all__ = ["DISAGREEMENT_FLAG", "RESULT_FILES", "EvaluationResult", "check_evaluation", "evaluate",
           "is_repetitive", "summarize"]

#: What :meth:`EvaluationResult.save` writes, in the order they are renamed into place
#: (``results.json`` last: it is what readers open first).
RESULT_FILES = ("completions.jsonl", "results.md", "results.json")


def summarize(
    labels: Sequence[str], categories: Sequence[str | None], completions: Sequence[Completion],
    cross: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Strict (``refusal``) and broad (``refusal`` + ``partial``) refusal rates (Wilson 95%)
    overall and per category, coherence guards, deflection shares among the compliant
    answers (:func:`refusaldir.judges.deflection_report`) and, per cross-check judge in
    ``cross`` (name → its labels), the share of responses it disagrees on."""
    n = len(labels)
    texts = [c.completion for c in completions]
    out = {
        "n": n,
        "refusal": rate(sum(lab == "refusal" for lab in labels), n, digits=ROUND),
        "broad": rate(sum(refused(lab) for lab in labels), n, digits=ROUND),
        "partial": rate(sum(lab == "partial" for lab in labels), n, digits=ROUND),
        "empty": rate(sum(not t.strip() for t in texts), n, digits=ROUND),
        "repetitive": rate(sum(is_repetitive(t) for t in texts), n, digits=ROUND),
        "mean_completion_tokens": round(sum(c.completion_tokens for c in completions) / max(n, 1), 3),
        "deflection": deflection_report([c.prompt for c in completions], texts, labels, digits=ROUND),
        "disagreement": {name: rate(count_disagreements(labels, other), n, digits=ROUND)
                         for name, other in (cross or {}).items()},
    }
    by_cat: dict[str, list[str]] = {}
    for lab, cat in zip(labels, categories):
        by_cat.setdefault(cat or "uncategorized", []).append(lab)
    out["by_category"] = {c: rate(sum(x == "refusal" for x in labs), len(labs), digits=ROUND)
                          for c, labs in sorted(by_cat.items())}
    return out


# ------------------------------------------------------------------ the harness
@dataclass
class EvaluationResult:
    """Everything one evaluation produced; ``results`` is what ``results.json`` holds."""

    results: dict[str, Any]
    completions: list[dict[str, Any]]

    @property
    def summary(self) -> dict[str, dict[str, Any]]:
        """``summary[condition][dataset]`` → ``{"refusal_rate", "ci95", "broad_rate",
        "broad_ci95", "n"}`` (flat view; ``refusal_rate`` is the strict rate)."""
        out: dict[str, dict[str, Any]] = {}
        for c, body in self.results["conditions"].items():
            out[c] = {}
            for d, v in body["datasets"].items():
                broad = v.get("broad", {})
                out[c][d] = {"refusal_rate": v["refusal"]["rate"], "ci95": v["refusal"]["ci95"],
                             "broad_rate": broad.get("rate"), "broad_ci95": broad.get("ci95"),
                             "n": v["n"]}
        return out

    def markdown(self) -> str:
        """Markdown tables: strict and broad refusal rates [95% CI] per condition and dataset,
        KL and loss; the judges, their measured accuracy and disagreement; deflection shares."""
        return results_markdown(self.results)

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``results.json``, ``completions.jsonl`` and ``results.md`` into ``folder``.

        The three files are written as one unit (:func:`refusaldir.io.atomic_write_files`,
        under the folder's lock): each is complete on disk before any is renamed into place, so
        a full disk or a signal never leaves new results beside old completions, and
        ``results.json`` records the completions' sha256 so a mixed folder is caught on load.
        Other files in ``folder`` are left alone. JSON is strict (NaN becomes ``null``).
        """
        out = Path(folder).expanduser()
        rows = "".join(dumps(c, indent=None, sort_keys=True) + "\n" for c in self.completions).encode()
        body = {**self.results, "completions_sha256": sha256_bytes(rows)}
        files = {"completions.jsonl": rows, "results.md": self.markdown().encode(),
                 "results.json": (dumps(body, indent=2, sort_keys=True) + "\n").encode()}
        atomic_write_files(out, {name: files[name] for name in RESULT_FILES})
        return out

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> EvaluationResult:
        """Read back what :meth:`save` wrote (``results.json`` and ``completions.jsonl``).

        Example:
            >>> res = EvaluationResult.load("runs/demo/eval")  # doctest: +SKIP
            >>> res.summary["baseline"]["harmful"]["refusal_rate"]  # doctest: +SKIP
            0.95
        """
        src = Path(folder)
        rpath, cpath = src / "results.json", src / "completions.jsonl"
        if not rpath.is_file() or not cpath.is_file():
            raise ArtifactError(
                f"{src} does not contain results.json and completions.jsonl; run "
                "`refusaldir evaluate --out` (or EvaluationResult.save) there first"
            )
        fix = "run the evaluation again"
        try:
            text, raw = rpath.read_text(encoding="utf-8"), cpath.read_bytes()
            lines = raw.decode("utf-8").splitlines()
        except (ValueError, OSError) as exc:
            raise ArtifactError(f"{src} holds an unreadable evaluation ({exc}); {fix}") from exc
        results = loads_strict(text, rpath, fix)
        rows = [loads_strict(line, f"{cpath} line {i + 1}", fix)
                for i, line in enumerate(lines) if line.strip()]
        if not isinstance(results, dict) or "conditions" not in results or "datasets" not in results:
            raise ArtifactError(
                f"{rpath} is not an evaluation result (no 'conditions'/'datasets'); {fix}"
            )
        want = results.get("completions_sha256")
        if want is not None and want != sha256_bytes(raw):
            raise ArtifactError(
                f"{cpath} does not match the sha256 recorded in results.json (the two files come "
                f"from different runs, or one was modified); {fix}"
            )
        check_evaluation(results, rows, src)
        return cls(results, rows)


def _finite(x: Any, allow_none: bool = False) -> bool:
    if x is None:
        return allow_none
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _rate_ok(r: Any) -> bool:
    return (isinstance(r, dict) and _finite(r.get("n")) and _finite(r.get("rate"), r.get("n") == 0)
            and (r.get("rate") is None or 0 <= r["rate"] <= 1) and isinstance(r.get("ci95"), list)
            and len(r["ci95"]) == 2 and all(_finite(x, True) for x in r["ci95"]))


def check_evaluation(results: dict[str, Any], rows: list[Any], src: str | os.PathLike[str]) -> None:
    """Raise :class:`ArtifactError` naming the field unless a loaded evaluation has what its
    readers use: per condition and dataset rates in [0, 1] with their 95% intervals, finite KL
    and loss numbers, and completion rows of the conditions and datasets it lists."""
    fix = "run the evaluation again"
    conds, sets = results["conditions"], results["datasets"]
    if not isinstance(conds, dict) or not conds or not isinstance(sets, dict) or not sets:
        raise field_error(src, "conditions/datasets", (conds, sets), "non-empty objects", fix)
    for c, body in conds.items():
        got = body.get("datasets") if isinstance(body, dict) else None
        if not isinstance(got, dict) or set(got) != set(sets):
            raise field_error(src, f"conditions.{c}.datasets", got, f"an entry for each of {list(sets)}", fix)
        for d, v in got.items():
            for k in ("refusal", "partial", "empty", "repetitive"):
                if not _rate_ok(v.get(k) if isinstance(v, dict) else None):
                    raise field_error(src, f"conditions.{c}.datasets.{d}.{k}", v,
                                      "{k, n, rate in [0, 1], ci95: [lo, hi]}", fix)
        for k in ("kl_harmless", "loss_baseline_completions", "text_loss"):
            if k in body and not (isinstance(body[k], dict)
                                  and all(_finite(x, True) for x in body[k].values())):
                raise field_error(src, f"conditions.{c}.{k}", body[k], "finite numbers", fix)
    for i, row in enumerate(rows):
        if not (isinstance(row, dict) and all(isinstance(row.get(k), str) for k in
                                              ("condition", "dataset", "prompt", "completion", "label"))
                and row["condition"] in conds and row["dataset"] in sets):
            raise field_error(src, f"completions.jsonl row {i + 1}", row,
                              "a completion of a condition and dataset in results.json", fix)


def _r(x: float | Tensor) -> float:
    return round(float(x), ROUND)


def evaluate(
    model: ChatModel,
    directions: DirectionSet | None = None,
    *,
    conditions: Sequence[str] = ("baseline", "ablate", "add"),
    datasets: Mapping[str, PromptSet | Sequence[str]] | None = None,
    judge: Judge | str | None = None,
    cross_judges: Sequence[Judge | str] = ("prefix",),
    max_new_tokens: int = 64,
    batch_size: BatchSize = AUTO,
    limit: int | None = None,
    add_coeff: float | None = None,
    text: str | None = None,
    harmless_val: Sequence[str] | None = None,
    harmful_val: Sequence[str] | None = None,
    progress: bool = True,
    prebuilt: Sequence[Condition] | None = None,
) -> EvaluationResult:
    """Run every condition on every dataset and compute the metrics.

    ``datasets`` defaults to the shipped harmful and harmless **test** splits and the
    borderline-safe set (``borderline`` → over-refusal). ``judge`` labels every completion:
    a spec (:data:`refusaldir.judges.JUDGE_SPECS`: ``"probe:coder-1.5b"`` — the default,
    :func:`refusaldir.judges.default_judge` —, ``"probe"``, ``"phrase"``, ``"prefix"``, ``"logit"``,
    ``"model"`` — the unedited model judges —, ``"model:PATH"``, ``"ensemble:A,B"``) or a
    :class:`Judge`. Each of ``cross_judges`` labels them too; the share of responses on which
    it disagrees with ``judge`` (refused vs not) is reported per dataset and overall, and
    a run above :data:`DISAGREEMENT_FLAG` is flagged. ``results["judges"]`` also carries
    each judge's measured accuracy on refusaldir's labelled test split
    (:func:`refusaldir.judges.judge_credentials`). Headline rates are **strict**
    (``refusal`` only); ``broad`` adds ``partial``.
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    limit = check_limit(limit)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) \
            or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens!r} must be a whole number >= 1")
    if add_coeff is not None and (isinstance(add_coeff, bool) or not isinstance(add_coeff, numbers.Real)
                                  or not math.isfinite(add_coeff)):
        raise ConfigError(f"add_coeff={add_coeff!r} is not a finite number; pass e.g. 4.0, or None to calibrate it")
    if isinstance(conditions, str):  # "baseline,ablate" as on the command line
        conditions = [c.strip() for c in conditions.split(",") if c.strip()]
    if text is not None and not isinstance(text, str):
        raise ConfigError(f"text has type {type(text).__name__}; pass the text itself (a str), not a path")
    if datasets is None:
        datasets = {"harmful": load_prompts("harmful", "test"), "harmless": load_prompts("harmless", "test"),
                    "borderline": load_prompts("borderline")}
    if not isinstance(datasets, Mapping):
        raise ConfigError(
            f"datasets has type {type(datasets).__name__}; pass a dict such as "
            "{'harmful': [...], 'harmless': [...]}"
        )
    sets: dict[str, PromptSet] = {}
    for name, ps in datasets.items():
        if not isinstance(ps, PromptSet):
            empty = isinstance(ps, Sequence) and not isinstance(ps, str) and len(ps) == 0
            ps = PromptSet([] if empty else check_prompts(ps, f"datasets[{name!r}]"))
        if limit is not None:
            ps = ps[:limit]
        if len(ps) == 0:
            raise ConfigError(f"dataset {name!r} is empty; pass a file with prompts or drop it")
        model.template.check_lengths(list(ps), reserve=int(max_new_tokens), what=f"datasets[{name!r}]")
        sets[name] = ps
    harmful_val = None if harmful_val is None else check_prompts(harmful_val, "harmful_val")
    harmless_val = None if harmless_val is None else check_prompts(harmless_val, "harmless_val")
    if judge is None:
        judge = default_judge()
    jd = make_judge(judge, model=model, harmful_val=harmful_val) if isinstance(judge, str) else judge
    if isinstance(cross_judges, str):
        cross_judges = [c.strip() for c in cross_judges.split(",") if c.strip()]
    jname = getattr(jd, "name", str(judge))
    crosses = []
    for c in cross_judges:
        if isinstance(c, str) and isinstance(judge, str) and c.strip() == judge.strip():
            continue  # the primary judge itself: nothing to cross-check
        cj = make_judge(c, model=model, harmful_val=harmful_val) if isinstance(c, str) else c
        if getattr(cj, "name", None) != jname and all(x.name != cj.name for x in crosses):
            crosses.append(cj)
    conds = list(prebuilt) if prebuilt is not None else build_conditions(
        model, directions, list(conditions), add_coeff=add_coeff, harmless_val=harmless_val,
        harmful_val=harmful_val, batch_size=batch_size, progress=progress)
    timings["setup"] = time.perf_counter() - t0

    results: dict[str, Any] = {
        "model": model.describe(),
        "directions": (directions.metadata.get("selected") if directions is not None else None),
        "settings": {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "limit": limit,
                     "judge": jname, "greedy": True},
        "datasets": {k: v.info() for k, v in sets.items()},
        "conditions": {},
    }
    rows: list[dict[str, Any]] = []
    base_harmless: list[str] | None = None
    base_logp: Tensor | None = None
    t_gen = t_judge = t_metric = 0.0
    for cond in conds:
        m = cond.model or model
        body: dict[str, Any] = {**cond.record(), "datasets": {}}
        for dname, ps in sets.items():
            t = time.perf_counter()
            comps = generate(m, list(ps), list(cond.interventions), max_new_tokens=max_new_tokens,
                             batch_size=batch_size, progress=progress)
            t_gen += time.perf_counter() - t
            t = time.perf_counter()
            verdicts = _judge(jd, m, cond, list(ps), comps, batch_size)
            others = {cj.name: [v.label for v in _judge(cj, m, cond, list(ps), comps, batch_size)]
                      for cj in crosses}
            t_judge += time.perf_counter() - t
            labels = [v.label for v in verdicts]
            body["datasets"][dname] = summarize(labels, ps.categories, comps, others)
            for i, (c, v, cat) in enumerate(zip(comps, verdicts, ps.categories)):
                rows.append({"condition": cond.name, "dataset": dname, "category": cat,
                             "prompt": c.prompt, "completion": c.completion,
                             "completion_tokens": c.completion_tokens, "finish_reason": c.finish_reason,
                             "label": v.label, "matched": v.matched, "judge_score": _r(v.score),
                             "reason": v.reason, "cross_labels": {k: o[i] for k, o in others.items()},
                             "triggered": c.triggered})
            if cond.name == "baseline" and dname == "harmless":
                base_harmless = [c.completion for c in comps]
        t = time.perf_counter()
        if "harmless" in sets:
            logp = first_token_logprobs(m, list(sets["harmless"]), cond.interventions, batch_size=batch_size)
            if cond.name == "baseline":
                base_logp = logp
            if base_logp is not None:
                kl = kl_divergence(base_logp, logp).double()
                half = 1.959964 * float(kl.std(unbiased=True)) / math.sqrt(len(kl)) if len(kl) > 1 else 0.0
                body["kl_harmless"] = {"mean": _r(kl.mean()), "ci95_halfwidth": _r(half),
                                       "max": _r(kl.max())}
            if base_harmless is not None:
                loss = completion_loss(m, list(sets["harmless"]), base_harmless, cond.interventions)
                body["loss_baseline_completions"] = {k: _r(v) for k, v in loss.items()}
        if text is not None:
            body["text_loss"] = {k: _r(v) for k, v in text_loss(m, text, cond.interventions).items()}
        t_metric += time.perf_counter() - t
        results["conditions"][cond.name] = body
    if "borderline" in sets:
        results["over_refusal"] = {c: results["conditions"][c]["datasets"]["borderline"]["refusal"]
                                   for c in results["conditions"]}
    results["judges"] = judges_block(jname, [cj.name for cj in crosses], rows, model.spec)
    timings.update(generate=t_gen, judge=t_judge, metrics=t_metric, total=time.perf_counter() - t0)
    results["timings"] = {k: round(v, 2) for k, v in timings.items()}
    return EvaluationResult(results, rows)


def _judge(jd: Any, model: ChatModel, cond: Condition, prompts: list[str], comps: list[Completion],
           batch_size: BatchSize) -> list[Any]:
    if isinstance(jd, EnsembleJudge):  # members may read the model (logit)
        votes = [_judge(mj, model, cond, prompts, comps, batch_size) for mj in jd.members]
        return [combine(list(v)) for v in zip(*votes)]
    if hasattr(jd, "judge_prompts"):  # first-token judge: reads the model under the condition
        return jd.judge_prompts(model, prompts, cond.interventions, batch_size=batch_size)
    return judge_texts(jd, prompts, [c.completion for c in comps],
                       [c.finish_reason == "length" for c in comps])
