"""GPU benchmark at real scale, side by side in one run (issue #11); no hub access needed.

A Qwen2.5-7B-shaped model (hidden 3584, 28 layers, 28 heads, 4 KV heads, MLP 18944, vocab
152064) with random bf16 weights is built on the GPU and paired with the demo's real Qwen
tokenizer. Speed and memory are real; behaviour (refusal) is not, so selection and the audit
are given refusal token ids instead of detecting them. Prints a Markdown table and writes JSON.

    python bench/gpu.py --tokenizer .gpu/qwen_tok --out $OUT/gpu.json          # on the H200
    python bench/gpu.py --shape tiny --device cpu --dtype float32              # smoke test here

Measured, each against its baseline in the same process:
- wrap: ``load_model(hf, tokenizer=tok)`` on an already-loaded model (target ≤ 5 s at 7B);
- capture (all layers, ``extract``'s positions) vs the bare decoder stack ``hf.model(...)`` on the
  same batches, at three batch sizes: seconds, TFLOP/s and the ratio (target ≥ 0.95);
- generation: plain ``refusaldir.generate`` vs under ablation on every layer vs HF ``generate``
  (target: ablated ≥ 0.95 × plain);
- fast selection on a few candidates, and one end-to-end ``audit`` with small limits.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import refusaldir as rd
from refusaldir.audit import AuditConfig, audit
from refusaldir.models import cache_dir, stop_token_ids

SHAPES = {
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=151936),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Any, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def build(shape: str, device: torch.device, dtype: torch.dtype) -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=False,
                      rope_theta=1e6)
    with torch.device(device):
        hf = Qwen2ForCausalLM(cfg).to(dtype).eval()
    return hf


def tokenizer(path: str | None) -> Any:
    from transformers import AutoTokenizer

    if path is None:
        found = sorted((cache_dir() / "models").glob("demo-*"))
        if not found:
            raise SystemExit("no --tokenizer and no cached demo model: run `refusaldir extract` once")
        path = str(found[0])
    return AutoTokenizer.from_pretrained(path)


def prompts(n: int) -> list[str]:
    base = list(rd.load_prompts("harmless", "train")) + list(rd.load_prompts("harmful", "train"))
    return [base[i % len(base)] for i in range(n)]


def flops_per_token(hf: Any) -> float:
    """2 × parameters outside the embeddings and LM head (the decoder stack's matmuls)."""
    n = sum(p.numel() for name, p in hf.model.layers.named_parameters())
    return 2.0 * n


def bench_capture(model: Any, batches: list[int], repeats: int) -> list[dict[str, Any]]:
    hf, dev = model.hf, model.device
    tpl = model.template
    pos = [tpl.t_inst, *tpl.positions]
    rows = []
    for b in batches:
        texts = prompts(b)
        enc = {k: v.to(dev) for k, v in tpl.encode(texts).items()}
        tokens = int(enc["attention_mask"].sum())

        def bare(enc: dict[str, Any] = enc) -> None:
            with torch.inference_mode():
                hf.model(**enc, use_cache=False)

        def capture(texts: list[str] = texts) -> None:
            rd.mean_activations(model, texts, positions=pos, batch_size=len(texts), progress=False)

        t_bare, t_cap = _time(bare, dev, repeats), _time(capture, dev, repeats)
        f = flops_per_token(hf) * enc["input_ids"].numel()
        rows.append({"batch": b, "tokens": tokens, "bare_s": t_bare, "capture_s": t_cap,
                     "bare_tflops": f / t_bare / 1e12, "capture_tflops": f / t_cap / 1e12,
                     "ratio": t_bare / t_cap})
    return rows


def bench_generate(model: Any, batch: int, new_tokens: int, repeats: int) -> dict[str, Any]:
    from transformers import GenerationConfig

    from refusaldir.hooks import bridge_kv_cache

    dev = model.device
    texts = prompts(batch)
    direction = rd.Direction(torch.randn(model.d_model, dtype=torch.float64), layer=model.n_layers // 2, pos=-1)
    enc = {k: v.to(dev) for k, v in model.template.encode(texts).items()}
    cfg = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           eos_token_id=stop_token_ids(model), pad_token_id=model.template.pad_id)

    def plain() -> None:
        rd.generate(model, texts, max_new_tokens=new_tokens, batch_size=batch)

    def ablated() -> None:
        rd.generate(model, texts, [rd.Ablation(direction)], max_new_tokens=new_tokens, batch_size=batch)

    def hf_generate() -> None:
        with torch.inference_mode(), bridge_kv_cache():
            model.hf.generate(**enc, generation_config=cfg)

    out = {name: _time(fn, dev, repeats) for name, fn in
           (("plain", plain), ("ablated", ablated), ("hf_generate", hf_generate))}
    out["ablated_vs_plain"] = out["plain"] / out["ablated"]
    out["tokens_per_s_plain"] = batch * new_tokens / out["plain"]
    return out


def bench_select_and_audit(model: Any, out_dir: Path) -> dict[str, Any]:
    harmful, harmless = list(rd.load_prompts("harmful", "train"))[:32], list(rd.load_prompts("harmless", "train"))[:32]
    t = time.perf_counter()
    ds = rd.extract(model, harmful, harmless, progress=False)
    t_extract = time.perf_counter() - t
    refusal_ids = model.tokenizer("I", add_special_tokens=False)["input_ids"][:1]
    mid = model.n_layers // 2
    cfg = rd.SelectionConfig(mode="fast", n_val=16, layers=[mid - 1, mid, mid + 1], positions=[-2, -1],
                             refusal_ids=refusal_ids, n_bootstrap=0, progress=False)
    t = time.perf_counter()
    res = rd.select_direction(model, ds, config=cfg)
    t_select = time.perf_counter() - t
    t = time.perf_counter()
    # A random model never refuses: no addition calibration, no refusal-token detection.
    acfg = AuditConfig(limit=8, n_val=8, max_new_tokens=16, mode="fast", n_train=32,
                       conditions=("baseline", "ablate", "ortho"), behaviour_logit=False,
                       concentration_n=8)
    audit(model, out_dir / "audit", config=acfg, directions=ds, selection=res, progress=False, force=True)
    t_audit = time.perf_counter() - t
    return {"extract_s": t_extract, "select_fast_s": t_select, "audit_s": t_audit,
            "select_pick": [res.pos, res.layer]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokenizer", default=None, help="folder with the Qwen tokenizer (default: the demo cache)")
    ap.add_argument("--batches", default="32,64,128")
    ap.add_argument("--gen-batch", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench/gpu.json"))
    ap.add_argument("--skip-audit", action="store_true")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    result: dict[str, Any] = {"shape": args.shape, "device": str(device), "dtype": args.dtype}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)

    tok = tokenizer(args.tokenizer)
    t = time.perf_counter()
    hf = build(args.shape, device, dtype)
    result["build_s"] = time.perf_counter() - t
    result["params_b"] = sum(p.numel() for p in hf.parameters()) / 1e9
    t = time.perf_counter()
    import transformer_lens.model_bridge  # noqa: F401  (a one-time import, timed apart from the wrap)

    result["import_transformer_lens_s"] = time.perf_counter() - t
    t = time.perf_counter()
    model = rd.load_model(hf, tokenizer=tok)
    result["wrap_s"] = time.perf_counter() - t
    print(f"wrap {result['wrap_s']:.2f}s ({result['params_b']:.2f}B params)", flush=True)

    result["capture"] = bench_capture(model, [int(b) for b in args.batches.split(",")], args.repeats)
    for r in result["capture"]:
        print(f"capture batch {r['batch']}: {r['capture_tflops']:.0f} vs bare {r['bare_tflops']:.0f} "
              f"TFLOP/s, ratio {r['ratio']:.3f}", flush=True)
    result["generate"] = bench_generate(model, args.gen_batch, args.new_tokens, args.repeats)
    print(f"generate: ablated/plain {result['generate']['ablated_vs_plain']:.3f}", flush=True)
    if not args.skip_audit:
        with tempfile.TemporaryDirectory() as tmp:
            result["pipeline"] = bench_select_and_audit(model, Path(tmp))
        print(f"pipeline: {result['pipeline']}", flush=True)
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30

    print("\n| measurement | value | target |\n|---|---:|---|")
    print(f"| wrap a loaded model (transformer-lens already imported: "
          f"{result['import_transformer_lens_s']:.1f} s once) | {result['wrap_s']:.2f} s | ≤ 5 s |")
    for r in result["capture"]:
        print(f"| capture / bare stack, batch {r['batch']} | {r['ratio']:.3f} "
              f"({r['capture_tflops']:.0f} / {r['bare_tflops']:.0f} TFLOP/s) | ≥ 0.95 |")
    g = result["generate"]
    print(f"| generate, ablated / plain | {g['ablated_vs_plain']:.3f} | ≥ 0.95 |")
    print(f"| generate, plain vs HF generate | {g['plain']:.2f} s vs {g['hf_generate']:.2f} s | |")
    if "pipeline" in result:
        p = result["pipeline"]
        print(f"| extract (64 prompts) / fast select (6 candidates) / audit | "
              f"{p['extract_s']:.1f} / {p['select_fast_s']:.1f} / {p['audit_s']:.1f} s | |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
