"""The filters a candidate must pass, the relaxation ladder used when every candidate fails
them, and the reasons recorded for each rejection.

Filters: ``layer < max_layer_frac · n_layers``; ``induce > induce_min`` (exact and fast
modes); ``KL <= kl_max`` (a KL stopped early fails once its lower bound exceeds the bound).
Zero directions never pass.

Example:
    >>> [lev.step for lev in levels(SelectionConfig(kl_relax=(0.5,)))]
    ['none', 'drop induce filter', 'raise KL bound to 0.5', 'ignore induce and KL filters', 'ignore all filters']
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from refusaldir.errors import ConfigError
from refusaldir.select.config import Key, SelectionConfig
from refusaldir.select.state import SelectionState

__all__ = ["Level", "all_filtered", "levels", "passes", "reasons"]


@dataclass(frozen=True)
class Level:
    """One rung of the relaxation ladder: which filters are in force."""

    step: str
    induce: bool
    kl_max: float
    layer: bool

    def without_kl(self) -> Level:
        """The same rung with the KL filter off (the cheap filters only)."""
        return replace(self, kl_max=math.inf)

    def to_dict(self, index: int) -> dict[str, Any]:
        return {"step": self.step, "index": index, "induce_filter": self.induce,
                "kl_max": None if math.isinf(self.kl_max) else self.kl_max,
                "layer_filter": self.layer}


def levels(cfg: SelectionConfig) -> list[Level]:
    """The ladder, strictest first (only the first rung when ``relax=False``)."""
    exact = cfg.mode != "cosine"
    out = [Level("none", exact, cfg.kl_max, True)]
    if not cfg.relax:
        return out
    if exact:
        out.append(Level("drop induce filter", False, cfg.kl_max, True))
    for k in sorted(k for k in cfg.kl_relax if k > cfg.kl_max):
        out.append(Level(f"raise KL bound to {k:g}", False, k, True))
    out.append(Level("ignore induce and KL filters", False, math.inf, True))
    out.append(Level("ignore all filters", False, math.inf, False))
    return out


def passes(st: SelectionState, c: Key, lev: Level) -> bool | None:
    """Whether ``c`` passes ``lev`` (``None``: a needed score is missing)."""
    s = {k: st.mean(c, k) for k in ("induce", "kl")}
    if c in st.degenerate:
        return False
    if lev.layer and not st.layer_ok(c):
        return False
    # A filter known to fail rejects even while another score is missing: fast mode
    # knows KL before induce, and must not pay for induce on KL-rejected candidates.
    missing = False
    if lev.induce:
        induce = s.get("induce")
        if induce is None:
            missing = True
        elif not induce > st.cfg.induce_min:
            return False
    if not math.isinf(lev.kl_max):
        kl = s.get("kl")
        if kl is None:
            lb = st.extra[c].get("kl_lower_bound")
            if lb is not None and lb > lev.kl_max:
                return False
            missing = True
        elif not kl <= lev.kl_max:
            return False
    return None if missing else True


def reasons(st: SelectionState, c: Key, lev: Level) -> list[str]:
    """Every filter of ``lev`` that ``c`` is known to fail, in words."""
    cfg = st.cfg
    out = []
    if c in st.degenerate:
        out.append("zero direction: harmful and harmless means are identical here")
    if not st.layer_ok(c):
        out.append(f"layer {c[1]} >= {cfg.max_layer_frac:g}·n_layers = {st.layer_cap:g}")
    ind, kl = st.mean(c, "induce"), st.mean(c, "kl")
    if cfg.mode != "cosine" and ind is not None and not ind > cfg.induce_min:
        out.append(f"induce {ind:.3f} <= {cfg.induce_min:g}")
    if kl is not None and not kl <= lev.kl_max:
        out.append(f"KL {kl:.3f} > {lev.kl_max:g}")
    lb = st.extra[c].get("kl_lower_bound")
    if kl is None and lb is not None and lb > lev.kl_max:
        done = int(st.extra[c].get("kl_prompts", 0))
        out.append(f"KL >= {lb:.3f} > {lev.kl_max:g} (exact early stop after {done} of "
                   f"{len(st.harmless)} prompts)")
    return out


def all_filtered(st: SelectionState) -> ConfigError:
    """The error raised when ``relax=False`` and no candidate passes the filters."""
    strict = levels(st.cfg)[0]
    counts: dict[str, int] = {}
    for c in st.cands:
        for r in reasons(st, c, strict):
            kind = r.split(" ")[0]
            counts[kind] = counts.get(kind, 0) + 1
    why = ", ".join(f"{kind}: {n}" for kind, n in sorted(counts.items())) or "none scored"
    return ConfigError(
        f"all {len(st.cands)} candidates were filtered out (rejections by {why}); "
        "allow relaxation (relax=True, the default) or loosen kl_max / induce_min / "
        "max_layer_frac"
    )
