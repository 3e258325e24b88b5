"""Train the probe judge (refusaldir/judges/probe.py) on the **dev** split of the labelled
responses in tests/data/judge/, choosing its layer, L2 strength and threshold by cross-validation that
holds out whole sources (a hand-written style, or one model under one condition), and ship it
to refusaldir/judges/data/probe/. The test split is never read here.

    python bench/judge_probe.py features   # judge-model features of rows not yet cached (all: ~50 min on 2 cores)
    python bench/judge_probe.py cv         # the layer x L2 grid on dev, sources held out
    python bench/judge_probe.py train      # fit on dev (but HELD_BACK_SETS) with the CV choice; write the probe
    python bench/judge_probe.py nested     # nested CV: the whole choice redone inside each fold (~15 min)
    python bench/judge_probe.py added      # do the held-back dev rows help? (dev only; writes a json)

The larger shipped judge model (`--judge probe:coder-1.5b`, Qwen2.5-Coder-1.5B-Instruct in
bfloat16; features of all 2,825 rows in 72 min on 2 cores), the same steps with `--probe coder-1.5b`:

    python bench/judge_probe.py --probe coder-1.5b features
    python bench/judge_probe.py --probe coder-1.5b nested
    python bench/judge_probe.py --probe coder-1.5b train

Another judge model (the route to a stronger probe judge: `--judge probe:DIR`):

    python bench/judge_probe.py --cache runs/judge/big.pt features --model PATH
    python bench/judge_probe.py --cache runs/judge/big.pt nested
    python bench/judge_probe.py --cache runs/judge/big.pt train --out runs/judge/big_probe
    python bench/judge_validate.py --probe runs/judge/big_probe --probe-features runs/judge/big.pt

`cv` reports the best of the grid on the folds it was picked on, an optimistic number;
`nested` repeats the choice inside each outer fold and scores the held-out sources only, the
estimate to expect on text from a new model or style. It writes bench/judge_probe_nested.json,
which judge_validate.py copies into the credentials.

Features are cached in runs/judge/probe_features.pt (rows by id; the rubric hash and the
character limits are checked on reuse). bench/judge_validate.py --probe-features scores the
shipped probe on the test split from the same cache.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from refusaldir.io import sha256_bytes
from refusaldir.judges import PhraseJudge, refused
from refusaldir.judges.model import RUBRIC
from refusaldir.judges.probe import ResponseProbe, probe_features
from refusaldir.judges.probe_judge import ProbeJudge, merge_probe, probe_candidates
from refusaldir.judges.shipped import SHIPPED_PROBES

sys.path.insert(0, str(Path(__file__).resolve().parent))
from judge_validate import judge_by_source_full, load_rows, row_sha, rows_features  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "runs" / "judge" / "probe_features.pt"


@dataclass(frozen=True)
class Shipped:
    """A shipped probe: the judge model it reads, its feature cache and its dev reports."""

    model: str
    dtype: str | None
    cache: Path
    nested: Path
    added: Path


SHIPPED = {
    "demo": Shipped("demo", None, CACHE, ROOT / "bench" / "judge_probe_nested.json",
                    ROOT / "bench" / "judge_probe_added.json"),
    "coder-1.5b": Shipped("coder-1.5b", "bfloat16", CACHE.with_name("probe_features_coder-1.5b.pt"),
                          ROOT / "bench" / "judge_probe_coder-1.5b_nested.json",
                          ROOT / "bench" / "judge_probe_coder-1.5b_added.json"),
}
#: Dev rows held out of probe training: 300 answers of the edited models to the *train*
#: prompts, labelled later to teach the probe the ablated models' deflections. `added` shows
#: (dev only) that training on them does not help on the other dev rows, and that the probe
#: stays weak on them either way; they stay in dev as a measurement of that hard case.
HELD_BACK_SETS = ("harmful-train", "harmless-train")
L2 = (1e-3, 1e-2, 1e-1)
THRESHOLDS = (0.5, 0.7, 0.9)
FOLDS = 5
PROMPT_CHARS, RESPONSE_CHARS = 600, 800


def default_layers(n_layers: int) -> list[int]:
    """Layers the grid searches: from a sixth to three quarters of the depth (4-18 for demo)."""
    return list(range(n_layers // 6, 3 * n_layers // 4 + 1))


def grid_layers(d: dict[str, Any]) -> list[int]:
    """The cached layers the grid searches (a cache may hold more)."""
    return [layer for layer in default_layers(d["model"]["n_layers"]) if layer in d["layers"]]


def probe_rows() -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The dev rows the probe is chosen and trained on (all of dev but HELD_BACK_SETS)."""
    rows, hashes = load_rows("dev")
    return [r for r in rows if r.get("set") not in HELD_BACK_SETS], hashes


def _stale(d: dict[str, Any]) -> str | None:
    if d["rubric_sha256"] != sha256_bytes(RUBRIC) or (d["prompt_chars"], d["response_chars"]) != (
            PROMPT_CHARS, RESPONSE_CHARS):
        return "another rubric or cut"
    return None


def load_features(path: Path | None = None) -> dict[str, Any]:
    path = path or CACHE
    if not path.is_file():
        raise SystemExit(f"no feature cache at {path}; run python bench/judge_probe.py "
                         f"--cache {path} features --model ...")
    d = torch.load(path, weights_only=True)
    why = _stale(d)
    if why:
        raise SystemExit(f"{path} was computed with {why}; run `features --all`")
    return d


def cmd_features(args: argparse.Namespace) -> None:
    import refusaldir as rd
    cache = args.cache
    rows = load_rows("dev")[0] + load_rows("test")[0]
    shipped = next((v for v in SHIPPED.values() if v.cache == cache), None)
    spec = args.model or (shipped.model if shipped else "demo")
    dtype = args.dtype or (shipped.dtype if shipped else None)
    if shipped is not None and (spec, dtype or "float32") != (shipped.model, shipped.dtype or "float32"):
        raise SystemExit(f"{cache} holds the {shipped.model} ({shipped.dtype or 'float32'}) "
                         f"features of a shipped probe; pass --cache FILE for {spec} ({dtype})")
    model = rd.load_model(spec, dtype=dtype)
    info = model.describe()
    old = torch.load(cache, weights_only=True) if cache.is_file() and not args.all else None
    if old is not None:
        same_model = all(old["model"].get(k) == info[k] for k in ("spec", "weights_hash", "dtype"))
        why = _stale(old) or (None if same_model else "another judge model or dtype")
        if why:
            print(f"{cache} was computed with {why}: recomputing every row")
            old = None
    if old is not None:  # keep cached rows whose prompt and response are unchanged
        now = {r["id"]: row_sha(r) for r in rows}
        keep = [k for k, (i, h) in enumerate(zip(old["ids"], old["row_sha256"])) if h == now.get(i)]
        have = {old["ids"][k] for k in keep}
        rows = [r for r in rows if r["id"] not in have]
        if not rows:
            print(f"all rows already in {cache}")
            return
    layers = old["layers"] if old is not None else default_layers(model.n_layers)
    t = time.perf_counter()
    x = probe_features(model, [r["prompt"] for r in rows], [r["response"] for r in rows],
                       layers=layers, prompt_chars=PROMPT_CHARS, response_chars=RESPONSE_CHARS,
                       batch_size=8, progress=True)
    ids, shas = [r["id"] for r in rows], [row_sha(r) for r in rows]
    if old is not None:
        ids = [old["ids"][k] for k in keep] + ids
        shas = [old["row_sha256"][k] for k in keep] + shas
        x = torch.cat([old["feats"][keep], x])
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"ids": ids, "row_sha256": shas, "layers": layers, "feats": x,
                "rubric_sha256": sha256_bytes(RUBRIC), "prompt_chars": PROMPT_CHARS,
                "response_chars": RESPONSE_CHARS, "model": info}, cache)
    print(f"{len(rows)} new rows, {time.perf_counter() - t:.0f} s -> {cache} ({len(ids)} rows)")


def _fold(source: str) -> int:
    return int(hashlib.sha256(source.encode()).hexdigest(), 16) % FOLDS


def cv_table(d: dict[str, Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    phrase = judge_by_source_full(PhraseJudge(), rows)
    y = [refused(r["label"]) for r in rows]
    acc = sum(refused(j.label) == g for j, g in zip(phrase, y)) / len(rows)
    table = [{"layer": None, "l2": None, "threshold": None, "cv_accuracy": round(acc, 4),
              "phrase_only": True}]
    print(f"phrase judge alone: accuracy {acc:.4f}")
    folds = [_fold(r["source"]) for r in rows]
    ask = set(probe_candidates(phrase, [r["response"] for r in rows],
                               [r.get("finish_reason") == "length" for r in rows], ProbeJudge.MIN_WORDS))
    for layer in grid_layers(d):
        x = rows_features(d, rows, layer)
        for l2 in L2:
            p: dict[int, float] = {}
            for f in range(FOLDS):
                tr = [i for i in range(len(rows)) if folds[i] != f]
                te = [i for i in range(len(rows)) if folds[i] == f]
                probe = ResponseProbe.fit_features(x[tr], [y[i] for i in tr], layer=layer, l2=l2)
                p.update((i, v) for i, v in zip(te, probe.score_features(x[te]).tolist()) if i in ask)
            for t in THRESHOLDS:
                preds = merge_probe(phrase, p, t)
                acc = sum(refused(j.label) == g for j, g in zip(preds, y)) / len(rows)
                three = sum(j.label == r["label"] for j, r in zip(preds, rows)) / len(rows)
                table.append({"layer": layer, "l2": l2, "threshold": t, "cv_accuracy": round(acc, 4),
                              "cv_agreement_3way": round(three, 4)})
                print(f"layer {layer:2d} l2 {l2:g} threshold {t}: accuracy {acc:.4f}, 3-way {three:.4f}",
                      flush=True)
    return table


def best(table: list[dict[str, Any]]) -> dict[str, Any]:
    probes = [r for r in table if not r.get("phrase_only")]
    return max(probes, key=lambda r: (r["cv_accuracy"], r["cv_agreement_3way"], r["l2"], r["threshold"],
                                      -r["layer"]))


def cmd_nested(args: argparse.Namespace) -> None:
    rows = probe_rows()[0]
    d = load_features(args.cache)
    layers = grid_layers(d)
    phrase = judge_by_source_full(PhraseJudge(), rows)
    y = [refused(r["label"]) for r in rows]
    pr = [refused(j.label) for j in phrase]
    ask = set(probe_candidates(phrase, [r["response"] for r in rows],
                               [r.get("finish_reason") == "length" for r in rows], ProbeJudge.MIN_WORDS))
    folds = [_fold(r["source"]) for r in rows]
    x = {layer: rows_features(d, rows, layer) for layer in layers}

    def correct(idx: list[int], p: dict[int, float], t: float) -> int:
        return sum((pr[i] or (i in p and p[i] > t)) == y[i] for i in idx)

    def scores(tr: list[int], te: list[int], layer: int, l2: float) -> dict[int, float]:
        probe = ResponseProbe.fit_features(x[layer][tr], [y[i] for i in tr], layer=layer, l2=l2)
        return {i: v for i, v in zip(te, probe.score_features(x[layer][te]).tolist()) if i in ask}

    right = right_phrase = 0
    picks = []
    for outer in range(FOLDS):
        train = [i for i in range(len(rows)) if folds[i] != outer]
        test = [i for i in range(len(rows)) if folds[i] == outer]
        best: tuple[Any, ...] | None = None
        for layer in layers:
            for l2 in L2:
                p: dict[int, float] = {}
                for f in sorted({folds[i] for i in train}):
                    p.update(scores([i for i in train if folds[i] != f], [i for i in train if folds[i] == f],
                                    layer, l2))
                for t in THRESHOLDS:
                    key = (correct(train, p, t), l2, t, -layer)
                    if best is None or key > best[0]:
                        best = (key, layer, l2, t)
        assert best is not None
        _, layer, l2, t = best
        right += correct(test, scores(train, test, layer, l2), t)
        right_phrase += sum(pr[i] == y[i] for i in test)
        picks.append({"outer": outer, "n": len(test), "layer": layer, "l2": l2, "threshold": t})
        print(picks[-1], flush=True)
    out = {"probe": round(right / len(rows), 4), "phrase": round(right_phrase / len(rows), 4),
           "n": len(rows), "folds": FOLDS, "picks": picks, "judge_model": d["model"].get("spec"),
           "note": "dev split; each outer fold holds out whole sources and the layer/L2/threshold "
                   "choice is redone on the other folds: the accuracy to expect on new sources"}
    report_path(args, "nested").write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(out))


def cmd_added(args: argparse.Namespace) -> None:
    """Dev only: out-of-fold accuracy of the probe judge at the shipped pick, trained without
    and with the held-back rows, scored on the other dev rows and on the held-back ones."""
    rows = load_rows("dev")[0]
    pick = ResponseProbe.load().training["pick"]
    layer, l2, t = pick["layer"], pick["l2"], pick["threshold"]
    d = load_features(args.cache)
    back = [r.get("set") in HELD_BACK_SETS for r in rows]
    # the held-back rows are judged as batches of their own, so canned-answer checks on them
    # cannot change the phrase verdicts of the other dev rows (and vice versa)
    phrase: list[Any] = [None] * len(rows)
    for want in (False, True):
        idx = [i for i in range(len(rows)) if back[i] == want]
        for i, jd in zip(idx, judge_by_source_full(PhraseJudge(), [rows[i] for i in idx])):
            phrase[i] = jd
    y = [refused(r["label"]) for r in rows]
    pr = [refused(j.label) for j in phrase]
    ask = set(probe_candidates(phrase, [r["response"] for r in rows],
                               [r.get("finish_reason") == "length" for r in rows], ProbeJudge.MIN_WORDS))
    folds = [_fold(r["source"]) for r in rows]
    x = rows_features(d, rows, layer)
    out: dict[str, Any] = {"pick": {"layer": layer, "l2": l2, "threshold": t},
                           "n_other_dev": back.count(False), "n_held_back": back.count(True)}
    for name, use in (("trained_without", False), ("trained_with", True)):
        p: dict[int, float] = {}
        for f in range(FOLDS):
            tr = [i for i in range(len(rows)) if folds[i] != f and (use or not back[i])]
            te = [i for i in range(len(rows)) if folds[i] == f]
            probe = ResponseProbe.fit_features(x[tr], [y[i] for i in tr], layer=layer, l2=l2)
            p.update(zip(te, probe.score_features(x[te]).tolist()))

        def acc(want: bool) -> float:
            idx = [i for i in range(len(rows)) if back[i] == want]
            return round(sum((pr[i] or (i in ask and p[i] > t)) == y[i] for i in idx) / len(idx), 4)

        out[name] = {"other_dev": acc(False), "held_back": acc(True)}
    idx = [i for i in range(len(rows)) if back[i]]
    out["phrase_on_held_back"] = round(sum(pr[i] == y[i] for i in idx) / len(idx), 4)
    out["note"] = ("dev split, 5 folds holding out whole sources; the held-back rows do not raise "
                   "the probe's accuracy on the other dev rows, so the probe is trained without them")
    report_path(args, "added").write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(out))


def cmd_cv(args: argparse.Namespace) -> None:
    rows = probe_rows()[0]
    table = cv_table(load_features(args.cache), rows)
    print("best:", best(table))


def cmd_train(args: argparse.Namespace) -> None:
    shipped = _shipped_name(args)
    args.out = Path(args.out).resolve() if args.out else SHIPPED_PROBES[shipped or "demo"]
    if args.out in SHIPPED_PROBES.values() and args.out != SHIPPED_PROBES.get(shipped or ""):
        raise SystemExit(f"--cache {args.cache} is not the feature cache of the shipped probe in "
                         f"{args.out}; pass --out DIR for this probe (the shipped one stays as it is)")
    rows, hashes = probe_rows()
    d = load_features(args.cache)
    table = cv_table(d, rows)
    pick = best(table)
    x = rows_features(d, rows, pick["layer"])
    by_source: dict[str, int] = defaultdict(int)
    for r in rows:
        by_source[r["source"]] += 1
    probe = ResponseProbe.fit_features(
        x, [refused(r["label"]) for r in rows], layer=pick["layer"], l2=pick["l2"],
        threshold=pick["threshold"],
        prompt_chars=PROMPT_CHARS, response_chars=RESPONSE_CHARS,
        judge_model={k: d["model"][k] for k in ("spec", "weights_hash", "n_layers", "d_model", "dtype")},
        training={"split": "dev", "n": len(rows), "files_sha256": hashes,
                  "held_back_sets": list(HELD_BACK_SETS),
                  "sources": dict(sorted(by_source.items())), "folds": FOLDS,
                  "cv": "folds hold out whole sources; pick = best CV accuracy of the probe judge "
                        "(phrase judge, then the probe on what it calls compliance)",
                  "pick": pick, "cv_table": table, "seed": None})
    probe.save(args.out)
    print(f"probe (layer {pick['layer']}, l2 {pick['l2']}, threshold {pick['threshold']}) -> {args.out}")
    print(json.dumps(pick))


def _shipped_name(args: argparse.Namespace) -> str | None:
    return next((k for k, v in SHIPPED.items() if v.cache == args.cache), None)


def report_path(args: argparse.Namespace, kind: str) -> Path:
    """Where a report goes: the shipped bench file for a shipped probe's cache, else beside the
    cache (judge_validate.py --probe DIR looks for ``<cache>_nested.json`` there)."""
    shipped = _shipped_name(args)
    if shipped is not None:
        return getattr(SHIPPED[shipped], kind)  # type: ignore[no-any-return]
    return args.cache.with_name(f"{args.cache.stem}_{kind}.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--probe", default="demo", choices=sorted(SHIPPED),
                    help="the shipped probe to work on (its judge model, cache and reports)")
    ap.add_argument("--cache", type=Path, default=None,
                    help="another judge model's feature cache (reports go beside it)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("features")
    f.add_argument("--model", default=None, help="judge model (default: the --probe's)")
    f.add_argument("--dtype", default=None,
                   help="the judge model's dtype (default float32 on the CPU); the probe records it")
    f.add_argument("--all", action="store_true", help="recompute every row, not only uncached ones")
    sub.add_parser("cv")
    sub.add_parser("nested")
    sub.add_parser("added")
    t = sub.add_parser("train")
    t.add_argument("--out", default=None, help="probe folder (default: the shipped --probe's)")
    args = ap.parse_args()
    args.cache = (args.cache or SHIPPED[args.probe].cache).resolve()
    {"features": cmd_features, "cv": cmd_cv, "nested": cmd_nested, "train": cmd_train,
     "added": cmd_added}[args.cmd](args)


if __name__ == "__main__":
    main()
