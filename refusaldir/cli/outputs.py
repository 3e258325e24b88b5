"""Where commands write, which directions they accept, and how they stop.

- :func:`default_run`: ``runs/<model name>``, the default run folder of a model (so
  ``extract --model smollm2`` never lands in the demo model's ``runs/demo``);
- :func:`check_apart`: an output folder that ``--force`` would replace must not hold the
  ``--directions`` the command reads;
- :data:`AllowMismatchOpt`: ``--allow-model-mismatch``, the deliberate way past the weights-hash
  check every command that combines directions with a model makes;
- :func:`sigterm_exits`: while a command runs, SIGTERM unwinds it like Ctrl-C (``finally``
  blocks run, temporary folders are removed, the previous outputs stay); the previous handler
  is restored afterwards.

Example:
    >>> default_run("Qwen/Qwen2.5-0.5B-Instruct").as_posix()
    'runs/Qwen2.5-0.5B-Instruct'
    >>> default_run("models/tiny.Q8_0.gguf").as_posix()
    'runs/tiny.Q8_0'
"""

from __future__ import annotations

import contextlib
import re
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer

from refusaldir.errors import ConfigError

__all__ = ["AllowMismatchOpt", "Terminated", "check_apart", "default_run", "sigterm_exits"]

AllowMismatchOpt = Annotated[bool, typer.Option(
    "--allow-model-mismatch",
    help="use --directions whose recorded weights hash differs from --model's (deliberate reuse only)")]


def default_run(model: str) -> Path:
    """``runs/<name>``: the last component of ``model`` (a name, folder, ``.gguf`` or hub id),
    made safe as a folder name."""
    name = Path(model.rstrip("/")).name.removesuffix(".gguf") or "model"
    return Path("runs") / re.sub(r"[^A-Za-z0-9._-]+", "-", name)


def check_apart(out: Path, directions: Path | None, flag: str = "--out", example: str = "eval") -> None:
    """Refuse an output folder that is, or contains, the ``--directions`` folder being read:
    writing it (``--force`` replaces it whole) would destroy the directions."""
    if directions is None:
        return
    o, d = out.expanduser().resolve(), directions.expanduser().resolve()
    if d == o or o in d.parents:
        raise ConfigError(
            f"{flag} {out} would replace the --directions folder {directions} (or the folder "
            f"holding it); choose another {flag}, e.g. {directions / example}"
        )


class Terminated(KeyboardInterrupt):
    """SIGTERM while a command runs: unwinds like Ctrl-C; exit status 143."""

    exit_code = 128 + signal.SIGTERM
    label = "terminated"


def _raise_terminated(signum: int, frame: FrameType | None) -> Any:
    raise Terminated()


@contextlib.contextmanager
def sigterm_exits() -> Iterator[None]:
    """Within the block (main thread only), SIGTERM raises :class:`Terminated`."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before if before is not None else signal.SIG_DFL)
