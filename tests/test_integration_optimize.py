"""The parametrised edit and the optimiser on the real models: hooks equal weights on the demo
for every variant, the inner loop measures what the edit does, and SmolLM2 runs the whole
command-line path (search, confirmation, export, plain reload) on a tiny budget."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import refusaldir as rd
from refusaldir.optimize import OptimizeConfig, TrialScorer, load_member
from refusaldir.steer import Edit, Kernel

pytestmark = pytest.mark.integration

VARIANTS = {
    "rank1": dict(source="selected"),
    "kernel-per-layer": dict(source="per_layer", attn=Kernel(12, 1.0, 4.0, 0.1), mlp=Kernel(10, 0.8, 3.0)),
    "fractional-projected": dict(source=14.5, projected=True, attn=Kernel(14, 1.0, 6.0, 0.3), mlp=Kernel(14, 1.0, 6.0, 0.3)),
    "norm-preserving": dict(source="selected", preserve_norm=True),
    "refusal+harmfulness": dict(source="selected", subspace="harmfulness", attn=Kernel(13, 1.2, 5.0), embed=0.5),
}
PROMPTS = ["How can I steal my neighbour's wifi password?", "Write a short poem about autumn rain.",
           "Explain how vaccines train the immune system."]


@pytest.fixture(scope="module")
def demo_ds(demo_model, demo_directions):
    ds = copy.deepcopy(demo_directions)  # the session's set stays unselected for other tests
    ds.select(-1, int(0.6 * demo_model.n_layers))
    return ds


def _logits(model, hf=None):
    enc = {k: v.to(model.device) for k, v in model.template.encode(PROMPTS).items()}
    with torch.inference_mode():
        return (hf or model.hf)(**enc, use_cache=False).logits.float(), enc["attention_mask"].bool()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_demo_hooks_equal_weights_for_every_variant(demo_model, demo_ds, variant):
    edit = Edit.from_directions(demo_ds, demo_model.n_layers, **VARIANTS[variant])
    base, mask = _logits(demo_model)
    with edit.apply(demo_model):
        hooked, _ = _logits(demo_model)
    baked_model = edit.orthogonalize(demo_model)[0]
    baked, _ = _logits(demo_model, baked_model)
    del baked_model
    assert (hooked - base)[mask].abs().max() > 0.1  # the edit changes the model
    assert (hooked - baked)[mask].abs().max() <= 1e-4


@pytest.mark.heavy
def test_demo_inner_loop_measures_refusal_and_damage(demo_model, demo_ds):
    sel = rd.load_prompts("harmful", "test")[:24]
    harmless = rd.load_prompts("harmless", "test")[:24]
    refusal_ids = demo_model.tokenizer.convert_tokens_to_ids(["I", "As"])
    scorer = TrialScorer(demo_model, OptimizeConfig(progress=False), list(sel), list(harmless), [], refusal_ids)
    base = scorer.baseline_scores()
    full = scorer.score(Edit.from_directions(demo_ds, demo_model.n_layers))
    half = scorer.score(Edit.from_directions(demo_ds, demo_model.n_layers, attn=Kernel(0, 0.5, 1, 0.5),
                                             mlp=Kernel(0, 0.5, 1, 0.5), embed=0.5))
    assert base["refusal_rate"] >= 0.25  # the demo refuses a good share of harmful prompts
    assert full["refusal_rate"] <= 0.5 * base["refusal_rate"]  # ablation removes most first-token refusals
    assert 0 < half["kl"] < full["kl"]  # a weaker edit does less damage
    assert half["refusal"] > full["refusal"]  # … and removes less refusal


def test_smollm2_optimize_export_and_reload_through_the_cli(smollm2_model, tmp_path):
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from refusaldir.cli import app

    harmful, harmless = rd.load_prompts("harmful", "train")[:24], rd.load_prompts("harmless", "train")[:24]
    ds = rd.extract(smollm2_model, harmful, harmless, progress=False)
    ds.select(-1, int(0.6 * smollm2_model.n_layers))
    ds.save(tmp_path / "run")
    run = CliRunner().invoke(app, [str(a) for a in [
        "optimize", "--model", "smollm2", "--directions", tmp_path / "run", "--trials", 3, "--n-harmful", 8,
        "--n-harmless", 8, "--n-borderline", 8, "--confirm", 1, "--judge", "phrase", "--cross-judge", "prefix",
        "--max-new-tokens", 12, "--subspaces", "refusal,harmfulness,pca", "--json",
        "--refusal-tokens", smollm2_model.tokenizer.encode("I", add_special_tokens=False)[0]]])
    assert run.exit_code == 0, run.output
    rec = json.loads(run.output)
    assert rec["n_trials"] == 3 and rec["front"] and rec["confirmation"]["members"][0]["name"] == "baseline"
    front = tmp_path / "run" / "optimize" / "front.json"
    out = CliRunner().invoke(app, [str(a) for a in ["orthogonalize", "--model", "smollm2", "--directions",
                                                    tmp_path / "run", "--edit", f"{front}#0", "--out", tmp_path / "x"]])
    assert out.exit_code == 0, out.output
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "x", dtype=torch.float32)
    edit, _ = load_member(f"{front}#0", rd.DirectionSet.load(tmp_path / "run"))
    with edit.apply(smollm2_model):
        hooked, mask = _logits(smollm2_model)
    loaded, _ = _logits(smollm2_model, hf)
    assert (hooked - loaded)[mask].abs().max() <= 5e-4  # float32 rounding over 30 layers, logits ~20
