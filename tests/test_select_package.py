"""The selection package: results load themselves, and the selection math follows the device
and dtype of the activations it meets (issue #11: on an H200 the proxies crashed mixing
``cuda:0`` activations with CPU directions)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_foundation import HARMFUL, HARMLESS
from tiny import TEST_DEVICE, make_chat_model, make_hf_model, make_tokenizer

import refusaldir as rd
from refusaldir.errors import ArtifactError
from refusaldir.io import dumps
from refusaldir.select import ForwardEngine, SelectionResult, select_direction
from refusaldir.select.cosine import cosine_scores
from refusaldir.select.stability import linearised_proxy, resampled_means
from refusaldir.stats import bootstrap_weights

SMALL = dict(positions=[-2, -1], layers=[1, 2, 3], n_val=6, batch_size=4, progress=False,
             n_bootstrap=32, record=False)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _ids(model):
    return model.tokenizer(" sorry I", add_special_tokens=False)["input_ids"][:2]


@pytest.fixture(scope="module")
def tiny():
    model = make_chat_model("qwen2", "chatml")
    return model, rd.extract(model, HARMFUL, HARMLESS, progress=False)


@pytest.fixture(scope="module")
def tiny_bf16():
    """A tiny model in bfloat16 (on $REFUSALDIR_TEST_DEVICE): directions stay float32 data."""
    tok = make_tokenizer("chatml")
    hf = make_hf_model("qwen2", vocab_size=len(tok)).to(device=TEST_DEVICE, dtype=torch.bfloat16)
    hf.generation_config.eos_token_id = tok.eos_token_id
    hf.generation_config.pad_token_id = tok.pad_token_id
    model = rd.load_model(hf, tokenizer=tok)
    return model, rd.extract(model, HARMFUL, HARMLESS, progress=False)


# ----------------------------------------------------------------------------- results
@pytest.mark.parametrize("mode", ["exact", "cosine"])
def test_result_save_load_round_trips(tiny, tmp_path, mode):
    model, ds = tiny
    res = select_direction(model, ds, HARMFUL, HARMLESS, mode=mode, refusal_ids=_ids(model), **SMALL)
    path = res.save(tmp_path)
    saved = json.loads(path.read_text())
    for source in (tmp_path, path):
        again = SelectionResult.load(source)
        assert again.to_dict() == saved
        assert (again.pos, again.layer, again.top_k) == (res.pos, res.layer, res.top_k)
        assert again.config == res.config and again.selected.status == "selected"
        assert again.metadata() == json.loads(dumps(res.metadata()))
    assert (again.refusal_tokens is None) == (mode == "cosine")
    assert SelectionResult.from_dict(res.to_dict()).to_dict() == json.loads(dumps(res.to_dict()))


def test_result_load_errors(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        SelectionResult.load(tmp_path / "nope.json")
    (tmp_path / "selection.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        SelectionResult.load(tmp_path)
    (tmp_path / "selection.json").write_text('{"mode": "exact"}')
    with pytest.raises(ArtifactError, match="lacks"):
        SelectionResult.load(tmp_path)
    with pytest.raises(ArtifactError, match="malformed"):
        SelectionResult.from_dict({"selected": {}, "mode": "exact", "candidates": []})


# ----------------------------------------------------------------------------- devices
def test_selection_math_runs_on_the_activations_device():
    """Activations live on the model's device, directions and bootstrap weights on the CPU.
    'meta' tensors stand in for a GPU here: mixing them with CPU tensors raises the same
    "not on the expected device" error as the H200 run did (issue #11)."""
    g = torch.Generator().manual_seed(0)
    h = torch.empty(5, 4, 2, 8, device="meta")
    hl = torch.empty(6, 4, 2, 8, device="meta")
    v = torch.randn(8, generator=g)  # a candidate direction: CPU data
    with pytest.raises(RuntimeError, match="device"):
        h[:, 1, 0].double() @ v.double()  # the expression that crashed
    p, sep = linearised_proxy(h, hl, v, layer=1, pos_index=0, eval_layers=[1, 3])
    assert p.device.type == "meta" and sep.device.type == "meta" and p.dtype == torch.float64
    w_h, w_l = bootstrap_weights(5, 3, g), bootstrap_weights(6, 3, g)
    s_abl, s_add = cosine_scores(h[:, [1, 3]], hl[:, [1, 3]], h[:, [1, 3]], hl[:, [1, 3]], w_h, w_l,
                                 center=True)
    assert s_abl.shape == s_add.shape == (4,) and s_abl.device.type == "meta"
    assert resampled_means(w_h, torch.ones(5, dtype=torch.float32)).tolist() == pytest.approx([1.0] * 3)


def _proxy_reference(hh, hl, vec, layer, pi, e_idx):
    """The pre-split proxy formula, on the CPU in float64."""
    hh, hl = hh.double().cpu(), hl.double().cpu()
    mh, ml = hh[:, e_idx].mean(0), hl[:, e_idx].mean(0)
    centre = (mh + ml) / 2
    u32 = vec.float()
    u = (u32 / u32.norm().clamp_min(1e-12)).double()
    v = vec.double()
    a, b = hh[:, layer, pi] @ u, hl[:, layer, pi] @ u
    pooled = math.sqrt((float(a.var(unbiased=False)) + float(b.var(unbiased=False))) / 2) or 1e-12
    abl = mh - (mh @ u).unsqueeze(-1) * u
    after = torch.tensor([e >= layer for e in e_idx], dtype=torch.float64)[:, None, None]
    cos = torch.nn.functional.cosine_similarity
    s = cos(abl - centre, ml - centre, dim=-1).mean() + cos(ml + after * v - centre, mh - centre, dim=-1).mean()
    return float(s), float(a.mean() - b.mean()) / pooled


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_proxy_accepts_any_activation_dtype(dtype):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(7, 4, 2, 16, generator=g).to(TEST_DEVICE, dtype)
    hl = torch.randn(5, 4, 2, 16, generator=g).to(TEST_DEVICE, dtype)
    v = torch.randn(16, generator=g)
    p, sep = linearised_proxy(h, hl, v, layer=2, pos_index=1, eval_layers=[1, 2, 3])
    ref = _proxy_reference(h, hl, v, 2, 1, [1, 2, 3])
    assert (float(p), float(sep)) == pytest.approx(ref, rel=1e-9, abs=1e-12)


def test_engine_returns_activations_on_cpu(tiny_bf16):
    model, _ = tiny_bf16
    eng = ForwardEngine(model, {"a": HARMLESS[:3]}, batch_size=2, share_prefix=True)
    logits, acts, resid = eng.run("a", range(3), [], collect=([1, 2], [-1]), collect_all=True)
    assert acts is not None and acts.device.type == "cpu" and acts.dtype == torch.float32
    assert acts.shape == (3, 2, 1, model.d_model)
    assert logits is not None and logits.device == model.device and logits.dtype == torch.float32
    assert resid is not None and resid[0].device == model.device and resid[0].dtype == torch.bfloat16


@pytest.mark.parametrize("opts", [dict(mode="exact"), dict(mode="fast", fast_prompts=2),
                                  dict(mode="cosine"), dict(method="naive")],
                         ids=["exact", "fast", "cosine", "naive"])
def test_every_mode_runs_in_low_precision(tiny_bf16, opts):
    """Every mode on a bfloat16 model (and on $REFUSALDIR_TEST_DEVICE, e.g. cuda): float32
    CPU directions meet bfloat16 activations on the model's device."""
    model, ds = tiny_bf16
    res = select_direction(model, ds, HARMFUL, HARMLESS, refusal_ids=_ids(model), **{**SMALL, **opts})
    sel = res.selected
    primary = sel.cosine if res.mode == "cosine" else sel.bypass
    assert sel.status == "selected" and primary is not None and math.isfinite(primary)
    assert 0.0 <= res.stability["top1_share"] <= 1.0
    if res.method == "shared":
        assert all(c.proxy is not None and math.isfinite(c.proxy) for c in res.candidates)
    json.loads(dumps(res.to_dict()))
