"""Progress display for long work (rich), shared by every stage.

Example:
    >>> with progress_bar(enabled=False) as bar:
    ...     task = bar.add_task("work", total=2)
    ...     bar.advance(task, 2)
"""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

__all__ = ["progress_bar"]


def progress_bar(enabled: bool = True) -> Progress:
    """The rich progress bar used for long work (disabled → a no-op bar)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=True,
    )
