"""Generation speed on the demo model: plain vs hook ablation vs orthogonalized weights.

Every variant generates exactly ``--new-tokens`` tokens per prompt (EOS ignored via
``min_new_tokens``) for the same left-padded batch, greedy, KV cache on; rounds alternate the
variants and the median is reported. Prints a Markdown table.

    python bench/generate.py [--model demo] [--directions runs/demo] [--batch 16] [--new-tokens 32]

Without ``--directions`` a direction is extracted from 32 + 32 shipped train prompts (speed does
not depend on which direction is ablated).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--directions", default=None)
    ap.add_argument("--layer", type=int, default=None)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    import refusaldir as rd
    from refusaldir.generation import stop_token_ids
    from refusaldir.hooks import bridge_kv_cache
    from refusaldir.steer import Ablation, orthogonalize

    model = rd.load_model(args.model)
    if args.directions:
        ds = rd.DirectionSet.load(args.directions)
    else:
        ds = rd.extract(model, rd.load_prompts("harmful", "train", limit=32),
                        rd.load_prompts("harmless", "train", limit=32), progress=False)
    layer = args.layer if args.layer is not None else (ds.selected[1] if ds.selected else int(0.6 * model.n_layers))
    direction = ds.refusal_direction(layer, -1)
    ortho = orthogonalize(model, direction)

    prompts = list(rd.load_prompts("harmless", "test", limit=args.batch))
    enc = {k: v.to(model.device) for k, v in model.template.encode(prompts).items()}
    n = args.new_tokens
    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False,
              eos_token_id=stop_token_ids(model), pad_token_id=model.tokenizer.pad_token_id)

    def run(hf: torch.nn.Module, ablation: Ablation | None) -> float:
        t = time.perf_counter()
        with torch.inference_mode(), bridge_kv_cache():
            if ablation is None:
                out = hf.generate(**enc, **kw)
            else:
                with ablation.apply(model):
                    out = hf.generate(**enc, **kw)
        dt = time.perf_counter() - t
        assert out.shape[1] - enc["input_ids"].shape[1] == n
        return len(prompts) * n / dt

    variants = {
        "plain (bridge model)": (model.hf, None),
        "hook ablation, all layers": (model.hf, Ablation(direction)),
        "orthogonalized weights (plain HF)": (ortho, None),
    }
    for hf, abl in variants.values():  # warm-up
        kw_short = {**kw, "max_new_tokens": 2, "min_new_tokens": 2}
        with torch.inference_mode(), bridge_kv_cache():
            if abl is None:
                hf.generate(**enc, **kw_short)
            else:
                with abl.apply(model):
                    hf.generate(**enc, **kw_short)
    speeds: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, (hf, abl) in variants.items():
            speeds[name].append(run(hf, abl))

    plain = statistics.median(speeds["plain (bridge model)"])
    threads = torch.get_num_threads()
    print(f"\n{args.model} ({type(model.hf).__name__}, {model.dtype}, {model.device}, "
          f"{threads} threads): batch {len(prompts)}, {n} new tokens, greedy, KV cache, "
          f"median of {args.rounds}; direction layer {layer}\n")
    print("| variant | tokens/s (median) | × plain | all rounds |")
    print("|---|---:|---:|---|")
    for name, vals in speeds.items():
        med = statistics.median(vals)
        runs = ", ".join(f"{v:.1f}" for v in vals)
        print(f"| {name} | {med:.1f} | {med / plain:.2f} | {runs} |")


if __name__ == "__main__":
    main()
