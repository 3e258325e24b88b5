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

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from refusaldir.errors import ConfigError
from refusaldir.steer.interventions import applied_all
from refusaldir.stats import wilson_interval

if TYPE_CHECKING:
    from refusaldir.directions import DirectionSet
    from refusaldir.generation import Completion
    from refusaldir.judges.phrase import Judge
    from refusaldir.models import ChatModel
    from refusaldir.data.prompts import PromptSet

CONDITIONS = ("baseline", "ablate", "add", "subtract", "ortho", "conditional")
NEEDS_DIRECTIONS = frozenset(CONDITIONS) - {"baseline"}
ROUND = 6


@dataclass
class Condition:
    """A named way of running the model: interventions on it, or another model (``ortho``)."""

    name: str
    interventions: tuple[Any, ...] = ()
    model: ChatModel | None = None
    description: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return {"description": self.description,
                "interventions": [i.to_dict() for i in self.interventions], **self.info}


def build_conditions(
    model: ChatModel,
    directions: DirectionSet | None,
    names: Sequence[str],
    *,
    add_coeff: float | None = None,
    harmless_val: Sequence[str] | None = None,
    harmful_val: Sequence[str] | None = None,
    target_rate: float = 0.8,
    target_fpr: float = 0.05,
    batch_size: int = 16,
    progress: bool = False,
) -> list[Condition]:
    """Turn condition names into :class:`Condition` objects (calibrating where needed).

    The refusal direction is the set's selected one, else the layer chosen by
    :func:`refusaldir.interventions.default_layer` at the last post-instruction position.
    ``add_coeff=None`` calibrates the addition coefficient on ``harmless_val`` for
    ``target_rate`` induced refusal (:func:`refusaldir.interventions.calibrate_addition`).
    """
    from refusaldir.steer.interventions import (
        Ablation,
        Addition,
        calibrate_addition,
        calibrate_conditional,
        default_layer,
    )

    unknown = [n for n in names if n not in CONDITIONS]
    if unknown:
        raise ConfigError(
            f"unknown condition(s) {unknown}; choose from {', '.join(CONDITIONS)}"
        )
    if not names:
        raise ConfigError(f"no conditions given; choose from {', '.join(CONDITIONS)}")
    needing = [n for n in names if n in NEEDS_DIRECTIONS]
    if needing and directions is None:
        raise ConfigError(
            f"condition(s) {needing} need refusal directions; pass --directions RUN_DIR "
            "(from `refusaldir extract`)"
        )
    out: list[Condition] = []
    direction = None
    coeff = add_coeff
    calib: dict[str, Any] | None = None
    if needing:
        assert directions is not None
        directions.check_model(model)
        if directions.selected is not None:
            direction = directions.refusal_direction()
            how = "selected"
        else:
            layer = default_layer(model, directions, harmful_val, harmless_val,
                                  batch_size=batch_size, progress=progress)
            direction = directions.refusal_direction(layer, directions.positions[-1])
            how = "default_layer (best val AUROC below 0.8·n_layers)"
        if coeff is None and any(n in ("add", "subtract", "conditional") for n in names):
            cal = calibrate_addition(model, direction, harmless_val, target_rate,
                                     batch_size=batch_size, progress=progress)
            coeff = cal.coeff
            calib = cal.to_dict()
            calib.pop("addition", None)
        if coeff is not None and not math.isfinite(coeff):
            raise ConfigError(f"add_coeff={coeff} is not finite; pass a real number")
    for name in names:
        if name == "baseline":
            out.append(Condition(name, description="unmodified model"))
            continue
        assert direction is not None
        src = {"direction": direction.to_dict(), "direction_choice": how}
        if name == "ablate":
            out.append(Condition(name, (Ablation(direction),),
                                 description=f"directional ablation (layer {direction.layer}, pos {direction.pos}) at every layer",
                                 info=src))
        elif name in ("add", "subtract"):
            sign = 1.0 if name == "add" else -1.0
            out.append(Condition(name, (Addition(direction, coeff=sign * float(coeff)),),  # type: ignore[arg-type]
                                 description=f"activation addition ×{sign * float(coeff):+.3g} at layer {direction.layer}",  # type: ignore[arg-type]
                                 info={**src, "coeff": sign * float(coeff), "calibration": calib}))  # type: ignore[arg-type]
        elif name == "ortho":
            from refusaldir.models import load_model
            from refusaldir.steer.orthogonalize import orthogonalize

            ortho = load_model(orthogonalize(model, direction), tokenizer=model.tokenizer,
                               system_prompt=model.system_prompt, chat_template=model.chat_template)
            out.append(Condition(name, model=ortho, info=src,
                                 description="weights orthogonalized to the refusal direction"))
        elif name == "conditional":
            assert directions is not None
            cs = calibrate_conditional(model, directions, Addition(direction, coeff=float(coeff)),  # type: ignore[arg-type]
                                       harmless_val, target_fpr=target_fpr, harmful_val=harmful_val,
                                       batch_size=batch_size, progress=progress)
            out.append(Condition(name, (cs,), info={**src, "calibration": cs.calibration},
                                 description=f"addition ×{float(coeff):+.3g} only where the harmfulness "  # type: ignore[arg-type]
                                             f"projection (layer {cs.layer}) exceeds {cs.threshold:.3g}"))
    return out


# ------------------------------------------------------------------ measurements
def first_token_logprobs(
    model: ChatModel, prompts: Sequence[str], interventions: Sequence[Any] = (), *, batch_size: int = 16
) -> Float[Tensor, "batch vocab"]:
    """Log-probabilities of the first generated token (LM head at the last position only)."""
    rows = []
    decoder = model.hf.get_decoder()
    head = model.hf.get_output_embeddings()
    with applied_all(model, interventions), torch.inference_mode():
        for s in range(0, len(prompts), batch_size):
            enc = {k: v.to(model.device) for k, v in model.template.encode(list(prompts[s : s + batch_size])).items()}
            hidden = decoder(**enc, use_cache=False).last_hidden_state[:, -1]
            rows.append(torch.log_softmax(head(hidden).float(), dim=-1).cpu())
    return torch.cat(rows)


def kl_divergence(p_log: Tensor, q_log: Tensor) -> Tensor:
    """Per-row KL(p ‖ q) from log-probabilities."""
    return (p_log.exp() * (p_log - q_log)).sum(-1).clamp_min(0)


def completion_loss(
    model: ChatModel,
    prompts: Sequence[str],
    completions: Sequence[str],
    interventions: Sequence[Any] = (),
    *,
    batch_size: int = 8,
) -> dict[str, float]:
    """Token-weighted cross-entropy of ``completions`` given their prompts (teacher forcing)."""
    tok = model.tokenizer
    total, count = 0.0, 0
    with applied_all(model, interventions), torch.inference_mode():
        for s in range(0, len(prompts), batch_size):
            p_enc = model.template.encode(list(prompts[s : s + batch_size]))
            rows, targets = [], []
            for i, comp in enumerate(completions[s : s + batch_size]):
                p_ids = p_enc["input_ids"][i][p_enc["attention_mask"][i].bool()].tolist()
                c_ids = tok(comp, add_special_tokens=False)["input_ids"]
                if not c_ids:
                    continue
                rows.append(p_ids + c_ids)
                targets.append(len(c_ids))
            if not rows:
                continue
            width = max(len(r) for r in rows)
            pad = tok.pad_token_id
            ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model.hf(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                              position_ids=pos.to(model.device), use_cache=False).logits.float().cpu()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            nxt = ids[:, 1:]
            tok_lp = logp.gather(-1, nxt.unsqueeze(-1)).squeeze(-1)
            for r, n in enumerate(targets):
                total -= float(tok_lp[r, -n:].sum())
                count += n
    ce = total / count if count else float("nan")
    return {"ce": ce, "ppl": math.exp(ce) if count else float("nan"), "tokens": count}


def text_loss(
    model: ChatModel, text: str, interventions: Sequence[Any] = (), *, chunk: int = 256,
    max_tokens: int = 4096, batch_size: int = 4,
) -> dict[str, float]:
    """Cross-entropy on plain text (no chat template), in chunks of ``chunk`` tokens."""
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    if len(ids) < 2:
        raise ConfigError("the text file has fewer than 2 tokens; pass a longer plain-text file")
    pieces = [ids[i : i + chunk] for i in range(0, len(ids), chunk) if len(ids[i : i + chunk]) > 1]
    total, count = 0.0, 0
    with applied_all(model, interventions), torch.inference_mode():
        for s in range(0, len(pieces), batch_size):
            batch = pieces[s : s + batch_size]
            width = max(len(p) for p in batch)
            pad = model.tokenizer.pad_token_id
            x = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model.hf(input_ids=x.to(model.device), attention_mask=mask.to(model.device),
                              position_ids=pos.to(model.device), use_cache=False).logits.float().cpu()
            lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, x[:, 1:].unsqueeze(-1)).squeeze(-1)
            valid = mask[:, 1:].bool() & mask[:, :-1].bool()
            total -= float(lp[valid].sum())
            count += int(valid.sum())
    ce = total / count
    return {"ce": ce, "ppl": math.exp(ce), "tokens": count}


def is_repetitive(text: str, n: int = 4, threshold: float = 0.5) -> bool:
    """True when more than ``threshold`` of the word ``n``-grams are repeats (degenerate loops)."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if len(grams) < 4:
        return False
    return 1 - len(set(grams)) / len(grams) > threshold


def _rate(k: int, n: int) -> dict[str, Any]:
    lo, hi = wilson_interval(k, n)
    return {"k": k, "n": n, "rate": round(k / n, ROUND) if n else None,
            "ci95": [round(lo, ROUND), round(hi, ROUND)]}


def summarize(
    labels: Sequence[str], categories: Sequence[str | None], completions: Sequence[Completion]
) -> dict[str, Any]:
    """Refusal/partial rates (Wilson 95%) overall and per category, plus coherence guards."""
    n = len(labels)
    out = {
        "n": n,
        "refusal": _rate(sum(lab == "refusal" for lab in labels), n),
        "partial": _rate(sum(lab == "partial" for lab in labels), n),
        "empty": _rate(sum(not c.completion.strip() for c in completions), n),
        "repetitive": _rate(sum(is_repetitive(c.completion) for c in completions), n),
        "mean_completion_tokens": round(sum(c.completion_tokens for c in completions) / max(n, 1), 3),
    }
    by_cat: dict[str, list[str]] = {}
    for lab, cat in zip(labels, categories):
        by_cat.setdefault(cat or "uncategorized", []).append(lab)
    out["by_category"] = {c: _rate(sum(x == "refusal" for x in labs), len(labs))
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
        """``summary[condition][dataset]`` → ``{"refusal_rate", "ci95", …}`` (flat view)."""
        return {
            c: {d: {"refusal_rate": v["refusal"]["rate"], "ci95": v["refusal"]["ci95"], "n": v["n"]}
                for d, v in body["datasets"].items()}
            for c, body in self.results["conditions"].items()
        }

    def markdown(self) -> str:
        """A Markdown table: refusal rate [95% CI] per condition and dataset, KL and loss."""
        res = self.results
        datasets = list(res["datasets"])
        head = ["condition", *[f"{d} refusal [95% CI]" for d in datasets], "KL (harmless)",
                "CE on baseline completions", "empty / repetitive"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, body in res["conditions"].items():
            cells = [name]
            for d in datasets:
                r = body["datasets"][d]["refusal"]
                cells.append(f"{100 * r['rate']:.1f}% [{100 * r['ci95'][0]:.1f}, {100 * r['ci95'][1]:.1f}] (n={r['n']})")
            kl = body.get("kl_harmless")
            cells.append(f"{kl['mean']:.4f} ± {kl['ci95_halfwidth']:.4f}" if kl else "—")
            loss = body.get("loss_baseline_completions")
            cells.append(f"{loss['ce']:.3f} (ppl {loss['ppl']:.2f})" if loss else "—")
            emp = [body["datasets"][d]["empty"]["rate"] for d in datasets]
            rep = [body["datasets"][d]["repetitive"]["rate"] for d in datasets]
            cells.append(f"{100 * max(emp):.1f}% / {100 * max(rep):.1f}%")
            lines.append("| " + " | ".join(cells) + " |")
        if "text_loss" in next(iter(res["conditions"].values()), {}):
            lines.append("")
            lines.append("| condition | CE on text file | ppl |")
            lines.append("|---|---|---|")
            for name, body in res["conditions"].items():
                t = body["text_loss"]
                lines.append(f"| {name} | {t['ce']:.3f} | {t['ppl']:.2f} |")
        return "\n".join(lines) + "\n"

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``results.json``, ``completions.jsonl`` and ``results.md`` (atomically)."""
        from refusaldir.directions import _ensure_writable, _tmp_in

        out = Path(folder)
        _ensure_writable(out)
        files = {
            "results.json": json.dumps(self.results, indent=2, sort_keys=True) + "\n",
            "completions.jsonl": "".join(json.dumps(c, sort_keys=True) + "\n" for c in self.completions),
            "results.md": self.markdown(),
        }
        for name, text in files.items():
            tmp = _tmp_in(out, name)
            tmp.write_text(text)
            os.replace(tmp, out / name)
        return out


def _r(x: float) -> float:
    return round(float(x), ROUND)


def evaluate(
    model: ChatModel,
    directions: DirectionSet | None = None,
    *,
    conditions: Sequence[str] = ("baseline", "ablate", "add"),
    datasets: Mapping[str, PromptSet | Sequence[str]] | None = None,
    judge: Judge | str = "phrase",
    max_new_tokens: int = 64,
    batch_size: int = 16,
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
    borderline-safe set (``borderline`` → over-refusal). ``judge`` is ``"phrase"``,
    ``"logit"`` (first-token refusal log-odds), ``"model:PATH"`` or a :class:`Judge`.
    """
    from refusaldir.generation import generate
    from refusaldir.judges.phrase import make_judge
    from refusaldir.data.prompts import PromptSet, load_prompts

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if datasets is None:
        datasets = {"harmful": load_prompts("harmful", "test"), "harmless": load_prompts("harmless", "test"),
                    "borderline": load_prompts("borderline")}
    sets: dict[str, PromptSet] = {}
    for name, ps in datasets.items():
        ps = ps if isinstance(ps, PromptSet) else PromptSet(list(ps))
        if limit is not None:
            ps = ps[:limit]
        if len(ps) == 0:
            raise ConfigError(f"dataset {name!r} is empty; pass a file with prompts or drop it")
        sets[name] = ps
    if int(max_new_tokens) < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens} must be >= 1")
    jd = make_judge(judge, model=model, harmful_val=harmful_val) if isinstance(judge, str) else judge
    conds = list(prebuilt) if prebuilt is not None else build_conditions(
        model, directions, list(conditions), add_coeff=add_coeff, harmless_val=harmless_val,
        harmful_val=harmful_val, batch_size=batch_size, progress=progress)
    timings["setup"] = time.perf_counter() - t0

    results: dict[str, Any] = {
        "model": model.describe(),
        "directions": (directions.metadata.get("selected") if directions is not None else None),
        "settings": {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "limit": limit,
                     "judge": getattr(jd, "name", str(judge)), "greedy": True},
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
            verdicts = _judge(jd, m, cond, list(ps), [c.completion for c in comps], batch_size)
            t_judge += time.perf_counter() - t
            labels = [v.label for v in verdicts]
            body["datasets"][dname] = summarize(labels, ps.categories, comps)
            for c, v, cat in zip(comps, verdicts, ps.categories):
                rows.append({"condition": cond.name, "dataset": dname, "category": cat,
                             "prompt": c.prompt, "completion": c.completion,
                             "completion_tokens": c.completion_tokens, "finish_reason": c.finish_reason,
                             "label": v.label, "matched": v.matched, "judge_score": _r(v.score),
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
    timings.update(generate=t_gen, judge=t_judge, metrics=t_metric, total=time.perf_counter() - t0)
    results["timings"] = {k: round(v, 2) for k, v in timings.items()}
    return EvaluationResult(results, rows)


def _judge(jd: Any, model: ChatModel, cond: Condition, prompts: list[str], responses: list[str],
           batch_size: int) -> list[Any]:
    if hasattr(jd, "judge_prompts"):  # first-token judge: reads the model under the condition
        return jd.judge_prompts(model, prompts, cond.interventions, batch_size=batch_size)
    return jd.judge_many(prompts, responses)
