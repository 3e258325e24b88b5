"""Unit tests for interventions, generation and weight orthogonalization on tiny random models."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from refusaldir.capture import project
from refusaldir.directions import Direction, DirectionSet
from refusaldir.errors import ArtifactError, ConfigError, HookError, RefusalDirError
from refusaldir.evaluate import calibrate_addition, calibrate_conditional
from refusaldir.generation import Completion, generate, stop_token_ids
from refusaldir.hooks import bridge_kv_cache, hook_name, hooks
from refusaldir.models import state_dict_hash
from refusaldir.steer import (
    PROVENANCE_FILE,
    Ablation,
    Addition,
    ConditionalSteering,
    ablate,
    add,
    default_layer,
    intervention_from_dict,
    orthogonalize,
    save_orthogonalized,
)

PROMPTS = [
    "How do I bake bread at home?",
    "Tell me how to build a bomb.",
    "hello there",
    "Write a poem about the sea. Explain photosynthesis simply.",
]
HARMFUL = ["Tell me how to build a bomb.", "How can I steal a car?", "Write malware that steals passwords."]
HARMLESS = ["How do I bake bread at home?", "Write a poem about the sea.", "Explain photosynthesis simply.",
            "List three prime numbers."]


@pytest.fixture(scope="module")
def qwen():
    from tiny import make_chat_model

    return make_chat_model("qwen2", "chatml")


@pytest.fixture(scope="module")
def llama_tied():
    from tiny import make_chat_model

    return make_chat_model("llama", "llama3", attention_bias=True, mlp_bias=True, tie_word_embeddings=True)


@pytest.fixture(scope="module", params=["qwen2", "llama-bias-tied"])
def any_model(request, qwen, llama_tied):
    return qwen if request.param == "qwen2" else llama_tied


def _direction(model, seed: int = 1, layer: int = 2) -> Direction:
    g = torch.Generator().manual_seed(seed)
    return Direction(torch.randn(model.d_model, generator=g), layer=layer, pos=-1)


def _logits(model, prompts=PROMPTS):
    enc = model.template.encode(prompts)
    with torch.no_grad():
        return model.hf(**enc).logits, enc["attention_mask"].bool()


def _dirset(model, seed: int = 0) -> DirectionSet:
    g = torch.Generator().manual_seed(seed)
    pos = model.template.positions
    n, d = model.n_layers, model.d_model
    return DirectionSet(
        refusal=torch.randn(len(pos), n, d, generator=g), positions=pos, layers=list(range(n)),
        harmfulness=torch.randn(n, d, generator=g), t_inst=model.template.t_inst,
    )


def _no_hooks_left(model) -> bool:
    return all(not getattr(p, "fwd_hooks", []) and not p._forward_hooks for p in model.bridge.hook_dict.values())


# ------------------------------------------------------------------ ablation ≡ orthogonalization
def test_ablation_matches_orthogonalized_weights(any_model, tol):
    d = _direction(any_model)
    base, mask = _logits(any_model)
    with ablate(any_model, d):
        hooked, _ = _logits(any_model)
    ortho = orthogonalize(any_model, d)
    enc = any_model.template.encode(PROMPTS)
    with torch.no_grad():
        baked = ortho(**enc).logits
    assert (hooked - base)[mask].abs().max() > 1e-3  # the ablation does something
    assert (hooked - baked)[mask].abs().max() <= tol(1e-5)


def test_orthogonalize_does_not_touch_input_model(llama_tied):
    before = state_dict_hash(llama_tied.hf)
    base, _ = _logits(llama_tied)
    orthogonalize(llama_tied, _direction(llama_tied))
    assert state_dict_hash(llama_tied.hf) == before
    assert torch.equal(_logits(llama_tied)[0], base)


def test_tied_embeddings_are_untied_and_unembedding_kept(llama_tied, tol):
    d = _direction(llama_tied)
    assert llama_tied.hf.config.tie_word_embeddings
    ortho = orthogonalize(llama_tied, d)
    emb, head = ortho.get_input_embeddings().weight, ortho.get_output_embeddings().weight
    assert emb.data_ptr() != head.data_ptr()
    assert not ortho.config.tie_word_embeddings
    original = llama_tied.hf.get_input_embeddings().weight
    assert torch.equal(head, original)  # the unembedding is the original (tied) matrix
    u = d.unit.to(emb)  # the model's device and dtype
    assert (emb @ u).abs().max() < tol(1e-5)  # the input embedding is orthogonal to u
    assert (ortho.model.layers[1].self_attn.o_proj.bias @ u).abs() < tol(1e-6)


# -------------------------------------------------------------------- nothing left behind
def test_context_leaves_model_bitwise_identical(qwen):
    d = _direction(qwen)
    base, _ = _logits(qwen)
    plain = [c.completion for c in generate(qwen, PROMPTS, max_new_tokens=6)]
    with ablate(qwen, d), add(qwen, d, layers=[1, 3], coeff=2.0):
        assert not torch.equal(_logits(qwen)[0], base)
    assert _no_hooks_left(qwen)
    assert torch.equal(_logits(qwen)[0], base)
    with pytest.raises(RuntimeError, match="boom"):
        with ablate(qwen, d):
            with ConditionalSteering(Addition(d, coeff=3.0), _direction(qwen, 5), 0.0, pos=-3).apply(qwen):
                _logits(qwen)
                raise RuntimeError("boom")
    assert _no_hooks_left(qwen)
    assert not qwen.hf.get_decoder()._forward_pre_hooks
    assert torch.equal(_logits(qwen)[0], base)
    assert [c.completion for c in generate(qwen, PROMPTS, max_new_tokens=6)] == plain


def test_apply_registers_hooks_only_inside_with(qwen):
    cm = Ablation(_direction(qwen)).apply(qwen)
    assert _no_hooks_left(qwen)
    with cm:
        assert not _no_hooks_left(qwen)
    assert _no_hooks_left(qwen)


# ------------------------------------------------------------------------ addition / composition
def _capture_resid(model, layer, prompts=PROMPTS):
    got = {}

    def grab(act, hook):
        got["x"] = act.detach().clone()

    enc = model.template.encode(prompts)
    with hooks(model, [(hook_name("resid_pre", layer), grab)]), torch.no_grad():
        model.hf(**enc)
    return got["x"]


def test_addition_adds_raw_vector_scaled_by_coeff(qwen, tol):
    d = _direction(qwen, layer=2)
    base = _capture_resid(qwen, 2)
    with add(qwen, d, coeff=1.5):  # default layer: the direction's own
        raw = _capture_resid(qwen, 2)
    with add(qwen, d, 2, coeff=1.5, normalize=True):
        unit = _capture_resid(qwen, 2)
    torch.testing.assert_close(raw - base, (1.5 * d.vector).to(base).expand_as(base), atol=tol(1e-5), rtol=0)
    torch.testing.assert_close(unit - base, (1.5 * d.unit).to(base).expand_as(base), atol=tol(1e-5), rtol=0)


def test_interventions_compose_in_order(qwen, tol):
    d = _direction(qwen, layer=2)
    u = d.unit.to(qwen.device, qwen.dtype)
    with ablate(qwen, d):
        x = _capture_resid(qwen, 2)
        assert (x @ u).abs().max() < tol(1e-4)
        with add(qwen, d, 2, coeff=2.0):
            y = _capture_resid(qwen, 2)
        # ablation runs first at resid_pre[2], then the addition: only 2·d is left along u
        torch.testing.assert_close(y @ u, torch.full(y.shape[:2], 2.0 * d.norm).to(y), atol=tol(1e-3), rtol=0)
        assert torch.equal(_capture_resid(qwen, 2), x)  # leaving the inner block restores the outer


# --------------------------------------------------------------------- conditional steering
def test_conditional_steering_masks_rows(qwen):
    ds = _dirset(qwen)
    layer = 2
    det = ds.harmfulness_direction(layer)
    scores = project(qwen, PROMPTS, det.vector.reshape(1, 1, -1), layers=[layer],
                     positions=[qwen.template.t_inst], progress=False)[:, 0, 0]
    order = scores.argsort()
    thr = float((scores[order[1]] + scores[order[2]]) / 2)  # two rows above, two below
    want = scores > thr
    act = Ablation(_direction(qwen, 7))
    cs = ConditionalSteering(act, det, thr, layer=layer)
    base, mask = _logits(qwen)
    with cs.apply(qwen) as applied:
        cond, _ = _logits(qwen)
        assert applied.mask.tolist() == want.tolist()
        torch.testing.assert_close(applied.scores, scores.float(), atol=1e-4, rtol=0)
    with act.apply(qwen):
        full, _ = _logits(qwen)
    for row in range(len(PROMPTS)):
        expect = full if want[row] else base
        assert torch.equal(cond[row][mask[row]], expect[row][mask[row]])

    # generation: the decision is held for generated tokens, untriggered rows are untouched
    plain = generate(qwen, PROMPTS, max_new_tokens=8, sort_by_length=False)
    steered = generate(qwen, PROMPTS, [cs], max_new_tokens=8, sort_by_length=False)
    always = generate(qwen, PROMPTS, [act], max_new_tokens=8, sort_by_length=False)
    for row, c in enumerate(steered):
        assert c.triggered == bool(want[row])
        ref = always[row] if want[row] else plain[row]
        assert c.completion == ref.completion
    assert any(a.completion != p.completion for a, p in zip(always, plain))


def test_calibrate_conditional_respects_fpr(qwen):
    ds = _dirset(qwen)
    act = Addition(ds.refusal_direction(2, -1), coeff=2.0)
    cs = calibrate_conditional(qwen, ds, act, HARMLESS, harmful_val=HARMFUL, layer=2, target_fpr=0.0)
    assert cs.calibration["val_fpr"] == 0.0
    assert cs.layer == 2 and cs.pos == qwen.template.t_inst
    cs2 = calibrate_conditional(qwen, ds, act, HARMLESS, harmful_val=HARMFUL, layer=2, target_fpr=0.5)
    assert cs2.calibration["val_fpr"] <= 0.5 and cs2.threshold <= cs.threshold


# ------------------------------------------------------------------------------- errors
def test_errors_are_clear(qwen):
    wrong = Direction(torch.randn(qwen.d_model + 1), layer=1, pos=-1)
    with pytest.raises(ArtifactError, match=r"d_model=65 .* d_model=64"):
        with ablate(qwen, wrong):
            pass
    with pytest.raises(HookError, match="layer 99 is out of range"):
        with ablate(qwen, _direction(qwen), layers=[99]):
            pass
    with pytest.raises(HookError, match="layer 7 is out of range"):
        Addition(_direction(qwen), layers=[7]).apply(qwen)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="coeff=.* is not finite"):
            Addition(_direction(qwen), coeff=bad)
    with pytest.raises(ConfigError, match="NaN or inf"):
        Ablation(Direction(torch.full((qwen.d_model,), float("nan")), layer=1))
    with pytest.raises(ConfigError, match="zero vector"):
        Ablation(Direction(torch.zeros(qwen.d_model), layer=1))
    with pytest.raises(ConfigError, match="threshold"):
        ConditionalSteering(Ablation(_direction(qwen)), _direction(qwen), float("nan"), pos=-3)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        generate(qwen, PROMPTS, max_new_tokens=0)
    assert _no_hooks_left(qwen)


def test_output_folder_errors(qwen, tmp_path, monkeypatch):
    d = _direction(qwen)
    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "keep.txt").write_text("x")
    with pytest.raises(ArtifactError, match="already exists; pass --force"):
        save_orthogonalized(qwen, d, existing)
    assert (existing / "keep.txt").exists()

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ArtifactError, match="cannot write to"):
        save_orthogonalized(qwen, d, blocker / "sub")

    import transformers

    def broken(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", broken)
    with pytest.raises(ArtifactError, match="No space left"):
        save_orthogonalized(qwen, d, tmp_path / "half")
    with pytest.raises(ArtifactError, match="No space left"):
        save_orthogonalized(qwen, d, existing, force=True)
    monkeypatch.undo()
    assert not (tmp_path / "half").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "exists"]  # no temp leftovers
    assert (existing / "keep.txt").exists()  # a failed --force keeps the old folder

    save_orthogonalized(qwen, d, existing, force=True)
    assert not (existing / "keep.txt").exists() and (existing / "config.json").exists()


# ---------------------------------------------------------------------------- generation
def test_generation_stops_at_every_eos(qwen):
    tok = qwen.tokenizer
    im_end, eot = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    old = qwen.hf.generation_config.eos_token_id
    qwen.hf.generation_config.eos_token_id = [im_end, eot]
    try:
        assert set(stop_token_ids(qwen)) >= {im_end, eot}
        for stop in (im_end, eot):
            calls = {"n": 0}

            def force(logits, hook, stop=stop):
                calls["n"] += 1
                if calls["n"] == 3:  # the prompt pass, two decode steps, then the stop token
                    logits = logits.clone()
                    logits[0, -1, stop] = 1e4
                return logits

            with hooks(qwen, [("unembed.hook_out", force)]):
                out = generate(qwen, PROMPTS[:2], max_new_tokens=8, sort_by_length=False)
            assert out[0].finish_reason == "stop" and out[0].completion_tokens == 2
            assert out[1].finish_reason == "length" and out[1].completion_tokens == 8
            assert "<|im_start|>" not in out[0].completion
    finally:
        qwen.hf.generation_config.eos_token_id = old


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_cached_generation_matches_plain_transformers(arch, tol):
    """The bridge must keep the KV cache: cached greedy output equals an unbridged HF model's.

    The bridge runs attention its own way (eager, float32 softmax), so the two agree to
    rounding: in float32 the greedy strings are identical; in bfloat16/float16 a near-tie may
    pick another token, so there each decode step whose prefix still agrees must give the
    same logits (a lost KV cache shows as differences of order 1, from the second step on).
    """
    from tiny import TEST_DTYPE, make_chat_model, make_hf_model, make_tokenizer

    tpl = "chatml" if arch == "qwen2" else "llama3"
    cm = make_chat_model(arch, tpl)
    ref = make_hf_model(arch, vocab_size=len(make_tokenizer(tpl))).to(cm.device, cm.dtype)
    out = generate(cm, PROMPTS, max_new_tokens=10, sort_by_length=False)
    enc = cm.template.encode(PROMPTS)
    n = enc["input_ids"].shape[1]
    kw = dict(max_new_tokens=10, do_sample=False, eos_token_id=stop_token_ids(cm),
              pad_token_id=cm.tokenizer.pad_token_id, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        want = ref.generate(**enc, **kw)
        with bridge_kv_cache():  # the bridged model as generate() runs it, with its logits
            got = cm.hf.generate(**enc, **kw)
    for row, c in enumerate(out):
        got_ids = got.sequences[row, n:].tolist()[: c.completion_tokens]
        assert c.completion == cm.tokenizer.decode(got_ids, skip_special_tokens=True)
        if TEST_DTYPE == torch.float32:
            ids = want.sequences[row, n:].tolist()[: c.completion_tokens]
            assert c.completion == cm.tokenizer.decode(ids, skip_special_tokens=True)
    a, b = want.sequences[:, n:], got.sequences[:, n:]
    for t in range(min(len(want.logits), len(got.logits))):
        same = (a[:, :t] == b[:, :t]).all(dim=1)  # rows whose first t tokens agree
        diff = (want.logits[t][same].float() - got.logits[t][same].float()).abs().max()
        assert diff <= tol(1e-6), (t, float(diff))


def test_template_end_of_turn_is_a_stop_token(llama_tied):
    llama_tied.hf.generation_config.eos_token_id = None
    try:
        assert llama_tied.tokenizer.convert_tokens_to_ids("<|eot_id|>") in stop_token_ids(llama_tied)
    finally:
        llama_tied.hf.generation_config.eos_token_id = llama_tied.tokenizer.eos_token_id


def test_generate_records(qwen):
    d = _direction(qwen)
    out = generate(qwen, PROMPTS, [Ablation(d, layers=[1, 2])], max_new_tokens=4, batch_size=3)
    assert [c.prompt for c in out] == PROMPTS
    assert all(isinstance(c, Completion) and c.completion_tokens <= 4 for c in out)
    rec = out[0].to_dict()
    assert rec["interventions"][0]["type"] == "ablation" and rec["interventions"][0]["layers"] == [1, 2]
    assert rec["prompt_tokens"] == len(qwen.template.encode([PROMPTS[0]])["input_ids"][0])
    json.dumps(rec)
    a = generate(qwen, PROMPTS, max_new_tokens=4, do_sample=True, temperature=1.5, seed=3)
    b = generate(qwen, PROMPTS, max_new_tokens=4, do_sample=True, temperature=1.5, seed=3)
    assert [c.completion for c in a] == [c.completion for c in b]  # seeded sampling repeats
    # batching does not change greedy completions
    one = generate(qwen, PROMPTS, [Ablation(d, layers=[1, 2])], max_new_tokens=4, batch_size=1)
    assert [c.completion for c in one] == [c.completion for c in out]


# --------------------------------------------------------------------- to_dict / from_dict
def test_to_dict_from_dict_round_trip(qwen):
    ds = _dirset(qwen)
    items = [
        Ablation(ds.refusal_direction(2, -1)),
        Ablation(ds.refusal_direction(1, -2), layers=[0, 3]),
        Addition(ds.refusal_direction(2, -1), layers=[1, 2], coeff=-3.5, normalize=True),
        ConditionalSteering(Addition(ds.refusal_direction(3, -1), coeff=2.0),
                            ds.harmfulness_direction(2), threshold=1.25, calibration={"val_fpr": 0.05}),
    ]
    for it in items:
        rec = json.loads(json.dumps(it.to_dict()))
        assert "vector" not in json.dumps(rec)  # stored by reference to the direction set
        back = intervention_from_dict(rec, ds)
        assert type(back) is type(it) and back.to_dict() == it.to_dict()
        full = json.loads(json.dumps(it.to_dict(include_vector=True)))
        assert intervention_from_dict(full, None).to_dict() == it.to_dict()
        with pytest.raises(ConfigError, match="pass the DirectionSet"):
            intervention_from_dict(rec, None)
    other = _dirset(qwen, seed=1)
    with pytest.raises(ArtifactError, match="does not match the recorded one"):
        intervention_from_dict(items[0].to_dict(), other)
    custom = Ablation(torch.ones(qwen.d_model))  # a bare tensor keeps its vector in the record
    assert intervention_from_dict(json.loads(json.dumps(custom.to_dict())), None).direction.vector.sum() == qwen.d_model
    with pytest.raises(ArtifactError, match="unknown intervention type"):
        intervention_from_dict({"type": "nope"}, ds)


# -------------------------------------------------------------------- exported folder
def test_orthogonalized_folder_loads_with_plain_transformers(llama_tied, tmp_path, tol):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ds = _dirset(llama_tied)
    d = ds.refusal_direction(2, -1)
    folder = save_orthogonalized(llama_tied, d, tmp_path / "ortho", directions=ds)
    names = set(os.listdir(folder))
    assert {"config.json", "model.safetensors", "generation_config.json", "README.md",
            "tokenizer.json", PROVENANCE_FILE} <= names
    assert not any(n.endswith(".bin") for n in names)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=llama_tied.dtype).to(llama_tied.device)
    tok = AutoTokenizer.from_pretrained(folder)
    assert hf.lm_head.weight.data_ptr() != hf.model.embed_tokens.weight.data_ptr()
    msgs = [{"role": "user", "content": PROMPTS[0]}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == llama_tied.template.format(PROMPTS[0])
    enc = llama_tied.template.encode(PROMPTS)
    mask = enc["attention_mask"].bool()
    with ablate(llama_tied, d):
        hooked, _ = _logits(llama_tied)
    with torch.no_grad():
        loaded = hf(**enc).logits
    assert (loaded - hooked)[mask].abs().max() <= tol(1e-5)
    card = (folder / "README.md").read_text()
    assert "layer 2, position -1" in card and "untied" in card and d.to_dict()["kind"] in card
    info = json.loads((folder / PROVENANCE_FILE).read_text())
    assert info["direction"]["layer"] == 2 and len(info["direction"]["unit_vector"]) == llama_tied.d_model
    assert info["edited_parameters"][0] == "model.embed_tokens.weight"
    assert len(info["edited_parameters"]) == 1 + 4 * llama_tied.n_layers  # o_proj, down_proj (+ biases)
    gen = json.loads((folder / "generation_config.json").read_text())
    assert llama_tied.tokenizer.convert_tokens_to_ids("<|eot_id|>") in (
        gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]])


# ------------------------------------------------------------------------ calibration logic
def test_calibrate_addition_finds_smallest_coefficient(qwen, monkeypatch):
    import refusaldir.evaluate.calibrate as gen_mod  # where calibrate_addition looks up generate

    # prompt i is "refused" once the coefficient reaches need[i]; 80% of 10 needs coeff >= 3.3
    need = {f"p{i}": c for i, c in enumerate([0.5, 1, 1.5, 2, 2.5, 3, 3.3, 3.3, 9, 20])}

    def fake_generate(model, prompts, interventions, **kw):
        c = interventions[0].coeff
        return [Completion(p, "I'm sorry, I can't." if c >= need[p] else "Sure.", 1, 1, "stop")
                for p in prompts]

    monkeypatch.setattr(gen_mod, "generate", fake_generate)
    cal = calibrate_addition(qwen, _direction(qwen), list(need), target_rate=0.8, batch_size=3)
    assert 3.3 <= cal.coeff <= 3.3 * 1.1
    assert cal.addition.coeff == cal.coeff and cal.layers == [2]
    assert all(t["reached"] == (t["coeff"] >= 3.3) for t in cal.trials)
    with pytest.raises(ConfigError, match="no coefficient up to max_coeff"):
        calibrate_addition(qwen, _direction(qwen), list(need), target_rate=1.0, max_coeff=16)


def test_default_layer_rule(qwen):
    from refusaldir.directions import extract

    ds = extract(qwen, HARMFUL * 2, HARMLESS * 2, progress=False)
    layer = default_layer(qwen, ds, HARMFUL, HARMLESS)
    assert 0 <= layer < 0.8 * qwen.n_layers
    ds.select(-1, 3)
    assert default_layer(qwen, ds, HARMFUL, HARMLESS) == 3
    assert default_layer(qwen, ds, HARMFUL, HARMLESS, use_selected=False) == layer


def test_errors_are_refusaldir_errors():
    assert issubclass(HookError, RefusalDirError) and issubclass(ConfigError, RefusalDirError)


# --------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
    from tiny import make_hf_model, make_tokenizer

    root = tmp_path_factory.mktemp("cli")
    tok = make_tokenizer("chatml")
    hf = make_hf_model("qwen2", vocab_size=len(tok))
    hf.generation_config.eos_token_id = tok.eos_token_id
    hf.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    import refusaldir

    cm = refusaldir.load_model(str(root / "model"))
    ds = _dirset(cm)
    ds.select(-1, 2)
    ds.save(root / "run")
    (root / "prompts.txt").write_text("\n".join(PROMPTS[:2]))
    return root


def test_cli_generate_and_orthogonalize(cli_setup):
    from typer.testing import CliRunner

    from refusaldir.cli import app

    root = cli_setup
    r = CliRunner().invoke(app, ["generate", "--model", str(root / "model"), "--directions",
                                 str(root / "run"), "--ablate", "--add", "1:2.5", "--prompts",
                                 str(root / "prompts.txt"), "--max-new-tokens", "3", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert [i["type"] for i in data["interventions"]] == ["ablation", "addition"]
    assert data["interventions"][1]["layers"] == [1] and data["interventions"][1]["coeff"] == 2.5
    assert len(data["completions"]) == 2 and data["completions"][0]["label"] in {"refusal", "compliance", "partial"}

    r = CliRunner().invoke(app, ["generate", "--model", str(root / "model"), "--ablate",
                                 "--prompts", str(root / "prompts.txt")])
    assert r.exit_code == 1 and "needs --directions" in r.output

    r = CliRunner().invoke(app, ["generate", "--model", str(root / "model"), "--directions",
                                 str(root / "run"), "--add", "1:nan", "--prompts", str(root / "prompts.txt")])
    assert r.exit_code == 1 and "not finite" in r.output

    out = root / "ortho"
    args = ["orthogonalize", "--model", str(root / "model"), "--directions", str(root / "run"),
            "--out", str(out), "--json"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["direction"]["layer"] == 2 and (out / "config.json").exists()
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 1 and "already exists" in r.output
    assert r.output.count("\n") <= 3  # one red line (possibly soft-wrapped)
    r = CliRunner().invoke(app, [*args, "--force"])
    assert r.exit_code == 0, r.output
    blocked = Path(root / "prompts.txt") / "sub"
    r = CliRunner().invoke(app, [*args[:-3], "--out", str(blocked), "--json"])
    assert r.exit_code == 1 and "cannot write" in r.output
