"""Options that would do nothing in the combination given are errors, not silent no-ops; and
the values that the direction set can check are checked before the model loads.

- :func:`passed`: whether the user gave an option on the command line (not its default);
- :func:`no_effect`: refuse options that have no effect unless some other option is given;
- :func:`check_column`: ``--column`` must apply to at least one prompt file;
- :func:`read_directions` / :func:`check_choice`: the ``--directions`` folder read, and
  ``--layer`` / ``--pos`` / ``--add`` checked against it, before the model loads.

Example:
    >>> passed("limit")  # outside a command nothing was passed
    False
    >>> shipped_only(["harmful", "harmless:test"])
    True
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from refusaldir.data import SHIPPED
from refusaldir.directions import DirectionSet
from refusaldir.errors import ConfigError

__all__ = ["check_choice", "check_column", "evaluate_combos", "flag", "no_effect", "passed", "read_directions", "select_combos", "shipped_only"]


def _context() -> Any:
    """The running command's click context (typer >= 0.20 bundles its own click), or ``None``."""
    for module in ("typer._click.globals", "click.globals"):
        try:
            ctx = importlib.import_module(module).get_current_context(silent=True)
        except (ImportError, AttributeError):
            continue
        if ctx is not None:
            return ctx
    return None


def passed(name: str) -> bool:
    """Whether the option ``name`` (the parameter's name) was given on the command line or by
    environment, rather than left at its default. ``False`` outside a command."""
    ctx = _context()
    source = ctx.get_parameter_source(name) if ctx is not None else None
    return getattr(source, "name", None) in ("COMMANDLINE", "ENVIRONMENT", "PROMPT")


def flag(name: str) -> str:
    """The long option of parameter ``name`` in the running command (``out_dir`` → ``--out``)."""
    ctx = _context()
    for p in (ctx.command.params if ctx is not None else []):
        if p.name == name:
            longs = [o for o in p.opts if o.startswith("--")]
            if longs:
                return longs[0]
    return "--" + name.replace("_", "-")


def no_effect(names: Iterable[str], unless: str, fix: str) -> None:
    """Refuse any of the options ``names`` that the user gave: they do nothing ``unless``.

    Example: ``no_effect(["temperature"], "without --sample", "add --sample or drop it")``."""
    given = [flag(n) for n in names if passed(n)]
    if given:
        verb = "has" if len(given) == 1 else "have"
        fix = fix.replace(" them", " it") if len(given) == 1 else fix
        raise ConfigError(f"{' and '.join(given)} {verb} no effect {unless}; {fix}")


def shipped_only(values: Sequence[str | None]) -> bool:
    """Whether every prompt option names a shipped set (``harmful:test``, ``borderline``…)."""
    return all(v is None or v == "" or (v.partition(":")[0] in SHIPPED and not Path(v).exists())
               for v in values)


def check_column(column: str | None, values: Sequence[str | None], dataset: str | None = None) -> None:
    """``--column`` picks a column in CSV/JSON/JSONL prompt files: one of ``values`` (the prompt
    options it applies to) must name a file (a shipped set's columns are fixed; a ``--dataset``
    loader knows its format's own column)."""
    if column is None or not shipped_only(values):
        return
    also = f" (--dataset {dataset} reads --harmful/--borderline with its own column)" if dataset else ""
    raise ConfigError(
        f"--column {column} has no effect: the prompt options it applies to name shipped sets, whose "
        f"columns are fixed{also}; drop --column, or pass your own CSV/JSON/JSONL prompt file"
    )


def evaluate_combos(conditions: Sequence[str], needs_directions: Iterable[str], additions: Iterable[str],
                    dataset: str | None, harmful: str, harmless: str, borderline: str,
                    column: str | None) -> None:
    """``evaluate``'s options that only act with some conditions or prompt files."""
    if not any(c in needs_directions for c in conditions):
        no_effect(["directions", "allow_model_mismatch"], f"with --conditions {','.join(conditions)} "
                  "(no condition uses the directions)", "add ablate, add, subtract, ortho or conditional, "
                  "or drop them")
    if not any(c in additions for c in conditions):
        no_effect(["add_coeff"], f"with --conditions {','.join(conditions)} (no addition)",
                  "add the add, subtract or conditional condition, or drop it")
    if dataset is not None and shipped_only([harmful, borderline]):
        raise ConfigError(
            f"--dataset {dataset} has no effect: it is the format of --harmful/--borderline files, and "
            "both name shipped sets; pass a benchmark file with --harmful (or --borderline), or drop --dataset"
        )
    check_column(column, [harmless] if dataset else [harmful, harmless, borderline], dataset)


def select_combos(mode: str, column: str | None, harmful_val: str, harmless_val: str) -> None:
    """``select``'s options that only act in some modes."""
    if mode != "fast":
        no_effect(["fast_prompts", "fast_keep"], f"with --mode {mode}", "add --mode fast, or drop them")
    if mode == "cosine":
        no_effect(["induce_min", "refusal_tokens"], "with --mode cosine (it scores no refusal tokens)",
                  "use --mode exact or fast, or drop them")
    check_column(column, [harmful_val, harmless_val])


def read_directions(path: Path | None, needed_for: str) -> DirectionSet:
    """The ``--directions`` folder, read (and checked on its own) before the model loads."""
    if path is None:
        raise ConfigError(f"{needed_for} needs --directions RUN_FOLDER (from `refusaldir extract`)")
    return DirectionSet.load(path)


def check_choice(ds: DirectionSet, path: Path | None, layer: int | None = None, pos: int | None = None,
                 add_layers: Sequence[Sequence[int]] = ()) -> None:
    """``--layer``, ``--pos`` and ``--add`` layers checked against the direction set (and the
    model it records) before the model loads or any layer is scored."""
    if pos is not None and pos not in ds.positions:
        raise ConfigError(
            f"--pos {pos} is not a position of the directions in {path} (they were extracted at the "
            f"template's post-instruction positions {ds.positions}); pass one of those, e.g. --pos -1"
        )
    if layer is not None and layer not in ds.layers:
        raise ConfigError(
            f"--layer {layer} is not a layer of the directions in {path} (layers "
            f"{ds.layers[0]}-{ds.layers[-1]}); pass one of those"
        )
    n_layers = (ds.metadata.get("model") or {}).get("n_layers")
    for at in add_layers:
        bad = [x for x in at if x < 0 or (isinstance(n_layers, int) and x >= n_layers)]
        if bad:
            raise ConfigError(
                f"--add layer(s) {bad} are outside the model (its layers are 0-"
                f"{n_layers - 1 if isinstance(n_layers, int) else '?'}); write e.g. --add 13:4"
            )
        if len(at) == 1 and layer is None and at[0] not in ds.layers:
            raise ConfigError(
                f"--add {at[0]}:… takes its direction from layer {at[0]}, which the directions in "
                f"{path} do not have (layers {ds.layers}); pass --layer L for the direction, or "
                "another --add layer"
            )
