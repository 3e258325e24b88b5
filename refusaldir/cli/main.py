"""``refusaldir extract``, ``select``, ``generate``, ``orthogonalize`` and ``evaluate``: thin
front ends of the public API, and :func:`main`, the ``refusaldir`` script.

The commands register themselves on :data:`refusaldir.cli.common.app` when this module is
imported; ``audit`` and ``guard`` live in :mod:`refusaldir.cli.audit`.

Example:
    $ refusaldir extract --model demo --out runs/demo
    $ refusaldir select --model demo --directions runs/demo
    $ refusaldir generate --model demo --directions runs/demo --ablate -p harmful:test
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from refusaldir.cli import combos
from refusaldir.cli.common import (
    BatchOpt,
    ColumnOpt,
    ForceOpt,
    JsonOpt,
    LayerOpt,
    ModelOptions,
    PosOpt,
    app,
    check_writable,
    direction_layer,
    direction_pos,
    err,
    friendly,
    load_dataset_arg,
    load_prompt_set,
    model_options,
    out,
    parse_add,
    parse_ints,
    parse_layers,
    print_json,
    torch_threads,
)
from refusaldir.cli.export_member import export_member
from refusaldir.cli.outputs import AllowMismatchOpt, check_apart, default_run
from refusaldir.cli.parsing import check_judge_spec
from refusaldir.directions import extract as extract_directions
from refusaldir.directions import layer_stats
from refusaldir.errors import ConfigError
from refusaldir.evaluate import CONDITIONS, NEEDS_DIRECTIONS, evaluate
from refusaldir.generation import generate
from refusaldir.hooks import RESID_POINTS
from refusaldir.io import prepare_out, staged_dir
from refusaldir.judges import PhraseJudge
from refusaldir.select import SelectionConfig, select_direction
from refusaldir.steer import (
    PROVENANCE_FILE,
    Ablation,
    Addition,
    Intervention,
    save_orthogonalized,
)

__all__ = ["main"]


@app.command("extract")
@friendly
@model_options
def extract_cmd(
    mo: ModelOptions,
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="folder for directions.safetensors + metadata.json (default: runs/MODEL)")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing --out folder whole (its selection, guard and evaluations too)")] = False,
    harmful: Annotated[str, typer.Option(help="harmful prompts: a file, or 'harmful' for the shipped train split")] = "harmful",
    harmless: Annotated[str, typer.Option(help="harmless prompts: a file, or 'harmless' for the shipped train split")] = "harmless",
    harmful_test: Annotated[str, typer.Option(help="held-out harmful prompts for AUROC")] = "harmful:test",
    harmless_test: Annotated[str, typer.Option(help="held-out harmless prompts for AUROC")] = "harmless:test",
    column: ColumnOpt = None,
    limit: Annotated[int | None, typer.Option(min=1, help="use at most this many prompts per set")] = None,
    layers: Annotated[str, typer.Option(help="'all' or comma-separated layer indices")] = "all",
    hook_point: Annotated[str, typer.Option(help="resid_pre, resid_mid or resid_post")] = "resid_pre",
    pos: Annotated[int, typer.Option(help="post-instruction position for the table (from the end)")] = -1,
    batch_size: BatchOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Extract per-layer refusal and harmfulness directions and report how well they separate."""
    out_dir = (out_dir if out_dir is not None else default_run(mo.model)).expanduser()
    prepare_out(out_dir, force)  # an existing run (another model's?) is never replaced silently
    check_writable(out_dir)  # every option is checked before the model loads
    if pos >= 0:
        raise ConfigError(f"--pos {pos} must be a negative offset from the end of the prompt, e.g. -1")
    if hook_point not in RESID_POINTS:
        raise ConfigError(f"--hook-point {hook_point!r} must be one of {', '.join(RESID_POINTS)}")
    combos.check_column(column, [harmful, harmless, harmful_test, harmless_test])
    sets = {k: load_prompt_set(v, column, limit, "--" + k.replace("_", "-")) for k, v in
            dict(harmful=harmful, harmless=harmless, harmful_test=harmful_test, harmless_test=harmless_test).items()}
    layer_sel: Any = "all" if layers == "all" else parse_layers(layers)
    cm = mo.load()
    if pos not in cm.template.positions:  # the template is known now: checked before extraction
        raise ConfigError(f"--pos {pos} is not a post-instruction position of {mo.model}'s chat template "
                          f"(positions {cm.template.positions}); pass one of those, e.g. --pos -1")
    ds = extract_directions(cm, sets["harmful"], sets["harmless"], layers=layer_sel, hook_point=hook_point,
                            batch_size=batch_size, progress=not as_json)
    rows = layer_stats(cm, ds, sets["harmful_test"], sets["harmless_test"], pos=pos,
                       batch_size=batch_size, progress=not as_json)
    ds.metadata["layer_stats"] = {"pos": pos, "rows": rows,
                                  "test_prompts": {"harmful": sets["harmful_test"].info(),
                                                   "harmless": sets["harmless_test"].info()}}
    folder = ds.save(out_dir, overwrite=force)
    if as_json:
        print_json({"out": str(folder), "model": ds.metadata["model"], "positions": ds.positions,
                    "t_inst": ds.t_inst, "layers": rows})
        return
    table = Table(title=f"{mo.model}: refusal (pos {pos}) vs harmfulness (t_inst) per layer")
    for col in ("layer", "‖refusal‖", "‖harmfulness‖", "cos(ref, harm)", "AUROC (test)"):
        table.add_column(col, justify="right")
    best = max(rows, key=lambda r: r["auroc"])
    for r in rows:
        style = "bold green" if r is best else None
        table.add_row(str(r["layer"]), f"{r['refusal_norm']:.2f}", f"{r['harmfulness_norm']:.2f}",
                      f"{r['cosine']:+.3f}", f"{r['auroc']:.3f}", style=style)
    out.print(table)
    out.print(f"post-instruction tokens: {ds.metadata['template']['post_instruction_tokens']} "
              f"(positions {ds.positions}); t_inst = {ds.t_inst}")
    out.print(f"wrote {folder / 'directions.safetensors'} and {folder / 'metadata.json'}")


# ------------------------------------------------------------ interventions (generate, orthogonalize)
@app.command("generate")
@friendly
@model_options
def generate_cmd(
    mo: ModelOptions,
    prompts: Annotated[str, typer.Option("--prompts", "-p", help="a prompt file, or a shipped set such as harmful:test")] = "harmful:test",
    directions: Annotated[Path | None, typer.Option(help="direction folder from `refusaldir extract` (for --ablate/--add)")] = None,
    ablate: Annotated[bool, typer.Option("--ablate", help="project the refusal direction out of every layer")] = False,
    add: Annotated[list[str] | None, typer.Option("--add", help="LAYER:COEFF adds COEFF × the raw refusal direction to resid_pre (e.g. 13:4, 10-14:2); repeatable")] = None,
    layer: LayerOpt = None,
    pos: PosOpt = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="tokens to generate per prompt")] = 64,
    batch_size: Annotated[int, typer.Option(min=1, help="prompts per batch")] = 16,
    limit: Annotated[int | None, typer.Option(min=1, help="use at most this many prompts")] = None,
    column: ColumnOpt = None,
    sample: Annotated[bool, typer.Option("--sample", help="sample instead of greedy decoding")] = False,
    temperature: float = 1.0,
    seed: int = 0,
    judge: Annotated[bool, typer.Option(help="label each completion with the phrase refusal judge")] = True,
    allow_model_mismatch: AllowMismatchOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Generate completions, optionally with the refusal direction ablated or added.

    With --add LAYER:COEFF the direction comes from LAYER itself when a single layer is given
    (Arditi et al.'s activation addition); otherwise from --layer.
    """
    combos.check_column(column, [prompts])
    texts = load_prompt_set(prompts, column, limit, "--prompts")
    adds = [parse_add(spec) for spec in add or []]  # checked before the model loads
    if not (ablate or add):
        combos.no_effect(["directions", "layer", "pos", "allow_model_mismatch"], "without --ablate or --add",
                         "add --ablate or --add LAYER:COEFF, or drop them")
    if not sample:
        combos.no_effect(["temperature", "seed"], "with greedy decoding", "add --sample, or drop them")
    if sample and not temperature > 0:
        raise ConfigError(f"--temperature {temperature} must be > 0 with --sample")
    ds = combos.read_directions(directions, "--ablate/--add") if ablate or add else None
    if ds is not None:
        combos.check_choice(ds, directions, layer, pos, [at for at, _ in adds])
    cm = mo.load()
    interventions: list[Intervention] = []
    if ds is not None:
        ds.check_model(cm, strict_hash=not allow_model_mismatch)
        p = direction_pos(ds, pos)
        if ablate:
            interventions.append(Ablation(ds.refusal_direction(direction_layer(cm, ds, layer, as_json), p)))
        for at, coeff in adds:
            src = at[0] if len(at) == 1 and layer is None else direction_layer(cm, ds, layer, as_json)
            interventions.append(Addition(ds.refusal_direction(src, p), tuple(at), coeff))
    comps = generate(cm, list(texts), interventions, max_new_tokens=max_new_tokens,
                     batch_size=batch_size, do_sample=sample, temperature=temperature,
                     seed=seed, progress=not as_json)
    labels: list[str | None] = [None] * len(comps)
    if judge:
        labels = [j.label for j in PhraseJudge().judge_many([c.prompt for c in comps],
                                                            [c.completion for c in comps])]
    rate = sum(lab == "refusal" for lab in labels) / len(labels) if judge else None
    broad = sum(lab in ("refusal", "partial") for lab in labels) / len(labels) if judge else None
    if as_json:
        print_json({
            "model": cm.describe(),
            "interventions": [i.to_dict() for i in interventions],
            "max_new_tokens": max_new_tokens,
            "refusal_rate": rate,
            "broad_refusal_rate": broad,
            "completions": [{k: v for k, v in {**c.to_dict(), "label": lab}.items() if k != "interventions"}
                            for c, lab in zip(comps, labels)],
        })
        return
    title = ", ".join(f"{i.type} (layers {i.to_dict()['layers']})" for i in interventions) or "no intervention"
    table = Table(title=f"{mo.model}: {title}", show_lines=True)
    table.add_column("prompt", ratio=2)
    table.add_column("completion", ratio=3)
    if judge:
        table.add_column("judge")
    for c, lab in zip(comps, labels):
        row = [c.prompt, c.completion + (" …" if c.finish_reason == "length" else "")]
        table.add_row(*row, *([lab or ""] if judge else []))
    out.print(table)
    if rate is not None:
        out.print(f"refusal rate (phrase judge): strict {rate:.1%}, broad (with partial) {broad:.1%} "
                  f"of {len(comps)}")


@app.command("orthogonalize")
@friendly
@model_options
def orthogonalize_cmd(
    mo: ModelOptions,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="folder to write the edited model to")],
    directions: Annotated[Path | None, typer.Option(help="direction folder from `refusaldir extract`")] = None,
    layer: LayerOpt = None,
    pos: PosOpt = None,
    edit: Annotated[str | None, typer.Option("--edit", help="export an optimiser front member instead of the rank-1 edit: runs/MODEL/optimize/front.json#N")] = None,
    force: ForceOpt = False,
    allow_model_mismatch: AllowMismatchOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Write a copy of the model with the refusal direction removed from its weights.

    The folder loads with plain transformers.AutoModelForCausalLM.from_pretrained.
    """
    if edit is not None:
        export_member(mo, out_dir, directions, edit, layer, pos, force, allow_model_mismatch, as_json)
        return
    prepare_out(out_dir.expanduser(), force)  # fail before loading the model
    check_writable(out_dir)
    combos.no_effect(["truncate_prompts"], "on orthogonalize (it encodes no prompts)", "drop it")
    ds = combos.read_directions(directions, "orthogonalize")
    check_apart(out_dir, directions, example="ortho")
    combos.check_choice(ds, directions, layer, pos)
    cm = mo.load()
    ds.check_model(cm, strict_hash=not allow_model_mismatch)
    direction = ds.refusal_direction(direction_layer(cm, ds, layer, as_json), direction_pos(ds, pos))
    with err.status(f"writing {out_dir} …"):
        folder = save_orthogonalized(cm, direction, out_dir, directions=ds, force=force)
    info = json.loads((folder / PROVENANCE_FILE).read_text())
    if as_json:
        info["direction"].pop("unit_vector", None)
        print_json({"out": str(folder), **info})
        return
    out.print(f"wrote {folder} ({len(info['edited_parameters'])} parameters edited; direction: "
              f"{direction.kind}, layer {direction.layer}, pos {direction.pos})")
    out.print(f"load it with transformers.AutoModelForCausalLM.from_pretrained({str(folder)!r})")


# ------------------------------------------------------------------------------- evaluate
@app.command("evaluate")
@friendly
@model_options
def evaluate_cmd(
    mo: ModelOptions,
    directions: Annotated[Path | None, typer.Option(help="direction folder (needed by every condition but baseline)")] = None,
    conditions: Annotated[str, typer.Option(help="comma-separated: baseline, ablate, add, subtract, ortho, conditional")] = "baseline,ablate,add",
    harmful: Annotated[str, typer.Option(help="harmful prompts (file or shipped set)")] = "harmful:test",
    harmless: Annotated[str, typer.Option(help="harmless prompts (file or shipped set)")] = "harmless:test",
    borderline: Annotated[str, typer.Option(help="borderline-safe prompts for over-refusal ('' to skip)")] = "borderline",
    dataset: Annotated[str | None, typer.Option(help="format of --harmful/--borderline files: advbench, harmbench, jbb, xstest, strongreject, alpaca, text")] = None,
    text: Annotated[Path | None, typer.Option(help="plain-text file: report each condition's cross-entropy on it")] = None,
    judge: Annotated[str | None, typer.Option(help="judge of every completion (default probe:coder-1.5b: the phrase judge plus a probe on the embedded Qwen2.5-Coder-1.5B's residual stream for deflections): probe:coder-1.5b, probe (the same on the demo model), probe:PATH, phrase (fast, model-free), prefix, logit (first-token log-odds), model (the unedited model judges itself), model:PATH or ensemble:A,B,...")] = None,
    cross_judge: Annotated[str, typer.Option(help="comma-separated judges that label the completions too; their disagreement with --judge is reported ('' for none)")] = "prefix",
    add_coeff: Annotated[float | None, typer.Option(help="addition coefficient (default: calibrated for 80% induced refusal on harmless val)")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="tokens generated per prompt")] = 64,
    batch_size: Annotated[int, typer.Option(min=1, help="prompts per batch")] = 16,
    limit: Annotated[int | None, typer.Option(min=1, help="use at most this many prompts per dataset")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="folder for results.json, completions.jsonl, results.md (default: runs/MODEL/eval)")] = None,
    force: ForceOpt = False,
    column: ColumnOpt = None,
    allow_model_mismatch: AllowMismatchOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Refusal and over-refusal rates (Wilson 95% CIs), KL and loss for each condition."""
    out_dir = (out_dir if out_dir is not None else default_run(mo.model) / "eval").expanduser()
    prepare_out(out_dir, force)  # an earlier evaluation is never replaced silently
    check_apart(out_dir, directions)
    names = [c.strip() for c in conditions.split(",") if c.strip()]
    unknown = [n for n in names if n not in CONDITIONS]
    if unknown or not names:
        raise ConfigError(f"--conditions {conditions!r}: unknown condition(s) {unknown}; choose from "
                          f"{', '.join(CONDITIONS)}")
    if judge is not None:
        check_judge_spec(judge)
    crosses = [c.strip() for c in cross_judge.split(",") if c.strip()]
    for c in crosses:
        check_judge_spec(c, "--cross-judge")
    check_writable(out_dir)
    if any(n in NEEDS_DIRECTIONS for n in names) and directions is None:
        raise ConfigError(
            f"conditions {[n for n in names if n in NEEDS_DIRECTIONS]} need --directions RUN_FOLDER "
            "(from `refusaldir extract`)"
        )
    combos.evaluate_combos(names, NEEDS_DIRECTIONS, ("add", "subtract", "conditional"), dataset, harmful,
                           harmless, borderline, column)
    sets = {"harmful": load_dataset_arg(harmful, dataset, column, limit, "--harmful"),
            "harmless": load_dataset_arg(harmless, None, column, limit, "--harmless")}
    if borderline:
        sets["borderline"] = load_dataset_arg(borderline, dataset, column, limit, "--borderline")
    text_body = None
    if text is not None:
        if not text.is_file():
            raise ConfigError(f"text file {text} does not exist; check --text")
        try:
            text_body = text.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise ConfigError(f"--text {text} cannot be read ({exc.strerror or exc}); check the path") from None
    ds = combos.read_directions(directions, "evaluate") if directions is not None else None
    cm = mo.load()
    if ds is not None:
        ds.check_model(cm, strict_hash=not allow_model_mismatch)
    res = evaluate(cm, ds, conditions=names, datasets=sets, judge=judge, cross_judges=crosses,
                   max_new_tokens=max_new_tokens,
                   batch_size=batch_size, add_coeff=add_coeff, text=text_body, progress=not as_json)
    with staged_dir(out_dir, force=force) as tmp:  # the three files replace the folder whole
        res.save(tmp)
    folder = out_dir
    if as_json:
        print_json(res.results, sort_keys=True)
        return
    print(res.markdown())  # plain print: rich would re-wrap the Markdown table
    t = res.results["timings"]
    out.print(f"wrote {folder}/results.json, completions.jsonl, results.md "
              f"({t['total']:.0f}s; judging {t['judge']:.1f}s)")


# ------------------------------------------------------------------------------- select
@app.command("select")
@friendly
@model_options
def select_cmd(
    mo: ModelOptions,
    directions: Annotated[Path | None, typer.Option(help="direction folder from `refusaldir extract` (default: runs/MODEL); the choice is saved there")] = None,
    mode: Annotated[str, typer.Option(help="exact (bypass/induce/KL sweep), cosine (output-free) or fast (exact on a shortlist from short bypass passes)")] = "exact",
    harmful_val: Annotated[str, typer.Option(help="harmful validation prompts (file or shipped set)")] = "harmful:val",
    harmless_val: Annotated[str, typer.Option(help="harmless validation prompts (file or shipped set)")] = "harmless:val",
    n_val: Annotated[int, typer.Option(min=1, help="validation prompts used from each set")] = 32,
    kl_max: Annotated[float, typer.Option(help="reject candidates whose ablation moves harmless first-token KL above this")] = 0.1,
    max_layer_frac: Annotated[float, typer.Option(help="reject candidates at layers >= this fraction of n_layers")] = 0.8,
    induce_min: Annotated[float, typer.Option(help="reject candidates whose addition leaves the harmless refusal log-odds <= this")] = 0.0,
    positions: Annotated[str | None, typer.Option(help="candidate positions, e.g. '-1,-5' (default: all post-instruction)")] = None,
    layers: Annotated[str | None, typer.Option(help="candidate layers, e.g. '8-16' (default: all)")] = None,
    refusal_tokens: Annotated[str | None, typer.Option(help="comma-separated token ids that start refusals (default: detected)")] = None,
    top_k: Annotated[int, typer.Option(min=1, help="candidates listed (and KL-checked) besides the pick")] = 5,
    bootstrap: Annotated[int, typer.Option(min=0, help="bootstrap resamples of the validation prompts (0: off)")] = 1000,
    method: Annotated[str, typer.Option(help="shared (fast, same result) or naive (the straightforward loop)")] = "shared",
    fast_prompts: Annotated[int, typer.Option(help="fast mode: harmful prompts in the short bypass pass that ranks candidates")] = 8,
    fast_keep: Annotated[int, typer.Option(help="fast mode: KL-passing finalists scored on every validation prompt")] = 2,
    batch_size: BatchOpt = "auto",
    threads: Annotated[int | None, typer.Option(min=1, help="torch CPU threads (on a busy machine 1 can be much faster)")] = None,
    column: ColumnOpt = None,
    seed: int = 0,
    allow_model_mismatch: AllowMismatchOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Pick the refusal direction (position × layer), explain why, and save the choice."""
    directions = directions if directions is not None else default_run(mo.model)
    combos.select_combos(mode, column, harmful_val, harmless_val)
    cfg = SelectionConfig(
        mode=mode, method=method, n_val=n_val, kl_max=kl_max, max_layer_frac=max_layer_frac,
        induce_min=induce_min, positions=parse_ints(positions, "--positions", "-1,-5"),
        layers=parse_layers(layers) if layers is not None else None,
        refusal_ids=parse_ints(refusal_tokens, "--refusal-tokens", "40,1263"), top_k=top_k, n_bootstrap=bootstrap,
        batch_size=batch_size, seed=seed, progress=not as_json, fast_prompts=fast_prompts,
        fast_keep=fast_keep,
    )
    check_writable(directions, "--directions")  # the choice is saved there
    with torch_threads(threads):
        harmful = load_prompt_set(harmful_val, column, n_val, "--harmful-val")
        harmless = load_prompt_set(harmless_val, column, n_val, "--harmless-val")
        ds = combos.read_directions(directions, "select")
        cm = mo.load()
        ds.check_model(cm, strict_hash=not allow_model_mismatch)
        res = select_direction(cm, ds, harmful, harmless, cfg)
    ds.save(directions)
    path = res.save(directions)
    if as_json:
        print_json(json.loads(path.read_text()))
        return
    table = Table(title=f"{mo.model}: refusal-direction candidates ({res.mode} mode), top {len(res.top_k)}")
    for col in ("rank", "pos", "layer", "bypass ↓", "induce", "KL", "cosine ↑", "status"):
        table.add_column(col, justify="right")

    def f(x: float | None, spec: str = "+.3f") -> str:
        return "–" if x is None else format(x, spec)

    for p, layer in res.top_k:
        c = res.candidate(p, layer)
        table.add_row(str(c.rank), str(p), str(layer), f(c.bypass), f(c.induce), f(c.kl, ".4f"),
                      f(c.cosine), c.status, style="bold green" if c.status == "selected" else None)
    out.print(table)
    counts: dict[str, int] = {}
    for c in res.candidates:
        counts[c.status] = counts.get(c.status, 0) + 1
    out.print(f"picked pos {res.pos}, layer {res.layer}; candidates: "
              + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())), highlight=False)
    if res.relaxation.get("all_filtered"):
        out.print(f"[yellow]every candidate failed the filters; relaxation used: "
                  f"{res.relaxation['step']}[/]", highlight=False)
    if res.refusal_tokens is not None:
        rt = res.refusal_tokens
        out.print(f"refusal tokens: {rt.tokens} (ids {rt.ids})", highlight=False)
    st = res.stability
    if st.get("n"):
        out.print(f"bootstrap ({st['n']} resamples of the validation prompts): the pick wins "
                  f"{100 * st['top1_share']:.0f}%", highlight=False)
    out.print(f"{res.timings['total']:.0f}s; wrote {path}, {path.parent / 'selection.html'} and the "
              f"choice into {directions / 'metadata.json'}", highlight=False)


def main() -> None:
    """Entry point of the ``refusaldir`` script."""
    app(prog_name="refusaldir")


if __name__ == "__main__":
    main()
