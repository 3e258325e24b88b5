"""Benchmark: exact direction selection, shared-work vs the straightforward loop, and fast mode.

All modes run in one process on the same model, direction set, candidates, validation
prompts and refusal tokens (detected once, timed separately). The straightforward loop
(``method="naive"``) runs three full forward passes per candidate with full logits; the
candidate set is restricted (the README's run: 20 of the 95 valid candidates) so that it
finishes in about a quarter of an hour on 2 CPU cores; prompts and batch size are the CLI
defaults (32 + 32, 16).

Usage:
    python bench/selection.py                       # demo model, runs/demo
    python bench/selection.py --layers 8-17 --positions=-2,-1 --out bench/select.json

Prints a Markdown table (mode, seconds, speed-up, pick).
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
    ap.add_argument("--positions", default="-2,-1", help="candidate positions, e.g. --positions=-2,-1")
    ap.add_argument("--layers", default="8-17", help="candidate layers, e.g. 8-17")
    ap.add_argument("--n-val", type=int, default=32, help="validation prompts per set (CLI default)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--fast-keep", type=int, default=None, help="fast mode's finalists (default: the library's)")
    ap.add_argument("--fast-prompts", type=int, default=None, help="fast mode's short-pass prompts (default: the library's)")
    ap.add_argument("--modes", default="naive,exact,fast,fast:3",
                    help="subset of naive,exact,fast,cosine; fast:K is fast mode with fast_keep=K")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args()

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import refusaldir as rd
    from refusaldir.judges import find_refusal_tokens
    from refusaldir.select import select_direction

    lo, _, hi = args.layers.partition("-")
    layers = list(range(int(lo), int(hi) + 1)) if hi else [int(x) for x in args.layers.split(",")]
    positions = [int(p) for p in args.positions.split(",")]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]

    model = rd.load_model(args.model)
    folder = Path(args.directions)
    if (folder / "directions.safetensors").is_file():
        ds = rd.DirectionSet.load(folder)
    else:
        print(f"extracting directions into {folder} …", file=sys.stderr)
        ds = rd.extract(model, rd.load_prompts("harmful", "train"), rd.load_prompts("harmless", "train"))
        ds.save(folder)
    harmful = list(rd.load_prompts("harmful", "val"))[: args.n_val]
    harmless = list(rd.load_prompts("harmless", "val"))[: args.n_val]

    t = time.perf_counter()
    tokens = find_refusal_tokens(model, harmful, harmless, n=args.n_val, max_new_tokens=16,
                                 batch_size=args.batch_size)
    t_detect = time.perf_counter() - t
    print(f"refusal tokens {tokens.tokens} (ids {tokens.ids}) detected in {t_detect:.1f}s; "
          f"{len(positions) * len(layers)} candidates, {args.n_val}+{args.n_val} val prompts, "
          f"torch threads {torch.get_num_threads()}", file=sys.stderr)

    common = dict(positions=positions, layers=layers, n_val=args.n_val, batch_size=args.batch_size,
                  refusal_ids=tokens.ids, progress=False, record=False, n_bootstrap=200)
    fast = {k: v for k, v in (("fast_keep", args.fast_keep), ("fast_prompts", args.fast_prompts))
            if v is not None}
    settings = {
        "naive": dict(mode="exact", method="naive"),
        "exact": dict(mode="exact", method="shared"),
        "fast": dict(mode="fast", **fast),
        "cosine": dict(mode="cosine"),
    }
    rows = []
    for mode in modes:
        name, _, keep = mode.partition(":")
        opts = {**settings[name], **({"fast_keep": int(keep)} if keep else {})}
        t = time.perf_counter()
        res = select_direction(model, ds, harmful, harmless, **common, **opts)
        secs = time.perf_counter() - t
        rows.append({"mode": mode, "seconds": secs, "pick": [res.pos, res.layer],
                     "fast_keep": res.config.fast_keep if name == "fast" else None,
                     "relaxation": res.relaxation["step"], "work": res.work,
                     "timings": res.timings, "top_k": res.top_k})
        print(f"{mode}: {secs:.1f}s, pick {res.pos},{res.layer}", file=sys.stderr)

    ref = next((r for r in rows if r["mode"] == "naive"), rows[0])
    print(f"\n### `refusaldir select` on {args.model}: {len(positions) * len(layers)} candidates "
          f"(positions {positions}, layers {layers[0]}–{layers[-1]}), {args.n_val} harmful + "
          f"{args.n_val} harmless val prompts\n")
    print("| mode | seconds | speed-up vs naive | pick (pos, layer) | same pick | candidate passes |")
    print("|---|---:|---:|---|---|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['seconds']:.1f} | {ref['seconds'] / r['seconds']:.1f}× | "
              f"{r['pick'][0]}, {r['pick'][1]} | {'yes' if r['pick'] == ref['pick'] else 'NO'} | "
              f"{r['work'].get('candidate_passes', 0)} |")
    print(f"\nRefusal-token detection (shared by all modes, not in the times above): {t_detect:.1f}s, "
          f"tokens {tokens.tokens}. Relaxation used: {rows[0]['relaxation']}.")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "detect_seconds": t_detect,
                                              "refusal_tokens": tokens.to_dict(), "rows": rows},
                                             indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
