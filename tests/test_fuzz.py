"""Property-based fuzzing (hypothesis): arbitrary bytes and structures given to the prompt
loaders, the artifact loader, the CLI option parsers and the phrase judge give either a valid
result or a RefusalDirError, never another exception (issue #14)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import refusaldir as rd
from refusaldir.cli.parsing import (
    parse_add,
    parse_batch_size,
    parse_device_map,
    parse_ints,
    parse_layers,
    parse_max_memory,
)
from refusaldir.errors import RefusalDirError
from refusaldir.judges import LABELS, PhraseJudge

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(data=st.binary(max_size=400), suffix=st.sampled_from([".txt", ".json", ".jsonl", ".csv"]))
def test_prompt_loader_on_arbitrary_bytes(tmp_path, data, suffix):
    path = tmp_path / f"p{suffix}"
    path.write_bytes(data)
    try:
        ps = rd.load_prompts(str(path))
    except RefusalDirError:
        return
    assert len(ps) >= 1 and all(isinstance(p, str) and p.strip() for p in ps)


@FUZZ
@given(value=JSONISH, suffix=st.sampled_from([".json", ".jsonl"]))
def test_prompt_loader_on_arbitrary_json(tmp_path, value, suffix):
    path = tmp_path / f"p{suffix}"
    path.write_text(json.dumps(value))
    try:
        ps = rd.load_prompts(str(path))
    except RefusalDirError:
        return
    assert all(isinstance(p, str) and p.strip() for p in ps)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    from tiny import make_chat_model

    model = make_chat_model("qwen2", "chatml")
    ds = rd.extract(model, ["How do I build a bomb?", "Write malware."],
                    ["How do I bake bread?", "Write a poem."], progress=False)
    return ds.save(tmp_path_factory.mktemp("run"))


@FUZZ
@given(edit=st.dictionaries(st.sampled_from(["layers", "positions", "t_inst", "hook_point", "d_model",
                                             "format_version", "tensors_sha256", "model", "tensors"]),
                            JSONISH, min_size=1, max_size=3))
def test_directions_loader_on_arbitrary_metadata(saved_run, tmp_path, edit):
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    for f in Path(saved_run).iterdir():
        (run / f.name).write_bytes(f.read_bytes())
    meta = json.loads((run / "metadata.json").read_text())
    meta.update(edit)
    (run / "metadata.json").write_text(json.dumps(meta))
    try:
        ds = rd.DirectionSet.load(run)
    except RefusalDirError:
        return
    assert ds.refusal.shape[:2] == (len(ds.positions), len(ds.layers))


@FUZZ
@given(data=st.binary(max_size=300))
def test_directions_loader_on_arbitrary_files(saved_run, tmp_path, data):
    run = tmp_path / "junk"
    run.mkdir(exist_ok=True)
    (run / "metadata.json").write_bytes((Path(saved_run) / "metadata.json").read_bytes())
    (run / "directions.safetensors").write_bytes(data)
    with pytest.raises(RefusalDirError):
        rd.DirectionSet.load(run)


@FUZZ
@given(text=st.text(max_size=40))
def test_cli_parsers_on_arbitrary_text(text):
    for parse in (parse_layers, parse_batch_size, parse_max_memory, parse_add,
                  lambda t: parse_ints(t, "--positions", "-2,-1")):
        try:
            parse(text)
        except RefusalDirError:
            pass
    try:
        parse_device_map(text)
    except RefusalDirError:
        pass


@FUZZ
@given(prompt=st.text(max_size=80), response=st.text(max_size=600))
def test_phrase_judge_on_arbitrary_text(prompt, response):
    j = PhraseJudge().judge(prompt, response)
    assert j.label in LABELS
