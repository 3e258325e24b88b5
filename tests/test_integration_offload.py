"""A model split across CPU memory and disk (accelerate offload) gives the unsplit model's
results: extraction, hook ablation and weight orthogonalization (issue #11)."""

from __future__ import annotations

import pytest
import torch

import refusaldir as rd

pytestmark = pytest.mark.integration

HARMFUL = list(rd.load_prompts("harmful", "train"))[:6]
HARMLESS = list(rd.load_prompts("harmless", "train"))[:6]


@pytest.fixture(scope="module")
def split_smollm2(smollm2_model, tmp_path_factory):
    n = smollm2_model.n_layers
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu",
                  "lm_head": "cpu"}
    for i in range(n):
        device_map[f"model.layers.{i}"] = "cpu" if i < n // 2 else "disk"
    model = rd.load_model("smollm2", dtype="float32", device_map=device_map,
                          offload_folder=tmp_path_factory.mktemp("offload"))
    assert model.hf.hf_device_map[f"model.layers.{n - 1}"] == "disk"
    assert model.weights_hash == smollm2_model.weights_hash  # same files, same identity
    return model


def _last_logits(model, prompts):
    enc = {k: v.to(model.device) for k, v in model.template.encode(prompts).items()}
    with torch.inference_mode():
        return model.hf(**enc, use_cache=False).logits[:, -1].float().cpu()


def test_offloaded_model_matches_unsplit(smollm2_model, split_smollm2):
    whole, split = smollm2_model, split_smollm2
    ds_whole = rd.extract(whole, HARMFUL, HARMLESS, progress=False)
    ds_split = rd.extract(split, HARMFUL, HARMLESS, progress=False)
    assert (ds_whole.refusal - ds_split.refusal).abs().max() <= 1e-5
    assert (ds_whole.harmfulness - ds_split.harmfulness).abs().max() <= 1e-5

    direction = ds_whole.refusal_direction(layer=whole.n_layers // 2, pos=-1)
    with rd.ablate(whole, direction):
        ablated_whole = _last_logits(whole, HARMFUL)
    with rd.ablate(split, direction):
        ablated_split = _last_logits(split, HARMFUL)
    assert (ablated_whole - ablated_split).abs().max() <= 1e-5
    assert (ablated_whole - _last_logits(whole, HARMFUL)).abs().max() > 1e-2  # ablation does act

    ortho_whole = rd.orthogonalize(whole, direction)
    ortho_split = rd.orthogonalize(split, direction)
    enc = whole.template.encode(HARMFUL)
    with torch.inference_mode():
        a = ortho_whole(**enc, use_cache=False).logits[:, -1].float()
        b = ortho_split(**enc, use_cache=False).logits[:, -1].float()
    assert (a - b).abs().max() <= 1e-5
    assert (a - ablated_whole).abs().max() <= 1e-3  # weights edit == hook ablation
