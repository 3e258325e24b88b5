"""``refusaldir optimize``: the edit on a refusal–damage front (a thin layer over
:func:`refusaldir.optimize.optimize_edit`). Every option and the study on disk are checked
before the model loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from refusaldir.cli import combos
from refusaldir.cli.common import (
    BatchOpt,
    ForceOpt,
    JsonOpt,
    ModelOptions,
    app,
    check_writable,
    friendly,
    model_options,
    out,
    parse_ints,
    print_json,
    torch_threads,
)
from refusaldir.cli.outputs import AllowMismatchOpt, check_apart, default_run
from refusaldir.cli.parsing import check_judge_spec
from refusaldir.errors import ConfigError
from refusaldir.optimize import (
    FRONT_FILE,
    OWN_FILES,
    STUDY_FILE,
    OptimizeConfig,
    check_sources,
    check_study,
    optimize_edit,
)
from refusaldir.optimize import warm_start as optimize_warm_start
from refusaldir.select import SelectionResult

__all__ = ["optimize_cmd"]


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


@app.command("optimize")
@friendly
@model_options
def optimize_cmd(
    mo: ModelOptions,
    directions: Annotated[Path | None, typer.Option(help="direction folder from `refusaldir extract` (default: runs/MODEL)")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="study and front folder (default: DIRECTIONS/optimize)")] = None,
    trials: Annotated[int, typer.Option(min=1, help="trials to run (on --resume: trials to add)")] = 60,
    sampler: Annotated[str, typer.Option(help="Optuna sampler: tpe, nsga2, random, qmc, gp or a class name from optuna.samplers")] = "tpe",
    seed: Annotated[int, typer.Option(min=0, help="sampler seed: the same seed gives the same front")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="add --trials trials to the study already in --out")] = False,
    warm_start: Annotated[str | None, typer.Option(help="a previous run's front.json (or front.json#N) whose members a new study tries first")] = None,
    kl_tokens: Annotated[int, typer.Option(min=1, help="KL over this many tokens of the unedited model's greedy continuation")] = 3,
    kl_ceiling: Annotated[float, typer.Option(help="trials whose KL exceeds this skip the refusal passes")] = 0.5,
    n_harmful: Annotated[int, typer.Option(min=2, help="harmful validation prompts scored per trial")] = 48,
    n_harmless: Annotated[int, typer.Option(min=2, help="harmless validation prompts for the KL")] = 48,
    n_borderline: Annotated[int, typer.Option(min=0, help="borderline-safe prompts (search half) for over-refusal; 0: off")] = 48,
    over_refusal_margin: Annotated[float, typer.Option(help="feasible: over-refusal at most the unedited model's plus this")] = 0.02,
    readout: Annotated[str, typer.Option(help="first-token refusal: greedy (the answer would open with a refusal token) or log_odds (refusal tokens hold over half the probability)")] = "greedy",
    gen_tokens: Annotated[int, typer.Option(min=0, help="also generate this many tokens per harmful prompt, read by --gen-judge, in trials whose first tokens rarely refuse (0: off)")] = 0,
    gen_below: Annotated[float, typer.Option(help="generate only in trials whose first-token refusal rate is at most this (1 with --gen-max-kl: a front measured one way)")] = 0.25,
    gen_judge: Annotated[str, typer.Option(help="judge of the generated tokens: phrase (refusals after a preamble) or probe:coder-1.5b (deflections too, ~3 s per answer on CPU)")] = "phrase",
    gen_max_kl: Annotated[float | None, typer.Option(help="generate only in trials whose KL is at most this (default: any)")] = None,
    sources: Annotated[str, typer.Option(help="direction sources searched: selected, per_layer, index")] = "selected,per_layer,index",
    subspaces: Annotated[str, typer.Option(help="subspaces searched: refusal, harmfulness, categories, pca")] = "refusal,harmfulness,categories,pca",
    variants: Annotated[str, typer.Option(help="variants searched: plain, projected, norm_preserving")] = "plain,projected,norm_preserving",
    confirm: Annotated[int, typer.Option(min=0, help="front members generated and judged on the test splits (0: none)")] = 3,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="tokens generated per prompt when confirming")] = 128,
    judge: Annotated[str | None, typer.Option(help="judge of the confirmation (default: the default judge, probe:coder-1.5b)")] = None,
    cross_judge: Annotated[str, typer.Option(help="comma-separated cross-check judges of the confirmation ('' for none)")] = "prefix",
    refusal_tokens: Annotated[str | None, typer.Option(help="comma-separated token ids that start refusals (default: the selection's, else detected)")] = None,
    batch_size: BatchOpt = "auto",
    threads: Annotated[int | None, typer.Option(min=1, help="torch CPU threads")] = None,
    force: ForceOpt = False,
    allow_model_mismatch: AllowMismatchOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Search per-layer edit strengths, directions and variants for the refusal–damage front,
    confirm the best members by generation, and write front.json, front.html and results.md."""
    directions = directions if directions is not None else default_run(mo.model)
    folder = out_dir if out_dir is not None else directions / "optimize"
    if resume and force:
        raise ConfigError("--resume continues the study in --out and --force replaces it; pass one of them")
    if judge is not None:
        check_judge_spec(judge, "--judge")
    crosses = tuple(c.strip() for c in cross_judge.split(",") if c.strip())
    for c in crosses:
        check_judge_spec(c, "--cross-judge")
    if not confirm and (judge is not None or max_new_tokens != 128 or cross_judge != "prefix"):
        raise ConfigError("--judge, --cross-judge and --max-new-tokens set how front members are confirmed; "
                          "with --confirm 0 nothing is confirmed, so drop them or pass --confirm N")
    cfg = OptimizeConfig(
        n_trials=trials, sampler=sampler, seed=seed, kl_tokens=kl_tokens, kl_ceiling=kl_ceiling,
        n_harmful=n_harmful, n_harmless=n_harmless, n_borderline=n_borderline,
        over_refusal_margin=over_refusal_margin, readout=readout, gen_tokens=gen_tokens, gen_below=gen_below,
        gen_judge=gen_judge, gen_max_kl=gen_max_kl,
        sources=_csv(sources), subspaces=_csv(subspaces),
        variants=_csv(variants),
        confirm=confirm, max_new_tokens=max_new_tokens, judge=judge, cross_judges=crosses,
        batch_size=batch_size, progress=not as_json)
    ids = parse_ints(refusal_tokens, "--refusal-tokens", "40,1263")
    ds = combos.read_directions(directions, "optimize")
    has_study = (folder / STUDY_FILE).exists()
    if has_study and not (resume or force):
        raise ConfigError(f"{folder} already holds a study; pass --resume to add trials to it or --force to start over")
    if resume and not has_study:
        raise ConfigError(f"--resume: there is no study in {folder}; run without --resume to start one")
    if resume:
        check_study(folder, ds, cfg)  # another model's or another scoring's study: refused here
    check_sources(ds, cfg)
    starts = optimize_warm_start(warm_start, ds, cfg) if warm_start is not None else []
    if starts and resume:
        raise ConfigError("--warm-start seeds a new study and --resume continues one; pass one of them")
    if ids is None and (directions / "selection.json").exists():
        sel = SelectionResult.load(directions)
        ids = sel.refusal_tokens.ids if sel.refusal_tokens is not None else None
    check_apart(folder, directions, example="optimize")
    check_writable(folder)
    if force:
        for name in OWN_FILES:  # only what the optimiser writes; the folder may hold other things
            (folder / name).unlink(missing_ok=True)
    with torch_threads(threads):
        cm = mo.load()
        ds.check_model(cm, strict_hash=not allow_model_mismatch)
        rec = optimize_edit(cm, ds, cfg, out=folder, resume=resume, refusal_ids=ids, warm_start=starts)
    if as_json:
        print_json(json.loads((folder / FRONT_FILE).read_text()))
        return
    table = Table(title=f"{mo.model}: refusal–damage front ({rec['n_trials']} trials, "
                        f"{rec['timings']['search_s']:.0f} s)")
    for col in ("#", "trial", "refusal (val)", f"KL ({cfg.kl_tokens} tok)", "over-refusal", "confirmed refusal (test)", "edit"):
        table.add_column(col, justify="right" if col != "edit" else "left")
    for i, r in enumerate(rec["front"]):
        conf = (r.get("confirmed") or {}).get("harmful", {}).get("refusal", {}).get("rate")
        table.add_row(str(i), str(r["trial"]), f"{100 * r['refusal_rate']:.0f}%", f"{r['kl']:.4f}",
                      "–" if r["over_refusal"] is None else f"{100 * r['over_refusal']:.0f}%",
                      "–" if conf is None else f"{100 * conf:.1f}%", r["describe"])
    out.print(table)
    if rec.get("rank1"):
        r = rec["rank1"]
        out.print(f"rank-1 edit (trial {r['trial']}): refusal {100 * r['refusal_rate']:.0f}%, KL {r['kl']:.4f}",
                  highlight=False)
    out.print(f"wrote {folder / FRONT_FILE}, front.html and results.md; export a member with "
              f"`refusaldir orthogonalize --directions {directions} --edit {folder / FRONT_FILE}#N --out DIR`",
              highlight=False)
