"""The state of one selection run, shared by the scoring, filtering and reporting steps.

:class:`SelectionState` holds the inputs (model, directions, prompts, settings), the
candidates, everything scored so far and the work counters. The steps are functions of it
(:mod:`~refusaldir.select.scoring`, :mod:`~refusaldir.select.criteria`, ...).

Device policy (issue #11): candidate directions stay on the CPU as data; a candidate's unit
vector and raw vector are moved to the model's device and dtype once (:meth:`placed_unit`,
:meth:`placed_vector`); per-prompt scores are kept on the CPU in float64.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from refusaldir.errors import ConfigError
from refusaldir.io import sha256_bytes
from refusaldir.judges import RefusalTokens
from refusaldir.progress import progress_bar
from refusaldir.readout import refusal_score
from refusaldir.select.config import Key, SelectionConfig
from refusaldir.select.engine import ForwardEngine
from refusaldir.stats import bootstrap_weights
from refusaldir.steer import unit_vector

if TYPE_CHECKING:
    from rich.progress import Progress

    from refusaldir.directions import DirectionSet
    from refusaldir.models import ChatModel

__all__ = ["SelectionState", "texts_info"]


def texts_info(texts: Sequence[str]) -> dict[str, Any]:
    """Count and sha256 of a prompt list (recorded in the result and the checkpoint key)."""
    return {"count": len(texts), "sha256": sha256_bytes("\n".join(texts))}


@dataclass(eq=False)
class SelectionState:
    """Inputs, candidates and everything computed so far in one selection.

    ``scores[c][name]``: per-prompt scores (``bypass``, ``induce``, ``kl``) on the CPU;
    ``extra[c]``: scalar details (cosine scores, proxies, KL lower bounds, ...);
    ``bypass_head[c]``: fast mode's partial bypass ``(scores, activations)``;
    ``cos_acts[c][kind]``: evaluation-layer activations waiting for the other side.
    """

    model: ChatModel
    ds: DirectionSet
    cfg: SelectionConfig
    harmful: list[str]
    harmless: list[str]
    positions: list[int]
    layers: list[int]
    cands: list[Key]
    vectors: dict[Key, Tensor]
    degenerate: set[Key]
    layer_cap: float
    boot_w: dict[str, Tensor | None]
    bar: Progress
    scores: dict[Key, dict[str, Tensor]] = field(default_factory=dict)
    extra: dict[Key, dict[str, float]] = field(default_factory=dict)
    bypass_head: dict[Key, tuple[Tensor, Tensor | None]] = field(default_factory=dict)
    cos_acts: dict[Key, dict[str, Tensor]] = field(default_factory=dict)
    boot_cos: dict[Key, Tensor] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    work: dict[str, int] = field(default_factory=lambda: {"candidate_passes": 0})
    refusal: RefusalTokens | None = None
    cos_layers: list[int] = field(default_factory=list)
    baseline: dict[str, Any] = field(default_factory=dict)
    eng: ForwardEngine | None = None
    base_logits: dict[str, Tensor] = field(default_factory=dict)
    base_acts: dict[str, Tensor] = field(default_factory=dict)
    base_scores: dict[str, Tensor] = field(default_factory=dict)
    resid: list[Tensor] = field(default_factory=list)
    kl_sum: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    kl_seen: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    t0: float = field(default_factory=time.perf_counter)
    ckpt_t: float = 0.0
    _placed: dict[tuple[str, Key], Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def create(cls, model: ChatModel, ds: DirectionSet, harmful: list[str], harmless: list[str],
               cfg: SelectionConfig) -> SelectionState:
        """Check the candidates against the direction set and set up an empty state."""
        if ds.hook_point != "resid_pre":
            raise ConfigError(
                f"these directions were captured at {ds.hook_point}; selection adds and ablates "
                "at resid_pre (Arditi et al.), so re-extract with hook_point='resid_pre'"
            )
        positions = cfg.positions if cfg.positions is not None else list(ds.positions)
        layers = cfg.layers if cfg.layers is not None else list(ds.layers)
        for p in positions:
            if p not in ds.positions:
                raise ConfigError(f"position {p} is not in the direction set; pick from {ds.positions}")
        for layer in layers:
            if layer not in ds.layers:
                raise ConfigError(
                    f"layer {layer} is not in the direction set; pick from {ds.layers[0]}..{ds.layers[-1]}"
                )
        layers = sorted(set(layers))
        cands: list[Key] = [(p, layer) for p in positions for layer in layers]
        vectors = {c: ds.refusal[ds.positions.index(c[0]), ds.layers.index(c[1])].detach().cpu()
                   for c in cands}
        norms = {c: float(v.float().norm()) for c, v in vectors.items()}
        top = max((v for v in norms.values() if math.isfinite(v)), default=0.0)
        # e.g. layer 0: post-instruction tokens are the same template tokens in every prompt,
        # so their embeddings, and the difference of means, are exactly zero.
        degenerate = {c for c, v in norms.items() if not math.isfinite(v) or v <= 1e-6 * top}
        if len(degenerate) == len(cands):
            raise ConfigError(
                "every candidate direction is zero or not finite; re-extract the directions "
                "with different prompts or layers"
            )
        g = torch.Generator().manual_seed(cfg.seed)
        boot_w = {name: bootstrap_weights(n, cfg.n_bootstrap, g)
                  for name, n in (("harmful", len(harmful)), ("harmless", len(harmless)))}
        return cls(
            model=model, ds=ds, cfg=cfg, harmful=harmful, harmless=harmless, positions=positions,
            layers=layers, cands=cands, vectors=vectors, degenerate=degenerate,
            layer_cap=cfg.max_layer_frac * model.n_layers, boot_w=boot_w,
            scores={c: {} for c in cands}, extra={c: {} for c in cands},
            kl_sum=torch.zeros(len(harmless), dtype=torch.float64),  # per-prompt KL seen so far
            kl_seen=torch.zeros(len(harmless), dtype=torch.float64),
            bar=progress_bar(cfg.progress),
        )

    # ------------------------------------------------------------------ directions
    def vec(self, c: Key) -> Float[Tensor, " d_model"]:
        """The raw direction of candidate ``c`` (CPU, the direction set's dtype)."""
        return self.vectors[c]

    def unit(self, c: Key) -> Float[Tensor, " d_model"]:
        """The unit direction of ``c`` (CPU, float32)."""
        return unit_vector(self.vectors[c], torch.float32)

    def placed_unit(self, c: Key) -> Float[Tensor, " d_model"]:
        """The unit direction on the model's device and dtype (moved once per candidate)."""
        key = ("unit", c)
        if key not in self._placed:
            self._placed[key] = self.unit(c).to(device=self.model.device, dtype=self.model.dtype)
        return self._placed[key]

    def placed_vector(self, c: Key) -> Float[Tensor, " d_model"]:
        """The raw direction on the model's device and dtype (moved once per candidate)."""
        key = ("vector", c)
        if key not in self._placed:
            self._placed[key] = self.vec(c).to(device=self.model.device, dtype=self.model.dtype)
        return self._placed[key]

    # ------------------------------------------------------------------ scores
    def mean(self, c: Key, name: str) -> float | None:
        t = self.scores[c].get(name)
        return None if t is None else float(t.mean())

    def rscore(self, logits: Float[Tensor, "n vocab"]) -> Float[Tensor, " n"]:
        """Refusal log-odds per prompt (CPU float64)."""
        if self.refusal is None:
            raise ConfigError("refusal tokens are needed for this score; set refusal_ids or use exact/fast mode")
        return refusal_score(logits, self.refusal.ids).cpu()

    def idx(self, name: str) -> range:
        return range(len(self.harmful if name == "harmful" else self.harmless))

    def layer_ok(self, c: Key) -> bool:
        return c[1] < self.layer_cap

    @property
    def engine(self) -> ForwardEngine:
        if self.eng is None:
            raise RuntimeError("the shared baseline has not run yet (no forward engine)")
        return self.eng

    # ------------------------------------------------------------------ bookkeeping
    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

