"""Score refusaldir's judges on the labelled responses in tests/data/judge/ (issue #12) and
write their credentials (refusaldir/judges/data/credentials.json) and a Markdown report.

Every judge is scored on the **test** split (dev is for tuning); each source (a hand-written
style, or one PyPI model under one condition) is judged as one batch, as an evaluation
judges one condition, so the phrase judge's canned-answer check sees the whole source.

    python bench/judge_validate.py                              # text judges: seconds
    python bench/judge_validate.py --self-judge demo,smollm2    # + each model judging its own responses
    python bench/judge_validate.py --split dev                  # the tuning view (never reported)
    python bench/judge_validate.py --probe-features runs/judge/probe_features.pt   # + the probe judge
    python bench/judge_validate.py --probe coder-1.5b --probe-features runs/judge/probe_features_coder-1.5b.pt

Accuracy is "refused (refusal or partial) vs compliance"; 3-way agreement is exact label
agreement; both with Wilson 95% intervals.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from refusaldir.judges import (
    LABELS,
    EnsembleJudge,
    ModelJudge,
    PhraseJudge,
    PrefixJudge,
    confusion_matrix,
    refused,
)
from refusaldir.judges.credentials import CREDENTIALS_FILE
from refusaldir.judges.probe import ResponseProbe
from refusaldir.judges.probe_judge import ProbeJudge, merge_probe, probe_candidates
from refusaldir.judges.shipped import DEFAULT_PROBE, SHIPPED_PROBES
from refusaldir.stats import rate

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "judge"


def load_rows(split: str) -> tuple[list[dict[str, Any]], dict[str, str]]:
    rows, hashes = [], {}
    for f in sorted(DATA.glob("*.jsonl")):
        raw = f.read_bytes()
        hashes[f.name] = hashlib.sha256(raw).hexdigest()
        rows += [r for r in map(json.loads, raw.decode().splitlines()) if r["split"] == split]
    return rows, hashes


def row_sha(r: dict[str, Any]) -> str:
    """What a row's cached judge-model features depend on: its prompt and response."""
    return hashlib.sha256((r["prompt"] + "\0" + r["response"]).encode()).hexdigest()


def rows_features(d: dict[str, Any], rows: list[dict[str, Any]], layer: int) -> Any:
    """The cached judge-model features of ``rows`` at ``layer`` (each row checked unchanged)."""
    pos = {i: k for k, i in enumerate(d["ids"])}
    missing = [r["id"] for r in rows if r["id"] not in pos]
    if missing:
        raise SystemExit(f"{len(missing)} rows have no cached features (e.g. {missing[0]}); "
                         "run python bench/judge_probe.py features")
    changed = [r["id"] for r in rows if d["row_sha256"][pos[r["id"]]] != row_sha(r)]
    if changed:
        raise SystemExit(f"{len(changed)} rows changed since their features were cached (e.g. "
                         f"{changed[0]}); run python bench/judge_probe.py features")
    return d["feats"][[pos[r["id"]] for r in rows], d["layers"].index(layer)]


def score(rows: list[dict[str, Any]], preds: list[str]) -> dict[str, Any]:
    gold = [r["label"] for r in rows]
    out = {"n": len(rows),
           "accuracy": rate(sum(refused(g) == refused(p) for g, p in zip(gold, preds)), len(rows), 4),
           "agreement_3way": rate(sum(g == p for g, p in zip(gold, preds)), len(rows), 4),
           "confusion": confusion_matrix(gold, preds)}
    return out


def judge_by_source_full(judge: Any, rows: list[dict[str, Any]]) -> list[Any]:
    """Each source judged as one batch (as an evaluation judges one condition); Judgements
    in row order."""
    by: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        by[r["source"]].append(i)
    out: list[Any] = [None] * len(rows)
    for idx in by.values():
        js = judge.judge_many([rows[i]["prompt"] for i in idx], [rows[i]["response"] for i in idx])
        for i, j in zip(idx, js):
            out[i] = j
    return out


def judge_by_source(judge: Any, rows: list[dict[str, Any]]) -> list[str]:
    return [j.label for j in judge_by_source_full(judge, rows)]


def report(rows: list[dict[str, Any]], preds: list[str]) -> dict[str, Any]:
    out = score(rows, preds)
    by: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        by[r["source"]].append(i)
    out["by_source"] = {}
    for src, idx in sorted(by.items()):
        s = score([rows[i] for i in idx], [preds[i] for i in idx])
        out["by_source"][src] = {k: s[k] for k in ("n", "accuracy", "agreement_3way")}
    return out


def markdown(name: str, r: dict[str, Any]) -> str:
    def pct(x: dict[str, Any]) -> str:
        return f"{x['rate']:.3f} [{x['ci95'][0]:.3f}, {x['ci95'][1]:.3f}]"
    lines = [f"### {name}: accuracy {pct(r['accuracy'])}, 3-way {pct(r['agreement_3way'])} "
             f"(n={r['n']})", "", "| source | n | accuracy | 3-way |", "|---|---:|---:|---:|"]
    for src, s in r["by_source"].items():
        lines.append(f"| {src} | {s['n']} | {s['accuracy']['rate']:.3f} | {s['agreement_3way']['rate']:.3f} |")
    lines += ["", "| human \\ judge | " + " | ".join(LABELS) + " |", "|---|" + "---:|" * len(LABELS)]
    for g in LABELS:
        lines.append(f"| {g} | " + " | ".join(str(r["confusion"][g][p]) for p in LABELS) + " |")
    return "\n".join(lines) + "\n"


def probe_folder(arg: str) -> tuple[Path, str | None]:
    """``--probe``: a shipped probe's name (``demo``, ``coder-1.5b``) or a folder; returns the
    folder and the shipped name (None for another folder)."""
    if arg in SHIPPED_PROBES:
        return SHIPPED_PROBES[arg], arg
    folder = Path(arg).resolve()
    return folder, next((k for k, v in SHIPPED_PROBES.items() if v == folder), None)


def nested_report(shipped: str | None, cache: Path) -> Path:
    """bench/judge_probe.py nested's report for this probe: in bench/ for a shipped probe,
    else beside its feature cache."""
    if shipped == "demo":
        return Path(__file__).resolve().parent / "judge_probe_nested.json"
    if shipped is not None:
        return Path(__file__).resolve().parent / f"judge_probe_{shipped}_nested.json"
    return cache.with_name(f"{cache.stem}_nested.json")


def probe_labels(rows: list[dict[str, Any]], cache: Path, folder: Path = DEFAULT_PROBE) -> list[str]:
    """The probe judge's labels (the probe in ``folder``), with the judge model's features read
    from ``cache`` (the phrase judge runs per source as usual; the probe decides what it calls
    compliance)."""
    import torch

    d = torch.load(cache, weights_only=True)
    probe = ResponseProbe.load(folder)
    if d["model"]["weights_hash"] != probe.judge_model.get("weights_hash") or (
            d["prompt_chars"], d["response_chars"]) != (probe.prompt_chars, probe.response_chars):
        raise SystemExit(f"{cache} was read from another judge model or cut than the probe in {folder}")
    x = rows_features(d, rows, probe.layer)
    p = probe.score_features(x).tolist()
    phrase = judge_by_source_full(PhraseJudge(), rows)
    ask = probe_candidates(phrase, [r["response"] for r in rows],
                           [r.get("finish_reason") == "length" for r in rows], ProbeJudge.MIN_WORDS)
    return [j.label for j in merge_probe(phrase, {i: p[i] for i in ask}, probe.threshold)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default="test", choices=["dev", "test"])
    ap.add_argument("--self-judge", default="", help="comma-separated shipped models (demo,smollm2)")
    ap.add_argument("--self-every", type=int, default=1,
                    help="self-judge every k-th of the model's own responses (CPU time)")
    ap.add_argument("--probe-features", type=Path,
                    help="score the shipped probe judge from this feature cache (bench/judge_probe.py features)")
    ap.add_argument("--probe", default="demo",
                    help="the probe to score with --probe-features: a shipped one "
                         f"({', '.join(SHIPPED_PROBES)}; default demo) or a folder")
    ap.add_argument("--write", action="store_true", help="write judges/data/credentials.json (test split only)")
    ap.add_argument("--md", type=Path, help="also write the Markdown report here")
    args = ap.parse_args()
    rows, hashes = load_rows(args.split)
    folder, shipped = probe_folder(args.probe)
    if args.write and shipped is None:
        raise SystemExit("--write records the shipped judges' credentials; drop --probe or --write")
    probe_name = "probe" if shipped in (None, "demo") else f"probe:{shipped}"
    results: dict[str, Any] = {}
    md = []
    for judge in (PhraseJudge(), PrefixJudge(), EnsembleJudge([PhraseJudge(), PrefixJudge()])):
        t = time.perf_counter()
        results[judge.name] = report(rows, judge_by_source(judge, rows))
        results[judge.name]["seconds"] = round(time.perf_counter() - t, 2)
        md.append(markdown(judge.name, results[judge.name]))
    if args.probe_features:
        t = time.perf_counter()
        res = results[probe_name] = report(rows, probe_labels(rows, args.probe_features, folder))
        res["seconds"] = round(time.perf_counter() - t, 2)
        res["measured_on"] = "features cached by bench/judge_probe.py features"
        probe = ResponseProbe.load(folder)
        res["probe_tensors_sha256"] = json.loads((folder / "probe.json").read_text())["tensors_sha256"]
        res["judge_model"] = probe.judge_model.get("spec")
        pick = probe.training.get("pick", {})
        nested_file = nested_report(shipped, args.probe_features)
        nested = json.loads(nested_file.read_text()) if nested_file.is_file() else {}
        res["dev_cv_sources_held_out"] = {
            "probe": nested.get("probe"), "phrase": nested.get("phrase"),
            "best_of_grid": pick.get("cv_accuracy"),
            "note": "dev split, whole sources held out, the choice of layer/L2/threshold redone "
                    "inside each fold (bench/judge_probe.py nested): what to expect on text from "
                    "new models or styles; best_of_grid is the optimistic score of the shipped pick"}
        md.append(markdown(probe_name, res))
    for model in filter(None, args.self_judge.split(",")):
        own = [r for r in rows if r.get("model") == model][:: args.self_every]
        t = time.perf_counter()
        judge = ModelJudge(model, batch_size=4, name="model:self")
        preds = judge_by_source(judge, own)
        res = report(own, preds)
        res["seconds"] = round(time.perf_counter() - t, 2)
        res["measured_on"] = f"every {args.self_every}. of {model}'s own {args.split} responses"
        phrase = report(own, judge_by_source(PhraseJudge(), own))
        res["phrase_on_same_rows"] = {k: phrase[k] for k in ("n", "accuracy", "agreement_3way")}
        results.setdefault("model:self", {"per_model": {}})["per_model"][model] = res
        md.append(markdown(f"model:self on {model}", res))
    text = "\n".join(md)
    print(text)
    if args.md:
        args.md.write_text(text, encoding="utf-8")
    if args.write:
        if args.split != "test":
            raise SystemExit("--write records test-split credentials only")
        old = json.loads(CREDENTIALS_FILE.read_text()) if CREDENTIALS_FILE.is_file() else {}
        for slow, entry in old.get("judges", {}).items():  # keep the slow measurements
            if slow not in results and (slow == "model:self" or slow.startswith("probe")):
                results[slow] = entry
        body = {"_about": "written by bench/judge_validate.py --write; test split of tests/data/judge",
                "labelled_set": {"split": "test", "n": len(rows), "files_sha256": hashes},
                "judges": results}
        CREDENTIALS_FILE.write_text(json.dumps(body, indent=1, sort_keys=True) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
