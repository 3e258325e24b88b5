"""Every hook refusaldir registers lives here: named TransformerLens hook points, raw module
hooks, early stops, bypassed blocks and the KV-cache shim, all scoped to ``with`` blocks.

The bridge silently ignores hook names it does not know; every name here is checked first.
Hooks are registered with PyTorch's own ``register_forward_hook`` on the bridge's
``HookPoint`` modules (TransformerLens's ``hook_conversion`` applied as it does), so removing
one is ``handle.remove()`` and no library-internal list is touched.

Example:
    >>> with hooks(model, [(hook_name("resid_pre", 3), lambda act, hook: act * 0)]):  # doctest: +SKIP
    ...     model.hf(input_ids)
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any, Protocol

from refusaldir.errors import HookError
from refusaldir.models.residual import mixer_out_names

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from refusaldir.models import ChatModel

__all__ = [
    "HOOK_POINTS", "RESID_POINTS", "Appliable", "HookHandle", "StopForward", "add_hooks",
    "applied_all", "bridge_kv_cache", "bypass_modules", "check_layers", "get_hook_point",
    "hook_name", "hooks", "module_forward_hook", "module_pre_hook", "stop_forward",
]

HookFn = Callable[..., Any]
RESID_POINTS = ("resid_pre", "resid_mid", "resid_post")
HOOK_POINTS = (*RESID_POINTS, "attn_out", "mlp_out")


class StopForward(Exception):
    """Raised inside the last needed hook so the layers above it are never computed."""


class Appliable(Protocol):
    """Anything that scopes itself onto a model: ``with x.apply(model): ...``."""

    def apply(self, model: ChatModel) -> AbstractContextManager[Any]: ...


# ----------------------------------------------------------------------------- names
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
    items = list(layers) if isinstance(layers, Iterable) else [layers]  # one index
    try:
        if any(isinstance(x, bool) for x in items):
            raise TypeError
        out = sorted({operator.index(x) for x in items})
    except TypeError:
        raise HookError(f"layers={layers!r} is not valid; pass 'all' or a list of whole layer indices") from None
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
    parts = name.split(".")
    if name not in hook_dict and parts[-1] == "hook_attn_out" and parts[1:2] and parts[1].isdigit():
        name = next((a for a in mixer_out_names(int(parts[1])) if a in hook_dict), name)  # linear attention
    if name not in hook_dict:
        near = sorted(k for k in hook_dict if k.split(".")[-1] == name.split(".")[-1])[:3]
        hint = f" (e.g. {', '.join(near)})" if near else ""
        raise HookError(
            f"hook {name!r} does not exist on {model.spec}; names look like "
            f"'blocks.<layer>.hook_resid_pre'{hint}"
        )
    return hook_dict[name]


# ----------------------------------------------------------------------------- named hooks
class HookHandle:
    """Handle for hooks added with :func:`add_hooks`; call ``remove()`` to take them off."""

    def __init__(self, handles: list[Any]) -> None:
        self._handles = handles

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> HookHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _register(point: Any, fn: HookFn) -> Any:
    def full_hook(module: Any, inputs: Any, output: Any) -> Any:
        conv = getattr(point, "hook_conversion", None)
        act = conv.convert(output) if conv is not None else output
        result = fn(act, hook=point)
        if result is not None and conv is not None:
            result = conv.revert(result)
        return result

    handle = point.register_forward_hook(full_hook)
    listed = getattr(point, "fwd_hooks", None)
    if not isinstance(listed, list):
        return handle
    # Some bridge blocks (Granite's scaled residual adds) only call a HookPoint that reports
    # hooks through TransformerLens's own list: record ours there too, for as long as it lives.
    from transformer_lens.hook_points import LensHandle

    lens = LensHandle(handle)
    listed.append(lens)
    return _ListedHandle(handle, listed, lens)


class _ListedHandle:
    """A PyTorch hook handle also recorded in a HookPoint's ``fwd_hooks``; removes both."""

    def __init__(self, handle: Any, listed: list[Any], lens: Any) -> None:
        self.handle, self.listed, self.lens = handle, listed, lens

    def remove(self) -> None:
        self.handle.remove()
        if any(h is self.lens for h in self.listed):
            self.listed[:] = [h for h in self.listed if h is not self.lens]


def add_hooks(model: ChatModel, fwd_hooks: Sequence[tuple[str, HookFn]]) -> HookHandle:
    """Register ``(name, fn)`` forward hooks; ``fn(activation, hook)`` may return a new tensor.

    Every name is validated before any hook is registered. Prefer :func:`hooks` (scoped).
    """
    points = [(get_hook_point(model, name), fn) for name, fn in fwd_hooks]
    handles: list[Any] = []
    try:
        for point, fn in points:
            handles.append(_register(point, fn))
    except BaseException:
        HookHandle(handles).remove()
        raise
    return HookHandle(handles)


@contextmanager
def hooks(model: ChatModel, fwd_hooks: Sequence[tuple[str, HookFn]]) -> Iterator[HookHandle]:
    """Context manager: hooks are active inside the block and removed on exit, even on error."""
    handle = add_hooks(model, fwd_hooks)
    try:
        yield handle
    finally:
        handle.remove()


@contextmanager
def stop_forward() -> Iterator[None]:
    """Swallow :class:`StopForward` raised by a hook (the pass ends early on purpose)."""
    try:
        yield
    except StopForward:
        pass


# ----------------------------------------------------------------------------- raw modules
@contextmanager
def module_pre_hook(module: Any, fn: Callable[[Any, tuple[Any, ...], dict[str, Any]], Any]) -> Iterator[None]:
    """``fn(module, args, kwargs)`` runs before ``module.forward`` inside the block."""
    handle = module.register_forward_pre_hook(fn, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def module_forward_hook(module: Any, fn: Callable[[Any, Any, Any], Any]) -> Iterator[None]:
    """``fn(module, args, output)`` runs after ``module.forward`` inside the block."""
    handle = module.register_forward_hook(fn)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def bypass_modules(modules: Sequence[Any], *, tuple_out: bool) -> Iterator[None]:
    """Inside the block each module returns its first input unchanged (as a 1-tuple when
    ``tuple_out``), e.g. decoder blocks below a layer whose input is injected anyway."""

    def passthrough(*args: Any, **kwargs: Any) -> Any:
        h = args[0] if args else kwargs["hidden_states"]
        return (h,) if tuple_out else h

    # The instance dict, not setattr: bridge components forward attribute writes to the
    # wrapped HF module, which would patch the wrong object.
    for m in modules:
        m.__dict__["forward"] = passthrough
    try:
        yield
    finally:
        for m in modules:
            m.__dict__.pop("forward", None)


@contextmanager
def bridge_kv_cache() -> Iterator[None]:
    """Let transformer-lens attention bridges use a KV cache passed as ``cache=``.

    transformers 5.x passes the cache to attention modules as ``cache=`` while
    transformer-lens 4.x attention bridges only read ``past_key_values=`` (or
    ``layer_past=``); without this every cached decode step attends to itself alone. The
    original method is restored on exit (a no-op on versions that agree).
    """
    try:
        from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge
    except ImportError:  # pragma: no cover - other transformer-lens layouts
        yield
        return
    orig = AttentionBridge.__dict__.get("_update_kv_cache")
    if orig is None or getattr(orig, "_refusaldir_compat", False):
        yield
        return

    def _update_kv_cache(self: Any, k: Any, v: Any, **kwargs: Any) -> Any:
        if (kwargs.get("past_key_values") is None and kwargs.get("layer_past") is None
                and kwargs.get("cache") is not None):
            kwargs["past_key_values"] = kwargs["cache"]
        return orig(self, k, v, **kwargs)

    _update_kv_cache._refusaldir_compat = True  # type: ignore[attr-defined]
    AttentionBridge._update_kv_cache = _update_kv_cache  # type: ignore[method-assign]
    try:
        with _recurrent_cache():
            yield
    finally:
        AttentionBridge._update_kv_cache = orig  # type: ignore[method-assign]


@contextmanager
def _recurrent_cache() -> Iterator[None]:
    """The same for linear-attention (gated delta net) bridges, which run HF's own cached
    forward only when the cache arrives as ``cache_params=``; transformers 5.x passes
    ``cache=`` (Qwen3.5), and without this the recurrent and conv states are never updated."""
    try:
        from transformer_lens.model_bridge.generalized_components.gated_delta_net import (
            GatedDeltaNetBridge,
        )
    except ImportError:  # pragma: no cover - other transformer-lens layouts
        yield
        return
    orig = GatedDeltaNetBridge.__dict__.get("forward")
    if orig is None or getattr(orig, "_refusaldir_compat", False) or not hasattr(GatedDeltaNetBridge, "_native_forward"):
        yield
        return

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("cache_params") is None and kwargs.get("cache") is not None:
            return self._native_forward(*args, **kwargs)
        return orig(self, *args, **kwargs)

    forward._refusaldir_compat = True  # type: ignore[attr-defined]
    GatedDeltaNetBridge.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        GatedDeltaNetBridge.forward = orig  # type: ignore[method-assign]


# ----------------------------------------------------------------------------- interventions
@contextmanager
def applied_all(model: ChatModel, interventions: Sequence[Appliable]) -> Iterator[list[Any]]:
    """Enter every intervention's ``apply(model)`` (in order); all are removed on exit."""
    with ExitStack() as stack:
        yield [stack.enter_context(iv.apply(model)) for iv in interventions]
