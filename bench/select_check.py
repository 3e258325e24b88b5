"""Check the selected refusal direction: refusal rate under ablation, and harmless KL.

Greedy-generates ``--max-new-tokens`` tokens for every shipped harmful TEST prompt, with and
without the selected direction ablated (every layer's ``resid_pre``, ``attn_out`` and
``mlp_out``), judges them with the phrase judge, and measures the first-token KL(baseline ‖
ablated) on the harmless TEST prompts.

Usage:
    python bench/select_check.py --directions runs/demo            # the recorded selection
    python bench/select_check.py --directions runs/demo --pos -1 --layer 12
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--directions", default="runs/demo")
    ap.add_argument("--pos", type=int, default=None)
    ap.add_argument("--layer", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--no-baseline", action="store_true", help="skip the unablated generations")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", default=None, help="also write results (and completions) as JSON")
    args = ap.parse_args()

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import refusaldir as rd
    from refusaldir.generation import generate
    from refusaldir.hooks import bridge_kv_cache
    from refusaldir.judges import PhraseJudge
    from refusaldir.readout import first_token_kl
    from refusaldir.stats import wilson_interval
    from refusaldir.steer import Ablation

    model = rd.load_model(args.model)
    ds = rd.DirectionSet.load(args.directions)
    direction = ds.refusal_direction(args.layer, args.pos)
    harmful = list(rd.load_prompts("harmful", "test"))[: args.limit]
    harmless = list(rd.load_prompts("harmless", "test"))[: args.limit]
    judge = PhraseJudge()
    t0 = time.perf_counter()
    out: dict = {"direction": {"pos": direction.pos, "layer": direction.layer},
                 "selected": ds.metadata.get("selected"), "n_harmful": len(harmful),
                 "n_harmless": len(harmless), "max_new_tokens": args.max_new_tokens}
    conds = [("ablated", [Ablation(direction)])]
    if not args.no_baseline:
        conds.insert(0, ("baseline", []))
    with bridge_kv_cache():  # transformers 5 passes `cache=`; see refusaldir/_compat.py
        for name, ivs in conds:
            comps = generate(model, harmful, ivs, max_new_tokens=args.max_new_tokens,
                             batch_size=args.batch_size)
            labels = [j.label for j in judge.judge_many(harmful, [c.completion for c in comps])]
            k = labels.count("refusal")
            lo, hi = wilson_interval(k, len(labels))
            out[name] = {"refusal_rate": k / len(labels), "refusals": k, "wilson95": [lo, hi],
                         "partial": labels.count("partial"),
                         "completions": [{"prompt": c.prompt, "completion": c.completion, "label": lab}
                                         for c, lab in zip(comps, labels)]}
            print(f"{name}: refusal {k}/{len(labels)} = {100 * k / len(labels):.1f}% "
                  f"(95% CI {100 * lo:.1f}–{100 * hi:.1f}%)", file=sys.stderr)
    logits = []
    with torch.inference_mode():
        for ivs in ([], [Ablation(direction)]):
            rows = []
            for s in range(0, len(harmless), args.batch_size):
                enc = model.template.encode(harmless[s : s + args.batch_size])
                if ivs:
                    with ivs[0].apply(model):
                        rows.append(model.hf(**enc, use_cache=False).logits[:, -1].float())
                else:
                    rows.append(model.hf(**enc, use_cache=False).logits[:, -1].float())
            logits.append(torch.cat(rows))
    kl = first_token_kl(logits[0], logits[1])
    out["harmless_kl"] = {"mean": float(kl.mean()), "max": float(kl.max())}
    out["seconds"] = time.perf_counter() - t0
    print(f"\n| direction (pos, layer) | harmful refusal, baseline | harmful refusal, ablated | "
          f"harmless first-token KL (mean) |\n|---|---:|---:|---:|\n| {direction.pos}, {direction.layer} | "
          + (f"{100 * out['baseline']['refusal_rate']:.1f}%" if "baseline" in out else "–")
          + f" | {100 * out['ablated']['refusal_rate']:.1f}% ({out['ablated']['refusals']}/{len(harmful)}) | "
          f"{out['harmless_kl']['mean']:.4f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
