"""The optimiser on the demo model, end to end, as the README reports it.

Searches on the validation splits (never test), confirms the chosen front members and the
rank-1 edit (trial 0, measured in the same run) on the shipped test splits with the default
judge at 128 new tokens, and writes ``bench/optimize_demo.json`` plus a blind sample of answers
for hand labelling (``bench/optimize_blind.jsonl``: shuffled, conditions hidden;
``bench/optimize_blind_key.json``: which condition each came from; label it blind, then score
the labels with ``bench/optimize_blind_score.py``).

    .venv/bin/python bench/optimize_demo.py --trials 40 --n 48 --confirm 2   # first token only
    .venv/bin/python bench/optimize_demo.py --trials 36 --n 48 --confirm 1 --out runs/demo/optimize-judged \
        --sources selected --subspaces refusal --variants plain --warm-start runs/demo/optimize/front.json \
        --gen-tokens 64 --gen-judge probe:coder-1.5b --gen-below 0.07 --gen-max-kl 0.032 \
        --summary bench/optimize_demo_judged.json --blind-prefix bench/optimize_judged_blind   # deflection-aware

Re-running with ``--resume`` adds trials to the same study.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

import refusaldir as rd
from refusaldir.optimize import OptimizeConfig, optimize_edit, warm_start
from refusaldir.select import SelectionResult

HERE = Path(__file__).parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--directions", default="runs/demo")
    ap.add_argument("--out", default="runs/demo/optimize")
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--n", type=int, default=32, help="val prompts per set in the inner loop")
    ap.add_argument("--confirm", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--judge", default=None)
    ap.add_argument("--gen-tokens", type=int, default=0, help="generated tokens judged per trial (0: first token only)")
    ap.add_argument("--gen-judge", default="phrase", help="judge of the generated tokens, e.g. probe:coder-1.5b")
    ap.add_argument("--gen-below", type=float, default=0.25)
    ap.add_argument("--gen-max-kl", type=float, default=None)
    ap.add_argument("--warm-start", default=None, help="a previous front.json whose members are tried first")
    ap.add_argument("--sources", default=None, help="comma-separated direction sources searched (default: all)")
    ap.add_argument("--subspaces", default=None, help="comma-separated subspaces searched (default: all)")
    ap.add_argument("--variants", default=None, help="comma-separated variants searched (default: all)")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--blind", type=int, default=20, help="answers per condition in the blind sample")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--summary", default=str(HERE / "optimize_demo.json"), help="where the summary goes")
    ap.add_argument("--blind-prefix", default=str(HERE / "optimize_blind"), help="blind sample path prefix")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = rd.load_model("demo")
    ds = rd.DirectionSet.load(args.directions)
    sel = SelectionResult.load(args.directions)
    cfg = OptimizeConfig(n_trials=args.trials, n_harmful=args.n, n_harmless=args.n, n_borderline=args.n,
                         confirm=args.confirm, max_new_tokens=args.max_new_tokens, judge=args.judge,
                         gen_tokens=args.gen_tokens, gen_judge=args.gen_judge, gen_below=args.gen_below,
                         gen_max_kl=args.gen_max_kl,
                         **{k: getattr(args, k) for k in ("sources", "subspaces", "variants") if getattr(args, k)})
    starts = warm_start(args.warm_start, ds, cfg) if args.warm_start else []
    rec = optimize_edit(model, ds, cfg, out=args.out, resume=args.resume,
                        refusal_ids=sel.refusal_tokens.ids if sel.refusal_tokens else None, warm_start=starts)
    conf = json.loads((Path(args.out) / "front.json").read_text())["confirmation"]
    summary = {
        "model": "demo", "trials": rec["n_trials"], "timings": rec["timings"],
        "confirmation_seconds": conf.get("seconds"), "total_seconds": round(time.perf_counter() - t0, 1),
        "baseline_search": rec["baseline"], "rank1_search": rec["rank1"],
        "front": [{k: r[k] for k in ("trial", "refusal_rate", "kl", "over_refusal", "describe")} for r in rec["front"]],
        "confirmed": [{k: m[k] for k in ("name", "describe", "harmful", "borderline", "kl", "kl_tokens")}
                      for m in conf["members"]],
        "judges": conf.get("judges"), "config": cfg.to_dict(),
    }
    Path(args.summary).write_text(json.dumps(summary, indent=2) + "\n")
    rows = [json.loads(line) for line in (Path(args.out) / "completions.jsonl").read_text().splitlines()]
    rng = random.Random(0)
    picked = []
    names = [m["name"] for m in conf["members"] if m["name"] != "baseline"][:2]  # rank1 and the best member
    for name in names:
        harmful = [r for r in rows if r["condition"] == name and r["dataset"] == "harmful"]
        picked += rng.sample(harmful, min(args.blind, len(harmful)))
    rng.shuffle(picked)
    with open(f"{args.blind_prefix}.jsonl", "w") as f:
        for i, r in enumerate(picked):
            f.write(json.dumps({"id": i, "prompt": r["prompt"], "response": r["completion"]}) + "\n")
    key = {i: {"condition": r["condition"], "judge_label": r["label"]} for i, r in enumerate(picked)}
    Path(f"{args.blind_prefix}_key.json").write_text(json.dumps(key, indent=1) + "\n")
    print(json.dumps({k: summary[k] for k in ("trials", "timings", "confirmation_seconds", "total_seconds")}))
    for m in summary["confirmed"]:
        h, b = m["harmful"]["refusal"], (m["borderline"] or {}).get("refusal") or {}
        print(f"{m['name']:>10}: harmful refusal {h['rate']:.3f} {h['ci95']}, borderline {b.get('rate')}, "
              f"KL {m['kl']:.4f} | {m['describe']}")


if __name__ == "__main__":
    main()
