"""The ``refusaldir`` command line: a thin layer over the public API.

User mistakes print one red line on stderr and exit with status 1.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from refusaldir.errors import RefusalDirError

app = typer.Typer(
    help="Refusal-direction interpretability for Hugging Face chat models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err = Console(stderr=True)
out = Console()
F = TypeVar("F", bound=Callable[..., Any])

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="demo, smollm2, a .gguf file, a model folder or a hub id")]
DeviceOpt = Annotated[str | None, typer.Option(help="cpu, cuda, … (default: cuda if available)")]
DtypeOpt = Annotated[str | None, typer.Option(help="float32, bfloat16, float16 (default: float32 on CPU)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print machine-readable JSON instead of a table")]


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show library logs")] = False,
) -> None:
    """refusaldir: extract, select and apply refusal directions; evaluate and audit models."""
    if verbose:
        logging.basicConfig(level=logging.INFO)


def _friendly(fn: F) -> F:
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RefusalDirError as exc:
            err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("[bold red]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def _load(model: str, device: str | None, dtype: str | None, system_prompt: str | None,
          chat_template: Path | None) -> Any:
    from refusaldir.models import load_model

    tpl = None
    if chat_template is not None:
        if not chat_template.is_file():
            from refusaldir.errors import TemplateError

            raise TemplateError(f"chat template file {chat_template} does not exist; check the path")
        tpl = chat_template.read_text()
    with err.status(f"loading {model} …"):
        return load_model(model, device=device, dtype=dtype, system_prompt=system_prompt, chat_template=tpl)


@app.command()
@_friendly
def extract(
    model: ModelOpt = "demo",
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="folder for directions.safetensors + metadata.json")] = Path("runs/demo"),
    harmful: Annotated[str, typer.Option(help="harmful prompts: a file, or 'harmful' for the shipped train split")] = "harmful",
    harmless: Annotated[str, typer.Option(help="harmless prompts: a file, or 'harmless' for the shipped train split")] = "harmless",
    harmful_test: Annotated[str, typer.Option(help="held-out harmful prompts for AUROC")] = "harmful:test",
    harmless_test: Annotated[str, typer.Option(help="held-out harmless prompts for AUROC")] = "harmless:test",
    column: Annotated[str | None, typer.Option(help="prompt column in CSV/JSON files")] = None,
    limit: Annotated[int | None, typer.Option(help="use at most this many prompts per set")] = None,
    layers: Annotated[str, typer.Option(help="'all' or comma-separated layer indices")] = "all",
    hook_point: Annotated[str, typer.Option(help="resid_pre, resid_mid or resid_post")] = "resid_pre",
    pos: Annotated[int, typer.Option(help="post-instruction position for the table (from the end)")] = -1,
    batch_size: Annotated[int, typer.Option(help="prompts per forward pass")] = 16,
    seed: int = 0,
    system_prompt: Annotated[str | None, typer.Option(help="system message (default: the template's own)")] = None,
    chat_template: Annotated[Path | None, typer.Option(help="Jinja chat template file for models without one")] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Extract per-layer refusal and harmfulness directions and report how well they separate."""
    _quiet_libraries()
    from refusaldir.directions import extract as run_extract
    from refusaldir.directions import layer_stats

    sets = {k: _prompt_arg(v, column, limit) for k, v in
            dict(harmful=harmful, harmless=harmless, harmful_test=harmful_test, harmless_test=harmless_test).items()}
    layer_sel: Any = "all" if layers == "all" else _split_ints(layers)
    cm = _load(model, device, dtype, system_prompt, chat_template)
    ds = run_extract(cm, sets["harmful"], sets["harmless"], layers=layer_sel, hook_point=hook_point,
                     batch_size=batch_size, seed=seed, progress=not as_json)
    rows = layer_stats(cm, ds, sets["harmful_test"], sets["harmless_test"], pos=pos,
                       batch_size=batch_size, progress=not as_json)
    ds.metadata["layer_stats"] = {"pos": pos, "rows": rows,
                                  "test_prompts": {"harmful": sets["harmful_test"].info(),
                                                   "harmless": sets["harmless_test"].info()}}
    folder = ds.save(out_dir)
    if as_json:
        print(json.dumps({"out": str(folder), "model": ds.metadata["model"], "positions": ds.positions,
                          "t_inst": ds.t_inst, "layers": rows}, indent=2))
        return
    table = Table(title=f"{model}: refusal (pos {pos}) vs harmfulness (t_inst) per layer")
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


def _split_ints(text: str) -> list[int]:
    """Parse ``"10,12,14"`` or ``"8-14"`` into layer indices."""
    import re

    from refusaldir.errors import ConfigError

    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if m := re.fullmatch(r"(\d+)-(\d+)", part):
            out.extend(range(int(m[1]), int(m[2]) + 1))
        elif re.fullmatch(r"-?\d+", part):
            out.append(int(part))
        else:
            raise ConfigError(f"{text!r} is not a list of layers; write e.g. '10,12,14' or '8-14'")
    return out


def _prompt_arg(value: str, column: str | None, limit: int | None) -> Any:
    """``harmful`` / ``harmless:test`` / ``borderline`` name shipped sets; anything else is a path."""
    from refusaldir.prompts import SHIPPED, load_prompts

    name, _, split = value.partition(":")
    if name in SHIPPED and not Path(value).exists():
        return load_prompts(name, split or (None if name == "borderline" else "train"), limit=limit)
    return load_prompts(value, column=column, limit=limit)


def main() -> None:
    """Entry point of the ``refusaldir`` script."""
    app(prog_name="refusaldir")


if __name__ == "__main__":
    sys.exit(main())
