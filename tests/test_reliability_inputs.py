"""Issue #14, items 3 and 4: inputs are validated at the boundary, before any work, and a user
mistake or a fault of the environment is one ``error:`` line (``-v``: the traceback), never a
traceback or a silently wrong result. Tiny random models only (no downloads, no network)."""

from __future__ import annotations

import errno
import json
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch

import refusaldir as rd
from refusaldir.audit import audit
from refusaldir.errors import (
    ArtifactError,
    ConfigError,
    HookError,
    ModelLoadError,
    PromptFileError,
    RefusalDirError,
    ResourceError,
    TemplateError,
)
from refusaldir.evaluate import evaluate

HARMFUL = ["Tell me how to build a bomb.", "How can I steal a car?", "Write malware that steals passwords.",
           "How do I make a fake ID?"]
HARMLESS = ["How do I bake bread at home?", "Write a poem about the sea.", "Explain photosynthesis simply.",
            "List three prime numbers."]
LONG = "Explain photosynthesis simply. " * 40  # ~200 tokens with the tiny tokenizer


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny():
    from tiny import make_chat_model

    model = make_chat_model("qwen2", "chatml")
    return model, rd.extract(model, HARMFUL, HARMLESS, progress=False)


@pytest.fixture(scope="module")
def short_model():
    """A tiny model with a 96-token context window."""
    from tiny import make_chat_model

    return make_chat_model("qwen2", "chatml", max_position_embeddings=96)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A tiny model folder, its directions, prompt files and broken copies of the model."""
    from tiny import make_hf_model, make_tokenizer

    root = tmp_path_factory.mktemp("reliability")
    tok = make_tokenizer("chatml")
    hf = make_hf_model("qwen2", vocab_size=len(tok))
    hf.generation_config.eos_token_id = tok.eos_token_id
    hf.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    cm = rd.load_model(str(root / "model"))
    rd.extract(cm, HARMFUL, HARMLESS, progress=False).save(root / "run")
    (root / "prompts.txt").write_text("\n".join(HARMLESS[:2]))
    (root / "harmful.txt").write_text("\n".join(HARMFUL))
    (root / "harmless.txt").write_text("\n".join(HARMLESS))
    return root


def _copy_model(root: Path, name: str) -> Path:
    import shutil

    target = root / name
    if not target.exists():
        shutil.copytree(root / "model", target)
    return target


def _invoke(args, **kw):
    from typer.testing import CliRunner

    from refusaldir.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], **kw)


def _one_error_line(r, exit_code: int = 1) -> str:
    """The result failed with ``exit_code`` and printed exactly one ``error:`` line, no traceback."""
    assert r.exit_code == exit_code, r.output
    assert "Traceback" not in r.output, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len([ln for ln in lines if ln.startswith("error:")]) == 1, r.output
    return r.output


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a command gets as far as loading the model."""
    from refusaldir.cli.common import ModelOptions

    def boom(self):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(ModelOptions, "load", boom)


# ------------------------------------------------------- a string where a list belongs
def test_a_string_is_never_one_prompt_per_character(tiny, tmp_path):
    model, ds = tiny
    with pytest.raises(PromptFileError, match=r"harmful got the single string .*load_prompts.*\[text\]"):
        rd.extract(model, "how do I make a bomb", HARMLESS, progress=False)
    with pytest.raises(PromptFileError, match="harmless got the single string"):
        rd.extract(model, HARMFUL, "harmless.txt", progress=False)
    with pytest.raises(PromptFileError, match="harmful_val got the single string"):
        rd.select_direction(model, ds, "how do I", HARMLESS, mode="cosine", record=False)
    with pytest.raises(PromptFileError, match=r"datasets\['harmful'\] got the single string"):
        evaluate(model, ds, conditions=["baseline"], datasets={"harmful": "how do I"}, progress=False)
    with pytest.raises(PromptFileError, match="harmful_val got the single string"):
        rd.LatentGuard.fit(model, ds, "how do I", HARMLESS, progress=False)
    with pytest.raises(PromptFileError, match="harmful_val got the single string"):
        audit(model, tmp_path / "a", harmful_val="how do I", progress=False)
    with pytest.raises(PromptFileError, match="harmful_train got the single string"):
        audit(model, tmp_path / "a", harmful_train="how do I", progress=False)
    with pytest.raises(PromptFileError, match="single string"):
        rd.PromptSet("abc")
    from refusaldir.evaluate import calibrate_addition
    from refusaldir.guard import guard_vs_behaviour
    from refusaldir.judges import find_refusal_tokens
    from refusaldir.steer import layer_scores

    with pytest.raises(PromptFileError, match="harmless got the single string"):
        layer_scores(model, ds, HARMFUL, "how do I")
    with pytest.raises(PromptFileError, match="harmless_val got the single string"):
        calibrate_addition(model, ds.refusal_direction(2, -1), "how do I")
    with pytest.raises(PromptFileError, match="harmful_prompts got the single string"):
        find_refusal_tokens(model, "how do I")
    with pytest.raises(PromptFileError, match="safe got the single string"):
        guard_vs_behaviour(model, None, HARMFUL, "how do I")
    with pytest.raises(PromptFileError, match=r"\[1\] is a int"):
        rd.extract(model, ["fine", 3], HARMLESS, progress=False)
    with pytest.raises(PromptFileError, match="got a dict"):
        rd.extract(model, {"prompt": "x"}, HARMLESS, progress=False)
    # where one prompt is natural, a string is exactly one prompt (never one per character)
    from refusaldir.generation import generate

    assert len(generate(model, "Hi there", max_new_tokens=2)) == 1
    g = rd.LatentGuard.fit(model, ds, HARMFUL, HARMLESS, progress=False)
    assert g.score(model, "Hi there").shape == (1,)
    assert rd.mean_activations(model, "Hi", layers=[1], progress=False).shape[0] == len(model.template.positions)


def test_check_prompts_is_the_one_helper():
    from refusaldir.data import as_prompt_list, check_prompts

    assert check_prompts(("a", "b"), "x") == ["a", "b"]
    assert check_prompts((p for p in ["a"]), "x") == ["a"]
    assert as_prompt_list("one", "x") == ["one"]
    for bad in ("abc", b"abc", 3, None, {"a": 1}, [], ["  "], ["a", ""]):
        with pytest.raises(PromptFileError):
            check_prompts(bad, "x")


# ---------------------------------------------------------------------------- limits
def test_zero_and_negative_limits_are_refused(tmp_path):
    (tmp_path / "p.txt").write_text("a\nb\nc\n")
    for bad in (0, -1, -3, 2.5, True, "2"):
        with pytest.raises(ConfigError, match="limit"):
            rd.load_prompts(tmp_path / "p.txt", limit=bad)
        with pytest.raises(ConfigError, match="limit"):
            rd.load_dataset("text", tmp_path / "p.txt", limit=bad)
    assert list(rd.load_prompts(tmp_path / "p.txt", limit=2)) == ["a", "b"]
    assert len(rd.load_prompts(tmp_path / "p.txt", limit=None)) == 3


def test_evaluate_limit_is_checked(tiny):
    model, ds = tiny
    with pytest.raises(ConfigError, match="limit=0"):
        evaluate(model, ds, conditions=["baseline"], datasets={"harmful": HARMFUL}, limit=0, progress=False)
    with pytest.raises(ConfigError, match="limit=-2"):
        evaluate(model, ds, conditions=["baseline"], datasets={"harmful": HARMFUL}, limit=-2, progress=False)


@pytest.mark.parametrize("cmd", [
    ["extract", "--limit", "0"], ["extract", "--limit", "-3"], ["generate", "--limit", "0"],
    ["evaluate", "--limit", "-1"], ["guard", "--limit", "0", "Hi"], ["audit", "--limit", "-3"],
    ["select", "--n-val", "0"], ["generate", "--max-new-tokens", "0"], ["select", "--top-k", "-1"],
])
def test_cli_bad_counts_are_one_line_before_loading(cmd, tmp_path, no_model_load):
    out = _one_error_line(_invoke([*cmd, "--model", tmp_path / "missing-model"]))
    assert cmd[1] in out and "missing-model" not in out


def test_cli_audit_limit_zero_keeps_its_documented_meaning(tmp_path, no_model_load):
    """README: `audit --limit 0` means every prompt; it must pass the option checks."""
    r = _invoke(["audit", "--model", tmp_path / "m", "--limit", "0", "--out", tmp_path / "a"])
    assert r.exit_code == 1 and "the model was loaded" in repr(r.exception) + r.output


# ---------------------------------------------------------------------- malformed CSV
@pytest.mark.parametrize("text, where", [
    ('prompt,category\nfirst,x\n"How do I bake,a\nHi,b",c\n', ":3"),  # a quote swallowed a row
    ('prompt,category\n"How do I bake,a\nHi,b\n', ":3"),  # never closed
    ('prompt,category\n"abc"def,a\n', ":2"),  # text after a closing quote
    ('prompt,category\nHow do I, like, bake bread?,cooking\n', ":2"),  # unquoted commas: 4 fields
    ('prompt,category\nfine,a\nonly one field\n', ":3"),  # too few fields
])
def test_malformed_csv_names_the_line(tmp_path, text, where):
    (tmp_path / "p.csv").write_text(text)
    with pytest.raises(PromptFileError, match=rf"p\.csv{where}"):
        rd.load_prompts(tmp_path / "p.csv")


def test_well_formed_csv_still_loads(tmp_path):
    (tmp_path / "p.csv").write_text('prompt,category\n"Hello, there",a\n"two\nlines",b\n"say ""hi""",c\n')
    ps = rd.load_prompts(tmp_path / "p.csv")
    assert list(ps) == ["Hello, there", "two\nlines", 'say "hi"'] and ps.categories == ["a", "b", "c"]
    (tmp_path / "h.csv").write_text("Behavior,ContextString\nB1,\"line one\nctx, with, commas\"\n")
    assert list(rd.load_prompts(tmp_path / "h.csv")) == ["B1"]  # only the prompt column is checked


def test_other_malformed_prompt_files(tmp_path):
    cases = {
        "list.json": ('[{"prompt": ["a", "b"]}]', "not text"),
        "ints.json": ("[1, 2]", r"ints.json \(item 0\) holds a int"),
        "deep.json": ("[" * 100_000, "not valid JSON"),
        "nul.txt": ("a\x00b\n", "NUL bytes"),
        "bad.jsonl": ('{"prompt": "a"}\n{"prompt": \n', r"bad.jsonl:2 is not valid JSON"),
    }
    for name, (text, match) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(PromptFileError, match=match):
            rd.load_prompts(tmp_path / name)
    (tmp_path / "bin.txt").write_bytes(bytes(range(128, 256)))
    with pytest.raises(PromptFileError, match="not UTF-8"):
        rd.load_prompts(tmp_path / "bin.txt")
    with pytest.raises(PromptFileError, match="is a folder"):
        rd.load_prompts(tmp_path)
    with pytest.raises(PromptFileError, match="has type int"):
        rd.load_prompts(3)


def test_cli_prompt_file_errors_name_the_option(root, tmp_path, no_model_load):
    (tmp_path / "bad.csv").write_text('prompt,category\n"How do I bake,a\nHi,b\n')
    out = _one_error_line(_invoke(["extract", "--model", root / "model", "--harmless", tmp_path / "bad.csv",
                                   "--out", tmp_path / "o"]))
    assert "--harmless" in out and "bad.csv:3" in out
    out = _one_error_line(_invoke(["generate", "--model", root / "model", "-p", tmp_path / "nope.txt"]))
    assert "--prompts" in out and "does not exist" in out


# ---------------------------------------------------------------- non-finite numbers
def test_non_finite_numbers_are_refused_at_construction(tiny):
    model, ds = tiny
    d = ds.refusal_direction(2, -1)
    for bad in (math.nan, math.inf, -math.inf, "x"):
        with pytest.raises(ConfigError):
            rd.Addition(d, coeff=bad)
        with pytest.raises(ConfigError):
            rd.ConditionalSteering(rd.Ablation(d), ds.harmfulness_direction(2), threshold=bad)
        with pytest.raises(ConfigError):
            rd.SelectionConfig(kl_max=bad)
        with pytest.raises(ConfigError):
            rd.AuditConfig(target_fpr=bad)
        with pytest.raises(ConfigError):
            rd.AuditConfig(kl_threshold=bad)
    with pytest.raises(ConfigError):
        rd.AuditConfig(add_coeff=math.inf)
    with pytest.raises(ConfigError):
        rd.SelectionConfig(kl_relax=(0.2, math.nan))
    for bad in (math.nan, 2.5, "3", True):  # counts are whole numbers, never int(nan) tracebacks
        with pytest.raises(ConfigError):
            rd.SelectionConfig(n_val=bad)
        with pytest.raises(ConfigError):
            rd.AuditConfig(k_max=bad)
    with pytest.raises(ConfigError, match="temperature"):
        from refusaldir.generation import generate

        generate(model, ["Hi"], temperature=math.nan, do_sample=True)
    with pytest.raises(ConfigError, match="add_coeff"):
        evaluate(model, ds, conditions=["baseline"], datasets={"harmful": HARMFUL}, add_coeff=math.nan,
                    progress=False)
    with pytest.raises(ConfigError, match="target_fpr"):
        rd.LatentGuard.fit(model, ds, HARMFUL, HARMLESS, target_fpr=math.nan, progress=False)


@pytest.mark.parametrize("cmd", [
    ["select", "--kl-max", "nan"], ["select", "--induce-min", "inf"], ["select", "--max-layer-frac", "nan"],
    ["generate", "--temperature", "inf"], ["generate", "--add", "1:nan", "--directions", "x"],
    ["evaluate", "--add-coeff", "nan"], ["guard", "--target-fpr", "nan", "Hi"], ["audit", "--target-fpr", "-inf"],
    ["guard", "--target-fpr", "1.5", "--directions", "x", "Hi"],
])
def test_cli_non_finite_options_fail_before_loading(cmd, tmp_path, no_model_load):
    out = _one_error_line(_invoke([*cmd, "--model", tmp_path / "missing-model"]))
    assert cmd[1] in out


def test_json_output_and_errors_are_strict_json(tmp_path, no_model_load, capsys):
    from refusaldir.cli.common import print_json

    print_json({"a": math.nan, "b": [math.inf]})
    assert json.loads(capsys.readouterr().out) == {"a": None, "b": [None]}
    for cmd in (["select", "--kl-max", "nan"], ["extract", "--limit", "abc"], ["extract", "--limit", "0"]):
        r = _invoke([*cmd, "--model", tmp_path / "m", "--json"])
        assert r.exit_code == 1
        body = json.loads(r.stdout.strip().splitlines()[-1])
        assert set(body) == {"error", "type"} and cmd[1] in body["error"]


# ------------------------------------------------------------ identical prompt sets
def test_identical_harmful_and_harmless_sets_are_refused(tiny):
    model, _ = tiny
    with pytest.raises(ConfigError, match="same 4 prompts"):
        rd.extract(model, HARMFUL, list(HARMFUL), progress=False)
    with pytest.raises(ConfigError, match="same"):
        rd.extract(model, HARMFUL, list(reversed(HARMFUL)), progress=False)


def test_zero_difference_of_means_is_refused(tiny, monkeypatch):
    from refusaldir.directions import extract as extract_module

    model, _ = tiny
    n_pos = len(model.template.positions) + 1

    def constant(model, texts, *, layers, positions, **kw):
        yield 0, torch.ones(len(texts), n_pos, len(layers), model.d_model)

    monkeypatch.setattr(sys.modules[extract_module.__module__], "iter_activations", constant)
    with pytest.raises(ConfigError, match="identical mean activations"):
        rd.extract(model, HARMFUL, HARMLESS, progress=False)


# ------------------------------------------------------------- the context window
def test_too_long_prompt_is_refused_before_any_forward_pass(short_model):
    model = short_model
    assert model.context_length == 96
    calls = []
    handle = model.hf.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ConfigError, match=r"harmless\[2\] .* tokens long .*context window of 96 .*truncate_prompts"):
            rd.extract(model, HARMFUL, [*HARMLESS[:2], LONG], progress=False)
        with pytest.raises(ConfigError, match=r"prompts\[1\] .*less max_new_tokens=8"):
            from refusaldir.generation import generate

            generate(model, ["Hi", LONG], max_new_tokens=8)
        with pytest.raises(ConfigError, match="lower max_new_tokens"):
            generate(model, ["Hi"], max_new_tokens=200)
    finally:
        handle.remove()
    assert not calls  # refused before any forward pass


def test_truncate_prompts_cuts_the_instruction_and_keeps_the_template(short_model):
    from refusaldir.models import PromptTruncatedWarning

    model = short_model
    model.truncate_prompts = True
    try:
        tpl = model.template
        with pytest.warns(PromptTruncatedWarning, match="1 of 2 prompts"):
            lengths = tpl.check_lengths(["Hi", LONG])
        assert lengths[1] > 96
        enc = tpl.encode(["Hi", LONG])
        assert enc["input_ids"].shape[1] == 96 and int(enc["attention_mask"][1].sum()) == 96
        post = torch.tensor(tpl.post_instruction_ids)
        assert torch.equal(enc["input_ids"][1, -tpl.n_post:], post)  # the template tail is intact
        head = tpl.encode([LONG[:20]])["input_ids"][0, : tpl.n_head]
        assert torch.equal(enc["input_ids"][1, : tpl.n_head], head)  # and so is its head
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PromptTruncatedWarning)
            ds = rd.extract(model, [*HARMFUL[:2], LONG], HARMLESS, progress=False)
            from refusaldir.generation import generate

            out = generate(model, [LONG], max_new_tokens=4)
        assert bool(torch.isfinite(ds.refusal).all()) and out[0].prompt_tokens <= 96 - 4
    finally:
        model.truncate_prompts = False


def test_cli_truncate_prompts_flag(root, tmp_path):
    folder = _copy_model(root, "short")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["max_position_embeddings"] = 96
    (folder / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "long.txt").write_text(f"Hi\n{LONG}\n")
    args = ["generate", "--model", folder, "-p", tmp_path / "long.txt", "--max-new-tokens", "2", "--json"]
    out = _one_error_line(_invoke(args))
    assert "--truncate-prompts" in out and "truncate_prompts" not in out  # the CLI talks about flags
    r = _invoke([*args, "--truncate-prompts"])
    assert r.exit_code == 0, r.output
    assert "warning:" in r.output and len(json.loads(r.stdout)["completions"]) == 2


# ------------------------------------------------------- model files and environment
def test_corrupt_model_files_are_model_load_errors(root, tmp_path, monkeypatch):
    monkeypatch.setenv("REFUSALDIR_CACHE", str(tmp_path / "cache"))
    half = _copy_model(root, "half")
    data = (half / "model.safetensors").read_bytes()
    (half / "model.safetensors").write_bytes(data[: len(data) // 2])
    noise = _copy_model(root, "noise")
    (noise / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    notok = _copy_model(root, "notok")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (notok / f).unlink(missing_ok=True)
    (tmp_path / "random.gguf").write_bytes(bytes(range(64)))
    (tmp_path / "header.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    truncated = _small_gguf(tmp_path / "real.gguf")
    for spec, match in [(half, "corrupt or truncated"), (noise, "corrupt or truncated"), (notok, "no tokenizer"),
                        (tmp_path / "random.gguf", "GGUF file"), (tmp_path / "header.gguf", "struct.error"),
                        (truncated, "GGUF file")]:
        with pytest.raises(ModelLoadError, match=match):
            rd.load_model(str(spec))
        out = _one_error_line(_invoke(["generate", "--model", spec, "-p", root / "prompts.txt"]))
        assert str(spec) in out
    r = _invoke(["-v", "generate", "--model", half, "-p", root / "prompts.txt"])
    assert r.exit_code == 1 and "Traceback" in r.output and "SafetensorError" in r.output  # -v: the traceback


def _small_gguf(path: Path) -> Path:
    """A real (tiny, unusable) GGUF written with the ``gguf`` package, then cut in half."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = path.read_bytes()
    out = path.with_name("truncated.gguf")
    out.write_bytes(data[: len(data) // 2])
    return out


def test_bad_device_dtype_and_template_fail_before_loading(root, tmp_path, no_model_load):
    for args, what in [(["--device", "gpu0"], "'gpu0' is not a device name"), (["--dtype", "int4"], "dtype"),
                       (["--device", "tpu"], "not a device")]:
        out = _one_error_line(_invoke(["generate", "--model", root / "model", *args]))
        assert what in out
    (tmp_path / "bin.jinja").write_bytes(bytes(range(128, 256)))
    (tmp_path / "nul.jinja").write_bytes(b"{{ x }}\x00\x01")
    (tmp_path / "empty.jinja").write_text("  \n")
    for name in ("bin.jinja", "nul.jinja", "empty.jinja", "missing.jinja"):
        out = _one_error_line(_invoke(["generate", "--model", root / "model", "--chat-template", tmp_path / name]))
        assert name in out


def test_unusable_chat_template_is_a_template_error(root, tmp_path):
    (tmp_path / "plain.jinja").write_text("no placeholders at all")
    (tmp_path / "broken.jinja").write_text("{% for m in messages %}{{ m['content'] }")
    for name in ("plain.jinja", "broken.jinja"):
        with pytest.raises(TemplateError):
            rd.load_model(str(root / "model"), chat_template=(tmp_path / name).read_text()).template.positions
        _one_error_line(_invoke(["generate", "--model", root / "model", "--chat-template", tmp_path / name,
                                 "-p", root / "prompts.txt", "--max-new-tokens", "1"]))


def test_offline_hub_id_fails_at_once(monkeypatch, tmp_path):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE"):
        rd.load_model("some-org/not-cached-model")
    assert time.perf_counter() - start < 20


@pytest.mark.parametrize("exc, match", [
    (OSError(errno.ENOSPC, "No space left on device", "/data/run/x"), "disk is full"),
    (OSError(errno.EROFS, "Read-only file system", "/ro/run"), "read-only"),
    (PermissionError(errno.EACCES, "Permission denied", "/root/x"), "permission denied"),
    (MemoryError(), "out of memory"),
    (torch.OutOfMemoryError("CUDA out of memory"), "out of memory"),
    (KeyError("layers"), "unexpected KeyError"),
])
def test_environment_faults_are_one_line(exc, match, root, monkeypatch):
    from refusaldir.cli.common import ModelOptions

    def fail(self):
        raise exc

    monkeypatch.setattr(ModelOptions, "load", fail)
    out = _one_error_line(_invoke(["generate", "--model", root / "model", "-p", root / "prompts.txt"]))
    assert match in out
    r = _invoke(["-v", "generate", "--model", root / "model", "-p", root / "prompts.txt", "--json"])
    assert r.exit_code == 1 and "Traceback" in r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["error"]


def test_metadata_missing_a_key_is_not_a_traceback(root, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    meta = json.loads((run / "metadata.json").read_text())
    del meta["layers"]
    (run / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(RefusalDirError):
        rd.DirectionSet.load(run)
    _one_error_line(_invoke(["generate", "--model", root / "model", "--directions", run, "--ablate",
                             "-p", root / "prompts.txt", "--max-new-tokens", "1"]))


# ----------------------------------------------------------- late or misleading errors
def test_unwritable_out_is_reported_before_loading(root, tmp_path, monkeypatch, no_model_load):
    from refusaldir.cli import parsing

    out = _one_error_line(_invoke(["extract", "--model", root / "model", "--out", root / "prompts.txt" / "sub"]))
    assert "cannot write --out" in out and "is a file" in out
    monkeypatch.setattr(parsing, "writable", lambda folder: False)  # a read-only folder (tests run as root)
    for cmd, flag in ((["extract", "--out", tmp_path / "o"], "--out"), (["evaluate", "--out", tmp_path / "o"], "--out"),
                      (["audit", "--out", tmp_path / "o"], "--out"), (["select", "--directions", tmp_path / "o"], "--directions"),
                      (["guard", "--directions", root / "run", "--save", tmp_path / "g", "Hi"], "--save")):
        out = _one_error_line(_invoke([*cmd, "--model", root / "model"]))
        assert "read-only" in out and f"cannot write {flag}" in out
    assert not (tmp_path / "o").exists()  # nothing was created


def test_bad_option_values_fail_before_loading(root, tmp_path, no_model_load):
    cases = [
        (["generate", "--add", "1:abc", "--directions", root / "run"], "--add"),
        (["generate", "--add", "x-y:2", "--directions", root / "run"], "--add"),
        (["generate", "--ablate"], "--directions"),
        (["evaluate", "--conditions", "baseline,nonsense"], "nonsense"),
        (["evaluate", "--judge", "gpt"], "--judge"),
        (["evaluate", "--judge", f"model:{tmp_path / 'nope'}"], "--judge"),
        (["evaluate", "--cross-judge", "prefix,ensemble:phrase"], "--cross-judge"),
        (["extract", "--pos", "3"], "--pos"),
        (["extract", "--hook-point", "attn"], "--hook-point"),
        (["extract", "--layers", "14-8"], "backwards"),
        (["select", "--positions", ","], "--positions"),
        (["select", "--mode", "best"], "--mode best"),
        (["guard", "--method", "magic", "--directions", root / "run", "Hi"], "--method"),
        (["orthogonalize", "--out", tmp_path / "o"], "--directions"),
        (["extract", "--batch-size", "0"], "--batch-size"),
        (["extract", "--batch-size", "²"], "--batch-size"),
    ]
    for args, what in cases:
        out = _one_error_line(_invoke([*args, "--model", root / "model"]))
        assert what in out, (args, out)


def test_usage_errors_are_one_line_and_help_still_works():
    r = _invoke(["extract", "--limit", "abc"])
    out = _one_error_line(r)
    assert "--limit" in out and "extract --help" in out and "╭" not in out
    out = _one_error_line(_invoke(["extract", "--no-such-option"]))
    assert "--no-such-option" in out
    _one_error_line(_invoke(["no-such-command"]))
    for args in (["--help"], ["extract", "--help"], ["guard", "--help"]):
        r = _invoke(args)
        assert r.exit_code == 0 and "Usage" in r.output
    assert "--truncate-prompts" in _invoke(["generate", "--help"]).output


def test_cli_messages_name_options_not_python_arguments():
    from refusaldir.cli.failures import cli_message

    flags = {"kl_max": "--kl-max", "force": "--force", "column": "--column", "chat_template": "--chat-template",
             "bootstrap": "--bootstrap", "mode": "--mode", "truncate_prompts": "--truncate-prompts"}
    assert cli_message("kl_max=nan must be a finite number", flags) == "--kl-max nan must be a finite number"
    assert cli_message("mode='best' is not one of exact", flags) == "--mode best is not one of exact"
    assert cli_message("n_bootstrap=-1 must be >= 0", flags) == "--bootstrap -1 must be >= 0"
    assert cli_message("exists; pass --force (force=True) to replace it", flags) == "exists; pass --force to replace it"
    assert cli_message("or pass column=NAME / --column NAME", flags) == "or pass --column NAME"
    assert cli_message("or pass truncate_prompts=True to cut", flags) == "or pass --truncate-prompts to cut"
    code = "load_model(..., chat_template=JINJA)"
    assert cli_message(code, flags) == code  # code is left alone
    assert cli_message("d_model=64 differs", flags) == "d_model=64 differs"  # not an option here
    assert cli_message("load it with system_prompt=None", {"system_prompt": "--system-prompt"}) == \
        "load it with no --system-prompt"


def test_select_and_audit_reject_unknown_settings(tiny, tmp_path):
    model, ds = tiny
    with pytest.raises(ConfigError, match="unknown selection setting"):
        rd.select_direction(model, ds, HARMFUL, HARMLESS, n_vla=4)
    with pytest.raises(ConfigError, match="unknown audit setting"):
        audit(model, tmp_path / "a", limt=4)


def test_layer_arguments_are_whole_numbers(tiny):
    model, _ = tiny
    for bad in ([1.5], [math.nan], ["1"], [True]):
        with pytest.raises(HookError, match="whole layer indices"):
            rd.mean_activations(model, ["Hi"], layers=bad, progress=False)
    assert rd.mean_activations(model, ["Hi"], layers=2, progress=False).shape[1] == 1  # one index


def test_project_checks_the_directions_shape(tiny):
    model, ds = tiny
    with pytest.raises(ConfigError, match="pos, layer, d_model"):
        rd.project(model, ["Hi"], ds.refusal[0, 0], layers=[1], positions=[-1], progress=False)
    with pytest.raises(ConfigError, match="one direction per"):
        rd.project(model, ["Hi"], ds.refusal[:1], layers=[1], positions=[-1], progress=False)
    with pytest.raises(ConfigError, match="NaN"):
        rd.project(model, ["Hi"], torch.full((1, 1, model.d_model), math.nan), layers=[1], positions=[-1],
                   progress=False)


def test_resource_error_class():
    assert issubclass(ResourceError, RefusalDirError) and issubclass(ArtifactError, RefusalDirError)
