"""Integration: the real embedded models from PyPI wheels (slow; loaded once per session)."""

from __future__ import annotations

import json

import pytest
import torch

import refusaldir as rd

pytestmark = pytest.mark.integration


def test_demo_refusal_direction_separates_test_prompts(demo_model, demo_directions):
    model, ds = demo_model, demo_directions
    assert ds.positions == [-5, -4, -3, -2, -1]  # <|im_end|> \n <|im_start|> assistant \n
    assert ds.metadata["model"]["weights_hash"] == rd.models.DEMO_SHA256
    rows = rd.directions.layer_stats(
        model, ds, rd.load_prompts("harmful", "test"), rd.load_prompts("harmless", "test"),
        pos=-1, progress=False,
    )
    middle = [r for r in rows if model.n_layers // 4 <= r["layer"] < 3 * model.n_layers // 4]
    best = max(middle, key=lambda r: r["auroc"])
    assert best["auroc"] >= 0.95, rows
    # harmful prompts project higher than harmless ones at the best layer
    assert best["mean_proj_harmful"] > best["mean_proj_harmless"]
    # refusal and harmfulness directions are related but distinct (Zhao et al. 2025)
    assert 0.2 < best["cosine"] < 0.95


def test_demo_second_load_uses_cache(demo_model):
    import time

    t = time.perf_counter()
    again = rd.load_model("demo")
    assert time.perf_counter() - t < 60
    assert again.weights_hash == demo_model.weights_hash


def test_smollm2_extract_and_cli(smollm2_model, tmp_path):
    from typer.testing import CliRunner

    from refusaldir.cli import app

    tpl = smollm2_model.template
    assert smollm2_model.tokenizer.decode(list(tpl.post_instruction_ids)).endswith("assistant\n")
    out = tmp_path / "smol"
    res = CliRunner().invoke(app, ["extract", "--model", "smollm2", "--out", str(out), "--limit", "24",
                                   "--layers", "10-20", "--json"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.output[res.output.index("{"):])
    assert [r["layer"] for r in payload["layers"]] == list(range(10, 21))
    ds = rd.DirectionSet.load(out)
    assert ds.refusal.shape == (tpl.n_post, 11, smollm2_model.d_model)
    assert torch.isfinite(ds.refusal).all()


def test_cli_user_mistakes_print_one_red_line(tmp_path):
    from typer.testing import CliRunner

    from refusaldir.cli import app

    (tmp_path / "empty.txt").write_text("\n")
    runner = CliRunner()
    for args, needle in (
        (["extract", "--model", "smollm2", "--harmful", str(tmp_path / "empty.txt")], "contains no prompts"),
        (["extract", "--model", "smollm2", "--layers", "0,99", "--limit", "2"], "layer 99 is out of range"),
        (["extract", "--model", "nope/../x.gguf"], "does not exist"),
    ):
        res = runner.invoke(app, args)
        assert res.exit_code == 1, res.output
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("error:"), res.stderr
        assert "Traceback" not in res.output
