"""How the command line reports what went wrong: one red ``error:`` line, never a traceback
(``-v`` shows it), for user mistakes, bad option values and faults of the environment.

- :class:`CliGroup`: the root command; an invalid option value, an unknown option or command
  is one ``error:`` line with exit status 1 (click would draw a usage box and exit with 2).
- :func:`environment_error`: a full disk, a read-only or forbidden folder, out of memory …
  as a :class:`~refusaldir.errors.RefusalDirError` that names the fault and the fix.
- :func:`cli_message`: library messages speak of Python arguments (``kl_max=nan``); on the
  command line they name the command's options instead (``--kl-max nan``).
- :func:`check_finite`: every float option must be a finite number.

Example:
    >>> cli_message("kl_max=nan must be a finite number", {"kl_max": "--kl-max"})
    '--kl-max nan must be a finite number'
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import math
import re
import sys
import typing
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup
from typer.models import ArgumentInfo, OptionInfo

from refusaldir.errors import ArtifactError, ConfigError, RefusalDirError, ResourceError
from refusaldir.io import dumps

__all__ = [
    "API_NAMES", "CliGroup", "check_finite", "cli_message", "environment_error", "option_flags",
    "warning_lines",
]

#: Python argument names whose command-line option is spelled differently.
API_NAMES = {
    "n_bootstrap": "bootstrap", "refusal_ids": "refusal_tokens", "out": "out_dir",
    "truncate": "truncate_prompts",
}
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_NO_ACCESS = (errno.EACCES, errno.EPERM, errno.EROFS)


def option_flags(fn: Callable[..., Any]) -> dict[str, str]:
    """``{parameter: "--flag"}`` for a typer command function (its long option names)."""
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
        params = inspect.signature(fn).parameters
    except (NameError, TypeError, ValueError):
        return {}
    flags: dict[str, str] = {}
    for name in params:
        meta = getattr(hints.get(name), "__metadata__", ())
        info = next((m for m in meta if isinstance(m, (OptionInfo, ArgumentInfo))), None)
        if isinstance(info, ArgumentInfo):
            continue
        decls = [d for d in (getattr(info, "param_decls", None) or ()) if d.startswith("--")]
        flags[name] = decls[0].split("/")[0] if decls else "--" + name.replace("_", "-")
    return flags


_CALL = re.compile(r"\w[\w.]*\([^()]*\)")
_ASSIGN = re.compile(r"(?<![\w.\-(\[])([a-z_][a-z0-9_]*)=('[^']*'|\"[^\"]*\"|\[[^\]]*\]|[^\s,;:)]+|…)?")


def cli_message(message: str, flags: Mapping[str, str]) -> str:
    """Rephrase a library message for the command line: ``name=value`` of a Python argument
    that the command has as an option becomes ``--flag value`` (``--flag`` for ``True``);
    code such as ``load_model(..., x=1)`` is left as it is, and an API hint in parentheses
    right after the same option, ``--force (force=True)``, is dropped."""
    def flag(name: str) -> str | None:
        return flags.get(API_NAMES.get(name, name)) or flags.get(name)

    def hint(m: re.Match[str]) -> str:  # "--force (force=True)": the API hint goes
        return m.group(1) if flag(m.group(2)) == m.group(1) else m.group(0)

    message = re.sub(r"(--[\w-]+)\s*\((\w+)=[^()]*\)", hint, message)
    calls = [m.span() for m in _CALL.finditer(message)]

    def sub(m: re.Match[str]) -> str:
        if any(a <= m.start() < b for a, b in calls):
            return m.group(0)
        f = flag(m.group(1))
        if f is None:
            return m.group(0)
        value = m.group(2) or ""
        if value == "True":
            return f
        if value in ("None", "False"):
            return f"no {f}"
        if re.fullmatch(r"'[^'\s]+'", value):
            value = value[1:-1]
        if value.startswith("["):  # a list argument is a comma-separated option value
            value = ",".join(v.strip(" '\"") for v in value[1:-1].split(",") if v.strip())
        return f"{f} {value}".rstrip()

    out = _ASSIGN.sub(sub, message)
    out = re.sub(r"(--[\w-]+ [^\s/]+) / \1", r"\1", out)  # "--column NAME / --column NAME"
    return out


def check_finite(values: Mapping[str, Any], flags: Mapping[str, str]) -> None:
    """Refuse NaN or infinite float options before any work."""
    for name, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            flag = flags.get(name, "--" + name.replace("_", "-"))
            raise ConfigError(f"{flag} {value} is not a finite number; pass a real number")


def environment_error(exc: BaseException) -> RefusalDirError | None:
    """A fault of the machine (full disk, read-only or forbidden path, out of memory) as a
    :class:`RefusalDirError` naming the fault and the fix; ``None`` for anything else."""
    code = exc.errno if isinstance(exc, OSError) and exc.errno is not None else _errno_in_text(exc)
    where = getattr(exc, "filename", None) or "a file"
    if code is not None:
        if code in _DISK_FULL:
            return ArtifactError(f"could not write {where}: the disk is full; free space or choose another --out")
        if code in _NO_ACCESS:
            why = "the file system is read-only" if code == errno.EROFS else "permission denied"
            return ArtifactError(
                f"could not access {where} ({why}); choose a folder you can write to, or fix its permissions"
            )
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or (
            isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()):
        return ResourceError(
            f"out of memory ({type(exc).__name__}); use --batch-size 1 or auto, a smaller --dtype "
            "(bfloat16), --device-map auto, or fewer prompts (--limit)"
        )
    return None


_ERRNO_TEXT = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT,
               "Read-only file system": errno.EROFS, "Permission denied": errno.EACCES}


def _errno_in_text(exc: BaseException) -> int | None:
    """The errno of a file fault that a library reported as its own exception, not an OSError
    (safetensors' ``SafetensorError``, torch's ``RuntimeError`` from its file writer): found by
    the operating system's own wording, or Rust's ``Os { code: N``."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:  # the message, or a cause's
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc.errno
        text = str(exc)
        for words, code in _ERRNO_TEXT.items():
            if words in text:
                return code
        if (m := re.search(r"Os \{ code: (\d+)", text)) and int(m[1]) in (*_DISK_FULL, *_NO_ACCESS):
            return int(m[1])
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return None


@contextlib.contextmanager
def warning_lines(console: Console) -> Iterator[None]:
    """Warnings shown during the block as one yellow ``warning:`` line each on ``console``."""
    def show(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
        console.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


_err = Console(stderr=True)


def _usage_message(exc: typer.TyperException) -> str:
    fmt = getattr(exc, "format_message", None)
    text = " ".join((fmt() if callable(fmt) else str(exc)).split()).rstrip(".")
    ctx = getattr(exc, "ctx", None)
    if ctx is not None:
        text += f"; see '{ctx.command_path} --help'"
    return text


class CliGroup(TyperGroup):
    """The ``refusaldir`` root command: click's usage errors (a bad option value, an unknown
    option or command) are one red ``error:`` line with exit status 1, like every other user
    mistake; with ``--json`` the error also goes to stdout as ``{"error", "type"}``."""

    def main(  # type: ignore[override]
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        argv = list(sys.argv[1:] if args is None else args)
        try:
            rv = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.Abort:
            _err.print("[bold red]aborted[/]")
            sys.exit(1)
        except (typer.TyperException, RefusalDirError) as exc:  # an option callback's error, too
            if type(exc).__name__ == "NoArgsIsHelpError":  # bare `refusaldir`: the help is printed
                sys.exit(getattr(exc, "exit_code", 2))
            message = _usage_message(exc) if isinstance(exc, typer.TyperException) else " ".join(str(exc).split())
            _err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
            if "--json" in argv:
                print(dumps({"error": message, "type": type(exc).__name__}, indent=None))
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)
