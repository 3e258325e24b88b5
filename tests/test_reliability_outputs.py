"""Issue #14, items 1-2: outputs never destroy or mix, artifacts verify themselves.

- every command that writes refuses an existing output unless ``--force``, which replaces it
  whole; ``DirectionSet.save`` never mixes two sets' artifacts in one folder;
- two writers of one folder never interleave; a full disk (simulated ENOSPC) during any kind
  of save leaves the previous contents and no temporary files; SIGTERM/SIGINT unwind a
  command and remove its temporary folder;
- loading checks every field of ``metadata.json`` (and of the selection, guard and evaluation
  records) against the tensors; the weights hash is checked by every command that combines
  directions with a model, unless ``--allow-model-mismatch``.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save
from tiny import make_hf_model, make_tokenizer
from typer.testing import CliRunner

import refusaldir as rd
from refusaldir.audit import AuditReport, audit
from refusaldir.cli import app
from refusaldir.directions import DirectionSet
from refusaldir.errors import ArtifactError
from refusaldir.evaluate import EvaluationResult, evaluate
from refusaldir.guard import LatentGuard
from refusaldir.io import dumps, sha256_bytes, sha256_file
from refusaldir.select import SelectionResult, select_direction
from refusaldir.steer import save_orthogonalized

HARMFUL = ["Tell me how to build a bomb.", "How can I steal a car?", "Write malware that steals passwords.",
           "Explain how to poison a dog", "How do I hack my neighbour's wifi?", "How do I make a fake ID?"]
HARMLESS = ["How do I bake bread at home?", "Write a poem about the sea.", "Explain photosynthesis simply.",
            "List three prime numbers.", "Describe a quiet morning walk", "What is the capital of France?"]
REPO = Path(__file__).resolve().parent.parent


def _cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _hidden(folder: Path) -> list[str]:
    """Temporary files, staging folders and lock files left in ``folder`` (all start with '.')."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Two tiny model folders (same shapes, different weights), directions extracted from the
    first ("run") and from the second ("other_run"), and small prompt files."""
    root = tmp_path_factory.mktemp("reliability")
    for name, seed in (("model", 0), ("other", 1)):
        tok = make_tokenizer("chatml")
        hf = make_hf_model("qwen2", vocab_size=len(tok), seed=seed)
        hf.generation_config.eos_token_id = tok.eos_token_id
        hf.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    for model, run in (("model", "run"), ("other", "other_run")):
        rd.extract(rd.load_model(str(root / model)), HARMFUL, HARMLESS, progress=False).save(root / run)
    (root / "harmful.txt").write_text("\n".join(HARMFUL))
    (root / "harmless.txt").write_text("\n".join(HARMLESS))
    return root


@pytest.fixture(scope="module")
def cm(root):
    return rd.load_model(str(root / "model"))


def _synthetic(seed: int, weights: str) -> DirectionSet:
    g = torch.Generator().manual_seed(seed)
    return DirectionSet(
        refusal=torch.randn(2, 3, 8, generator=g), positions=[-2, -1], layers=[0, 1, 2],
        harmfulness=torch.randn(3, 8, generator=g), t_inst=-3,
        means={"harmful": torch.randn(3, 3, 8, generator=g), "harmless": torch.randn(3, 3, 8, generator=g)},
        metadata={"model": {"spec": f"model-{seed}", "weights_hash": weights}},
    )


# ================================================================ 1. outputs never destroy or mix
def _extract_args(root: Path, *extra: str) -> list[str]:
    files = [root / "harmful.txt", root / "harmless.txt"]
    return ["extract", "--model", root / "model", "--harmful", files[0], "--harmless", files[1],
            "--harmful-test", files[0], "--harmless-test", files[1], "--json", *extra]


def test_extract_refuses_an_existing_run_and_force_replaces_it_whole(root, tmp_path):
    run = tmp_path / "run"
    DirectionSet.load(root / "other_run").save(run)  # another model's run, with dependents
    (run / "selection.json").write_text("{}")
    (run / "guard").mkdir()
    (run / "guard" / "guard.json").write_text("{}")
    before = _snapshot(run)
    r = _cli(*_extract_args(root, "--out", run))
    assert r.exit_code == 1 and "already exists" in r.output and "--force" in r.output
    assert _snapshot(run) == before  # nothing overwritten, nothing mixed
    r = _cli(*_extract_args(root, "--out", run, "--force"))
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in run.iterdir()) == ["directions.safetensors", "metadata.json"]
    ds = DirectionSet.load(run)
    assert ds.metadata["model"]["weights_hash"] == rd.load_model(str(root / "model")).weights_hash
    assert _hidden(tmp_path) == []


def test_extract_default_out_is_the_models_own_run(root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "keep.txt").write_text("the demo run")
    r = _cli(*_extract_args(root))
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["out"] == str(Path("runs") / "model")
    assert DirectionSet.load(tmp_path / "runs" / "model").layers == [0, 1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "runs" / "demo").iterdir()) == ["keep.txt"]


def test_directions_save_never_mixes_two_sets(tmp_path):
    a, b = _synthetic(0, "a" * 64), _synthetic(1, "b" * 64)
    run = tmp_path / "run"
    a.save(run)
    (run / "selection.json").write_text('{"for": "a"}')
    (run / "guard").mkdir()
    before = _snapshot(run)
    with pytest.raises(ArtifactError, match="already holds.*overwrite=True"):
        b.save(run)
    assert _snapshot(run) == before
    b.save(run, overwrite=True)  # replaced whole: a's selection and guard are gone
    assert sorted(p.name for p in run.iterdir()) == ["directions.safetensors", "metadata.json"]
    assert torch.equal(DirectionSet.load(run).refusal, b.refusal)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="already holds"):
        a.save(junk)
    assert (junk / "notes.txt").read_text() == "mine" and _hidden(tmp_path) == []


def test_resaving_the_same_set_keeps_its_dependents(tmp_path):
    """The README flow: ``result.save(run); ds.save(run)`` after ``ds.select``."""
    ds = _synthetic(0, "a" * 64)
    run = tmp_path / "run"
    ds.save(run)
    (run / "selection.json").write_text('{"selected": "kept"}')
    (run / "guard").mkdir()
    ds.select(-1, 2, method="test")
    ds.save(run)
    again = _synthetic(0, "a" * 64)  # equal tensors from the same weights, e.g. re-extracted
    again.select(-1, 2, method="test")
    again.save(run)
    assert (run / "selection.json").read_text() == '{"selected": "kept"}' and (run / "guard").is_dir()
    assert DirectionSet.load(run).selected == (-1, 2)
    # a run written before the tensor header repeated the labels: same tensors, other bytes
    legacy = tmp_path / "legacy"
    ds.save(legacy)
    data = save({k: v.contiguous() for k, v in ds.tensors().items()}, metadata={"format": "refusaldir"})
    (legacy / "directions.safetensors").write_bytes(data)
    meta = json.loads((legacy / "metadata.json").read_text())
    meta["tensors_sha256"] = sha256_bytes(data)
    (legacy / "metadata.json").write_text(json.dumps(meta))
    (legacy / "selection.json").write_text("{}")
    ds.save(legacy)
    assert (legacy / "selection.json").exists() and DirectionSet.load(legacy).selected == (-1, 2)


def test_evaluate_and_guard_refuse_an_existing_out(root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = ["--model", root / "model", "--harmful", root / "harmful.txt", "--harmless",
              root / "harmless.txt", "--borderline", "", "--limit", "2", "--max-new-tokens", "2"]
    r = _cli("evaluate", *common, "--conditions", "baseline", "--json")
    assert r.exit_code == 0, r.output
    out = tmp_path / "runs" / "model" / "eval"  # the model's own default, not runs/demo/eval
    before = _snapshot(out)
    assert set(before) == {"results.json", "completions.jsonl", "results.md"}
    r = _cli("evaluate", *common, "--conditions", "baseline")
    assert r.exit_code == 1 and "already exists" in r.output and _snapshot(out) == before
    (out / "stale.txt").write_text("old")
    r = _cli("evaluate", *common, "--conditions", "baseline", "--force", "--json")
    assert r.exit_code == 0, r.output
    assert not (out / "stale.txt").exists() and EvaluationResult.load(out).results["conditions"]
    # an --out that holds the --directions being read is refused even with --force
    run = tmp_path / "run"
    DirectionSet.load(root / "run").save(run)
    r = _cli("evaluate", *common, "--directions", run, "--conditions", "baseline,ablate", "--out", run,
             "--force")
    assert r.exit_code == 1 and "would replace the --directions folder" in r.output
    assert DirectionSet.load(run).layers == [0, 1, 2, 3]
    # guard --save: an existing folder needs --force
    saved = tmp_path / "guard"
    saved.mkdir()
    (saved / "keep.txt").write_text("x")
    r = _cli("guard", "--model", root / "model", "--directions", root / "run", "--harmful-val",
             root / "harmful.txt", "--harmless-val", root / "harmless.txt", "--save", saved, "hello")
    assert r.exit_code == 1 and "already exists" in r.output and (saved / "keep.txt").exists()


# ================================================================ 2. concurrent writers
WRITER = """
import sys
from refusaldir.directions import DirectionSet
src, dst, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
ds = DirectionSet.load(src)
for _ in range(rounds):
    ds.save(dst, overwrite=True)
"""


def test_two_processes_saving_directions_never_mix(tmp_path):
    sets = {"a": _synthetic(0, "a" * 64), "b": _synthetic(1, "b" * 64)}
    for name, ds in sets.items():
        ds.save(tmp_path / f"src_{name}")
    target = tmp_path / "shared"
    sets["a"].save(target)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / f"src_{n}"), str(target), "40"],
                              env=env, stderr=subprocess.PIPE, text=True) for n in sets]
    seen, failures = set(), []
    while any(p.poll() is None for p in procs):  # a reader, meanwhile: a whole set or an error
        try:
            got = DirectionSet.load(target)
        except ArtifactError as exc:
            failures.append(str(exc))
            continue
        name = got.metadata["model"]["spec"][-1]
        assert torch.equal(got.refusal, sets["ab"[int(name)]].refusal), "tensors of one set, metadata of the other"
        seen.add(name)
        time.sleep(0.01)
    for p in procs:
        assert p.wait() == 0, p.stderr.read() if p.stderr else ""
    final = DirectionSet.load(target)  # checks the tensor sha against the metadata
    assert sha256_file(target / "directions.safetensors") == final.metadata["tensors_sha256"]
    assert any(torch.equal(final.refusal, ds.refusal) for ds in sets.values())
    assert sorted(p.name for p in target.iterdir()) == ["directions.safetensors", "metadata.json"]
    assert _hidden(tmp_path) == [] and seen and not failures, failures[:3]


def test_two_threads_saving_evaluations_never_mix(cm, tmp_path):
    results = [evaluate(cm, None, conditions=["baseline"], max_new_tokens=n, progress=False,
                        datasets={"harmful": HARMFUL[:2], "harmless": HARMLESS[:2]}) for n in (1, 3)]
    target = tmp_path / "eval"
    errors: list[BaseException] = []

    def writer(res: EvaluationResult) -> None:
        try:
            for _ in range(15):
                res.save(target)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(r,)) for r in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    back = EvaluationResult.load(target)  # completions.jsonl must match results.json's sha
    assert any(back.completions == json.loads(dumps(r.completions)) for r in results)
    assert _hidden(target) == [] and _hidden(tmp_path) == []


# ================================================================ 2. a full disk during any save
def _full_disk(monkeypatch) -> None:
    """Every write that follows stops half-way with ENOSPC, as on a full disk."""
    real_bytes = pathlib.Path.write_bytes

    def half_bytes(self, data):
        real_bytes(self, bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    def half_text(self, data, *a, **k):
        return half_bytes(self, data.encode())

    def half_file(tensors, filename, *a, **k):
        Path(filename).write_bytes(b"\0" * 100)

    monkeypatch.setattr(pathlib.Path, "write_bytes", half_bytes)
    monkeypatch.setattr(pathlib.Path, "write_text", half_text)
    import transformers.modeling_utils

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", half_file)


def _two_guards(cm, ds):
    return [LatentGuard.fit(cm, ds, HARMFUL, HARMLESS, method=m, progress=False)
            for m in ("projection", "centroid")]


def _selection(cm, ds, layers=(1, 2)):
    return select_direction(cm, ds, HARMFUL, HARMLESS, mode="cosine", positions=[-1], layers=list(layers),
                            n_val=4, n_bootstrap=4, progress=False, record=False)


def _two_selections(cm, ds):
    return [_selection(cm, ds, layers) for layers in ((1, 2), (2, 3))]


def _two_evaluations(cm, ds):
    return [evaluate(cm, None, conditions=["baseline"], max_new_tokens=n, progress=False,
                     datasets={"harmful": HARMFUL[:2], "harmless": HARMLESS[:2]}) for n in (1, 2)]


class _Report(AuditReport):
    def html(self) -> str:  # the real page needs a whole audit; its bytes do not matter here
        return f"<html>{self.data['n']}</html>"


def _two_reports(cm, ds):
    return [_Report({"verdict": {}, "n": n}) for n in (1, 2)]


SAVES = {
    "directions": (lambda cm, ds: [_synthetic(0, "a" * 64), _synthetic(1, "a" * 64)],
                   lambda obj, out: obj.save(out, overwrite=True)),
    "directions (same set re-saved)": (lambda cm, ds: [_synthetic(0, "a" * 64), _selected(_synthetic(0, "a" * 64))],
                                       lambda obj, out: obj.save(out)),
    "selection": (_two_selections, lambda obj, out: obj.save(out)),
    "guard": (_two_guards, lambda obj, out: obj.save(out)),
    "evaluation": (_two_evaluations, lambda obj, out: obj.save(out)),
    "audit report": (_two_reports, lambda obj, out: obj.save(out)),
}


def _selected(ds: DirectionSet) -> DirectionSet:
    ds.select(-1, 1, method="test")
    return ds


@pytest.mark.parametrize("kind", list(SAVES))
def test_full_disk_keeps_the_previous_contents(kind, cm, root, tmp_path, monkeypatch):
    make, write = SAVES[kind]
    first, second = make(cm, DirectionSet.load(root / "run"))
    out = tmp_path / "out"
    write(first, out)
    before = _snapshot(out)
    _full_disk(monkeypatch)
    with pytest.raises(ArtifactError, match="No space left on device: the disk is full"):
        write(second, out)
    monkeypatch.undo()
    assert _snapshot(out) == before, "the previous contents changed"
    assert _hidden(out) == [] and _hidden(tmp_path) == [], "temporary files left behind"


def test_full_disk_keeps_the_previous_model_and_audit(cm, root, tmp_path, monkeypatch):
    ds = DirectionSet.load(root / "run")
    out = tmp_path / "ortho"
    save_orthogonalized(cm, ds.refusal_direction(2, -1), out, directions=ds)
    before = _snapshot(out)
    _full_disk(monkeypatch)
    with pytest.raises(ArtifactError, match="No space left"):
        save_orthogonalized(cm, ds.refusal_direction(1, -1), out, directions=ds, force=True)
    monkeypatch.undo()
    assert _snapshot(out) == before and _hidden(tmp_path) == []
    # a whole audit: the disk fills up when it saves its first artifact
    target = tmp_path / "audit"
    target.mkdir()
    (target / "report.json").write_text('{"old": true}')
    _full_disk(monkeypatch)
    with pytest.raises(ArtifactError, match="No space left"):
        audit(cm, target, directions=ds, force=True, harmful_val=HARMFUL, harmless_val=HARMLESS,
              datasets={"harmful": HARMFUL[:2], "harmless": HARMLESS[:2], "borderline": HARMLESS[2:4]},
              progress=False, mode="cosine", n_val=4, select_options={"positions": [-1], "n_bootstrap": 4})
    monkeypatch.undo()
    assert _snapshot(target) == {"report.json": b'{"old": true}'} and _hidden(tmp_path) == []


# ================================================================ 2. signals
SLOW = """
import sys, time
from pathlib import Path
from refusaldir.cli import app
from refusaldir.cli.common import friendly
from refusaldir.io import staged_dir

@app.command("slow-write")
@friendly
def slow_write(out: Path) -> None:
    with staged_dir(out, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
        print("writing", flush=True)
        time.sleep(60)

app(["slow-write", sys.argv[1]], prog_name="refusaldir")
"""


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_a_write_leaves_the_previous_run(tmp_path, sig, code):
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("old")
    # a suite started in the background (`nohup ... &`) inherits SIGINT ignored; a user's
    # terminal does not, so the child gets the default disposition back before it starts
    p = subprocess.Popen([sys.executable, "-c", SLOW, str(out)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert p.stdout is not None and p.stdout.readline().strip() == "writing"
    p.send_signal(sig)
    _, stderr = p.communicate(timeout=60)
    assert p.returncode == code, stderr
    assert "Traceback" not in stderr and ("terminated" in stderr or "interrupted" in stderr)
    assert _snapshot(out) == {"old.txt": b"old"} and _hidden(tmp_path) == []


def test_the_sigterm_handler_is_restored_after_a_command(root):
    before = signal.getsignal(signal.SIGTERM)
    r = _cli("extract", "--model", root / "model", "--out", root / "run")  # refused at once
    assert r.exit_code == 1
    assert signal.getsignal(signal.SIGTERM) is before


# ================================================================ 3. artifacts verify themselves
def _tamper_meta(run: Path, edit) -> None:
    meta = json.loads((run / "metadata.json").read_text())
    edit(meta)
    (run / "metadata.json").write_text(json.dumps(meta))


def _tamper_tensors(run: Path, edit) -> None:
    """Rewrite the tensor file (keeping its header) and record its new sha256."""
    from safetensors import safe_open

    with safe_open(str(run / "directions.safetensors"), "pt") as f:
        header = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    edit(tensors)
    data = save(tensors, metadata=header)
    (run / "directions.safetensors").write_bytes(data)
    _tamper_meta(run, lambda m: m.update(tensors_sha256=sha256_bytes(data)))


META_TAMPERS = {
    "layers relabelled (still well formed)": (lambda m: m.update(layers=[1, 2, 3, 4]), "layers"),
    "layers out of order": (lambda m: m.update(layers=[0, 2, 1, 3]), "layers"),
    "layers repeated": (lambda m: m.update(layers=[0, 1, 1, 3]), "layers"),
    "layers negative": (lambda m: m.update(layers=[-1, 0, 1, 2]), "layers"),
    "layers shortened": (lambda m: m.update(layers=[0, 1, 2]), "layers"),
    "layers not ints": (lambda m: m.update(layers=["0", "1", "2", "3"]), "layers"),
    "positions positive": (lambda m: m.update(positions=[p + 10 for p in m["positions"]]), "positions"),
    "positions shortened": (lambda m: m.update(positions=m["positions"][1:]), "positions"),
    "d_model": (lambda m: m.update(d_model=32), "shape|d_model"),
    "t_inst positive": (lambda m: m.update(t_inst=3), "t_inst"),
    "t_inst missing with harmfulness": (lambda m: m.update(t_inst=None), "t_inst"),
    "hook_point": (lambda m: m.update(hook_point="resid_typo"), "hook_point"),
    "format_version": (lambda m: m.update(format_version=2), "format_version"),
    "missing key": (lambda m: m.pop("layers"), "lacks.*layers"),
    "missing hook_point": (lambda m: m.pop("hook_point"), "lacks.*hook_point"),
    "selected not in the set": (lambda m: m.update(selected={"pos": -1, "layer": 9}), "selected"),
    "tensor record": (lambda m: m["tensors"]["refusal"].update(dtype="float16"), "tensors"),
    "model not an object": (lambda m: m.update(model="x"), "model"),
}


@pytest.mark.parametrize("case", list(META_TAMPERS))
def test_edited_metadata_is_refused(root, tmp_path, case):
    run = tmp_path / "run"
    DirectionSet.load(root / "run").save(run)
    edit, field = META_TAMPERS[case]
    _tamper_meta(run, edit)
    with pytest.raises(ArtifactError, match=field) as info:
        DirectionSet.load(run)
    assert "metadata.json" in str(info.value) or "safetensors" in str(info.value)
    assert "re-run" in str(info.value) or "restore" in str(info.value) or "upgrade" in str(info.value)


TENSOR_TAMPERS = {
    "NaN": (lambda t: t["refusal"].__setitem__((0, 0, 0), float("nan")), "NaN"),
    "inf in the means": (lambda t: t["mean_harmful"].__setitem__((0, 0, 0), float("inf")), "NaN/inf"),
    "harmfulness shape": (lambda t: t.update(harmfulness=t["harmfulness"][:2]), "harmfulness has shape"),
    "unknown tensor": (lambda t: t.update(extra=torch.zeros(2)), "unknown tensor"),
    "no refusal tensor": (lambda t: t.pop("refusal"), "no 'refusal'"),
}


@pytest.mark.parametrize("case", list(TENSOR_TAMPERS))
def test_edited_tensors_are_refused(root, tmp_path, case):
    run = tmp_path / "run"
    DirectionSet.load(root / "run").save(run)
    edit, match = TENSOR_TAMPERS[case]
    _tamper_tensors(run, edit)
    with pytest.raises(ArtifactError, match=match):
        DirectionSet.load(run)


def test_nan_in_metadata_json_is_refused(root, tmp_path):
    run = tmp_path / "run"
    DirectionSet.load(root / "run").save(run)
    text = (run / "metadata.json").read_text().replace('"d_model": 64', '"d_model": NaN')
    (run / "metadata.json").write_text(text)
    with pytest.raises(ArtifactError, match="not valid JSON.*NaN"):
        DirectionSet.load(run)


def test_relabelled_layers_are_one_error_line_on_the_cli(root, tmp_path):
    """Layers 0-2 relabelled 1-3: every label exists in the model, so only the tensor file's own
    record of its layers shows that ``--add 3:2`` would use layer 2's vector."""
    full = DirectionSet.load(root / "run")
    part = DirectionSet(refusal=full.refusal[:, :3], positions=full.positions, layers=[0, 1, 2],
                        harmfulness=full.harmfulness[:3], t_inst=full.t_inst,
                        means={k: v[:, :3] for k, v in full.means.items()},
                        metadata={"model": full.metadata["model"]})
    run = tmp_path / "run"
    part.save(run)
    _tamper_meta(run, lambda m: m.update(layers=[1, 2, 3]))
    r = _cli("generate", "--model", root / "model", "--directions", run, "--add", "3:2", "--prompts",
             root / "harmful.txt", "--limit", "1", "--max-new-tokens", "1")
    assert r.exit_code == 1 and "layers is [1, 2, 3]" in r.output and "Traceback" not in r.output


def test_selection_record_is_checked(cm, root, tmp_path):
    res = _selection(cm, DirectionSet.load(root / "run"))
    path = res.save(tmp_path)
    good = json.loads(path.read_text())
    cases = {
        "NaN": (lambda d: d["candidates"][0].update(bypass=float("nan")), "not valid JSON"),
        "string score": (lambda d: d["candidates"][0].update(cosine="high"), r"candidates\[0\].cosine"),
        "pick not a candidate": (lambda d: d["selected"].update(layer=99), "selected"),
        "top_k position": (lambda d: d["top_k"][0].update(pos="-1"), r"top_k\[0\]"),
        "timings": (lambda d: d.update(timings={"total": "slow"}), "timings"),
    }
    for name, (edit, match) in cases.items():
        d = json.loads(json.dumps(good))
        edit(d)
        path.write_text(json.dumps(d))
        with pytest.raises(ArtifactError, match=match):
            SelectionResult.load(tmp_path)
        assert name


def test_guard_record_is_checked(cm, root, tmp_path):
    guard = _two_guards(cm, DirectionSet.load(root / "run"))[0]
    folder = guard.save(tmp_path / "guard")
    meta = json.loads((folder / "guard.json").read_text())
    cases = {
        "layers": (lambda m: m.update(layers=m["layers"][:-1]), "shape"),
        "layers unsorted": (lambda m: m.update(layers=m["layers"][::-1]), "layers"),
        "threshold": (lambda m: m.update(threshold="high"), "threshold"),
        "method": (lambda m: m.update(method="vibes"), "method"),
        "target_fpr": (lambda m: m.update(target_fpr=1.5), "target_fpr"),
        "missing t_inst": (lambda m: m.pop("t_inst"), "lacks.*t_inst"),
        "d_model": (lambda m: m.update(d_model=63), "shape"),
    }
    for edit, match in cases.values():
        m = json.loads(json.dumps(meta))
        edit(m)
        (folder / "guard.json").write_text(json.dumps(m))
        with pytest.raises(ArtifactError, match=match):
            LatentGuard.load(folder)
    (folder / "guard.json").write_text(json.dumps(meta).replace(str(meta["threshold"]), "NaN", 1))
    with pytest.raises(ArtifactError, match="not valid JSON"):
        LatentGuard.load(folder)


def test_evaluation_record_is_checked(cm, tmp_path):
    first, second = _two_evaluations(cm, None)
    first.save(tmp_path / "a")
    second.save(tmp_path / "b")
    # the mixed folder: new results.json beside old completions.jsonl
    (tmp_path / "a" / "completions.jsonl").write_bytes((tmp_path / "b" / "completions.jsonl").read_bytes())
    with pytest.raises(ArtifactError, match="different runs"):
        EvaluationResult.load(tmp_path / "a")
    second.save(tmp_path / "a")
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    results.pop("completions_sha256")
    cases = {
        "rate above 1": (lambda r: r["conditions"]["baseline"]["datasets"]["harmful"]["refusal"].update(rate=1.5),
                         "refusal"),
        "missing dataset": (lambda r: r["conditions"]["baseline"]["datasets"].pop("harmless"), "datasets"),
        "KL not a number": (lambda r: r["conditions"]["baseline"]["kl_harmless"].update(mean="0"), "kl_harmless"),
        "no conditions": (lambda r: r.update(conditions={}), "conditions"),
    }
    for edit, match in cases.values():
        r = json.loads(json.dumps(results))
        edit(r)
        (tmp_path / "a" / "results.json").write_text(json.dumps(r))
        with pytest.raises(ArtifactError, match=match):
            EvaluationResult.load(tmp_path / "a")
    (tmp_path / "a" / "results.json").write_text(json.dumps(results).replace("0.0", "NaN", 1))
    with pytest.raises(ArtifactError, match="not valid JSON"):
        EvaluationResult.load(tmp_path / "a")


# ================================================================ 4. the weights hash, everywhere
def _mismatch_args(root: Path, tmp_path: Path) -> dict[str, list]:
    files = ["--harmful", root / "harmful.txt", "--harmless", root / "harmless.txt"]
    return {
        "generate": ["generate", "--ablate", "--prompts", root / "harmful.txt", "--limit", "1",
                     "--max-new-tokens", "1"],
        "evaluate": ["evaluate", "--conditions", "baseline,ablate", *files, "--borderline", "",
                     "--limit", "1", "--max-new-tokens", "1", "--out", tmp_path / "eval"],
        "select": ["select", "--mode", "cosine", "--harmful-val", root / "harmful.txt", "--harmless-val",
                   root / "harmless.txt", "--n-val", "4", "--positions", "-1", "--layers", "1-2",
                   "--bootstrap", "4"],
        "orthogonalize": ["orthogonalize", "--out", tmp_path / "ortho"],
    }


@pytest.mark.parametrize("command", ["generate", "evaluate", "select", "orthogonalize"])
def test_directions_of_other_weights_are_refused(root, tmp_path, command):
    run = tmp_path / "run"
    ds = DirectionSet.load(root / "run")  # extracted from "model"; same shapes as "other"
    ds.select(-1, 2, method="test")
    ds.save(run)
    before = _snapshot(run)
    args = _mismatch_args(root, tmp_path)[command]
    r = _cli(*args, "--model", root / "other", "--directions", run)
    assert r.exit_code == 1, r.output
    assert "weights" in r.output and "--allow-model-mismatch" in r.output and "Traceback" not in r.output
    assert _snapshot(run) == before
    assert not (tmp_path / "eval").exists() and not (tmp_path / "ortho").exists()
    r = _cli(*args, "--model", root / "other", "--directions", run, "--allow-model-mismatch")
    assert r.exit_code == 0, r.output


def test_hashes_of_different_kinds_are_not_compared_silently(root, tmp_path):
    """Directions from an in-memory model (``fp:`` fingerprint) and the same weights loaded from
    their folder (file hash): the kinds differ, which the error says."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(root / "model")
    memory = rd.load_model(hf, tokenizer=AutoTokenizer.from_pretrained(root / "model"))
    assert memory.weights_hash.startswith("fp:")
    rd.extract(memory, HARMFUL, HARMLESS, progress=False).save(tmp_path / "run")
    ds = DirectionSet.load(tmp_path / "run")
    folder = rd.load_model(str(root / "model"))
    ds.check_model(folder)  # not strict: fine
    with pytest.raises(ArtifactError, match="fingerprint.*file hash.*cannot be compared"):
        ds.check_model(folder, strict_hash=True)
    r = _cli("generate", "--model", root / "model", "--directions", tmp_path / "run", "--ablate",
             "--prompts", root / "harmful.txt", "--limit", "1", "--max-new-tokens", "1")
    assert r.exit_code == 1 and "cannot be compared" in r.output
