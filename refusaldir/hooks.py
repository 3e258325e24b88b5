"""Named hook points on a ``TransformerBridge``, validated, and scoped to ``with`` blocks.

The bridge silently ignores hook names it does not know; every name here is checked first.

Example:
    >>> with hooks(model, [(hook_name("resid_pre", 3), lambda act, hook: act * 0)]):  # doctest: +SKIP
    ...     model.hf(input_ids)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from refusaldir.errors import HookError

if TYPE_CHECKING:
    from refusaldir.models import ChatModel

HookFn = Callable[..., Any]
RESID_POINTS = ("resid_pre", "resid_mid", "resid_post")
HOOK_POINTS = (*RESID_POINTS, "attn_out", "mlp_out")


def hook_name(point: str, layer: int) -> str:
    """TransformerLens-style name, e.g. ``hook_name("resid_pre", 3) == "blocks.3.hook_resid_pre"``."""
    if point not in HOOK_POINTS:
        raise HookError(
            f"hook point {point!r} is not supported; expected one of {', '.join(HOOK_POINTS)}"
        )
    return f"blocks.{layer}.hook_{point}"


def check_layers(model: ChatModel, layers: Iterable[int] | str | None) -> list[int]:
    """Normalise a layer selection (``None``/``"all"`` or indices) and check the range."""
    n = model.n_layers
    if layers is None or layers == "all":
        return list(range(n))
    if isinstance(layers, str):
        raise HookError(f"layers={layers!r} is not valid; pass 'all' or a list of ints")
    out = sorted({int(x) for x in layers})
    for layer in out:
        if not 0 <= layer < n:
            raise HookError(
                f"layer {layer} is out of range for {model.spec} which has {n} layers; "
                f"use 0..{n - 1}"
            )
    if not out:
        raise HookError("no layers selected; pass at least one layer index")
    return out


def get_hook_point(model: ChatModel, name: str) -> Any:
    """Return the bridge's ``HookPoint`` for ``name``; raise when the bridge lacks it."""
    hook_dict = model.bridge.hook_dict
    if name not in hook_dict:
        near = sorted(k for k in hook_dict if k.split(".")[-1] == name.split(".")[-1])[:3]
        hint = f" (e.g. {', '.join(near)})" if near else ""
        raise HookError(
            f"hook {name!r} does not exist on {model.spec}; names look like "
            f"'blocks.<layer>.hook_resid_pre'{hint}"
        )
    return hook_dict[name]


class HookHandle:
    """Handle for hooks added with :func:`add_hooks`; call ``remove()`` to take them off."""

    def __init__(self, registered: list[tuple[Any, Any]]) -> None:
        self._registered = registered

    def remove(self) -> None:
        while self._registered:
            point, lens = self._registered.pop()
            lens.hook.remove()
            if lens in point.fwd_hooks:
                point.fwd_hooks.remove(lens)

    def __enter__(self) -> HookHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def add_hooks(model: ChatModel, fwd_hooks: Sequence[tuple[str, HookFn]]) -> HookHandle:
    """Register ``(name, fn)`` forward hooks; ``fn(activation, hook)`` may return a new tensor."""
    points = [(get_hook_point(model, name), fn) for name, fn in fwd_hooks]
    registered: list[tuple[Any, Any]] = []
    try:
        for point, fn in points:
            registered.append((point, point.add_hook(fn)))
    except BaseException:
        HookHandle(registered).remove()
        raise
    return HookHandle(registered)


@contextmanager
def hooks(model: ChatModel, fwd_hooks: Sequence[tuple[str, HookFn]]) -> Iterator[HookHandle]:
    """Context manager: hooks are active inside the block and removed on exit, even on error."""
    handle = add_hooks(model, fwd_hooks)
    try:
        yield handle
    finally:
        handle.remove()
