"""What every ``refusaldir`` command shares: the typer ``app``, the error wrapper, JSON output,
the common options and the loaders for models, prompts and directions.

User mistakes (any :class:`~refusaldir.errors.RefusalDirError`) print one red ``error:`` line
on stderr and exit with status 1; ``-v``/``--verbose`` prints the traceback above it, and with
``--json`` the error also goes to stdout as ``{"error": "...", "type": "..."}``.

Library noise (UserWarning/FutureWarning, transformers' logs and progress bars) is silenced
only while a command runs: importing or calling the CLI from Python changes no global state.

Example:
    >>> from typer.testing import CliRunner
    >>> from refusaldir.cli import app
    >>> CliRunner().invoke(app, ["--help"]).exit_code
    0
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import logging
import os
import traceback
import typing
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import jinja2
import torch
import typer
from rich.console import Console
from rich.markup import escape

from refusaldir.cli.failures import (
    CliGroup,
    check_finite,
    cli_message,
    environment_error,
    option_flags,
    warning_lines,
)
from refusaldir.cli.outputs import sigterm_exits
from refusaldir.cli.parsing import (
    check_writable,
    parse_add,
    parse_batch_size,
    parse_device_map,
    parse_ints,
    parse_layers,
    parse_max_memory,
)
from refusaldir.data import SHIPPED, PromptSet, load_dataset, load_prompts
from refusaldir.directions import DirectionSet
from refusaldir.errors import ConfigError, PromptFileError, RefusalDirError, TemplateError
from refusaldir.io import dumps
from refusaldir.models import ChatModel, load_model, resolve_device, resolve_dtype
from refusaldir.steer import default_layer

__all__ = [
    "BatchOpt", "ColumnOpt", "DeviceOpt", "DtypeOpt", "ForceOpt", "JsonOpt", "LayerOpt", "ModelOpt",
    "ModelOptions", "PosOpt", "SystemOpt", "TemplateOpt", "app", "direction_layer", "direction_pos", "err",
    "check_writable", "friendly", "model_options", "parse_add", "parse_batch_size", "parse_device_map",
    "parse_max_memory", "load_dataset_arg", "load_directions", "load_prompt_set", "out", "parse_ints",
    "parse_layers", "print_json", "quiet_libraries", "torch_threads",
]

app = typer.Typer(
    cls=CliGroup,
    help="Refusal-direction interpretability for Hugging Face chat models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err = Console(stderr=True)
out = Console()
F = TypeVar("F", bound=Callable[..., Any])
_VERBOSE: contextvars.ContextVar[bool] = contextvars.ContextVar("refusaldir_cli_verbose", default=False)

# ------------------------------------------------------------------------- shared options
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="demo, smollm2, coder-1.5b, a .gguf file, a model folder or a hub id")]
DeviceOpt = Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N (default: $REFUSALDIR_DEVICE, else cuda if available)")]
DtypeOpt = Annotated[str | None, typer.Option(help="float32, bfloat16, float16 (default: float32 on CPU)")]
SystemOpt = Annotated[str | None, typer.Option(help="system message (default: the template's own)")]
TemplateOpt = Annotated[Path | None, typer.Option(help="Jinja chat template file for models without one")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print machine-readable JSON instead of a table")]
ColumnOpt = Annotated[str | None, typer.Option(help="prompt column in CSV/JSON files")]
BatchOpt = Annotated[str, typer.Option(
    callback=parse_batch_size, help="prompts per forward pass, or 'auto' (largest that fits: 16 on CPU, more on a GPU, halved on out-of-memory)")]
ForceOpt = Annotated[bool, typer.Option("--force", help="replace an existing --out folder")]
LayerOpt = Annotated[int | None, typer.Option(help="layer of the direction (default: selected, else best val AUROC)")]
PosOpt = Annotated[int | None, typer.Option(help="position of the direction (default: selected, else -1)")]


@app.callback()
def _root(
    ctx: typer.Context,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show library logs and error tracebacks")] = False,
) -> None:
    """refusaldir: extract, select and apply refusal directions; evaluate and audit models."""
    token = _VERBOSE.set(verbose)  # read by `friendly`; reset when this invocation ends
    ctx.call_on_close(lambda: _VERBOSE.reset(token))


# ------------------------------------------------------------------- running a command
@contextlib.contextmanager
def _env_defaults(**values: str) -> Iterator[None]:
    """Set environment variables that are unset, and unset them again afterwards."""
    added = [k for k in values if k not in os.environ]
    for k in added:
        os.environ[k] = values[k]
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


@contextlib.contextmanager
def _logger_level(name: str, level: int) -> Iterator[None]:
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


@contextlib.contextmanager
def _hf_progress_bars_off() -> Iterator[None]:
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    transformers_on = hf_logging.is_progress_bar_enabled()
    hub_on = not hub_utils.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if transformers_on:
            hf_logging.enable_progress_bar()
        if hub_on:
            hub_utils.enable_progress_bars()
        elif not hub_utils.are_progress_bars_disabled():
            hub_utils.disable_progress_bars()


@contextlib.contextmanager
def _library_logs(verbose: bool) -> Iterator[None]:
    """``-v``: INFO logs on stderr while the command runs (what ``logging.basicConfig`` did)."""
    if not verbose:
        yield
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(logging.BASIC_FORMAT))
    with _logger_level("", logging.INFO):
        logging.getLogger().addHandler(handler)
        try:
            yield
        finally:
            logging.getLogger().removeHandler(handler)


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence UserWarning/FutureWarning, transformers' logs and Hugging Face progress bars
    for the duration of the block; everything is restored when it ends."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        stack.enter_context(_hf_progress_bars_off())  # imports transformers' logging setup first
        stack.enter_context(_env_defaults(TOKENIZERS_PARALLELISM="false"))
        stack.enter_context(_logger_level("transformers", logging.ERROR))
        yield


def print_json(obj: Any, *, indent: int | None = 2, **kwargs: Any) -> None:
    """Print strict JSON (NaN/inf as ``null``) on stdout."""
    print(dumps(obj, indent=indent, **kwargs))


def friendly(fn: F) -> F:
    """Wrap a command: library noise scoped to it, user mistakes and faults of the environment
    (full disk, out of memory, …) as one red ``error:`` line naming the command's options
    (see :mod:`refusaldir.cli.failures`) with exit status 1, Ctrl-C as ``interrupted`` with
    status 130, warnings as yellow ``warning:`` lines. Float options must be finite."""
    flags = option_flags(fn)

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        verbose = _VERBOSE.get()
        try:
            with quiet_libraries(), _library_logs(verbose), warning_lines(err), sigterm_exits():
                check_finite(kwargs, flags)
                return fn(*args, **kwargs)
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (outputs.Terminated)
            err.print(f"[bold red]{getattr(exc, 'label', 'interrupted')}[/]")
            raise typer.Exit(getattr(exc, "exit_code", 130)) from None
        except (typer.Exit, typer.Abort, typer.TyperException, BrokenPipeError):  # `| head`: quiet
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes one line (-v: traceback)
            known = exc if isinstance(exc, RefusalDirError) else environment_error(exc)
            if verbose:
                err.print(traceback.format_exc().rstrip(), markup=False, highlight=False, soft_wrap=True)
            message = " ".join(cli_message(str(known), flags).split()) if known is not None else (
                f"unexpected {type(exc).__name__}: {' '.join(str(exc).split())}. This is a refusaldir bug or an input it "
                "does not check yet; rerun with `refusaldir -v …` for the traceback and report it")
            err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
            if kwargs.get("as_json"):
                print_json({"error": message, "type": type(known or exc).__name__}, indent=None)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


# ------------------------------------------------------------------------------ loaders
DeviceMapOpt = Annotated[str | None, typer.Option(
    "--device-map", help="split a model over devices: 'auto', 'balanced', or a JSON file {module: device}")]
MaxMemoryOpt = Annotated[str | None, typer.Option(
    "--max-memory", help="per-device caps for --device-map, e.g. '0=70GiB,1=70GiB,cpu=200GiB'")]
OffloadOpt = Annotated[Path | None, typer.Option(
    "--offload-folder", help="folder for weights --device-map puts on 'disk'")]
TruncateOpt = Annotated[bool, typer.Option(
    "--truncate-prompts", help="cut prompts longer than the model's context window (the end of the instruction; the chat template is kept) instead of refusing them")]


@dataclass(frozen=True)
class ModelOptions:
    """The options every model-loading command shares (see :func:`model_options`)."""

    model: str = "demo"
    device: str | None = None
    dtype: str | None = None
    system_prompt: str | None = None
    chat_template: Path | None = None
    device_map: str | None = None
    max_memory: str | None = None
    offload_folder: Path | None = None
    truncate_prompts: bool = False

    def template_text(self) -> str | None:
        """The ``--chat-template`` file's text (``None`` without one), checked to be text."""
        if self.chat_template is None:
            return None
        if not self.chat_template.is_file():
            raise TemplateError(f"chat template file {self.chat_template} does not exist; check the path")
        try:
            text = self.chat_template.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError) as exc:
            raise TemplateError(
                f"chat template file {self.chat_template} is not readable UTF-8 text ({exc}); "
                "pass a Jinja template file"
            ) from exc
        if "\x00" in text or not text.strip():
            raise TemplateError(
                f"chat template file {self.chat_template} is {'binary' if text.strip() else 'empty'}; "
                "pass a Jinja chat template (text)"
            )
        try:  # a syntax error is found here, before the model loads, naming the file
            jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(text)
        except jinja2.TemplateSyntaxError as exc:
            if "generation" not in str(exc):  # transformers' own {% generation %} tag
                raise TemplateError(f"--chat-template {self.chat_template}: Jinja syntax error on line "
                                    f"{exc.lineno}: {exc.message}; fix the file") from None
        return text

    def check(self) -> None:
        """Validate every model option (device, dtype, placement, template file) before any work."""
        dev = resolve_device(self.device if self.device_map is None else (self.device or "cpu"))
        resolve_dtype(self.dtype, dev)
        parse_device_map(self.device_map)
        parse_max_memory(self.max_memory)
        if self.device_map is None and (self.max_memory is not None or self.offload_folder is not None):
            given = " and ".join(f for f, v in (("--max-memory", self.max_memory),
                                                ("--offload-folder", self.offload_folder)) if v is not None)
            raise ConfigError(f"{given} only {'apply' if ' and ' in given else 'applies'} to a model split with --device-map; add "
                              f"--device-map auto (or a JSON map), or drop {given}")
        if self.offload_folder is not None:
            check_writable(self.offload_folder, "--offload-folder")
        self.template_text()

    def load(self) -> ChatModel:
        """:func:`refusaldir.models.load_model` from these options (a spinner while it loads)."""
        tpl = self.template_text()
        with err.status(f"loading {self.model} …"):
            return load_model(
                self.model, device=self.device, dtype=self.dtype, system_prompt=self.system_prompt,
                chat_template=tpl, device_map=parse_device_map(self.device_map),
                max_memory=parse_max_memory(self.max_memory), offload_folder=self.offload_folder,
                truncate_prompts=self.truncate_prompts,
            )


_MODEL_PARAMS = [
    inspect.Parameter("model", inspect.Parameter.KEYWORD_ONLY, default="demo", annotation=ModelOpt),
    inspect.Parameter("system_prompt", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=SystemOpt),
    inspect.Parameter("chat_template", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=TemplateOpt),
    inspect.Parameter("device", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=DeviceOpt),
    inspect.Parameter("dtype", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=DtypeOpt),
    inspect.Parameter("device_map", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=DeviceMapOpt),
    inspect.Parameter("max_memory", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=MaxMemoryOpt),
    inspect.Parameter("offload_folder", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=OffloadOpt),
    inspect.Parameter("truncate_prompts", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=TruncateOpt),
]


def model_options(fn: F) -> F:
    """Give a command the shared model options (``--model``, ``--device``, ``--dtype``,
    ``--system-prompt``, ``--chat-template``, ``--device-map``, ``--max-memory``,
    ``--offload-folder``, ``--truncate-prompts``), defined once here, as one
    ``mo: ModelOptions`` argument, checked (:meth:`ModelOptions.check`) before the command runs."""
    sig = inspect.signature(fn)
    hints = typing.get_type_hints(fn, include_extras=True)  # resolved in fn's own module
    own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints.get(p.name, p.annotation))
           for p in sig.parameters.values() if p.name != "mo"]
    names = [p.name for p in _MODEL_PARAMS]

    @wraps(fn)
    def wrapper(**kwargs: Any) -> Any:
        mo = ModelOptions(**{k: kwargs.pop(k) for k in names})
        mo.check()
        return fn(mo=mo, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=[*own, *_MODEL_PARAMS], return_annotation=None)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {**{p.name: p.annotation for p in own},
                               **{p.name: p.annotation for p in _MODEL_PARAMS}}
    del wrapper.__wrapped__  # typer must see the new signature, not fn's
    return wrapper  # type: ignore[return-value]


def load_prompt_set(value: str, column: str | None, limit: int | None, flag: str | None = None) -> PromptSet:
    """``harmful`` / ``harmless:test`` / ``borderline`` name shipped sets; anything else is a path.
    A problem with the file is reported under ``flag`` (the option that named it)."""
    name, _, split = value.partition(":")
    try:
        if name in SHIPPED and not Path(value).exists():
            return load_prompts(name, split or (None if name == "borderline" else "train"), limit=limit)
        return load_prompts(value, column=column, limit=limit)
    except PromptFileError as exc:
        if flag is None:
            raise
        raise PromptFileError(f"{flag} {value}: {exc}") from exc


def load_dataset_arg(
    value: str, fmt: str | None, column: str | None, limit: int | None, flag: str | None = None
) -> PromptSet:
    """A shipped set name, or a file read with a benchmark loader when ``--dataset`` is given."""
    if fmt is None or value.partition(":")[0] in ("harmful", "harmless", "borderline"):
        return load_prompt_set(value, column, limit, flag)
    try:
        return load_dataset(fmt, value, limit=limit)
    except PromptFileError as exc:
        if flag is None:
            raise
        raise PromptFileError(f"{flag} {value}: {exc}") from exc


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """``--threads``: torch's CPU thread count for this command only."""
    if n is None:
        yield
        return
    if n < 1:
        raise ConfigError(f"--threads {n} must be >= 1")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_directions(path: Path | None, cm: ChatModel, needed_for: str,
                    allow_mismatch: bool = False) -> DirectionSet:
    """The ``--directions`` folder, checked against the loaded model: shapes, layers and the
    weights hash (unless ``--allow-model-mismatch``)."""
    if path is None:
        raise ConfigError(f"{needed_for} needs --directions RUN_FOLDER (from `refusaldir extract`)")
    ds = DirectionSet.load(path)
    ds.check_model(cm, strict_hash=not allow_mismatch)
    return ds


def direction_layer(cm: ChatModel, ds: DirectionSet, layer: int | None, quiet: bool) -> int:
    """--layer, else the recorded selection, else the val-AUROC rule (printed unless ``quiet``)."""
    if layer is not None:
        return layer
    if ds.selected is not None:
        return int(ds.selected[1])
    with err.status("choosing a layer (val AUROC) …"):
        chosen = default_layer(cm, ds)
    if not quiet:
        err.print(f"using layer {chosen}: highest harmful-vs-harmless AUROC on the val prompts "
                  "among layers < 0.8·n_layers (pass --layer to choose)", highlight=False)
    return chosen


def direction_pos(ds: DirectionSet, pos: int | None) -> int:
    """--pos, else the recorded selection, else -1."""
    return pos if pos is not None else (ds.selected[0] if ds.selected else -1)
