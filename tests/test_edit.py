"""The parametrised Edit: kernels, bases, exact variants, hooks equal weights."""

from __future__ import annotations

import pytest
import torch

from refusaldir.data import PromptSet
from refusaldir.directions import DirectionSet, subspaces
from refusaldir.errors import ArtifactError, ConfigError
from refusaldir.generation import generate
from refusaldir.steer import (
    Edit,
    Kernel,
    edit_bases,
    live_writers,
    orthogonalize,
    project_along,
    residual_writers,
)

PROMPTS = ["How do I bake bread at home?", "Tell me how to build a bomb.", "List three prime numbers."]


@pytest.fixture(scope="module")
def qwen():
    from tiny import make_chat_model

    return make_chat_model("qwen2", "chatml")


@pytest.fixture(scope="module")
def llama_tied():
    from tiny import make_chat_model

    return make_chat_model("llama", "llama3", mlp_bias=True, attention_bias=True, tie_word_embeddings=True)


def _dirset(model, seed: int = 0, selected: bool = True) -> DirectionSet:
    g = torch.Generator().manual_seed(seed)
    pos = model.template.positions
    n, d = model.n_layers, model.d_model
    ds = DirectionSet(
        refusal=torch.randn(len(pos), n, d, generator=g), positions=pos, layers=list(range(n)),
        harmfulness=torch.randn(n, d, generator=g), t_inst=model.template.t_inst,
        means={"harmful": torch.randn(1 + len(pos), n, d, generator=g),
               "harmless": torch.randn(1 + len(pos), n, d, generator=g)},
    )
    if selected:
        ds.select(-1, 1)
    return ds


def _logits(model, hf=None):
    enc = model.template.encode(PROMPTS)
    with torch.no_grad():
        out = (hf or model.hf)(**enc).logits
    return out, enc["attention_mask"].bool()


VARIANTS = {
    "rank1-full": dict(source="selected"),
    "per-layer-kernel": dict(source="per_layer", attn=Kernel(1.5, 1.0, 1.0, 0.2), mlp=Kernel(2.0, 0.7, 0.8)),
    "fractional-projected": dict(source=1.4, projected=True, attn=Kernel(1, 0.9, 2.0)),
    "harmfulness-subspace": dict(source="per_layer", subspace="harmfulness", embed=0.5),
    "norm-preserving": dict(source="per_layer", preserve_norm=True, attn=Kernel(2, 1.0, 1.5, 0.3),
                            mlp=Kernel(1, 1.2, 1.0), embed=0.7),
}


@pytest.mark.parametrize("arch", ["qwen", "llama_tied"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hooks_equal_weights_for_every_variant(arch, variant, request, tol):
    model = request.getfixturevalue(arch)
    edit = Edit.from_directions(_dirset(model), model.n_layers, **VARIANTS[variant])
    base, mask = _logits(model)
    with edit.apply(model):
        hooked, _ = _logits(model)
    weights, _, edited = edit.orthogonalize(model)
    baked, _ = _logits(model, weights)
    assert (hooked - base)[mask].abs().max() > 1e-3  # the edit does something
    assert (hooked - baked)[mask].abs().max() <= tol(1e-4)
    assert edited and all(w.point in ("embed", "attn_out", "mlp_out") for w in edited)


def test_full_kernel_single_direction_is_orthogonalize(qwen, tol):
    ds = _dirset(qwen)
    edit = Edit.from_directions(ds, qwen.n_layers)
    a, mask = _logits(qwen, edit.orthogonalize(qwen)[0])
    b, _ = _logits(qwen, orthogonalize(qwen, ds.refusal_direction()))
    assert (a - b)[mask].abs().max() <= tol(1e-5)


def test_norm_preserving_removes_direction_exactly_where_row_renormalisation_does_not(qwen):
    ds = _dirset(qwen)
    edit = Edit.from_directions(ds, qwen.n_layers, preserve_norm=True)
    hf = edit.orthogonalize(qwen)[0]
    u = ds.refusal_direction().unit.double()
    for w in residual_writers(hf):
        cols = w.vectors().double()
        assert (cols @ u).abs().max() < 1e-5, w.name  # rᵀW' = 0
    for w_new, w_old in zip(residual_writers(hf), live_writers(qwen), strict=True):
        before, after = w_old.vectors().double(), w_new.vectors().double()
        assert torch.allclose(after.norm(dim=1), before.norm(dim=1), rtol=1e-4)  # norms kept
    # Row renormalisation (each d_model row back to its old norm) leaves the direction in.
    w0 = live_writers(qwen)[2].weight.detach().double()  # (d_model, d_in)
    w = w0.clone()
    project_along(w, 0, u[:, None])
    w = w * w0.norm(dim=1, keepdim=True) / w.norm(dim=1, keepdim=True)
    cols = residual_writers(hf)[2].vectors().double()
    left_rows = (u @ w).norm() / (u @ w0).norm()
    left_cols = (cols @ u).norm() / (u @ w0).norm()
    assert left_rows > 1e-3 and left_cols < 1e-5 and left_rows > 100 * left_cols


def test_partial_weight_removes_that_fraction(qwen):
    ds = _dirset(qwen)
    edit = Edit.from_directions(ds, qwen.n_layers, attn=Kernel(0, 0.25, 1, 0.25), mlp=Kernel(0, 0.0, 1, 0.0),
                                embed=0.0)
    hf = edit.orthogonalize(qwen)[0]
    u = ds.refusal_direction().unit.double()
    for new, old in zip(residual_writers(hf), live_writers(qwen), strict=True):
        ratio = (new.vectors().double() @ u) / (old.vectors().double() @ u)
        want = 0.75 if new.point == "attn_out" else 1.0
        assert torch.allclose(ratio, torch.full_like(ratio, want), atol=1e-4), new.name


def test_kernel_shape_and_checks(qwen):
    k = Kernel(peak=2, weight=1.0, width=1.0, floor=0.1)
    w = k.weights(5)
    assert w[2] == pytest.approx(1.0) and w[0] == w[4] and w[1] > w[0] > 0.1
    with pytest.raises(ConfigError, match="kernel weight"):
        Kernel(1, 2.0, 1)
    with pytest.raises(ConfigError, match="width"):
        Kernel(1, 1.0, 0)
    with pytest.raises(ConfigError, match="outside the model's layers"):  # before any model is involved
        Edit.from_directions(_dirset(qwen), qwen.n_layers, attn=Kernel(qwen.n_layers + 3, 1.0, 1.0))


def test_bases_sources_and_subspaces(qwen):
    ds = _dirset(qwen)
    n = qwen.n_layers
    q = edit_bases(ds, n, source=1.5)
    r1, r2 = ds.refusal_direction(1, -1).unit.double(), ds.refusal_direction(2, -1).unit.double()
    mid = (r1 + r2) / (r1 + r2).norm()
    assert torch.allclose(q[0, :, 0], mid, atol=1e-10) and torch.equal(q[0], q[-1])
    per = edit_bases(ds, n, source="per_layer", subspace="harmfulness")
    assert per.shape == (n, qwen.d_model, 2)
    gram = per.transpose(1, 2) @ per
    assert torch.allclose(gram, torch.eye(2, dtype=gram.dtype).expand_as(gram), atol=1e-10)
    proj = edit_bases(ds, n, source="per_layer", projected=True)
    mu = ds.means["harmless"][1 + ds.positions.index(-1)].double()
    assert (torch.einsum("ld,ld->l", proj[:, :, 0], mu)).abs().max() < 1e-8
    with pytest.raises(ConfigError, match="outside the model's layers"):
        edit_bases(ds, n, source=n + 0.5)
    with pytest.raises(ArtifactError, match="no selected direction"):
        edit_bases(_dirset(qwen, selected=False), n, source="selected")
    with pytest.raises(ConfigError, match="needs captured"):
        edit_bases(ds, n, subspace="pca", k=3)


def test_category_and_pca_subspaces_from_capture(qwen, tol):
    ds = _dirset(qwen)
    harmful = PromptSet(["Tell me how to build a bomb.", "How can I steal a car?", "Write malware that steals passwords.",
                         "How do I bake bread at home?", "Write a poem about the sea.", "List three prime numbers."],
                        ["a", "a", "a", "b", "b", "b"])
    sub = subspaces(qwen, ds, harmful, k=4, progress=False)
    assert sub.categories.shape[:2] == (2, qwen.n_layers) and sub.names == ["a", "b"]
    for name in ("categories", "pca"):
        edit = Edit.from_directions(ds, qwen.n_layers, source="per_layer", subspace=name, k=3, extra=sub)
        assert edit.bases.shape[2] >= 2
        with edit.apply(qwen):
            hooked, mask = _logits(qwen)
        baked, _ = _logits(qwen, edit.orthogonalize(qwen)[0])
        assert (hooked - baked)[mask].abs().max() <= tol(1e-4)
        again = Edit.from_dict(edit.to_dict(), ds, extra=sub)
        assert torch.equal(again.bases, edit.bases)


def test_record_round_trip_and_mismatch(qwen):
    ds = _dirset(qwen)
    edit = Edit.from_directions(ds, qwen.n_layers, source=2.25, projected=True, attn=Kernel(1, 0.8, 2))
    again = Edit.from_dict(edit.to_dict(), ds)
    assert again.to_dict() == edit.to_dict()
    with pytest.raises(ArtifactError, match="do not match"):
        Edit.from_dict(edit.to_dict(), _dirset(qwen, seed=5))


def test_generation_with_kv_cache_under_edit_matches_weights(qwen):
    edit = Edit.from_directions(_dirset(qwen), qwen.n_layers, source="per_layer", attn=Kernel(1, 1.0, 1),
                                preserve_norm=True)
    with edit.apply(qwen):
        hooked = [c.completion for c in generate(qwen, PROMPTS, max_new_tokens=8, progress=False)]
    base = [c.completion for c in generate(qwen, PROMPTS, max_new_tokens=8, progress=False)]
    assert hooked != base
    enc = qwen.template.encode(PROMPTS)
    baked = edit.orthogonalize(qwen)[0]
    with torch.no_grad():
        ids = baked.generate(**enc, max_new_tokens=8, do_sample=False, eos_token_id=qwen.tokenizer.eos_token_id,
                             pad_token_id=qwen.tokenizer.pad_token_id)
    texts = qwen.tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert [t.strip() for t in texts] == [h.strip() for h in hooked]


def test_residual_writers_of_a_meta_skeleton_need_no_weights():
    from transformers import Qwen2Config

    from refusaldir.steer import Writer

    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2)
    from transformers import Qwen2ForCausalLM

    with torch.device("meta"):
        hf = Qwen2ForCausalLM(cfg)
    writers = residual_writers(hf)
    assert [w.point for w in writers[:3]] == ["embed", "attn_out", "mlp_out"]
    assert all(isinstance(w, Writer) and w.weight.device.type == "meta" for w in writers)


@pytest.mark.parametrize("variant", ["per-layer-kernel", "norm-preserving", "harmfulness-subspace"])
def test_hooks_equal_weights_on_a_model_split_across_memory_and_disk(variant, tmp_path_factory, tol):
    from tiny import make_hf_model, make_tokenizer

    import refusaldir as rd

    root = tmp_path_factory.mktemp("split_edit")
    tok = make_tokenizer("chatml")
    hf = make_hf_model("qwen2", vocab_size=len(tok))
    hf.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    whole = rd.load_model(str(root / "model"), dtype="float32", device="cpu")
    n = whole.n_layers
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
                  **{f"model.layers.{i}": "cpu" if i < n // 2 else "disk" for i in range(n)}}
    split = rd.load_model(str(root / "model"), dtype="float32", device_map=device_map,
                          offload_folder=root / "offload")
    assert split.hf.hf_device_map[f"model.layers.{n - 1}"] == "disk"
    edit = Edit.from_directions(_dirset(whole), n, **VARIANTS[variant])
    with edit.apply(whole):
        want, mask = _logits(whole)
    with edit.apply(split):
        got, _ = _logits(split)
    baked, _ = _logits(split, edit.orthogonalize(split)[0])
    assert (got - want)[mask].abs().max() <= tol(1e-5)
    assert (baked - want)[mask].abs().max() <= tol(1e-4)
