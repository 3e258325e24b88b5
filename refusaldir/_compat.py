"""Small, scoped work-arounds for version skew between transformers and transformer-lens.

``bridge_kv_cache``: transformers 5.x passes the KV cache to attention modules as ``cache=``
while transformer-lens 4.x attention bridges only read ``past_key_values=`` (or
``layer_past=``). Without this the cache is never filled: every cached decode step attends to
itself alone, so ``generate(use_cache=True)`` through the bridge produces garbage after the
first token. The context manager maps ``cache`` onto ``past_key_values`` while it is active
and restores the original method on exit (a no-op on versions that agree).

Example:
    >>> with bridge_kv_cache():  # doctest: +SKIP
    ...     out = model.hf.generate(**batch, max_new_tokens=16)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["bridge_kv_cache"]


@contextmanager
def bridge_kv_cache() -> Iterator[None]:
    """Let transformer-lens attention bridges use a cache passed as ``cache=``."""
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
        yield
    finally:
        AttentionBridge._update_kv_cache = orig  # type: ignore[method-assign]
