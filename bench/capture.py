"""Capture benchmark on the demo model, everything measured side by side in one run.

1. tokens/s of refusaldir capture (resid_pre, every layer, all post-instruction positions)
   against a bare HF forward on the same left-padded batch and dtype;
2. bf16 against fp32 capture speed, and the cosine between the directions each gives;
3. peak resident memory of extraction with 64 versus 256 prompts (fresh subprocesses).

Run: ``.venv/bin/python bench/capture.py [--model demo] [--batch-size 16] [--repeats 3]``
Prints a Markdown table (copy it into the README).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore")


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def speed(model_spec: str, batch_size: int, repeats: int, n_prompts: int) -> dict:
    import refusaldir as rd

    prompts = list(rd.load_prompts("harmful", "train"))[: n_prompts // 2] + list(
        rd.load_prompts("harmless", "train")
    )[: n_prompts // 2]
    out: dict = {}
    dirs = {}
    for dtype in ("float32", "bfloat16"):
        model = rd.load_model(model_spec, dtype=dtype)
        enc = model.template.encode(prompts[:batch_size])
        n_tokens = int(enc["attention_mask"].sum())
        pos = [model.template.t_inst, *model.template.positions]

        def bare() -> None:
            with torch.inference_mode():
                model.hf(**enc, use_cache=False)

        def capture() -> None:
            rd.mean_activations(model, prompts[:batch_size], positions=pos, batch_size=batch_size,
                                progress=False)

        t_bare = _time(bare, repeats)
        t_cap = _time(capture, repeats)
        out[dtype] = {"bare_tok_s": n_tokens / t_bare, "capture_tok_s": n_tokens / t_cap,
                      "ratio": t_bare / t_cap}
        ds = rd.extract(model, prompts[: n_prompts // 2], prompts[n_prompts // 2 :],
                        batch_size=batch_size, progress=False)
        dirs[dtype] = ds.refusal.float()
    cos = torch.nn.functional.cosine_similarity(dirs["float32"], dirs["bfloat16"], dim=-1)
    # layer 0's resid_pre is the embedding: identical for both prompt sets' template tokens
    valid = dirs["float32"].norm(dim=-1) > 1e-3
    out["cosine_min"] = float(cos[valid].min())
    out["cosine_median"] = float(cos[valid].median())
    out["bf16_speedup"] = out["bfloat16"]["capture_tok_s"] / out["float32"]["capture_tok_s"]
    return out


def peak_memory_child(model_spec: str, n: int, batch_size: int) -> None:
    import refusaldir as rd

    model = rd.load_model(model_spec)
    rd.mean_activations(model, ["warm up"], progress=False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    harmful = (list(rd.load_prompts("harmful", "train")) * 2)[: n // 2]
    harmless = (list(rd.load_prompts("harmless", "train")) * 2)[: n // 2]
    rd.extract(model, harmful, harmless, batch_size=batch_size, progress=False)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"n": n, "peak_mib": after / 1024, "before_mib": before / 1024}))


def peak_memory(model_spec: str, batch_size: int) -> dict:
    res = {}
    for n in (64, 256):
        proc = subprocess.run(
            [sys.executable, __file__, "--child-memory", str(n), "--model", model_spec,
             "--batch-size", str(batch_size)],
            capture_output=True, text=True, check=True,
        )
        res[n] = json.loads(proc.stdout.strip().splitlines()[-1])
    res["growth"] = res[256]["peak_mib"] / res[64]["peak_mib"] - 1
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n-prompts", type=int, default=64)
    ap.add_argument("--child-memory", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_memory:
        peak_memory_child(args.model, args.child_memory, args.batch_size)
        return
    torch.manual_seed(0)
    s = speed(args.model, args.batch_size, args.repeats, args.n_prompts)
    m = peak_memory(args.model, args.batch_size)
    print(f"### Capture benchmark ({args.model}, batch {args.batch_size}, {torch.get_num_threads()} threads)\n")
    print("| measurement | value | target |")
    print("|---|---|---|")
    for dt in ("float32", "bfloat16"):
        r = s[dt]
        print(f"| {dt}: bare HF forward | {r['bare_tok_s']:.0f} tok/s | |")
        print(f"| {dt}: capture (all layers, resid_pre) | {r['capture_tok_s']:.0f} tok/s "
              f"({r['ratio']:.2f}× bare) | ≥ 0.95× |")
    print(f"| bf16 capture speed vs fp32 | {s['bf16_speedup']:.2f}× | ≥ 1.8× |")
    print(f"| cosine(fp32 dirs, bf16 dirs), min / median over layer×pos | "
          f"{s['cosine_min']:.4f} / {s['cosine_median']:.4f} | ≥ 0.999 |")
    print(f"| peak RSS, 64 prompts | {m[64]['peak_mib']:.0f} MiB | |")
    print(f"| peak RSS, 256 prompts | {m[256]['peak_mib']:.0f} MiB ({100 * m['growth']:+.1f}%) | < +5% |")


if __name__ == "__main__":
    main()
