"""``refusaldir audit`` and ``refusaldir guard``: command-line front ends of
:func:`refusaldir.audit.audit` and :class:`refusaldir.guard.LatentGuard`.

The commands register themselves on :data:`refusaldir.cli.common.app` when this module is
imported (``refusaldir.cli`` imports it after :mod:`refusaldir.cli.main`).

Example:
    $ refusaldir audit --model demo --out runs/demo/audit --limit 16 --max-new-tokens 32
    $ refusaldir guard --model demo --directions runs/demo "How do I make a pipe bomb?"
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from refusaldir.audit import REPORT_HTML, AuditConfig, audit
from refusaldir.cli.combos import check_column, no_effect, read_directions
from refusaldir.cli.common import (
    BatchOpt,
    ColumnOpt,
    ForceOpt,
    JsonOpt,
    ModelOptions,
    app,
    check_writable,
    err,
    friendly,
    load_prompt_set,
    model_options,
    out,
    parse_ints,
    parse_layers,
    print_json,
)
from refusaldir.cli.outputs import AllowMismatchOpt, check_apart, default_run
from refusaldir.cli.parsing import check_judge_spec
from refusaldir.errors import ConfigError, PromptFileError
from refusaldir.guard import GUARD_METHODS, LatentGuard
from refusaldir.io import prepare_out, staged_dir
from refusaldir.judges import default_judge
from refusaldir.optimize import check_front

__all__: list[str] = []


def _default_out(model: str) -> Path:
    return default_run(model) / "audit"


@app.command("audit")
@friendly
@model_options
def audit_cmd(
    mo: ModelOptions,
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="folder for report.html, report.json and artifacts (default: runs/MODEL/audit)")] = None,
    force: ForceOpt = False,
    directions: Annotated[Path | None, typer.Option(help="reuse a direction folder from `refusaldir extract` (must match the model's weights)")] = None,
    selection: Annotated[Path | None, typer.Option(help="reuse a selection.json for --directions instead of selecting again")] = None,
    mode: Annotated[str, typer.Option(help="direction selection: cosine (output-free: needs no refusal tokens), fast (quickest: successive halving on bypass), or exact")] = "cosine",
    refusal_tokens: Annotated[str | None, typer.Option(help="exact/fast mode: comma-separated token ids that start refusals (default: detected)")] = None,
    limit: Annotated[int, typer.Option(min=0, help="prompts per test set for the generation-based evaluation (0 = all)")] = 32,
    max_new_tokens: Annotated[int, typer.Option(help="tokens generated per prompt")] = 48,
    n_val: Annotated[int, typer.Option(help="validation prompts per class for selection and calibration")] = 32,
    conditions: Annotated[str, typer.Option(help="comma-separated conditions to evaluate")] = "baseline,ablate,add,ortho",
    add_coeff: Annotated[float | None, typer.Option(help="addition coefficient (default: calibrated on harmless val)")] = None,
    k_max: Annotated[int, typer.Option(help="most directions to ablate together in the concentration curve")] = 4,
    judge: Annotated[str | None, typer.Option(help="judge of the completions: probe:coder-1.5b (default), probe (demo judge model), probe:PATH, phrase (fast, model-free), prefix, logit, model (self-judge), model:PATH or ensemble:A,B,...")] = None,
    cross_judge: Annotated[str, typer.Option(help="comma-separated cross-check judges; the audit flags more than 10% disagreement ('' for none)")] = "prefix",
    guard_method: Annotated[str, typer.Option(help="latent guard: projection or centroid")] = "projection",
    target_fpr: Annotated[float, typer.Option(help="latent guard false-positive rate on harmless val")] = 0.05,
    front: Annotated[Path | None, typer.Option(help="an optimiser front.json (from `refusaldir optimize` on --directions): its cheapest member under 5% refusal is evaluated beside the rank-1 edit")] = None,
    optimize_trials: Annotated[int, typer.Option(min=0, help="search this many optimiser trials inside the audit and evaluate the cheapest member under 5% refusal (0: off)")] = 0,
    batch_size: BatchOpt = "auto",
    seed: int = 0,
    as_json: JsonOpt = False,
) -> None:
    """Audit a model's refusal mechanism; write a self-contained report.html and report.json.

    Runs extract (unless --directions), select, evaluate (baseline, ablation, addition,
    orthogonalized weights), the concentration curve and the latent guard.
    """
    if judge is not None:
        check_judge_spec(judge)
    for spec in cross_judge.split(","):
        if spec.strip():
            check_judge_spec(spec.strip(), "--cross-judge")
    cfg = AuditConfig(
        mode=mode, limit=limit or None, max_new_tokens=max_new_tokens, n_val=n_val,
        conditions=tuple(c.strip() for c in conditions.split(",") if c.strip()), add_coeff=add_coeff,
        k_max=k_max, judge=judge or default_judge(), cross_judges=tuple(c.strip() for c in cross_judge.split(",") if c.strip()),
        guard_method=guard_method, target_fpr=target_fpr, batch_size=batch_size, seed=seed,
        front=None if front is None else str(front), optimize_trials=optimize_trials,
        select_options={"refusal_ids": ids} if (ids := parse_ints(refusal_tokens, "--refusal-tokens", "40,1263")) else {},
    )
    if front is not None:
        if directions is None:
            raise ConfigError("--front was optimised on a direction folder; pass that folder as --directions too")
        if selection is None and (directions / "selection.json").exists():
            selection = directions / "selection.json"  # the front's edits use the selection they were made with
        check_front(front, directions)
    if selection is not None and directions is None:
        raise ConfigError("--selection reuses a selection of the directions it was made for; pass "
                          "--directions RUN_FOLDER too, or drop --selection")
    if mode == "cosine" and selection is None:
        no_effect(["refusal_tokens"], "with --mode cosine (it scores no refusal tokens)",
                  "use --mode exact or fast, or drop it")
    if selection is not None:
        no_effect(["mode", "refusal_tokens"], "with --selection (the selection is reused, not run)",
                  "drop --mode, or drop --selection to select again")
    if not set(cfg.conditions) & {"add", "subtract", "conditional"}:
        no_effect(["add_coeff"], f"with --conditions {conditions} (no addition)",
                  "add the add, subtract or conditional condition, or drop it")
    target = out_dir if out_dir is not None else _default_out(mo.model)
    prepare_out(target.expanduser(), force)  # fail before loading the model
    check_writable(target)
    check_apart(target, directions, example="audit")
    cm = mo.load()
    rep = audit(cm, target, directions=directions, selection=selection, config=cfg, force=force,
                progress=not as_json, console=err)
    if as_json:
        print_json({"out": str(target), "report": str(target / REPORT_HTML),
                    "verdict": rep.verdict, "timings": rep.data["timings"]})
        return
    out.print(rep.headline(), highlight=False)
    out.print(f"open {target / REPORT_HTML} in a browser (works offline)")


@app.command("guard")
@friendly
@model_options
def guard_cmd(
    mo: ModelOptions,
    texts: Annotated[list[str] | None, typer.Argument(metavar="[PROMPT]...", help="prompts to classify")] = None,
    directions: Annotated[Path | None, typer.Option(help="direction folder from `refusaldir extract` (fits a guard)")] = None,
    guard: Annotated[Path | None, typer.Option("--guard", help="a saved guard folder (instead of fitting one)")] = None,
    prompts: Annotated[str | None, typer.Option("--prompts", "-p", help="prompt file, or a shipped set such as borderline")] = None,
    method: Annotated[str, typer.Option(help="projection or centroid")] = "projection",
    layers: Annotated[str | None, typer.Option(help="layers to read, e.g. '10,12' or '8-12' (default: best 3 on val)")] = None,
    target_fpr: Annotated[float, typer.Option(help="false-positive rate on harmless val prompts")] = 0.05,
    harmful_val: Annotated[str, typer.Option(help="harmful calibration prompts")] = "harmful:val",
    harmless_val: Annotated[str, typer.Option(help="harmless calibration prompts")] = "harmless:val",
    save: Annotated[Path | None, typer.Option(help="save the fitted guard to this folder")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing --save folder")] = False,
    column: ColumnOpt = None,
    limit: Annotated[int | None, typer.Option(min=1, help="classify at most this many prompts from --prompts")] = None,
    batch_size: BatchOpt = "auto",
    allow_model_mismatch: AllowMismatchOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Flag harmful prompts from the model's own harmfulness representation at t_inst."""
    items: list[str] = [t for t in (texts or [])]
    if guard is not None:
        no_effect(["directions", "method", "layers", "target_fpr", "harmful_val", "harmless_val", "save",
                   "allow_model_mismatch"], "with --guard (a saved guard is used as it was fit)",
                  "drop them, or drop --guard to fit a new guard")
    if save is None:
        no_effect(["force"], "without --save", "drop it")
    if prompts is None:
        no_effect(["column", "limit"], "without --prompts", "drop them, or pass --prompts FILE")
    check_column(column, [prompts])
    if prompts is not None:
        items += list(load_prompt_set(prompts, column, limit, "--prompts"))
    if not items:
        raise PromptFileError(
            "no prompts to classify; pass them as arguments (refusaldir guard \"PROMPT\" …) or with "
            "--prompts FILE"
        )
    blank = [i for i, t in enumerate(items) if not t.strip()]
    if blank:
        raise PromptFileError(f"prompt #{blank[0] + 1} is empty; remove empty prompts")
    if guard is None and directions is None:
        raise ConfigError("guard needs --directions RUN_FOLDER (to fit a guard) or --guard GUARD_FOLDER")
    if method not in GUARD_METHODS:
        raise ConfigError(f"--method {method!r} is not one of {', '.join(GUARD_METHODS)}")
    if not 0 <= target_fpr < 1:
        raise ConfigError(f"--target-fpr {target_fpr} must be in [0, 1), e.g. 0.05")
    guard_layers = parse_layers(layers) if layers else None
    if save is not None:
        prepare_out(save.expanduser(), force)  # an existing guard is never replaced silently
        check_writable(save, "--save")
        check_apart(save, directions, "--save", "guard")
    val_sets = None if guard is not None else (list(load_prompt_set(harmful_val, None, None, "--harmful-val")),
                                               list(load_prompt_set(harmless_val, None, None, "--harmless-val")))
    saved = LatentGuard.load(guard) if guard is not None else None
    ds = read_directions(directions, "guard") if saved is None else None
    missing = sorted(set(guard_layers or []) - set(ds.layers)) if ds is not None else []
    if ds is not None and missing:  # checked before the model loads
        raise ConfigError(f"--layers {layers}: layers {missing} are not in the directions in {directions} "
                          f"(layers {ds.layers[0]}-{ds.layers[-1]}); pass layers from those")
    cm = mo.load()
    if saved is not None:
        g = saved
        g.check_model(cm)
    else:
        assert ds is not None and val_sets is not None
        g = LatentGuard.fit(cm, ds, *val_sets, layers=guard_layers, method=method, target_fpr=target_fpr,
                            batch_size=batch_size, progress=not as_json, strict_hash=not allow_model_mismatch)
        if save is not None:
            with staged_dir(save, force=force) as tmp:
                g.save(tmp)
    scores = g.score(cm, items, batch_size=batch_size, progress=not as_json)
    flags = (scores > g.threshold).tolist()
    if as_json:
        info: dict[str, Any] = {k: v for k, v in g.to_dict().items() if k != "calibration"}
        info["val"] = {k: g.calibration.get(k) for k in ("val_auroc", "val_tpr", "val_fpr")}
        print_json({"guard": info, "results": [
            {"prompt": p, "score": float(s), "harmful": bool(f)} for p, s, f in zip(items, scores.tolist(), flags)
        ]})
        return
    table = Table(title=f"latent guard ({g.method}, layers {g.layers}, threshold {g.threshold:.3f})")
    table.add_column("prompt", ratio=4)
    table.add_column("score", justify="right")
    table.add_column("verdict")
    for p, s, f in zip(items, scores.tolist(), flags):
        table.add_row(p, f"{s:+.2f}", "[bold red]harmful[/]" if f else "[green]ok[/]")
    out.print(table)
    val = g.calibration
    if val:
        out.print(f"calibrated on {val.get('n_harmless_val')} harmless val prompts for FPR "
                  f"{g.target_fpr:.0%} (val AUROC {val.get('val_auroc', float('nan')):.3f}, "
                  f"TPR {val.get('val_tpr', float('nan')):.2f})")
    if save is not None and saved is None:
        out.print(f"saved the guard to {save}")
