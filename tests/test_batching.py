"""batch_size="auto": halve on out-of-memory, keep order, and explain when even 1 does not fit."""

from __future__ import annotations

import pytest
import torch

from refusaldir.batching import BatchSizer, check_batch_size, resolve_batch_size
from refusaldir.errors import ConfigError, ResourceError


def test_auto_halves_on_oom_and_keeps_every_item_in_order():
    sizer = BatchSizer("auto")  # CPU start: 16
    tried = []

    def work(chunk):
        tried.append(len(chunk))
        if len(chunk) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [x * 10 for x in chunk]

    out = [(start, r) for start, _, r in sizer.map(list(range(10)), work)]
    assert tried[:4] == [10, 8, 4, 2]  # 16 → 8 → 4 → 2 (the first chunk holds all 10 items)
    assert sizer.size == 2
    assert [x for _, r in out for x in r] == [x * 10 for x in range(10)]
    assert [s for s, _ in out] == [0, 2, 4, 6, 8]


def test_oom_at_batch_size_one_names_size_memory_and_fix(tiny_qwen):
    sizer = BatchSizer("auto", tiny_qwen)

    def work(chunk):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")

    with pytest.raises(ResourceError, match=r"at batch size 1 \(0\.\d+B parameters in .*device_map='auto'"):
        list(sizer.map(["a", "b", "c"], work))


def test_a_fixed_batch_size_is_not_shrunk_silently():
    sizer = BatchSizer(4)

    def work(chunk):
        raise torch.OutOfMemoryError("out of memory")

    with pytest.raises(ResourceError, match="batch size 4.*--batch-size auto"):
        list(sizer.map([1, 2, 3, 4, 5], work))


def test_other_errors_pass_through_and_sizes_are_checked():
    sizer = BatchSizer("auto")
    with pytest.raises(ValueError, match="boom"):
        list(sizer.map([1], lambda c: (_ for _ in ()).throw(ValueError("boom"))))
    for bad in (0, -1, 2.5, True, "big"):
        with pytest.raises(ConfigError, match="'auto' or an integer >= 1"):
            check_batch_size(bad)
    assert resolve_batch_size("auto") == 16 and resolve_batch_size(3) == 3
