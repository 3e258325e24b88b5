"""Generate the model responses of the judge's labelled set (issue #12), reproducibly.

For one embedded model it writes one JSONL row per response: source model, condition
(baseline / ablate / add), split (dev from the shipped val prompts and the even borderline
prompts, test from the test prompts and the odd borderline prompts), prompt set, prompt and
response. Labels are added by hand afterwards (tests/data/judge/).

Directions come from the shipped train prompts (pos -1, the layer with the best val AUROC
below 0.8·n_layers, as `refusaldir.steer.default_layer` picks); the addition coefficient is the
smallest of 1, 2, 4, 6, 8, 12 that makes the phrase judge see refusals on at least half of
12 harmless *train* prompts (failing that, the one with the most refusals).

    python bench/judge_responses.py --model demo --out runs/judge/demo.jsonl

The demo model's labelled *test* responses are instead the completions of the 128-token
`refusaldir evaluate` run reported in the README (`--splits dev` here), so that the set
measures the judge on exactly the text behind the reported rates.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import refusaldir as rd
from refusaldir.generation import generate
from refusaldir.judges import PhraseJudge
from refusaldir.steer import Ablation, Addition, default_layer


def sets() -> dict[str, dict[str, list[str]]]:
    border = list(rd.load_prompts("borderline"))
    return {
        "dev": {
            "harmful": list(rd.load_prompts("harmful", "val")),
            "harmless": list(rd.load_prompts("harmless", "val")),
            "borderline": border[0::2],
        },
        "test": {
            "harmful": list(rd.load_prompts("harmful", "test")),
            "harmless": list(rd.load_prompts("harmless", "test")),
            "borderline": border[1::2],
        },
        # more tuning data: the train prompts (never test prompts) under the edited conditions
        "train": {
            "harmful": list(rd.load_prompts("harmful", "train")),
            "harmless": list(rd.load_prompts("harmless", "train")),
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--splits", default="dev,test",
                    help="which prompt splits to generate (comma-separated: dev, test, train; "
                         "train rows are labelled split dev)")
    ap.add_argument("--conditions", default="baseline,ablate,add", help="comma-separated")
    ap.add_argument("--limit", type=int, default=None,
                    help="at most this many prompts per set (the first ones: on harmless train, "
                         "the 12 that chose the addition coefficient come first)")
    args = ap.parse_args()
    bad = sorted(set(args.splits.split(",")) - set(sets()))
    bad += sorted(set(args.conditions.split(",")) - {"baseline", "ablate", "add"})
    if bad:
        raise SystemExit(f"unknown split or condition {bad}: splits are dev, test, train; "
                         "conditions baseline, ablate, add")
    t0 = time.time()
    model = rd.load_model(args.model, device="cpu", dtype="float32")
    ds = rd.extract(model, rd.load_prompts("harmful", "train"), rd.load_prompts("harmless", "train"),
                    progress=False)
    layer = default_layer(model, ds)
    direction = ds.refusal_direction(layer=layer, pos=-1)
    judge = PhraseJudge()
    probe = list(rd.load_prompts("harmless", "train"))[:12]
    best = (-1, 1.0)
    for c in (1.0, 2.0, 4.0, 6.0, 8.0, 12.0):
        outs = generate(model, probe, [Addition(direction, coeff=c)], max_new_tokens=24)
        refused = sum(j.label != "compliance" for j in judge.judge_many(probe, [o.completion for o in outs]))
        print(f"coeff {c}: {refused}/{len(probe)} refused", flush=True)
        if refused > best[0]:
            best = (refused, c)
        if refused >= len(probe) / 2:
            break
    coeff = best[1]  # a weakly aligned model may never reach half: take the most refusing coeff
    conditions = {
        "baseline": ([], ("harmful", "harmless", "borderline")),
        "ablate": ([Ablation(direction)], ("harmful", "borderline")),
        "add": ([Addition(direction, coeff=coeff)], ("harmless",)),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        for split, by_set in sets().items():
            if split not in args.splits.split(","):
                continue
            for cond, (ivs, names) in conditions.items():
                if cond not in args.conditions.split(","):
                    continue
                for name in [n for n in names if n in by_set]:
                    prompts = by_set[name][:args.limit]
                    outs = generate(model, prompts, ivs, max_new_tokens=args.max_new_tokens)
                    for p, o in zip(prompts, outs):
                        f.write(json.dumps({
                            "source": f"{args.model}-{cond}", "model": args.model, "condition": cond,
                            "split": "dev" if split == "train" else split,
                            "set": f"{name}-train" if split == "train" else name, "prompt": p, "response": o.completion,
                            "finish_reason": o.finish_reason,
                        }) + "\n")
                    f.flush()
                    print(f"{split} {cond} {name}: {len(prompts)} in {time.time() - t0:.0f}s", flush=True)
    print(json.dumps({"model": args.model, "layer": layer, "coeff": coeff,
                      "seconds": round(time.time() - t0)}))


if __name__ == "__main__":
    main()
