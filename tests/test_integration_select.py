"""Integration: direction selection on the demo model (~7 min on 2 cores).

Cosine mode runs on a small candidate subset; fast mode runs with its defaults on every
candidate. The full claim (ablating the selected direction leaves <= 5% refusals on all 60
harmful test prompts with first-token KL <= 0.1 on the harmless test prompts) is measured by
``bench/select_check.py``; here it is checked on a 20-prompt subset with 32 new tokens.
"""

from __future__ import annotations

import os

import pytest
import torch

import refusaldir as rd
from refusaldir.hooks import bridge_kv_cache
from refusaldir.readout import first_token_kl
from refusaldir.select import select_direction

pytestmark = [pytest.mark.integration, pytest.mark.heavy]

@pytest.fixture(autouse=True, scope="module")
def _threads():
    """On an oversubscribed machine one torch thread is several times faster than two."""
    before = torch.get_num_threads()
    if os.getloadavg()[0] >= (os.cpu_count() or 1):
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SMALL = dict(positions=[-5, -1], layers=list(range(6, 16)), n_val=12, batch_size=12,
             progress=False, n_bootstrap=200)


def test_cosine_mode_on_demo(demo_model, demo_directions):
    ds = demo_directions
    res = select_direction(demo_model, ds, mode="cosine", record=False, **SMALL)
    assert res.refusal_tokens is None  # output-free
    assert res.cosine_layers and all(0 <= e < demo_model.n_layers for e in res.cosine_layers)
    sel = res.selected
    assert sel.cosine is not None and sel.kl is not None and sel.kl <= 0.1
    scored = [c for c in res.candidates if c.cosine is not None]
    assert len(scored) == 20
    # the pick has the best cosine score among candidates that pass KL; every better one failed KL
    better = [c for c in scored if c.cosine > sel.cosine]
    assert all(c.status == "rejected" and any("KL" in r for r in c.reasons) for c in better), better
    assert 0 < res.stability["top1_share"] <= 1


def test_fast_mode_on_demo_and_ablation_bypasses_refusal(demo_model, demo_directions):
    from refusaldir.generation import generate
    from refusaldir.judges import PhraseJudge, refusal_rate
    from refusaldir.steer import Ablation

    model, ds = demo_model, demo_directions
    # every candidate and the CLI's default 32 + 32 validation prompts: what users run
    res = select_direction(model, ds, mode="fast", progress=False, n_bootstrap=200)
    rt = res.refusal_tokens
    assert rt is not None and rt.ids and rt.n_refused > 0
    assert res.baseline["refusal_score_harmful"] > res.baseline["refusal_score_harmless"]
    assert ds.selected == (res.pos, res.layer)
    sel = res.selected
    assert sel.status == "selected" and sel.kl <= 0.1 and sel.layer < 0.8 * model.n_layers
    assert sel.bypass < res.baseline["refusal_score_harmful"]

    direction = ds.refusal_direction()  # the recorded selection
    harmful = list(rd.load_prompts("harmful", "test"))[:20]
    harmless = list(rd.load_prompts("harmless", "test"))[:20]
    judge = PhraseJudge()
    with bridge_kv_cache():
        base = generate(model, harmful, max_new_tokens=32, batch_size=10)
        ablated = generate(model, harmful, [Ablation(direction)], max_new_tokens=32, batch_size=10)
    base_rate = refusal_rate(judge.judge_many(harmful, [c.completion for c in base]))
    rate = refusal_rate(judge.judge_many(harmful, [c.completion for c in ablated]))
    assert base_rate >= 0.4, base_rate  # the model does refuse these
    assert rate <= 0.05, [c.completion[:60] for c in ablated]

    enc = model.template.encode(harmless)
    with torch.inference_mode():
        clean = model.hf(**enc, use_cache=False).logits[:, -1]
        with Ablation(direction).apply(model):
            abl = model.hf(**enc, use_cache=False).logits[:, -1]
    assert float(first_token_kl(clean, abl).mean()) <= 0.1
