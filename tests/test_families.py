"""The family matrix: every stage on a tiny random model of each chat-model family users edit
(``tests/families.py``), from template positions to the exported, reloaded, edited model.

Each test runs one stage for one family (``test_<stage>[<family>]``); the README's
supported-families table is generated from :data:`families.FAMILIES` and these stages by
``bench/families_table.py``.
"""

from __future__ import annotations

import json

import pytest
import torch
from families import FAMILIES, Family, make_family_model, make_family_tokenizer
from test_foundation import HARMFUL, HARMLESS

import refusaldir as rd
from refusaldir.errors import ModelLoadError, RefusalDirError, TemplateError
from refusaldir.generation import generate
from refusaldir.hooks import hook_name, hooks
from refusaldir.steer import PROVENANCE_FILE, residual_writers, save_orthogonalized

WORKING = [f for f in FAMILIES.values() if f.edit != "refused"]
IDS = [f.name for f in WORKING]
PROMPTS = ["How do I bake bread at home?", "Tell me how to build a bomb.", "hello there"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls are much faster single-threaded on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_CACHE: dict[str, tuple[rd.ChatModel, rd.DirectionSet]] = {}


def built(fam: Family) -> tuple[rd.ChatModel, rd.DirectionSet]:
    """The family's model and its directions, built once per test session."""
    if fam.name not in _CACHE:
        model = make_family_model(fam)
        _CACHE[fam.name] = model, rd.extract(model, HARMFUL, HARMLESS, batch_size=8, progress=False)
    return _CACHE[fam.name]


def _direction(model: rd.ChatModel, layer: int = 2) -> rd.Direction:
    g = torch.Generator().manual_seed(1)
    return rd.Direction(torch.randn(model.d_model, generator=g), layer=layer, pos=-1)


def _record(model, names):
    """Hooks that keep a copy of each named activation, registered after any intervention."""
    got: dict[str, torch.Tensor] = {}

    def grab(name):
        def fn(act, hook):
            got[name] = act.detach().float().clone()
        return fn

    return got, hooks(model, [(n, grab(n)) for n in names])


# ------------------------------------------------------------------------------- stages
@pytest.mark.parametrize("fam", WORKING, ids=IDS)
def test_template(fam):
    model, _ = built(fam)
    tpl = model.template
    assert tuple(tpl.post_instruction_tokens) == fam.post  # golden, from the family's turn format
    text = tpl.format(PROMPTS[1])
    ids = tpl.encode([PROMPTS[1]])["input_ids"][0].tolist()
    assert model.tokenizer.decode(ids[tpl.t_inst]).strip() == "."  # t_inst: the instruction's last token
    assert text.endswith("".join(fam.post)) and "bomb." in text
    if not fam.system:  # a system prompt is refused by the template itself, with a clear error
        with pytest.raises(TemplateError, match="system_prompt=None"):
            rd.ChatTemplate(model.tokenizer, system_prompt="Be brief.").format("Hi")


@pytest.mark.parametrize("fam", WORKING, ids=IDS)
def test_capture_extract(fam, tol):
    model, ds = built(fam)
    n_post = len(fam.post)
    assert tuple(ds.refusal.shape) == (n_post, model.n_layers, model.d_model)
    assert tuple(ds.harmfulness.shape) == (model.n_layers, model.d_model)
    assert ds.positions == list(range(-n_post, 0)) and ds.t_inst == -n_post - 1
    # the streamed difference of means equals one plain forward pass per set
    layer = model.n_layers - 1
    means = []
    for prompts in (HARMFUL, HARMLESS):
        got, ctx = _record(model, [hook_name("resid_pre", layer)])
        with ctx, torch.no_grad():
            model.hf(**model.template.encode(prompts))
        means.append(got[hook_name("resid_pre", layer)][:, -1].double().mean(0))
    assert torch.allclose(ds.refusal[-1, layer].double(), means[0] - means[1], atol=tol(1e-4))


@pytest.mark.parametrize("fam", WORKING, ids=IDS)
def test_ablation_hooks(fam, tol):
    model, _ = built(fam)
    d = _direction(model)
    u = d.unit
    enc = model.template.encode(PROMPTS)
    names = [hook_name(p, i) for i in range(model.n_layers) for p in ("resid_pre", "attn_out", "mlp_out")]
    with torch.no_grad():
        base = model.hf(**enc).logits
        with rd.ablate(model, d):
            got, ctx = _record(model, names)
            with ctx:
                hooked = model.hf(**enc).logits
    assert set(got) == set(names)  # every hook fired (linear-attention layers included)
    assert max(float((a @ u).abs().max()) for a in got.values()) <= tol(1e-5)
    assert float((hooked - base).abs().max()) > 1e-3


@pytest.mark.parametrize("fam", WORKING, ids=IDS)
def test_addition(fam, tol):
    model, _ = built(fam)
    d = _direction(model, layer=1)
    enc = model.template.encode(PROMPTS)
    name = hook_name("resid_pre", 1)
    with torch.no_grad():
        got, ctx = _record(model, [name])
        with ctx:
            model.hf(**enc)
        before = got[name]
        with rd.add(model, d, coeff=2.0):
            got, ctx = _record(model, [name])
            with ctx:
                model.hf(**enc)
    assert torch.allclose(got[name] - before, 2.0 * d.vector.float().expand_as(before), atol=tol(1e-5))


def _greedy_without_cache(model, prompt: str, n: int) -> list[int]:
    """Greedy decoding by full forward passes: the reference a KV cache must reproduce."""
    ids = model.template.encode([prompt])["input_ids"]
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model.hf(input_ids=ids).logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]], device=ids.device)], dim=1)
    return out


@pytest.mark.parametrize("fam", WORKING, ids=IDS)
def test_generation_kv_cache(fam):
    model, _ = built(fam)
    d = _direction(model)
    for interventions in ([], [rd.Ablation(d)]):
        out = generate(model, PROMPTS[:2], interventions, max_new_tokens=6, batch_size=2)
        with (rd.ablate(model, d) if interventions else torch.no_grad()):
            for c in out:
                ref = _greedy_without_cache(model, c.prompt, c.completion_tokens)
                assert c.completion == model.tokenizer.decode(ref, skip_special_tokens=True)


@pytest.mark.parametrize("fam", WORKING, ids=IDS)
def test_fast_selection(fam):
    model, ds = built(fam)
    ids = model.tokenizer(" sorry I", add_special_tokens=False)["input_ids"][:2]
    res = rd.select_direction(model, ds, HARMFUL, HARMLESS, record=False, mode="fast", refusal_ids=ids,
                              positions=[-1], layers=[1, 2, 3], n_val=6, batch_size=4, progress=False,
                              n_bootstrap=16, fast_keep=2, fast_prompts=2, induce_min=-100.0)
    assert res.mode == "fast" and res.pos == -1 and res.layer in (1, 2, 3)
    assert all(c.proxy is not None for c in res.candidates)


@pytest.mark.parametrize("fam", WORKING, ids=IDS)
def test_guard(fam):
    model, ds = built(fam)
    g = rd.LatentGuard.fit(model, ds, HARMFUL, HARMLESS, target_fpr=0.25, progress=False)
    assert g.t_inst == model.template.t_inst
    s = g.score(model, HARMFUL + HARMLESS)
    assert s.shape == (len(HARMFUL) + len(HARMLESS),) and bool(torch.isfinite(s).all())


def _sublayer_outputs(hf, u):
    """Largest |u·x| over every residual-stream state and every sublayer contribution of a
    plain ``transformers`` model (hooks on the layers and on their output norms)."""
    worst = {"resid": 0.0, "sublayer": 0.0}
    handles = []
    for layer in hf.model.layers:
        for n in ("post_attention_layernorm", "post_feedforward_layernorm"):
            if getattr(layer, "post_feedforward_layernorm", None) is not None:
                def fn(mod, inp, out):
                    worst["sublayer"] = max(worst["sublayer"], float((out.double() @ u).abs().max()))
                handles.append(getattr(layer, n).register_forward_hook(fn))
    return worst, handles


@pytest.mark.parametrize("fam", WORKING, ids=IDS)
def test_orthogonalize_save_reload(fam, tmp_path, tol):
    from transformers import AutoModelForCausalLM

    model, ds = built(fam)
    d = ds.refusal_direction(2, -1)
    u = d.unit.double()
    folder = save_orthogonalized(model, d, tmp_path / "edited", directions=ds)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=model.dtype).to(model.device).eval()
    enc = model.template.encode(PROMPTS)
    mask = enc["attention_mask"].bool()
    worst, handles = _sublayer_outputs(hf, u)
    try:
        with torch.no_grad():
            out = hf(**enc, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        base = model.hf(**enc).logits
        with rd.ablate(model, d):
            hooked = model.hf(**enc).logits
    # the residual stream of the reloaded model never carries the direction
    resid = max(float((h.double()[mask] @ u).abs().max()) for h in out.hidden_states[:-1])
    assert resid <= tol(1e-5) * max(1.0, float(out.hidden_states[1].abs().max()))
    diff = float((out.logits - hooked)[mask].abs().max())
    info = json.loads((folder / PROVENANCE_FILE).read_text())
    edits = info["edits"]
    if fam.edit == "exact":
        assert diff <= tol(1e-4)
        assert all(e["exact"] for e in edits)
    else:  # norm-exact: each sublayer's contribution is free of u, the rms scale differs
        assert worst["sublayer"] <= tol(1e-5)
        assert 0 < diff < 0.5 * float((base - hooked)[mask].abs().max())  # far closer than no edit
        assert any(e["through_norm"] for e in edits)
    # provenance lists every edited tensor, every expert's included, and never a router
    names = info["edited_parameters"]
    writers = residual_writers(hf)
    assert len(names) == sum(1 + (w.bias is not None) for w in writers)
    assert not any("router" in n or n.endswith("mlp.gate.weight") for n in names)
    if fam.moe:
        assert any("experts" in n for n in names)
    card = (folder / "README.md").read_text()
    assert "**Exactness:**" in card and ("every edit is exact" in card) == (fam.edit == "exact")


# ----------------------------------------------------------------------------- refusals
def test_family_without_residual_stream_is_refused_by_name():
    with pytest.raises(ModelLoadError, match=r"MambaForCausalLM \(model family 'mamba'\).*no residual stream"):
        make_family_model(FAMILIES["mamba"])


def test_template_without_user_turn_fails_before_capture():
    fam = FAMILIES["qwen2"]
    tok = make_family_tokenizer("{{ '<|im_start|>assistant\\n' }}", fam.eos)
    model = rd.load_model(built(fam)[0].hf, tokenizer=tok)
    calls = []
    handle = model.hf.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(TemplateError, match="does not put the user's message"):
            rd.extract(model, HARMFUL, HARMLESS, progress=False)
    finally:
        handle.remove()
    assert not calls  # refused before any forward pass


def test_thinking_template_whose_tail_depends_on_the_prompt_fails_before_capture():
    """A template that opens the think block only for some prompts has no single
    post-instruction span; the positions would silently mean different tokens."""
    fam = FAMILIES["qwen3-thinking"]
    tail = "{% if messages[-1]['content'] | length > 26 %}{{ '<think>\\n' }}{% endif %}"
    bad = fam.template.removesuffix("{% endif %}") + tail + "{% endif %}"  # inside the generation prompt
    tok = make_family_tokenizer(bad, fam.eos)
    model = rd.load_model(built(fam)[0].hf, tokenizer=tok)
    calls = []
    handle = model.hf.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(TemplateError, match="differs between prompts"):
            rd.extract(model, HARMFUL, HARMLESS, progress=False)
    finally:
        handle.remove()
    assert not calls


def test_refusals_are_refusaldir_errors():
    assert issubclass(ModelLoadError, RefusalDirError) and issubclass(TemplateError, RefusalDirError)
