"""Direction selection on tiny random models: filters, relaxation, ranking, equivalence, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_foundation import HARMFUL, HARMLESS
from tiny import make_chat_model

import refusaldir as rd
from refusaldir.errors import ConfigError, RefusalDirError
from refusaldir.judges import RefusalTokens, find_refusal_tokens
from refusaldir.readout import first_token_kl, refusal_score
from refusaldir.select import SelectionConfig, select_direction

# Small candidate set and prompt counts keep every selection well under a second or two.
SMALL = dict(positions=[-2, -1], layers=[1, 2, 3], n_val=6, batch_size=4, progress=False,
             n_bootstrap=64)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls are much faster single-threaded on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    model = make_chat_model("qwen2", "chatml")
    ds = rd.extract(model, HARMFUL, HARMLESS, progress=False)
    ids = model.tokenizer(" sorry I", add_special_tokens=False)["input_ids"][:2]
    return model, ds, ids


def _run(tiny, **kw):
    model, ds, ids = tiny
    opts = {**SMALL, "refusal_ids": ids, **kw}
    return select_direction(model, ds, HARMFUL, HARMLESS, record=False, **opts)


# ----------------------------------------------------------------------------- metrics
def test_refusal_score_is_log_odds():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [5.0, -1.0, 0.0, 2.0]])
    got = refusal_score(logits, [0, 3])
    p = torch.softmax(logits.double(), -1)[:, [0, 3]].sum(-1)
    assert torch.allclose(got, torch.log(p) - torch.log1p(-p))
    assert got[0].item() == pytest.approx(0.0)
    with pytest.raises(ConfigError):
        refusal_score(logits, [])
    with pytest.raises(ConfigError):
        refusal_score(logits, [9])


def test_first_token_kl():
    a = torch.tensor([[1.0, 2.0, 3.0]])
    assert first_token_kl(a, a).item() == pytest.approx(0.0, abs=1e-12)
    b = torch.tensor([[3.0, 2.0, 1.0]])
    p, q = torch.softmax(a.double(), -1), torch.softmax(b.double(), -1)
    assert first_token_kl(a, b).item() == pytest.approx(float((p * (p / q).log()).sum()))


class _StubJudge:
    """Labels a response by the set its prompt came from (deterministic)."""

    name = "stub"

    def judge(self, prompt, response):
        from refusaldir.judges import Judgement

        label = "refusal" if prompt in HARMFUL else "compliance"
        return Judgement(label, 1.0, None, "stub")

    def judge_many(self, prompts, responses):
        return [self.judge(p, r) for p, r in zip(prompts, responses)]


def test_find_refusal_tokens_counts_first_tokens(tiny):
    model, _, _ = tiny
    rt = find_refusal_tokens(model, HARMFUL, HARMLESS, n=4, max_new_tokens=3,
                             judge=_StubJudge(), max_harmless_share=1.0)
    assert rt.n_refused == 4 and rt.n_complied == 4
    assert rt.ids and sum(rt.refusal_counts.values()) == 4
    assert rt.tokens == [model.tokenizer.decode([i]) for i in rt.ids]
    assert json.loads(json.dumps(rt.to_dict()))["ids"] == rt.ids
    # A random model never says "I'm sorry": detection explains itself instead of guessing.
    with pytest.raises(ConfigError, match="refusal_ids"):
        find_refusal_tokens(model, HARMFUL, HARMLESS, n=3, max_new_tokens=3)


# ----------------------------------------------------------------------------- equivalence
def test_shared_scorer_matches_straightforward_loop(tiny):
    naive = _run(tiny, method="naive")
    shared = _run(tiny, method="shared", score_all=True)
    unshared = _run(tiny, method="shared", score_all=True, share_prefix=False)
    for a, b, c in zip(naive.candidates, shared.candidates, unshared.candidates):
        assert a.key == b.key == c.key
        for k in ("bypass", "induce", "kl"):
            assert getattr(b, k) == pytest.approx(getattr(a, k), abs=1e-5), (a.key, k)
            assert getattr(c, k) == pytest.approx(getattr(a, k), abs=1e-5), (a.key, k)
    assert (naive.pos, naive.layer) == (shared.pos, shared.layer)
    # the default (lazy) shared run picks the same and computes less
    lazy = _run(tiny)
    assert (lazy.pos, lazy.layer) == (naive.pos, naive.layer)
    assert lazy.work["candidate_passes"] < naive.work["candidate_passes"]
    assert shared.baseline["shared_prefix_tokens"] > 0
    # a KL bound in the middle of the candidates' KLs: early-stopped KL, same pick as naive
    kls = sorted(c.kl for c in naive.candidates if c.kl is not None)
    mid = (kls[len(kls) // 2] + kls[len(kls) // 2 - 1]) / 2
    a, b = _run(tiny, method="naive", kl_max=mid), _run(tiny, kl_max=mid)
    assert (a.pos, a.layer, a.relaxation["step"]) == (b.pos, b.layer, b.relaxation["step"])
    assert a.top_k[: len(b.top_k)] == b.top_k


def test_late_start_and_prefix_reproduce_intervened_forward(tiny, tol):
    """Addition started at the candidate's layer from the cached residual == a full pass."""
    from refusaldir.select import ForwardEngine
    from refusaldir.steer import Addition

    model, ds, _ = tiny
    eng = ForwardEngine(model, {"a": HARMLESS[:5]}, batch_size=2, share_prefix=True)
    _, _, resid = eng.run("a", range(5), [], collect_all=True)
    d = ds.refusal_direction(2, -1)
    v = d.vector.to(model.dtype)

    def start(rows, width):
        out = torch.zeros(len(rows), width, model.d_model, dtype=model.dtype, device=model.device)
        for r, i in enumerate(rows):
            out[r, width - resid[i].shape[1]:] = resid[i][2]
        return out

    logits, _, _ = eng.run("a", range(5), [(rd.hook_name("resid_pre", 2), lambda act, hook: act + v)],
                           key="add", start_layer=2, start_resid=start)
    with Addition(d).apply(model), torch.inference_mode():
        ref = model.hf(**model.template.encode(HARMLESS[:5]), use_cache=False).logits[:, -1].float()
    assert torch.allclose(logits, ref, atol=tol(1e-5), rtol=tol(1e-5))  # rtol: allclose's default
    # the bridge blocks were restored (no passthrough left behind)
    assert all("forward" not in b.__dict__ for b in eng.blocks)


# ----------------------------------------------------------------------------- filters
def test_filter_reasons_and_statuses(tiny):
    res = _run(tiny, max_layer_frac=0.6, kl_max=1e-12, kl_relax=())  # layer >= 2.4, every KL fails
    for c in res.candidates:
        if c.layer >= 3:
            assert any(r.startswith("layer 3 >= 0.6") for r in c.reasons), c
            assert c.status in ("not scored", "rejected", "selected")
        if c.induce is not None and c.induce <= 0:
            assert any(r.startswith("induce") for r in c.reasons)
        if c.kl is not None:
            assert any(r.startswith("KL") for r in c.reasons)
    assert any("exact early stop" in " ".join(c.reasons) for c in res.candidates)
    assert all(c.kl is None for c in res.candidates if "early stop" in " ".join(c.reasons))
    not_scored = [c for c in res.candidates if c.status == "not scored"]
    assert not_scored and all(c.reasons for c in not_scored)
    assert all(any("not scored" in r or r.startswith("layer") for r in c.reasons) for c in not_scored)


def test_all_filtered_relaxes_and_records(tiny):
    # The random model never "refuses": induce <= 0 everywhere, so the strict filters reject all.
    res = _run(tiny)
    assert res.relaxation["all_filtered"] is True
    assert res.relaxation["step"] == "drop induce filter"
    assert res.selected.status == "selected" and res.selected.rank == 1
    # Impossible bounds walk further down the ladder, still without crashing.
    res2 = _run(tiny, kl_max=1e-12, kl_relax=(1e-11,))
    assert res2.relaxation["step"] == "ignore induce and KL filters"
    assert res2.relaxation["kl_max"] is None
    res3 = _run(tiny, max_layer_frac=0.01, kl_max=1e-12, kl_relax=())
    assert res3.relaxation["step"] == "ignore all filters"
    with pytest.raises(ConfigError, match="filtered out"):
        _run(tiny, relax=False)


def test_top_k_order_and_ranks(tiny):
    res = _run(tiny, induce_min=-100.0, top_k=3)  # make every candidate pass induce
    assert res.relaxation["step"] == "none"
    tops = [res.candidate(p, layer) for p, layer in res.top_k]
    assert len(tops) == 3 and tops[0].key == (res.pos, res.layer)
    assert [c.rank for c in tops] == [1, 2, 3]
    assert [c.bypass for c in tops] == sorted(c.bypass for c in tops)
    passed = [c for c in res.candidates if c.status in ("passed", "selected")]
    assert min(passed, key=lambda c: c.bypass).key == (res.pos, res.layer)
    cos = _run(tiny, mode="cosine", top_k=3)
    tops = [cos.candidate(p, layer) for p, layer in cos.top_k]
    assert [c.cosine for c in tops] == sorted((c.cosine for c in tops), reverse=True)
    assert cos.refusal_tokens is None and cos.cosine_layers


def test_deterministic(tiny):
    a, b = _run(tiny, mode="exact"), _run(tiny, mode="exact")
    assert (a.pos, a.layer) == (b.pos, b.layer) and a.top_k == b.top_k
    assert a.stability == b.stability
    for x, y in zip(a.candidates, b.candidates):
        assert (x.bypass, x.induce, x.kl, x.status) == (y.bypass, y.induce, y.kl, y.status)
    c, d = _run(tiny, mode="cosine"), _run(tiny, mode="cosine")
    assert (c.pos, c.layer, c.top_k, c.stability) == (d.pos, d.layer, d.top_k, d.stability)


def test_fast_mode_prunes_and_keeps_pick(tiny):
    exact = _run(tiny, induce_min=-100.0)
    fast = _run(tiny, induce_min=-100.0, mode="fast", fast_keep=2, fast_prompts=2)
    assert fast.work["forward_tokens"] < exact.work["forward_tokens"]
    pruned = [c for c in fast.candidates if c.bypass is None]
    assert pruned and all("pruned" in " ".join(c.reasons) or c.layer >= 3.2 for c in pruned)
    assert all("bypass_head" in c.details for c in pruned if c.layer < 3.2)
    assert all(c.proxy is not None for c in fast.candidates)
    # a bypass finished from the short pass equals the one computed in one go
    ex = {(c.pos, c.layer): c for c in exact.candidates}
    done = [c for c in fast.candidates if c.bypass is not None]
    assert done and all(abs(c.bypass - ex[c.pos, c.layer].bypass) < 1e-5 for c in done)
    assert (fast.pos, fast.layer) == (exact.pos, exact.layer)


def test_zero_directions_are_skipped(tiny):
    res = _run(tiny, layers=[0, 1, 2])  # layer 0: template tokens have identical embeddings
    for c in res.candidates:
        if c.layer == 0:
            assert c.status == "not scored" and "zero direction" in c.reasons[0]
    assert res.layer != 0


# ----------------------------------------------------------------------------- outputs
def test_record_save_and_figures(tiny, tmp_path):
    model, ds, ids = tiny
    ds = rd.DirectionSet.load(ds.save(tmp_path / "run"))
    res = select_direction(model, ds, HARMFUL, HARMLESS, refusal_ids=ids, **SMALL)
    assert ds.selected == (res.pos, res.layer)
    assert ds.refusal_direction().layer == res.layer
    ds.save(tmp_path / "run")
    path = res.save(tmp_path / "run")
    again = rd.DirectionSet.load(tmp_path / "run")
    assert again.selected == (res.pos, res.layer)
    assert again.metadata["selected"]["method"] == "exact/shared"
    assert again.metadata["selected"]["relaxation"] == "drop induce filter"
    data = json.loads(path.read_text())
    assert data["selected"]["pos"] == res.pos and data["refusal_tokens"]["ids"] == ids
    assert {"candidates", "timings", "stability", "top_k", "relaxation", "config"} <= set(data)
    assert len(data["candidates"]) == 6 and all("reasons" in c for c in data["candidates"])
    assert 0.0 <= data["stability"]["top1_share"] <= 1.0
    html = (tmp_path / "run" / "selection.html").read_text()
    # works offline: plotly.js is inlined, not loaded from a CDN
    assert len(html) > 1_000_000 and '<script src="http' not in html and "Plotly.newPlot" in html
    figs = res.figures()
    assert set(figs) == {"scores", "kl", "stability"}
    assert all(math.isfinite(float(x)) for x in figs["scores"].data[0].y)


def test_config_validation():
    for bad in (dict(mode="best"), dict(kl_max=-1.0), dict(n_val=0), dict(max_layer_frac=1.5),
                dict(kl_max=float("nan")), dict(method="naive", mode="cosine"), dict(positions=[])):
        with pytest.raises(ConfigError):
            SelectionConfig(**bad)
    assert SelectionConfig().to_dict()["kl_relax"] == [0.2, 0.5, 1.0, 2.0]


def test_bad_candidates_raise_clear_errors(tiny):
    with pytest.raises(ConfigError, match="position 7"):
        _run(tiny, positions=[7])
    with pytest.raises(ConfigError, match="layer 99"):
        _run(tiny, layers=[99])
    with pytest.raises(ConfigError, match="vocabulary"):
        _run(tiny, refusal_ids=[10**7])


def test_kv_cache_compat_is_scoped(tiny):
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    from refusaldir.hooks import bridge_kv_cache

    before = AttentionBridge.__dict__["_update_kv_cache"]
    with bridge_kv_cache():
        assert AttentionBridge.__dict__["_update_kv_cache"] is not before
    assert AttentionBridge.__dict__["_update_kv_cache"] is before


def test_cli_select(tiny, tmp_path):
    from tiny import make_hf_model, make_tokenizer
    from typer.testing import CliRunner

    from refusaldir.cli import app

    _, _, ids = tiny
    folder = tmp_path / "tiny-model"
    tok = make_tokenizer("chatml")
    make_hf_model("qwen2", vocab_size=len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    loaded = rd.load_model(str(folder))
    run = tmp_path / "run"
    rd.extract(loaded, HARMFUL, HARMLESS, progress=False).save(run)
    (tmp_path / "harmful.txt").write_text("\n".join(HARMFUL))
    (tmp_path / "harmless.txt").write_text("\n".join(HARMLESS))
    args = ["select", "--model", str(folder), "--directions", str(run),
            "--harmful-val", str(tmp_path / "harmful.txt"), "--harmless-val", str(tmp_path / "harmless.txt"),
            "--n-val", "5", "--positions", "-1", "--layers", "1-3", "--bootstrap", "16",
            "--refusal-tokens", ",".join(map(str, ids))]
    res = CliRunner().invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.output[res.output.index("{"):])
    assert payload["selected"]["pos"] == -1 and payload["mode"] == "exact"
    assert rd.DirectionSet.load(run).selected == (-1, payload["selected"]["layer"])
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0 and "picked pos -1" in res.output
    res = CliRunner().invoke(app, [*args, "--mode", "fast", "--fast-keep", "1", "--fast-prompts", "2",
                                   "--json"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.output[res.output.index("{"):])
    assert payload["config"]["fast_keep"] == 1 and payload["config"]["fast_prompts"] == 2
    bad = CliRunner().invoke(app, [*args, "--mode", "fast", "--fast-keep", "0"])
    assert bad.exit_code == 1 and "--fast-keep 0" in bad.output  # the option, not the Python argument
    bad = CliRunner().invoke(app, [*args, "--mode", "best"])
    assert bad.exit_code == 1 and "error:" in bad.output and "--mode best" in bad.output
    assert len([ln for ln in bad.output.splitlines() if ln.strip()]) == 1
    missing = CliRunner().invoke(app, ["select", "--model", str(folder),
                                       "--directions", str(tmp_path / "nope")])
    assert missing.exit_code == 1 and "error:" in missing.output


def test_errors_are_refusaldir_errors():
    assert issubclass(ConfigError, RefusalDirError)
    assert RefusalTokens(ids=[1], tokens=["a"], n_harmful=0, n_refused=0, n_harmless=0,
                         n_complied=0).to_dict()["ids"] == [1]


def test_checkpoint_resumes_without_recomputing(tiny, tmp_path):
    ckpt = str(tmp_path / "scores.pt")
    first = _run(tiny, checkpoint=ckpt)
    again = _run(tiny, checkpoint=ckpt)
    assert again.work["candidate_passes"] == 0 and again.work["resumed_scores"] > 0
    assert (again.pos, again.layer, again.top_k) == (first.pos, first.layer, first.top_k)
    assert [c.bypass for c in again.candidates] == [c.bypass for c in first.candidates]
    other = _run(tiny, checkpoint=ckpt, n_val=5)  # other prompts: the checkpoint is ignored
    assert other.work["candidate_passes"] > 0 and "resumed_scores" not in other.work


def test_several_candidates_per_pass_match_one_by_one(tiny):
    """run_many (rows of several ablations in shared batches, one batched prefix pass)
    reproduces one pass per candidate; a stopped group keeps its prompts so far."""
    from refusaldir.select import ForwardEngine
    from refusaldir.select.scoring import (
        ablate_many,
        ablation_hooks,
        refusal_tokens,
        shared_baseline,
    )
    from refusaldir.select.state import SelectionState

    model, ds, ids = tiny
    cfg = SelectionConfig(**{**SMALL, "refusal_ids": ids})
    sel = SelectionState.create(model, ds, HARMFUL[:6], HARMLESS[:6], cfg)
    refusal_tokens(sel)
    shared_baseline(sel)
    eng: ForwardEngine = sel.engine
    cands = [(-1, 1), (-2, 2), (-1, 3)]
    one = [eng.run("harmful", range(6), ablation_hooks(sel, c), key=("single", c))[0] for c in cands]
    items = [(c, range(6)) for c in cands]
    out = ablate_many(sel, "harmful", items, reduce=lambda prompts, logits: logits.clone())
    assert eng.prefix_len > 0 and len(eng.banks) == 1
    for (prompts, logits, _), ref in zip(out, one):
        assert prompts == list(range(6))
        assert torch.allclose(logits, ref, atol=1e-5)
    # the prefix bank is reused for a subset in another order, with different prompts per group
    before = eng.forward_tokens
    out = ablate_many(sel, "harmful", [(cands[2], [4, 5]), (cands[0], range(3))],
                      reduce=lambda prompts, logits: logits.clone())
    assert torch.allclose(out[0][1], one[2][[4, 5]], atol=1e-5)
    assert torch.allclose(out[1][1], one[0][:3], atol=1e-5)
    assert len(eng.banks) == 1 and eng.forward_tokens > before
    # a group that stops after its first batch; priority puts prompt 5 first
    pr = [0.0] * 6
    pr[5] = 1.0
    out = ablate_many(sel, "harmful", items, reduce=lambda prompts, logits: logits[:, 0].clone(),
                      stop=lambda prompts, sc: True, priority=pr)
    for (prompts, sc, _), ref in zip(out, one):
        assert 0 < len(prompts) < 6 and prompts[0] == 5
        assert torch.allclose(sc, ref[prompts, 0], atol=1e-5)


def test_fast_mode_skips_induce_for_kl_rejected(tiny):
    """A candidate already rejected by KL is never scored on induce (the filter order does
    not force a score that cannot change the outcome)."""
    base = _run(tiny, method="naive")
    kls = sorted(c.kl for c in base.candidates if c.kl is not None)
    mid = (kls[len(kls) // 2] + kls[len(kls) // 2 - 1]) / 2
    fast = _run(tiny, mode="fast", fast_keep=2, fast_prompts=2, kl_max=mid)
    rejected = [c for c in fast.candidates
                if (c.kl is not None and c.kl > mid) or c.details.get("kl_lower_bound", 0) > mid]
    assert rejected and all(c.induce is None for c in rejected)
    assert all(c.status in ("rejected", "not scored") for c in rejected)
