"""Batch sizes nobody has to tune: ``batch_size="auto"`` starts from the largest sensible batch
for the device and halves it whenever the accelerator runs out of memory, retrying the same
prompts; the size that worked is kept for the rest of the run.

Example:
    >>> sizer = BatchSizer(4)
    >>> [(start, len(chunk)) for start, chunk, _ in sizer.map(list(range(10)), lambda c: None)]
    [(0, 4), (4, 4), (8, 2)]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from refusaldir.errors import ConfigError, ResourceError

if TYPE_CHECKING:
    from refusaldir.models import ChatModel

__all__ = ["AUTO", "BatchSize", "BatchSizer", "auto_start", "check_batch_size", "resolve_batch_size"]

AUTO = "auto"
BatchSize = int | str
T = TypeVar("T")
R = TypeVar("R")

#: Starting batch of ``"auto"`` per kind of work on an accelerator (halved on out-of-memory).
GPU_START = {"capture": 256, "forward": 128, "generate": 128}
CPU_BATCH = 16


def check_batch_size(batch_size: Any, name: str = "batch_size") -> BatchSize:
    """``"auto"`` or an int >= 1 (a bool, float or other string is refused)."""
    if batch_size == AUTO:
        return AUTO
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"{name}={batch_size!r} must be 'auto' or an integer >= 1")
    return batch_size


def auto_start(device: torch.device, kind: str = "forward") -> int:
    """The first batch size ``"auto"`` tries on ``device``."""
    return GPU_START.get(kind, 64) if device.type == "cuda" else CPU_BATCH


def resolve_batch_size(batch_size: BatchSize, model: ChatModel | None = None, kind: str = "forward") -> int:
    """A concrete batch size: ``"auto"`` becomes the device's starting size (see
    :data:`GPU_START`; 16 on the CPU), an int is checked and returned.

    Example:
        >>> resolve_batch_size("auto"), resolve_batch_size(8)
        (16, 8)
    """
    batch_size = check_batch_size(batch_size)
    if isinstance(batch_size, int):
        return batch_size
    return auto_start(model.device if model is not None else torch.device("cpu"), kind)


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


class BatchSizer:
    """Runs work in batches, halving the batch on out-of-memory (only for ``"auto"``)."""

    def __init__(self, batch_size: BatchSize, model: ChatModel | None = None, *, kind: str = "forward") -> None:
        batch_size = check_batch_size(batch_size)
        self.auto = batch_size == AUTO
        self.model = model
        device = model.device if model is not None else torch.device("cpu")
        self.size = auto_start(device, kind) if isinstance(batch_size, str) else batch_size

    def map(self, items: Sequence[T], work: Callable[[list[T]], R]) -> Iterator[tuple[int, list[T], R]]:
        """Yield ``(start, chunk, work(chunk))`` over ``items`` in order."""
        start = 0
        while start < len(items):
            chunk = list(items[start : start + self.size])
            try:
                result = work(chunk)
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                if not _is_oom(exc):
                    raise
                self._shrink(exc)
                continue
            yield start, chunk, result
            start += len(chunk)

    def _shrink(self, exc: BaseException) -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if not self.auto or self.size == 1:
            raise ResourceError(self._oom_message()) from exc
        self.size = max(1, self.size // 2)

    def _oom_message(self) -> str:
        where, free = "the device", "unknown"
        params = "unknown size"
        if self.model is not None:
            dev = self.model.device
            where = str(dev)
            n = sum(p.numel() for p in self.model.hf.parameters())
            params = f"{n / 1e9:.2f}B parameters in {str(self.model.dtype).removeprefix('torch.')}"
            if dev.type == "cuda":
                free_b, total_b = torch.cuda.mem_get_info(dev)
                free = f"{free_b / 2**30:.1f} of {total_b / 2**30:.1f} GiB free"
        fix = ("pass batch_size='auto' (--batch-size auto) to shrink it automatically"
               if not self.auto else
               "load the model split across devices (device_map='auto', max_memory=…, "
               "offload_folder=…), in a smaller dtype, or shorten the prompts")
        return (f"out of memory on {where} at batch size {self.size} ({params}; {free}); {fix}")
