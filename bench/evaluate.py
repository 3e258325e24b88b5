"""Evaluation-time breakdown on the demo model: generation vs judging vs metrics.

Run: ``.venv/bin/python bench/evaluate.py [--directions runs/demo] [--limit 30]``
Prints a Markdown table; the target is judging < 10% of evaluation time.
"""

from __future__ import annotations

import argparse
import warnings

warnings.filterwarnings("ignore")


def main() -> None:
    import refusaldir as rd
    from refusaldir.evaluate import evaluate

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--directions", default="runs/demo")
    ap.add_argument("--limit", type=int, default=30)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--add-coeff", type=float, default=4.0)
    args = ap.parse_args()
    model = rd.load_model(args.model)
    ds = rd.DirectionSet.load(args.directions)
    res = evaluate(model, ds, conditions=["baseline", "ablate", "add"], limit=args.limit,
                   max_new_tokens=args.max_new_tokens, add_coeff=args.add_coeff, progress=False)
    t = res.results["timings"]
    n = sum(d["count"] for d in res.results["datasets"].values())
    print(f"### Evaluation time ({args.model}, 3 conditions × {n} prompts, {args.max_new_tokens} new tokens)\n")
    print("| stage | seconds | share |")
    print("|---|---|---|")
    for k in ("setup", "generate", "judge", "metrics"):
        print(f"| {k} | {t[k]:.1f} | {100 * t[k] / t['total']:.1f}% |")
    print(f"| total | {t['total']:.1f} | judging target < 10% |")


if __name__ == "__main__":
    main()
