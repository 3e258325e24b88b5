"""Pick *the* refusal direction among the |positions| × |layers| candidates, and say why.

Three modes:

- ``exact`` (Arditi et al. 2024, appendix C). For every candidate ``(pos, layer)``:
  **bypass** = mean refusal log-odds on harmful validation prompts with the direction ablated
  everywhere (``resid_pre`` of every layer, every ``attn_out`` and ``mlp_out``, all positions);
  **induce** = mean refusal log-odds on harmless validation prompts with the raw direction
  added to ``resid_pre`` of its own layer; **KL** = first-token KL(baseline ‖ ablated) on
  harmless prompts. Candidates must pass ``KL <= kl_max``, ``induce > induce_min`` and
  ``layer < max_layer_frac * n_layers``; the lowest bypass wins. The refusal log-odds use
  the model's own refusal tokens (:mod:`refusaldir.refusal_metric`).
- ``cosine`` (COSMIC-style, output-free): no refusal tokens and no generation. At the layers
  where mean harmful and harmless activations differ most, ablating a good direction makes
  harmful activations look harmless and adding it makes harmless ones look harmful; the
  score is the sum of those two (centred) cosine similarities, guarded by the same KL bound.
- ``fast``: successive halving on the objective. Every candidate's bypass score is first
  computed on only ``fast_prompts`` harmful validation prompts; the candidates are walked in
  that order checking KL (early-stopped) until ``fast_keep`` (default 2) pass it, and exact
  mode runs on the walked pool (finishing bypass on the remaining prompts for the finalists,
  scoring induce). Strong directions rank first and are the ones KL tends to reject, so most
  of the work is the short bypass passes. Relaxations apply within the pool (recorded), so
  fast mode can relax a filter that a candidate outside the pool passes; a larger
  ``fast_keep`` compares more finalists on the full validation set.

When every candidate is filtered out nothing crashes: the filters are relaxed step by step
(``RELAXATIONS``), the step used is recorded, and every candidate keeps its rejection reasons.

The ``shared`` method computes exactly what the straightforward ``naive`` loop computes, with
less work: the shared prefix (system prompt) run once for a whole batch of candidates and
its KV cache reused, several candidates' ablations scored in the same batches (rows of one
prompt share a width, so there is little padding), the unmodified residual stream cached
once so additions start at the candidate's layer, the LM head applied at the last position
only, cheap filters first (layer → induce → bypass), and KL only where it can still change
the pick, stopped early once the bound is provably exceeded (prompts that moved earlier
candidates most go first, so a rejection needs fewer of them). Candidates that
are never fully scored say why (``"not scored: ..."``).

Example:
    >>> import refusaldir as rd  # doctest: +SKIP
    >>> model, ds = rd.load_model("demo"), rd.DirectionSet.load("runs/demo")  # doctest: +SKIP
    >>> result = select_direction(model, ds, mode="exact")  # doctest: +SKIP
    >>> result.pos, result.layer, ds.selected  # doctest: +SKIP
    (-2, 15, (-2, 15))
    >>> result.save("runs/demo"); ds.save("runs/demo")  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from refusaldir.hooks import bridge_kv_cache
from refusaldir.progress import progress_bar
from refusaldir.errors import ConfigError, PromptFileError
from refusaldir.hooks import hook_name, hooks
from refusaldir.judges.logit import RefusalTokens, find_refusal_tokens, refusal_score

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from refusaldir.directions import DirectionSet
    from refusaldir.models import ChatModel

__all__ = [
    "MODES", "RELAXATIONS", "CandidateScore", "SelectionConfig", "SelectionResult",
    "first_token_kl", "select_direction",
]

MODES = ("exact", "cosine", "fast")
METHODS = ("shared", "naive")
SELECTION_FILE = "selection.json"
FIGURES_FILE = "selection.html"
#: Relaxation ladder used when every candidate is filtered out (recorded in the result).
RELAXATIONS = (
    "none",
    "drop induce filter",
    "raise KL bound",
    "ignore induce and KL filters",
    "ignore all filters",
)
ABLATION_POINTS = ("resid_pre", "attn_out", "mlp_out")
_MANY = 8  # candidates scored together in one batched pass (progress/checkpoint granularity)
log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- config
@dataclass
class SelectionConfig:
    """Settings for :func:`select_direction` (validated on creation).

    ``checkpoint``: a file where per-prompt scores (and detected refusal tokens) are saved as
    they are computed; a rerun with the same model, directions, prompts and scoring settings
    resumes from it instead of recomputing (useful for long CPU sweeps).

    Example:
        >>> SelectionConfig(mode="cosine", n_val=16).kl_max
        0.1
    """

    mode: str = "exact"
    method: str = "shared"
    n_val: int = 32
    kl_max: float = 0.1
    induce_min: float = 0.0
    max_layer_frac: float = 0.8
    positions: list[int] | None = None
    layers: list[int] | None = None
    batch_size: int = 16
    top_k: int = 5
    n_bootstrap: int = 1000
    seed: int = 0
    refusal_ids: list[int] | None = None
    detect_max_new_tokens: int = 16
    relax: bool = True
    kl_relax: tuple[float, ...] = (0.2, 0.5, 1.0, 2.0)
    cosine_layer_frac: float = 0.1
    cosine_center: bool = True
    fast_keep: int = 2
    fast_prompts: int = 8
    share_prefix: bool = True
    score_all: bool = False
    checkpoint: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode={self.mode!r} is not one of {', '.join(MODES)}")
        if self.method not in METHODS:
            raise ConfigError(f"method={self.method!r} is not one of {', '.join(METHODS)}")
        if self.method == "naive" and self.mode != "exact":
            raise ConfigError("method='naive' (the straightforward loop) exists for mode='exact' only")
        for name in ("n_val", "batch_size", "top_k", "fast_keep", "fast_prompts", "detect_max_new_tokens"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if int(self.n_bootstrap) < 0:
            raise ConfigError(f"n_bootstrap={self.n_bootstrap} must be >= 0 (0 disables it)")
        for name in ("kl_max", "induce_min", "max_layer_frac", "cosine_layer_frac"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"{name}={v!r} must be a finite number")
        if self.kl_max < 0:
            raise ConfigError(f"kl_max={self.kl_max} must be >= 0 (e.g. 0.1)")
        if not 0 < self.max_layer_frac <= 1:
            raise ConfigError(f"max_layer_frac={self.max_layer_frac} must be in (0, 1] (e.g. 0.8)")
        if not 0 < self.cosine_layer_frac <= 1:
            raise ConfigError(f"cosine_layer_frac={self.cosine_layer_frac} must be in (0, 1]")
        self.kl_relax = tuple(float(k) for k in self.kl_relax)
        if any(not math.isfinite(k) or k <= 0 for k in self.kl_relax):
            raise ConfigError(f"kl_relax={self.kl_relax} must hold positive finite KL bounds")
        if self.positions is not None:
            self.positions = [int(p) for p in self.positions]
            if not self.positions:
                raise ConfigError("positions is empty; pass None for every post-instruction position")
        if self.layers is not None:
            self.layers = [int(x) for x in self.layers]
            if not self.layers:
                raise ConfigError("layers is empty; pass None for every layer of the direction set")
        if self.refusal_ids is not None:
            self.refusal_ids = [int(i) for i in self.refusal_ids]
            if not self.refusal_ids:
                raise ConfigError("refusal_ids is empty; pass None to detect them")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kl_relax"] = list(self.kl_relax)
        return d


# ----------------------------------------------------------------------------- results
@dataclass
class CandidateScore:
    """Scores and verdict of one candidate ``(pos, layer)``.

    ``status``: ``selected``, ``passed`` (passes the filters in force), ``rejected`` (fails
    them), ``not scored`` (rejected before the remaining scores were computed, or, in cosine
    mode, ranked below the candidates whose KL was checked). ``reasons`` names every failed
    filter, judged against the configured (unrelaxed) bounds.
    """

    pos: int
    layer: int
    bypass: float | None = None
    induce: float | None = None
    kl: float | None = None
    cosine: float | None = None
    cos_ablation: float | None = None
    cos_addition: float | None = None
    proxy: float | None = None
    status: str = "not scored"
    reasons: list[str] = field(default_factory=list)
    rank: int | None = None
    norm: float | None = None
    details: dict[str, float] = field(default_factory=dict)

    @property
    def key(self) -> tuple[int, int]:
        return (self.pos, self.layer)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SelectionResult:
    """What :func:`select_direction` found, and why (see :meth:`to_dict`, :meth:`save`)."""

    pos: int
    layer: int
    mode: str
    method: str
    candidates: list[CandidateScore]
    relaxation: dict[str, Any]
    top_k: list[tuple[int, int]]
    stability: dict[str, Any]
    timings: dict[str, float]
    refusal_tokens: RefusalTokens | None
    config: SelectionConfig
    baseline: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    prompts: dict[str, Any] = field(default_factory=dict)
    cosine_layers: list[int] = field(default_factory=list)
    work: dict[str, int] = field(default_factory=dict)

    @property
    def selected(self) -> CandidateScore:
        return self.candidate(self.pos, self.layer)

    def candidate(self, pos: int, layer: int) -> CandidateScore:
        for c in self.candidates:
            if c.key == (pos, layer):
                return c
        raise ConfigError(f"({pos}, {layer}) is not a candidate of this selection")

    def to_dict(self) -> dict[str, Any]:
        sel = self.selected
        return {
            "selected": {"pos": self.pos, "layer": self.layer, **_score_fields(sel)},
            "mode": self.mode,
            "method": self.method,
            "relaxation": self.relaxation,
            "top_k": [{"pos": p, "layer": layer, **_score_fields(self.candidate(p, layer))}
                      for p, layer in self.top_k],
            "stability": self.stability,
            "refusal_tokens": self.refusal_tokens.to_dict() if self.refusal_tokens else None,
            "baseline": self.baseline,
            "cosine_layers": self.cosine_layers,
            "timings": self.timings,
            "work": self.work,
            "config": self.config.to_dict(),
            "model": self.model,
            "prompts": self.prompts,
            "candidates": [c.to_dict() for c in self.candidates],
        }

    def metadata(self) -> dict[str, Any]:
        """The compact record stored in ``DirectionSet.metadata["selected"]``."""
        return {
            "method": f"{self.mode}" + (f"/{self.method}" if self.mode == "exact" else ""),
            "mode": self.mode,
            "scores": _score_fields(self.selected),
            "relaxation": self.relaxation["step"],
            "stability": self.stability.get("top1_share"),
            "refusal_token_ids": self.refusal_tokens.ids if self.refusal_tokens else None,
            "selection_file": SELECTION_FILE,
        }

    def figures(self) -> dict[str, go.Figure]:
        """Plotly figures: ``scores`` (per layer and position), ``kl`` and ``stability``."""
        return _figures(self)

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``selection.json`` and ``selection.html`` (offline, plotly.js inlined)."""
        from refusaldir.directions import _ensure_writable

        out = Path(folder)
        _ensure_writable(out)
        tmp = out / f".{SELECTION_FILE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(_finite(self.to_dict()), indent=2, default=_json_default))
        os.replace(tmp, out / SELECTION_FILE)
        figs = self.figures()
        parts = []
        for i, fig in enumerate(figs.values()):
            parts.append(fig.to_html(full_html=False, include_plotlyjs=(i == 0)))
        html = (
            "<!DOCTYPE html><html><head><meta charset='utf-8'><title>refusaldir selection"
            "</title></head><body>" + "\n".join(parts) + "</body></html>"
        )
        tmp = out / f".{FIGURES_FILE}.{os.getpid()}.tmp"
        tmp.write_text(html, encoding="utf-8")
        os.replace(tmp, out / FIGURES_FILE)
        return out / SELECTION_FILE


def _score_fields(c: CandidateScore) -> dict[str, Any]:
    return {k: getattr(c, k) for k in ("bypass", "induce", "kl", "cosine", "proxy", "status", "rank")}


def _finite(o: Any) -> Any:
    """Replace NaN/inf floats (invalid JSON) by ``None``, recursively."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def _json_default(o: Any) -> Any:
    if isinstance(o, Tensor):
        return o.tolist()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    raise TypeError(f"cannot serialise {type(o).__name__}")


# ----------------------------------------------------------------------------- metrics
def first_token_kl(
    base_logits: Float[Tensor, "batch vocab"], logits: Float[Tensor, "batch vocab"]
) -> Float[Tensor, " batch"]:
    """KL(base ‖ other) of the next-token distributions, per row, in float64.

    Example:
        >>> first_token_kl(torch.zeros(2, 5), torch.zeros(2, 5)).tolist()
        [0.0, 0.0]
    """
    lp = torch.log_softmax(base_logits.to(torch.float64), dim=-1)
    lq = torch.log_softmax(logits.to(torch.float64), dim=-1)
    return (lp.exp() * (lp - lq)).sum(dim=-1)


# ----------------------------------------------------------------------------- engine
class _StopForward(Exception):
    """Raised by the last needed hook so layers above it are never computed."""


@dataclass
class _PromptSet:
    name: str
    texts: list[str]
    suffix: list[list[int]]  # token ids after the shared prefix, per prompt


class _Engine:
    """Forward passes with shared-prefix KV caching, late starts and early stops.

    ``run`` evaluates one intervention (a list of hooks) on a subset of prompts. The shared
    prefix (everything before the first token that differs between prompts, e.g. the system
    prompt) is run once per intervention and its KV cache is expanded over the batch; the
    suffixes are left-padded after it, with position ids that continue the prefix.
    """

    def __init__(self, model: ChatModel, sets: dict[str, list[str]], *, batch_size: int,
                 share_prefix: bool) -> None:
        self.model = model
        self.batch_size = batch_size
        self.decoder = model.hf.get_decoder() if hasattr(model.hf, "get_decoder") else model.hf.model
        self.blocks = self.decoder.layers
        self.head = model.hf.get_output_embeddings()
        self.softcap = getattr(model.hf.config, "final_logit_softcapping", None)
        params = inspect.signature(self.decoder.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        tpl = model.template
        pad = model.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else model.tokenizer.eos_token_id)
        rows: dict[str, list[list[int]]] = {}
        for name, texts in sets.items():
            enc = tpl.encode(texts)
            rows[name] = [r[m.bool()].tolist() for r, m in zip(enc["input_ids"], enc["attention_mask"])]
        everything = [r for rs in rows.values() for r in rs]
        k = 0
        if share_prefix:
            shortest = min(len(r) for r in everything)
            limit = shortest - tpl.n_post - 1  # keep t_inst and the template tail in the suffix
            first = everything[0]
            while k < limit and all(r[k] == first[k] for r in everything):
                k += 1
            if k < 2:
                k = 0
        self.prefix_len = k
        self.prefix_ids = torch.tensor([everything[0][:k]], dtype=torch.long) if k else None
        self.sets = {n: _PromptSet(n, list(sets[n]), [r[k:] for r in rs]) for n, rs in rows.items()}
        self.phase = "suffix"
        self.inject: Tensor | None = None
        self.tuple_out: bool | None = None
        self._prefix_cache: dict[Any, Any] = {}
        self.forward_tokens = 0  # tokens pushed through the decoder (work counter)
        self.row_param: Tensor | None = None  # run_many: per-row intervention parameters
        self._banks: list[tuple[dict[Any, int], Any]] = []  # run_many: batched prefix caches

    # ------------------------------------------------------------------ batches
    def batches(self, ps: _PromptSet, idx: Sequence[int]) -> Iterator[tuple[list[int], dict[str, Tensor]]]:
        for s in range(0, len(idx), self.batch_size):
            chunk = list(idx[s : s + self.batch_size])
            yield chunk, self._encode([ps.suffix[i] for i in chunk])

    def _encode(self, seqs: list[list[int]]) -> dict[str, Tensor]:
        """Suffixes left-padded after the shared prefix, with position ids that continue it."""
        k, dev, n = self.prefix_len, self.model.device, len(seqs)
        width = max(len(q) for q in seqs)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for r, q in enumerate(seqs):
            ids[r, width - len(q):] = torch.tensor(q, dtype=torch.long)
            mask[r, width - len(q):] = 1
        pos = k + (mask.cumsum(-1) - 1).clamp(min=0)
        full_mask = torch.cat([torch.ones((n, k), dtype=torch.long), mask], dim=1)
        return {"input_ids": ids.to(dev), "attention_mask": full_mask.to(dev), "position_ids": pos.to(dev)}

    # ------------------------------------------------------------------ plumbing
    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.model.hf.config)
        except TypeError:
            return DynamicCache()

    @contextmanager
    def _skip_below(self, layer: int) -> Iterator[None]:
        """Blocks below ``layer`` return their input unchanged (their output is replaced by
        the cached residual at ``layer`` anyway)."""
        tuple_out = bool(self.tuple_out)

        def passthrough(*args: Any, **kwargs: Any) -> Any:
            h = args[0] if args else kwargs["hidden_states"]
            return (h,) if tuple_out else h

        # Write to the instance dict directly: bridge components forward attribute writes
        # to the wrapped HF module, which would patch the wrong object.
        mods = [self.blocks[i] for i in range(layer)]
        for m in mods:
            m.__dict__["forward"] = passthrough
        try:
            yield
        finally:
            for m in mods:
                m.__dict__.pop("forward", None)

    def _probe_output_type(self) -> Any:
        def fn(module: Any, args: Any, output: Any) -> None:
            self.tuple_out = isinstance(output, tuple)

        return self.blocks[0].register_forward_hook(fn)

    def _logits(self, h: Float[Tensor, "batch d_model"]) -> Float[Tensor, "batch vocab"]:
        logits = self.head(h).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _prefix_pass(self, fwd: list[tuple[str, Callable[..., Any]]], rows: int) -> Any:
        """KV cache of the shared prefix under the hooks ``fwd``, ``rows`` copies in a batch."""
        cache = self._new_cache()
        ids = self.prefix_ids.to(self.model.device).expand(rows, -1)  # type: ignore[union-attr]
        self.phase = "prefix"
        try:
            with hooks(self.model, fwd), torch.inference_mode(), bridge_kv_cache():
                self.decoder(input_ids=ids, attention_mask=torch.ones_like(ids),
                             position_ids=torch.arange(ids.shape[1], device=ids.device)[None].expand(rows, -1),
                             use_cache=True, **{self.cache_kw: cache})
        except _StopForward:
            pass
        finally:
            self.phase = "suffix"
        self.forward_tokens += ids.numel()
        return cache

    def _prefix(self, key: Any, fwd: list[tuple[str, Callable[..., Any]]]) -> Any:
        """KV cache of the shared prefix under the hooks ``fwd`` (cached per ``key``)."""
        if key is not None and key in self._prefix_cache:
            return self._prefix_cache[key]
        cache = self._prefix_pass(fwd, 1)
        if key is not None:
            if len(self._prefix_cache) > 256:
                self._prefix_cache.pop(next(iter(self._prefix_cache)))
            self._prefix_cache[key] = cache
        return cache

    # ------------------------------------------------------------------ one pass
    def run(
        self,
        set_name: str,
        idx: Sequence[int],
        fwd: list[tuple[str, Callable[..., Any]]],
        *,
        key: Any = None,
        start_layer: int | None = None,
        start_resid: Callable[[list[int], int], Tensor] | None = None,
        collect: tuple[list[int], list[int]] | None = None,
        collect_all: bool = False,
        want_logits: bool = True,
    ) -> tuple[Tensor | None, Tensor | None, list[Tensor] | None]:
        """Run ``fwd`` hooks over prompts ``idx`` of ``set_name``.

        Returns ``(logits, acts, resid)``: last-position logits ``(n, vocab)``; activations at
        ``collect = (layers, positions)`` ``(n, layers, positions, d)``; with ``collect_all``,
        per prompt the ``resid_pre`` of every layer over its suffix ``(n_layers, len, d)``.
        ``start_layer`` skips the blocks below it and feeds ``start_resid(rows, width)``
        (the cached residual) into it instead.

        Prompts are batched in order of suffix length (less padding); results come back in
        ``idx`` order. Several ablations at once, with early stops: :meth:`run_many`.
        """
        ps = self.sets[set_name]
        model = self.model
        n_layers = model.n_layers
        logits_out: list[Tensor] = []
        acts_out: list[Tensor] = []
        resid_out: list[Tensor] = []
        buf: dict[int, Tensor] = {}
        stop_at: int | None = None
        extra: list[tuple[str, Callable[..., Any]]] = []
        if collect is not None and not want_logits:
            stop_at = max(collect[0])
        c_layers = collect[0] if collect is not None else []
        c_pos = torch.tensor(collect[1] if collect is not None else [], dtype=torch.long)
        all_layers = list(range(n_layers)) if collect_all else []
        for layer in sorted(set(c_layers) | set(all_layers)):
            def grab(act: Tensor, hook: Any, layer: int = layer) -> None:
                if self.phase == "suffix":
                    buf[layer] = act.detach()
                if layer == stop_at:
                    raise _StopForward

            extra.append((hook_name("resid_pre", layer), grab))
        pre: list[tuple[str, Callable[..., Any]]] = []
        if start_layer is not None:
            def inject(act: Tensor, hook: Any) -> Tensor | None:
                if self.phase == "suffix" and self.inject is not None:
                    return self.inject
                return None

            pre.append((hook_name("resid_pre", start_layer), inject))
        all_hooks = pre + list(fwd) + extra
        cache0 = self._prefix(None if key is None else (key, stop_at), all_hooks) \
            if self.prefix_len else None
        probe = self._probe_output_type() if self.tuple_out is None else None
        order = sorted(idx, key=lambda i: len(ps.suffix[i]))
        done: list[int] = []
        try:
            with hooks(model, all_hooks), torch.inference_mode(), bridge_kv_cache():
                for rows, enc in self.batches(ps, order):
                    done.extend(rows)
                    buf.clear()
                    kw: dict[str, Any] = dict(enc)
                    if cache0 is not None:
                        cache = copy.deepcopy(cache0)
                        cache.batch_repeat_interleave(len(rows))
                        kw[self.cache_kw] = cache
                        kw["use_cache"] = True
                    else:
                        kw["use_cache"] = False
                    width = enc["input_ids"].shape[1]
                    self.forward_tokens += len(rows) * width
                    out = None
                    try:
                        if start_layer is not None and start_layer > 0:
                            self.inject = start_resid(rows, width)  # type: ignore[misc]
                            with self._skip_below(start_layer):
                                out = self.decoder(**kw)
                        else:
                            if start_layer is not None:
                                self.inject = start_resid(rows, width)  # type: ignore[misc]
                            out = self.decoder(**kw)
                    except _StopForward:
                        pass
                    finally:
                        self.inject = None
                    if want_logits:
                        if out is None:
                            raise RuntimeError("forward stopped before the last layer")
                        logits_out.append(self._logits(out.last_hidden_state[:, -1]))
                    if collect is not None:
                        acts_out.append(torch.stack(
                            [buf[layer][:, c_pos.to(buf[layer].device)].float() for layer in c_layers],
                            dim=1))
                    if collect_all:
                        lens = [len(ps.suffix[i]) for i in rows]
                        stacked = torch.stack([buf[layer] for layer in all_layers], dim=1)
                        for r, n in enumerate(lens):
                            resid_out.append(stacked[r, :, width - n:].clone())
        finally:
            if probe is not None:
                probe.remove()
        logits = torch.cat(logits_out) if logits_out else None
        acts = torch.cat(acts_out) if acts_out else None
        where = {i: r for r, i in enumerate(done)}  # back to the caller's order
        perm = torch.tensor([where[i] for i in idx], dtype=torch.long)
        if logits is not None:
            logits = logits[perm.to(logits.device)]
        if acts is not None:
            acts = acts[perm.to(acts.device)]
        if collect_all:
            resid_out = [resid_out[r] for r in perm.tolist()]
        return logits, acts, (resid_out if collect_all else None)

    # ------------------------------------------------------------------ many interventions
    def _bank(self, groups: Sequence[tuple[Any, Tensor, Sequence[int]]],
              fwd: list[tuple[str, Callable[..., Any]]]) -> tuple[Any, list[int]]:
        """Prefix KV cache with one row per group (from a cached bank when one holds every
        group's key; otherwise one batched prefix pass over all groups)."""
        keys = [g[0] for g in groups]
        if all(k is not None for k in keys):
            for index, cache in reversed(self._banks):
                if all(k in index for k in keys):
                    return cache, [index[k] for k in keys]
        self.row_param = torch.stack([g[1] for g in groups])
        try:
            cache = self._prefix_pass(fwd, len(groups))
        finally:
            self.row_param = None
        if all(key is not None for key in keys):
            self._banks.append(({key: r for r, key in enumerate(keys)}, cache))
            del self._banks[:-8]
        return cache, list(range(len(groups)))

    def run_many(
        self,
        set_name: str,
        groups: Sequence[tuple[Any, Tensor, Sequence[int]]],
        fwd: list[tuple[str, Callable[..., Any]]],
        *,
        reduce: Callable[[int, list[int], Tensor], Tensor],
        collect: tuple[list[int], list[int]] | None = None,
        stop: Callable[[int, list[int], Tensor], bool] | None = None,
        priority: Sequence[float] | None = None,
    ) -> list[tuple[list[int], Tensor, Tensor | None]]:
        """Evaluate several interventions of one kind in shared batches.

        ``groups[g] = (key, param, idx)``: prompts ``idx`` of ``set_name`` under intervention
        ``g``. The hooks ``fwd`` read ``self.row_param``, every batch row's ``param`` stacked
        ``(batch, ...)``. Rows are batched by suffix length (one prompt under several
        interventions shares a width, so there is little padding); the groups' prefix caches
        come from one batched prefix pass, kept per ``key``. ``reduce(g, prompts, logits)``
        turns group ``g``'s last-position logits in a batch into per-prompt scores; after each
        batch ``stop(g, prompts_so_far, scores_so_far)`` may drop ``g`` from later batches;
        batches then hold at most ``batch_size // 2`` prompts per running group, so a group
        is checked at least that often. ``priority`` (per prompt of the set, higher first)
        replaces the length order, e.g. to reach an early stop in fewer prompts.

        Returns per group ``(prompts, scores, acts)``: in ``idx`` order when the group ran to
        the end, else in the order run; ``acts`` ``(n, layers, positions, d)`` with ``collect``.
        """
        ps = self.sets[set_name]
        dev = self.model.device
        k_len = self.prefix_len
        c_layers = collect[0] if collect is not None else []
        c_pos = torch.tensor(collect[1] if collect is not None else [], dtype=torch.long, device=dev)
        buf: dict[int, Tensor] = {}
        extra: list[tuple[str, Callable[..., Any]]] = []
        for layer in sorted(set(c_layers)):
            def grab(act: Tensor, hook: Any, layer: int = layer) -> None:
                if self.phase == "suffix":
                    buf[layer] = act.detach()

            extra.append((hook_name("resid_pre", layer), grab))
        all_hooks = list(fwd) + extra
        bank, bank_rows = self._bank(groups, all_hooks) if k_len else (None, [])
        params = [g[1] for g in groups]
        if priority is None:
            rows = sorted((len(ps.suffix[i]), i, g) for g, grp in enumerate(groups) for i in grp[2])
        else:
            rank = {i: r for r, i in enumerate(sorted(range(len(ps.suffix)),
                                                      key=lambda i: (-priority[i], len(ps.suffix[i]), i)))}
            rows = sorted((rank[i], i, g) for g, grp in enumerate(groups) for i in grp[2])
        every = max(1, self.batch_size // 2)
        active = [True] * len(groups)
        done: list[list[int]] = [[] for _ in groups]
        scores: list[list[Tensor]] = [[] for _ in groups]
        acts: list[list[Tensor]] = [[] for _ in groups]
        probe = self._probe_output_type() if self.tuple_out is None else None
        pos_ = 0
        try:
            with hooks(self.model, all_hooks), torch.inference_mode(), bridge_kv_cache():
                while True:
                    chunk: list[tuple[int, int]] = []
                    size = self.batch_size if stop is None else min(self.batch_size, every * sum(active))
                    while pos_ < len(rows) and len(chunk) < size:
                        _, i, g = rows[pos_]
                        pos_ += 1
                        if active[g]:
                            chunk.append((g, i))
                    if not chunk:
                        break
                    kw: dict[str, Any] = self._encode([ps.suffix[i] for _, i in chunk])
                    n, width = kw["input_ids"].shape
                    if bank is not None:
                        cache = copy.deepcopy(bank)
                        cache.batch_select_indices(
                            torch.tensor([bank_rows[g] for g, _ in chunk], device=dev))
                        kw[self.cache_kw] = cache
                        kw["use_cache"] = True
                    else:
                        kw["use_cache"] = False
                    self.forward_tokens += n * width
                    self.row_param = torch.stack([params[g] for g, _ in chunk])
                    buf.clear()
                    try:
                        out = self.decoder(**kw)
                    finally:
                        self.row_param = None
                    logits = self._logits(out.last_hidden_state[:, -1])
                    got = None
                    if collect is not None:
                        got = torch.stack([buf[layer][:, c_pos].float() for layer in c_layers], dim=1)
                    for g in sorted({g for g, _ in chunk}):
                        sel = [r for r, (gg, _) in enumerate(chunk) if gg == g]
                        prompts = [chunk[r][1] for r in sel]
                        done[g].extend(prompts)
                        scores[g].append(reduce(g, prompts, logits[sel]))
                        if got is not None:
                            acts[g].append(got[sel])
                        if stop is not None and len(done[g]) < len(groups[g][2]) \
                                and stop(g, list(done[g]), torch.cat(scores[g])):
                            active[g] = False
        finally:
            if probe is not None:
                probe.remove()
        out_: list[tuple[list[int], Tensor, Tensor | None]] = []
        for g, grp in enumerate(groups):
            s = torch.cat(scores[g]) if scores[g] else torch.zeros(0)
            a = torch.cat(acts[g]) if acts[g] else None
            target = list(grp[2]) if len(done[g]) == len(grp[2]) else done[g]
            where = {i: r for r, i in enumerate(done[g])}
            perm = torch.tensor([where[i] for i in target], dtype=torch.long)
            out_.append((target, s[perm], None if a is None else a[perm.to(a.device)]))
        return out_


# ----------------------------------------------------------------------------- selection
@dataclass(frozen=True)
class _Level:
    """One rung of the relaxation ladder."""

    step: str
    induce: bool
    kl_max: float
    layer: bool

    def to_dict(self, index: int) -> dict[str, Any]:
        return {"step": self.step, "index": index, "induce_filter": self.induce,
                "kl_max": None if math.isinf(self.kl_max) else self.kl_max,
                "layer_filter": self.layer}


Key = tuple[int, int]


class _Selector:
    """Runs one selection: baseline, scoring stages, relaxation, bootstrap, report."""

    def __init__(self, model: ChatModel, ds: DirectionSet, harmful: list[str], harmless: list[str],
                 cfg: SelectionConfig) -> None:
        self.model, self.ds, self.cfg = model, ds, cfg
        self.harmful, self.harmless = harmful, harmless
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
        self.positions, self.layers = positions, sorted(set(layers))
        self.cands: list[Key] = [(p, layer) for p in positions for layer in self.layers]
        norms = {c: float(self.vec(c).float().norm()) for c in self.cands}
        top = max((v for v in norms.values() if math.isfinite(v)), default=0.0)
        # e.g. layer 0: post-instruction tokens are the same template tokens in every prompt,
        # so their embeddings, and the difference of means, are exactly zero.
        self.degenerate = {c for c, v in norms.items() if not math.isfinite(v) or v <= 1e-6 * top}
        if len(self.degenerate) == len(self.cands):
            raise ConfigError(
                "every candidate direction is zero or not finite; re-extract the directions "
                "with different prompts or layers"
            )
        self.layer_cap = cfg.max_layer_frac * model.n_layers
        self.scores: dict[Key, dict[str, Tensor]] = {c: {} for c in self.cands}
        self.extra: dict[Key, dict[str, float]] = {c: {} for c in self.cands}
        self.boot_cos: dict[Key, Tensor] = {}
        self.timings: dict[str, float] = {}
        self.work: dict[str, int] = {"candidate_passes": 0}
        self.refusal: RefusalTokens | None = None
        self.kl_sum = torch.zeros(len(harmless), dtype=torch.float64)  # per-prompt KL seen so far
        self.kl_seen = torch.zeros(len(harmless), dtype=torch.float64)
        self.cos_layers: list[int] = []
        self.baseline: dict[str, Any] = {}
        self.bar = progress_bar(cfg.progress)
        self.t0 = time.perf_counter()
        self._ckpt_t = 0.0
        self._load_checkpoint()
        g = torch.Generator().manual_seed(cfg.seed)
        self.boot_w = {
            name: _bootstrap_weights(n, cfg.n_bootstrap, g)
            for name, n in (("harmful", len(harmful)), ("harmless", len(harmless)))
        }

    # ------------------------------------------------------------------ helpers
    def vec(self, c: Key) -> Tensor:
        i, j = self.ds._index(*c)
        return self.ds.refusal[i, j]

    def unit(self, c: Key) -> Tensor:
        v = self.vec(c).to(torch.float32)
        return v / v.norm().clamp_min(1e-12)

    def mean(self, c: Key, name: str) -> float | None:
        t = self.scores[c].get(name)
        return None if t is None else float(t.mean())

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t

    def _ablation_hooks(self, c: Key) -> list[tuple[str, Callable[..., Any]]]:
        u = self.unit(c).to(device=self.model.device, dtype=self.model.dtype)

        def ablate(act: Tensor, hook: Any) -> Tensor:
            return act - (act @ u).unsqueeze(-1) * u

        return [(hook_name(p, layer), ablate) for layer in range(self.model.n_layers)
                for p in ABLATION_POINTS]

    def _ablation_hooks_many(self) -> list[tuple[str, Callable[..., Any]]]:
        """Ablation hooks for :meth:`_Engine.run_many`: row ``b`` ablates ``eng.row_param[b]``."""
        eng = self.eng

        def ablate(act: Tensor, hook: Any) -> Tensor:
            u = eng.row_param  # (batch, d_model), unit rows
            return act - torch.einsum("btd,bd->bt", act, u).unsqueeze(-1) * u[:, None, :]

        return [(hook_name(p, layer), ablate) for layer in range(self.model.n_layers)
                for p in ABLATION_POINTS]

    def _ablate_many(self, name: str, items: Sequence[tuple[Key, Sequence[int]]], *,
                     reduce: Callable[[list[int], Tensor], Tensor],
                     collect: tuple[list[int], list[int]] | None = None,
                     stop: Callable[[list[int], Tensor], bool] | None = None,
                     priority: Sequence[float] | None = None,
                     ) -> list[tuple[list[int], Tensor, Tensor | None]]:
        """Ablate each candidate of ``items`` on its prompts of set ``name``, all in shared
        batches (see :meth:`_Engine.run_many`)."""
        dev, dt = self.model.device, self.model.dtype
        groups = [(("abl", c), self.unit(c).to(device=dev, dtype=dt), list(idx)) for c, idx in items]
        out = self.eng.run_many(
            name, groups, self._ablation_hooks_many(), collect=collect,
            reduce=lambda g, prompts, logits: reduce(prompts, logits),
            stop=None if stop is None else (lambda g, prompts, sc: stop(prompts, sc)),
            priority=priority,
        )
        self.work["candidate_passes"] += len(items)
        return out

    def _addition_hooks(self, c: Key) -> list[tuple[str, Callable[..., Any]]]:
        v = self.vec(c).to(device=self.model.device, dtype=self.model.dtype)

        def add(act: Tensor, hook: Any) -> Tensor:
            return act + v

        return [(hook_name("resid_pre", c[1]), add)]

    # ------------------------------------------------------------------ top level
    def run(self) -> SelectionResult:
        cfg = self.cfg
        t_all = time.perf_counter()
        with self.bar:
            if cfg.mode in ("exact", "fast"):
                with self.timed("refusal_tokens"):
                    self._refusal_tokens()
            if cfg.method == "naive":
                with self.timed("baseline"):
                    self._naive_baseline()
            else:
                with self.timed("baseline"):
                    self._shared_baseline()
            if cfg.method == "shared":
                with self.timed("proxy"):
                    self._proxies()
            if cfg.mode == "cosine":
                level, pick = self._select_cosine()
            else:
                level, pick = self._select_exact()
            self._save_checkpoint(force=True)
            with self.timed("bootstrap"):
                stability = self._bootstrap(level, pick)
        self.timings["total"] = time.perf_counter() - t_all
        return self._result(level, pick, stability)

    # ------------------------------------------------------------------ refusal tokens
    def _refusal_tokens(self) -> None:
        cfg = self.cfg
        if self.refusal is not None:  # restored from a checkpoint
            pass
        elif cfg.refusal_ids is not None:
            self.refusal = RefusalTokens.from_ids(self.model, cfg.refusal_ids)
        else:
            self.refusal = find_refusal_tokens(
                self.model, self.harmful, self.harmless, n=cfg.n_val,
                max_new_tokens=cfg.detect_max_new_tokens, batch_size=cfg.batch_size,
                progress=cfg.progress,
            )
        self.ref_ids = torch.tensor(self.refusal.ids, dtype=torch.long)
        self._save_checkpoint(force=True)

    # ------------------------------------------------------------------ checkpoints
    def _ckpt_key(self) -> str:
        import hashlib

        cfg = self.cfg
        blob = json.dumps({
            "model": self.model.weights_hash,
            "directions": hashlib.sha256(self.ds.refusal.float().numpy().tobytes()).hexdigest(),
            "harmful": _texts_info(self.harmful), "harmless": _texts_info(self.harmless),
            "refusal_ids": cfg.refusal_ids, "detect": cfg.detect_max_new_tokens,
            "cosine": [cfg.cosine_layer_frac, cfg.cosine_center], "seed": cfg.seed,
            "n_bootstrap": cfg.n_bootstrap, "dtype": str(self.model.dtype),
        }, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _load_checkpoint(self) -> None:
        path = self.cfg.checkpoint
        if not path or not Path(path).is_file():
            return
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a corrupt checkpoint is just ignored
            log.warning("ignoring unreadable checkpoint %s (%s)", path, exc)
            return
        if data.get("key") != self._ckpt_key():
            log.warning("checkpoint %s belongs to other inputs or settings; starting afresh", path)
            return
        n = 0
        for k, v in data.get("scores", {}).items():
            c = tuple(int(x) for x in k.split(","))
            if c in self.scores:
                self.scores[c].update(v)  # type: ignore[index]
                n += len(v)
        for k, v in data.get("extra", {}).items():
            c = tuple(int(x) for x in k.split(","))
            if c in self.extra:
                self.extra[c].update({kk: float(vv) for kk, vv in v.items()})  # type: ignore[index]
        for k, v in data.get("boot_cos", {}).items():
            self.boot_cos[tuple(int(x) for x in k.split(","))] = v  # type: ignore[index]
        if data.get("refusal"):
            self.refusal = RefusalTokens(**json.loads(data["refusal"]))
        self.work["resumed_scores"] = n

    def _save_checkpoint(self, force: bool = False) -> None:
        path = self.cfg.checkpoint
        if not path or (not force and time.perf_counter() - self._ckpt_t < 30):
            return
        self._ckpt_t = time.perf_counter()
        data = {
            "key": self._ckpt_key(),
            "scores": {f"{p},{layer}": dict(v) for (p, layer), v in self.scores.items() if v},
            "extra": {f"{p},{layer}": {k: float(x) for k, x in v.items()
                                        if k in ("cosine", "cos_ablation", "cos_addition",
                                                 "kl_lower_bound", "kl_prompts")}
                      for (p, layer), v in self.extra.items()},
            "boot_cos": {f"{p},{layer}": v for (p, layer), v in self.boot_cos.items()},
            "refusal": json.dumps(self.refusal.to_dict()) if self.refusal else "",
        }
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        torch.save(data, tmp)
        os.replace(tmp, target)

    def rscore(self, logits: Tensor) -> Tensor:
        return refusal_score(logits, self.ref_ids).cpu()

    # ------------------------------------------------------------------ baselines
    def _shared_baseline(self) -> None:
        cfg = self.cfg
        eng = _Engine(self.model, {"harmful": self.harmful, "harmless": self.harmless},
                      batch_size=cfg.batch_size, share_prefix=cfg.share_prefix)
        self.eng = eng
        n_layers = self.model.n_layers
        all_layers = list(range(n_layers))
        task = self.bar.add_task("baseline", total=2)
        lh, ah, _ = eng.run("harmful", range(len(self.harmful)), [], key=("base",),
                            collect=(all_layers, self.positions))
        self.bar.advance(task)
        ll, al, resid = eng.run("harmless", range(len(self.harmless)), [], key=("base",),
                                collect=(all_layers, self.positions), collect_all=True)
        self.bar.advance(task)
        self.base_logits = {"harmful": lh, "harmless": ll}
        self.base_acts = {"harmful": ah, "harmless": al}  # (n, layer, pos, d)
        self.resid = resid  # per harmless prompt: (n_layers, len, d)
        self._cosine_layers()
        if self.refusal is not None:
            self.base_scores = {"harmful": self.rscore(lh), "harmless": self.rscore(ll)}
            self.baseline = {
                "refusal_score_harmful": float(self.base_scores["harmful"].mean()),
                "refusal_score_harmless": float(self.base_scores["harmless"].mean()),
            }
        self.baseline["shared_prefix_tokens"] = eng.prefix_len

    def start_resid(self, layer: int) -> Callable[[list[int], int], Tensor]:
        d = self.model.d_model

        def fn(rows: list[int], width: int) -> Tensor:
            out = torch.zeros((len(rows), width, d), dtype=self.model.dtype, device=self.model.device)
            for r, i in enumerate(rows):
                x = self.resid[i][layer]
                out[r, width - x.shape[0]:] = x
            return out

        return fn

    def _cosine_layers(self) -> None:
        """The layers where mean harmful and harmless activations differ most (lowest cosine)."""
        mh = self.base_acts["harmful"].mean(0)
        ml = self.base_acts["harmless"].mean(0)
        cos = torch.nn.functional.cosine_similarity(mh, ml, dim=-1).mean(-1)  # (layer,)
        k = max(2, math.ceil(self.cfg.cosine_layer_frac * self.model.n_layers))
        k = min(k, self.model.n_layers)
        self.cos_layers = sorted(int(i) for i in torch.argsort(cos)[:k])
        self.baseline["layer_cosine_harmful_harmless"] = [round(float(x), 5) for x in cos]

    # ------------------------------------------------------------------ shared scoring
    def _ensure(self, what: str, cands: list[Key], description: str) -> None:
        """Compute score ``what`` (induce | kl | bypass) for the candidates lacking it."""
        todo = [c for c in cands if what not in self.scores[c]]
        if not todo:
            return
        task = self.bar.add_task(description, total=len(todo))
        with self.timed(what):
            if self.cfg.method == "shared" and what in ("bypass", "kl"):
                for s in range(0, len(todo), _MANY):
                    chunk = todo[s : s + _MANY]
                    if what == "bypass":
                        self._bypass_many(chunk)
                    else:
                        self._kl_many(chunk, math.inf)
                    self.bar.advance(task, len(chunk))
                    log.info("%s %s done (%.1fs elapsed)", what, chunk, time.perf_counter() - self.t0)
                    self._save_checkpoint()
                return
            for c in todo:
                if self.cfg.method == "naive":
                    self._naive_candidate(c)
                else:
                    self._shared_induce(c)
                self.bar.advance(task)
                log.info("%s %s done (%.1fs elapsed)", what, c, time.perf_counter() - self.t0)
                self._save_checkpoint()

    def _idx(self, name: str) -> range:
        return range(len(self.harmful if name == "harmful" else self.harmless))

    def _shared_induce(self, c: Key) -> None:
        layer = c[1]
        want_cos = self.cfg.mode != "cosine"
        cl = [e for e in self.cos_layers if e >= layer]
        logits, acts, _ = self.eng.run(
            "harmless", self._idx("harmless"), self._addition_hooks(c), key=("add", c),
            start_layer=layer, start_resid=self.start_resid(layer),
            collect=(cl, self.positions) if (want_cos and cl) else None,
        )
        self.work["candidate_passes"] += 1
        self.scores[c]["induce"] = self.rscore(logits)  # type: ignore[arg-type]
        if want_cos:
            self._store_cos_acts(c, "addition", acts, cl)

    def _bypass_many(self, cands: Sequence[Key]) -> None:
        """Bypass scores on every harmful prompt (continuing fast-mode partial scores)."""
        n = len(self.harmful)
        heads: dict[Key, tuple[Tensor, Tensor] | None] = {
            c: self.extra[c].pop("_head", None) for c in cands}  # type: ignore[misc]
        items = [(c, range(0 if h is None else int(h[0].shape[0]), n)) for c, h in heads.items()]
        items = [(c, idx) for c, idx in items if len(idx)]
        rest = dict(zip((c for c, _ in items), self._ablate_many(
            "harmful", items, reduce=lambda prompts, logits: self.rscore(logits),
            collect=(self.cos_layers, self.positions)))) if items else {}
        for c, head in heads.items():
            parts = ([head] if head is not None else []) + \
                ([(rest[c][1], rest[c][2])] if c in rest else [])
            self.scores[c]["bypass"] = torch.cat([p[0] for p in parts])
            self._store_cos_acts(c, "ablation", torch.cat([p[1] for p in parts]),  # type: ignore[misc]
                                 self.cos_layers)

    def _partial_bypass_many(self, cands: Sequence[Key], m: int) -> None:
        """Bypass scores of ``cands`` on the first ``m`` harmful prompts (kept for completion)."""
        out = self._ablate_many("harmful", [(c, range(m)) for c in cands],
                                reduce=lambda prompts, logits: self.rscore(logits),
                                collect=(self.cos_layers, self.positions))
        for c, (_, head, acts) in zip(cands, out):
            self.extra[c]["bypass_head"] = float(head.mean())
            self.extra[c]["_head"] = (head, acts)  # type: ignore[assignment]

    def _kl_many(self, cands: Sequence[Key], bound: float) -> None:
        """KL of each candidate, with an exact early exit: per-prompt KL is never negative, so
        once a candidate's running sum exceeds ``bound · n`` its mean is known to exceed
        ``bound`` and its remaining prompts are skipped (``kl_lower_bound`` is recorded
        instead of ``kl``). The candidates share batches; a stopped one leaves them."""
        if self.cfg.method == "naive":
            for c in cands:
                self._naive_candidate(c)
            return
        base = self.base_logits["harmless"]
        n = len(self.harmless)
        stop = (lambda prompts, kl: float(kl.sum()) > bound * n) if math.isfinite(bound) else None
        priority = None
        if stop is not None and bool((self.kl_seen > 0).any()):
            # Prompts where earlier candidates moved the output most come first: KL is
            # correlated across candidates, so a rejected one passes the bound sooner.
            seen = self.kl_seen > 0
            mean = torch.where(seen, self.kl_sum / self.kl_seen.clamp_min(1),
                               (self.kl_sum[seen] / self.kl_seen[seen]).mean())
            priority = mean.tolist()
        out = self._ablate_many(
            "harmless", [(c, self._idx("harmless")) for c in cands],
            reduce=lambda prompts, logits: first_token_kl(base[prompts], logits).cpu(),
            stop=stop, priority=priority,
        )
        for c, (prompts, kl, _) in zip(cands, out):
            self.kl_sum[prompts] += kl.double()
            self.kl_seen[prompts] += 1
            if kl.shape[0] == n:
                self.scores[c]["kl"] = kl
                self.extra[c].pop("kl_lower_bound", None)
                self.extra[c].pop("kl_prompts", None)
            else:
                self.extra[c]["kl_lower_bound"] = float(kl.sum()) / n
                self.extra[c]["kl_prompts"] = float(kl.shape[0])

    # ------------------------------------------------------------------ cosine scores
    def _store_cos_acts(self, c: Key, kind: str, acts: Tensor | None, layers: list[int]) -> None:
        """Fill in the eval-layer activations of one side and score it when both are in."""
        base = self.base_acts["harmless" if kind == "addition" else "harmful"]
        full = base[:, self.cos_layers].clone()  # layers below an addition are unchanged
        if acts is not None:
            for j, e in enumerate(layers):
                full[:, self.cos_layers.index(e)] = acts[:, j]
        self.extra[c][f"_acts_{kind}"] = full  # type: ignore[assignment]
        self._cos_score(c)

    def _cos_score(self, c: Key) -> None:
        ex = self.extra[c]
        if "_acts_ablation" not in ex or "_acts_addition" not in ex:
            return
        abl: Tensor = ex.pop("_acts_ablation")  # type: ignore[assignment]
        add: Tensor = ex.pop("_acts_addition")  # type: ignore[assignment]
        hh = self.base_acts["harmful"][:, self.cos_layers]
        hl = self.base_acts["harmless"][:, self.cos_layers]
        # Means over prompts: full sample first, then every bootstrap resample (paired:
        # the same resampled prompts enter the baseline and the intervened means).
        w_h, w_l = self.boot_w["harmful"], self.boot_w["harmless"]
        ones_h = torch.full((1, hh.shape[0]), 1.0 / hh.shape[0], dtype=torch.float64)
        ones_l = torch.full((1, hl.shape[0]), 1.0 / hl.shape[0], dtype=torch.float64)
        wh = torch.cat([ones_h, w_h]) if w_h is not None else ones_h
        wl = torch.cat([ones_l, w_l]) if w_l is not None else ones_l
        shape = hh.shape[1:]

        def means(w: Tensor, x: Tensor) -> Tensor:
            return (w @ x.reshape(x.shape[0], -1).double()).reshape(w.shape[0], *shape)

        m_hh, m_hl, m_abl, m_add = means(wh, hh), means(wl, hl), means(wh, abl), means(wl, add)
        centre = (m_hh + m_hl) / 2 if self.cfg.cosine_center else torch.zeros_like(m_hh)
        cos = torch.nn.functional.cosine_similarity
        s_abl = cos(m_abl - centre, m_hl - centre, dim=-1).mean(dim=(-1, -2))
        s_add = cos(m_add - centre, m_hh - centre, dim=-1).mean(dim=(-1, -2))
        ex["cos_ablation"], ex["cos_addition"] = float(s_abl[0]), float(s_add[0])
        ex["cosine"] = float(s_abl[0] + s_add[0])
        self.boot_cos[c] = (s_abl + s_add)[1:]

    def _cosine_candidate(self, c: Key) -> None:
        """Output-free scoring: passes stop at the deepest evaluation layer."""
        layer = c[1]
        top = max(self.cos_layers)
        _, acts, _ = self.eng.run("harmful", self._idx("harmful"), self._ablation_hooks(c),
                                  key=("abl-cos", c), collect=(self.cos_layers, self.positions),
                                  want_logits=False)
        self.work["candidate_passes"] += 1
        self._store_cos_acts(c, "ablation", acts, self.cos_layers)
        cl = [e for e in self.cos_layers if e >= layer]
        acts = None
        if layer <= top:
            _, acts, _ = self.eng.run(
                "harmless", self._idx("harmless"), self._addition_hooks(c), key=("add-cos", c),
                start_layer=layer, start_resid=self.start_resid(layer),
                collect=(cl, self.positions), want_logits=False,
            )
            self.work["candidate_passes"] += 1
        self._store_cos_acts(c, "addition", acts, cl)

    # ------------------------------------------------------------------ naive loop
    def _naive_logits(self, texts: list[str]) -> Tensor:
        """Full forward passes, full logits; the last position's row is kept."""
        out = []
        tpl = self.model.template
        with torch.inference_mode():
            for s in range(0, len(texts), self.cfg.batch_size):
                enc = {k: v.to(self.model.device)
                       for k, v in tpl.encode(texts[s : s + self.cfg.batch_size]).items()}
                out.append(self.model.hf(**enc, use_cache=False).logits[:, -1].float())
        return torch.cat(out)

    def _naive_baseline(self) -> None:
        self.base_logits = {"harmful": self._naive_logits(self.harmful),
                            "harmless": self._naive_logits(self.harmless)}
        self.base_scores = {k: self.rscore(v) for k, v in self.base_logits.items()}
        self.baseline = {
            "refusal_score_harmful": float(self.base_scores["harmful"].mean()),
            "refusal_score_harmless": float(self.base_scores["harmless"].mean()),
        }

    def _naive_candidate(self, c: Key) -> None:
        """The straightforward loop: three separate full passes for one candidate."""
        if {"bypass", "induce", "kl"} <= set(self.scores[c]):
            return
        d = self.ds.refusal_direction(c[1], c[0])
        try:
            from refusaldir.steer.interventions import Ablation, Addition

            abl: Any = Ablation(d).apply(self.model)
            add: Any = Addition(d, coeff=1.0).apply(self.model)
        except ImportError:  # pragma: no cover - interventions is optional here
            abl = hooks(self.model, self._ablation_hooks(c))
            add = hooks(self.model, self._addition_hooks(c))
        with abl:
            bypass = self._naive_logits(self.harmful)
            ablated = self._naive_logits(self.harmless)
        with add:
            induced = self._naive_logits(self.harmless)
        self.work["candidate_passes"] += 3
        self.scores[c]["bypass"] = self.rscore(bypass)
        self.scores[c]["kl"] = first_token_kl(self.base_logits["harmless"], ablated).cpu()
        self.scores[c]["induce"] = self.rscore(induced)

    # ------------------------------------------------------------------ filters
    def levels(self) -> list[_Level]:
        cfg = self.cfg
        exact = cfg.mode != "cosine"
        out = [_Level("none", exact, cfg.kl_max, True)]
        if not cfg.relax:
            return out
        if exact:
            out.append(_Level("drop induce filter", False, cfg.kl_max, True))
        for k in sorted(k for k in cfg.kl_relax if k > cfg.kl_max):
            out.append(_Level(f"raise KL bound to {k:g}", False, k, True))
        out.append(_Level("ignore induce and KL filters", False, math.inf, True))
        out.append(_Level("ignore all filters", False, math.inf, False))
        return out

    def layer_ok(self, c: Key) -> bool:
        return c[1] < self.layer_cap

    def passes(self, c: Key, lev: _Level, scores: dict[str, float | None] | None = None) -> bool | None:
        """Whether ``c`` passes ``lev`` (``None``: a needed score is missing)."""
        s = scores if scores is not None else {k: self.mean(c, k) for k in ("induce", "kl")}
        if c in self.degenerate:
            return False
        if lev.layer and not self.layer_ok(c):
            return False
        # A filter known to fail rejects even while another score is missing: fast mode
        # knows KL before induce, and must not pay for induce on KL-rejected candidates.
        missing = False
        if lev.induce:
            if s.get("induce") is None:
                missing = True
            elif not s["induce"] > self.cfg.induce_min:  # type: ignore[operator]
                return False
        if not math.isinf(lev.kl_max):
            if s.get("kl") is None:
                lb = self.extra[c].get("kl_lower_bound")
                if lb is not None and lb > lev.kl_max:
                    return False
                missing = True
            elif not s["kl"] <= lev.kl_max:  # type: ignore[operator]
                return False
        return None if missing else True

    # ------------------------------------------------------------------ exact / fast
    def _select_exact(self) -> tuple[int, Key]:
        """Cheap filters first, then the objective, then KL lazily in objective order.

        1. the layer filter (free);
        2. induce for every remaining candidate (the cheapest score: its pass starts at the
           candidate's layer);
        3. bypass for the candidates that pass the induce filter (the objective);
        4. KL in increasing-bypass order until ``top_k`` candidates pass: a candidate whose
           bypass is worse than the ``top_k``-th accepted one cannot change the pick, so its
           KL is never computed ("not scored"). KL itself stops early, exactly, once the
           running sum proves the mean exceeds the bound.

        Each relaxation step reuses every score computed so far. In fast mode the pool is
        the one built by :meth:`_fast_pool` instead of every candidate.
        """
        cfg = self.cfg
        pool = [c for c in self.cands if c not in self.degenerate]
        if cfg.score_all or cfg.method == "naive":
            for what in ("induce", "kl", "bypass"):
                self._ensure(what, pool, f"{what} (all)")
        if cfg.mode == "fast":
            pool = self._fast_pool(pool)
        for li, lev in enumerate(self.levels()):
            cand = [c for c in pool if self.passes(c, lev) is not False]
            if lev.induce:
                self._ensure("induce", cand, "induce")
            cheap = _Level(lev.step, lev.induce, math.inf, lev.layer)
            cand = [c for c in cand if self.passes(c, cheap)]
            self._ensure("bypass", cand, "bypass")
            accepted = self._walk(cand, lev)
            if accepted:
                return li, accepted[0]
        raise self._all_filtered()

    def _fast_pool(self, valid: list[Key]) -> list[Key]:
        """Fast mode: rank the candidates by their bypass score on the first ``fast_prompts``
        harmful validation prompts (a quarter of the work of a full bypass pass), walk that
        ranking checking KL (with the exact early exit) until ``fast_keep`` candidates pass
        it, and hand the walked pool to exact mode (which finishes their bypass on the
        remaining prompts, reusing the first ones).

        The strongest directions rank first and are the ones KL tends to reject, so the walk
        pays one (often truncated) KL pass per rejected candidate and full scoring only for
        the few survivors. If no candidate passes KL, the pool is every valid candidate.
        """
        cfg = self.cfg
        m = min(cfg.fast_prompts, len(self.harmful))
        ranked = [c for c in valid if self.layer_ok(c)]
        todo = [c for c in ranked if "bypass" not in self.scores[c] and "_head" not in self.extra[c]]
        task = self.bar.add_task(f"fast: bypass on {m} prompts", total=len(todo))
        with self.timed("bypass"):
            for s in range(0, len(todo), 4 * _MANY):
                chunk = todo[s : s + 4 * _MANY]
                self._partial_bypass_many(chunk, m)
                self.bar.advance(task, len(chunk))
        self.bar.remove_task(task)

        def head(c: Key) -> float:
            s = self.scores[c].get("bypass")
            return float(s[:m].mean()) if s is not None else float(self.extra[c]["bypass_head"])

        ranked.sort(key=lambda c: (head(c), c[1], c[0]))
        kl_level = _Level("kl", False, cfg.kl_max, True)
        accepted, walked = self._lockstep(ranked, kl_level, cfg.fast_keep, "fast: KL in that order")
        pool = ranked[:walked]
        return pool if accepted else pool + [c for c in valid if c not in pool]

    def _walk(self, elig: list[Key], lev: _Level, limit: int | None = None) -> list[Key]:
        """Accept candidates best first (lowest bypass; cosine mode: highest cosine score),
        computing KL only when needed, until ``limit`` (default ``top_k``) are accepted."""
        if self.cfg.mode == "cosine":
            order = sorted(elig, key=lambda c: (-self.extra[c]["cosine"], c[1], c[0]))
        else:
            order = sorted(elig, key=lambda c: (self.mean(c, "bypass"), c[1], c[0]))
        return self._lockstep(order, lev, limit or self.cfg.top_k, "KL (lazy)")[0]

    def _lockstep(self, order: list[Key], lev: _Level, limit: int, label: str) -> tuple[list[Key], int]:
        """Accept candidates of ``order`` that pass ``lev``, in order, until ``limit`` are
        accepted; returns them and how far the walk went.

        A one-by-one walk would compute KL for each undecided candidate it reaches. With ``k``
        acceptances still needed, it surely reaches the next ``k`` candidates that are not
        already rejected, so their KL is computed together (shared batches, each with its own
        exact early exit). The result is the one-by-one walk's.
        """
        accepted: list[Key] = []
        p = 0
        todo_all = [c for c in order if self.passes(c, lev) is None]
        task = self.bar.add_task(label, total=len(todo_all)) if todo_all else None
        while p < len(order) and len(accepted) < limit:
            ahead: list[Key] = []
            for c in order[p:]:
                if self.passes(c, lev) is not False:
                    ahead.append(c)
                    if len(ahead) >= limit - len(accepted):
                        break
            todo = [c for c in ahead if self.passes(c, lev) is None]
            if todo and not math.isinf(lev.kl_max):
                with self.timed("kl"):
                    self._kl_many(todo, lev.kl_max)
                if task is not None:
                    self.bar.advance(task, len(todo))
                log.info("kl %s done (%.1fs elapsed)", todo, time.perf_counter() - self.t0)
                self._save_checkpoint()
            # every candidate up to the last of ``ahead`` is decided now
            last = order.index(ahead[-1]) if ahead else len(order) - 1
            while p <= last and len(accepted) < limit:
                c = order[p]
                p += 1
                if self.passes(c, lev):
                    accepted.append(c)
        if task is not None:
            self.bar.remove_task(task)
        return accepted, p

    # ------------------------------------------------------------------ cosine mode
    def _select_cosine(self) -> tuple[int, Key]:
        cfg = self.cfg
        valid = [c for c in self.cands if c not in self.degenerate]
        pool = [c for c in valid if self.layer_ok(c)] or valid
        todo = [c for c in (valid if cfg.score_all else pool) if "cosine" not in self.extra[c]]
        task = self.bar.add_task("cosine", total=len(todo))
        with self.timed("cosine"):
            for c in todo:
                self._cosine_candidate(c)
                self.bar.advance(task)
                log.info("cosine %s done (%.1fs elapsed)", c, time.perf_counter() - self.t0)
                self._save_checkpoint()
        limit = len(valid) if cfg.score_all else cfg.top_k
        for li, lev in enumerate(self.levels()):
            cheap = _Level(lev.step, False, math.inf, lev.layer)
            elig = [c for c in valid if "cosine" in self.extra[c] and self.passes(c, cheap)]
            accepted = self._walk(elig, lev, limit)
            if accepted:
                return li, accepted[0]
        raise self._all_filtered()

    def _all_filtered(self) -> ConfigError:
        """The error raised when ``relax=False`` and no candidate passes the filters."""
        strict = self.levels()[0]
        counts: dict[str, int] = {}
        for c in self.cands:
            for r in self._reasons(c, strict):
                kind = r.split(" ")[0]
                counts[kind] = counts.get(kind, 0) + 1
        why = ", ".join(f"{kind}: {n}" for kind, n in sorted(counts.items())) or "none scored"
        return ConfigError(
            f"all {len(self.cands)} candidates were filtered out (rejections by {why}); "
            "allow relaxation (relax=True, the default) or loosen kl_max / induce_min / "
            "max_layer_frac"
        )

    # ------------------------------------------------------------------ zero-pass proxies
    def _proxies(self) -> None:
        """Zero-pass proxies from the unmodified activations (higher is better).

        Reported per candidate as a free hint; no mode selects by them (fast mode ranks
        by a short bypass pass instead). ``proxy`` is the linearised cosine score: the cosine score of
        :meth:`_cos_score` with the intervention applied to the cached baseline activations
        at the evaluation layers instead of being propagated through the model — ablation
        removes the direction from harmful means, addition adds it to harmless means at
        evaluation layers at or above the candidate's layer. ``proxy_sep`` is the
        standardised separation of harmful and harmless projections at the candidate's own
        position and layer.
        """
        hh, hl = self.base_acts["harmful"], self.base_acts["harmless"]
        e_idx = self.cos_layers
        mh = hh[:, e_idx].double().mean(0)  # (E, P, d)
        ml = hl[:, e_idx].double().mean(0)
        centre = (mh + ml) / 2 if self.cfg.cosine_center else torch.zeros_like(mh)
        cos = torch.nn.functional.cosine_similarity
        for c in self.cands:
            if c in self.degenerate:
                self.extra[c].update(proxy=-math.inf, proxy_sep=-math.inf)
                continue
            u = self.unit(c).double()
            v = self.vec(c).double()
            pi = self.positions.index(c[0])
            a = hh[:, c[1], pi].double() @ u
            b = hl[:, c[1], pi].double() @ u
            pooled = math.sqrt((float(a.var(unbiased=False)) + float(b.var(unbiased=False))) / 2) or 1e-12
            abl = mh - (mh @ u).unsqueeze(-1) * u
            after = torch.tensor([e >= c[1] for e in e_idx], dtype=torch.float64)[:, None, None]
            add = ml + after * v
            s_abl = cos(abl - centre, ml - centre, dim=-1).mean()
            s_add = cos(add - centre, mh - centre, dim=-1).mean()
            self.extra[c].update(proxy=float(s_abl + s_add),
                                 proxy_sep=float(a.mean() - b.mean()) / pooled)

    # ------------------------------------------------------------------ bootstrap
    def _bootstrap(self, li: int, pick: Key) -> dict[str, Any]:
        cfg = self.cfg
        if cfg.n_bootstrap == 0:
            return {"n": 0}
        lev = self.levels()[li]
        w_h, w_l = self.boot_w["harmful"], self.boot_w["harmless"]
        b = cfg.n_bootstrap
        if cfg.mode == "cosine":
            cands = [c for c in self.cands if c in self.boot_cos
                     and (not lev.layer or self.layer_ok(c))]
            # Candidates whose KL was never checked count as eligible (conservative).
            ok = []
            for c in cands:
                if not math.isinf(lev.kl_max) and "kl" not in self.scores[c] \
                        and self.passes(c, lev) is False:
                    ok.append(torch.zeros(b, dtype=torch.bool))  # KL known to exceed the bound
                elif math.isinf(lev.kl_max) or "kl" not in self.scores[c]:
                    ok.append(torch.ones(b, dtype=torch.bool))
                else:
                    ok.append((w_l @ self.scores[c]["kl"].double()) <= lev.kl_max)
            score = torch.stack([self.boot_cos[c] for c in cands])
            score = torch.where(torch.stack(ok), score, torch.full_like(score, -math.inf))
            winners = score.argmax(0)
            valid = torch.isfinite(score.max(0).values)
        else:
            # Candidates whose KL was never computed (bypass ranked below the top-k) count as
            # passing it: that can only lower the reported stability (conservative).
            need = {"bypass"} | ({"induce"} if lev.induce else set())
            cands = [c for c in self.cands if need <= set(self.scores[c])
                     and (not lev.layer or self.layer_ok(c)) and c not in self.degenerate]
            rows, ok = [], []
            for c in cands:
                s = self.scores[c]
                rows.append(w_h @ s["bypass"].double())
                m = torch.ones(b, dtype=torch.bool)
                if lev.induce:
                    m &= (w_l @ s["induce"].double()) > cfg.induce_min
                if not math.isinf(lev.kl_max) and "kl" in s:
                    m &= (w_l @ s["kl"].double()) <= lev.kl_max
                elif not math.isinf(lev.kl_max) and self.passes(c, lev) is False:
                    m &= False  # KL known to exceed the bound (early stop)
                ok.append(m)
            score = torch.stack(rows)
            score = torch.where(torch.stack(ok), score, torch.full_like(score, math.inf))
            winners = score.argmin(0)
            valid = torch.isfinite(score.min(0).values)
        counts: dict[Key, int] = {}
        for w, v in zip(winners.tolist(), valid.tolist()):
            if v:
                counts[cands[w]] = counts.get(cands[w], 0) + 1
        share = {f"{p},{layer}": n / b for (p, layer), n in
                 sorted(counts.items(), key=lambda kv: -kv[1])[:10]}
        out: dict[str, Any] = {
            "n": b, "top1_share": counts.get(pick, 0) / b, "winners": share,
            "no_eligible_share": 1 - float(valid.float().mean()),
            "candidates": len(cands),
        }
        if cfg.mode != "cosine":
            # Candidates rejected before being fully scored: how often would they have
            # passed the filters they were scored on in a resample?
            flips = 0.0
            for c in self.cands:
                if c in cands or c in self.degenerate or (lev.layer and not self.layer_ok(c)):
                    continue
                s = self.scores[c]
                if not s:
                    continue
                m = torch.ones(b, dtype=torch.bool)
                if lev.induce and "induce" in s:
                    m &= (w_l @ s["induce"].double()) > cfg.induce_min
                if not math.isinf(lev.kl_max) and "kl" in s:
                    m &= (w_l @ s["kl"].double()) <= lev.kl_max
                flips = max(flips, float(m.double().mean()))
            out["unscored_max_pass_share"] = flips
        return out

    # ------------------------------------------------------------------ report
    def _result(self, li: int, pick: Key, stability: dict[str, Any]) -> SelectionResult:
        cfg = self.cfg
        lev = self.levels()[li]
        strict = self.levels()[0]
        recs: list[CandidateScore] = []
        for c in self.cands:
            ex = self.extra[c]
            rec = CandidateScore(
                pos=c[0], layer=c[1], bypass=self.mean(c, "bypass"), induce=self.mean(c, "induce"),
                kl=self.mean(c, "kl"), cosine=ex.get("cosine"), cos_ablation=ex.get("cos_ablation"),
                cos_addition=ex.get("cos_addition"), proxy=ex.get("proxy"),
                norm=float(self.vec(c).float().norm()),
                details={k: v for k, v in ex.items() if not k.startswith("_")
                         and k not in ("cosine", "cos_ablation", "cos_addition", "proxy")},
            )
            for k in ("bypass", "induce", "kl"):
                t = self.scores[c].get(k)
                if t is not None and t.numel() > 1:
                    rec.details[f"{k}_sem"] = float(t.std() / math.sqrt(t.numel()))
            rec.reasons = self._reasons(c, strict)
            ok = self.passes(c, lev)
            primary = rec.cosine if cfg.mode == "cosine" else rec.bypass
            if c == pick:
                rec.status = "selected"
            elif ok is False:
                rec.status = "rejected" if primary is not None else "not scored"
            elif ok is None or primary is None:
                rec.status = "not scored"
            else:
                rec.status = "passed"
            if rec.status == "not scored" and not rec.reasons and primary is None:
                rec.reasons = ["not scored: pruned by fast mode (short bypass ranking)" if cfg.mode == "fast"
                               else "not scored"]
            elif rec.status == "not scored":
                missing = [k for k in ("induce", "kl", "bypass") if getattr(rec, k) is None
                           and not (k == "kl" and "kl_lower_bound" in ex)]
                rec.reasons = [*rec.reasons, (f"not scored ({', '.join(missing)}): rejected as above; "
                                              "the missing scores could not change the pick")]
            if rec.status == "not scored" and ok is None and primary is not None:
                rec.reasons = [(f"not scored (KL): {'cosine' if cfg.mode == 'cosine' else 'bypass'} "
                                "ranks below the top-k candidates, so KL cannot change the pick")]
            recs.append(rec)
        eligible = [r for r in recs if r.status in ("selected", "passed")]
        if cfg.mode == "cosine":
            eligible.sort(key=lambda r: (-(r.cosine or -math.inf), r.layer, r.pos))
        else:
            eligible.sort(key=lambda r: (r.bypass, r.layer, r.pos))
        for i, r in enumerate(eligible):
            r.rank = i + 1
        top = [r.key for r in eligible[: cfg.top_k]]
        relax = lev.to_dict(li)
        relax["all_filtered"] = li > 0
        prompts = {"harmful": _texts_info(self.harmful), "harmless": _texts_info(self.harmless)}
        work = dict(self.work)
        if hasattr(self, "eng"):
            work["forward_tokens"] = self.eng.forward_tokens
        return SelectionResult(
            pos=pick[0], layer=pick[1], mode=cfg.mode, method=cfg.method, candidates=recs,
            relaxation=relax, top_k=top, stability=stability,
            timings={k: round(v, 3) for k, v in self.timings.items()},
            refusal_tokens=self.refusal, config=cfg, baseline=self.baseline,
            model=self.model.describe(), prompts=prompts, cosine_layers=self.cos_layers, work=work,
        )

    def _reasons(self, c: Key, lev: _Level) -> list[str]:
        out = []
        if c in self.degenerate:
            out.append("zero direction: harmful and harmless means are identical here")
        if not self.layer_ok(c):
            out.append(f"layer {c[1]} >= {self.cfg.max_layer_frac:g}·n_layers = {self.layer_cap:g}")
        ind, kl = self.mean(c, "induce"), self.mean(c, "kl")
        if self.cfg.mode != "cosine" and ind is not None and not ind > self.cfg.induce_min:
            out.append(f"induce {ind:.3f} <= {self.cfg.induce_min:g}")
        if kl is not None and not kl <= lev.kl_max:
            out.append(f"KL {kl:.3f} > {lev.kl_max:g}")
        lb = self.extra[c].get("kl_lower_bound")
        if kl is None and lb is not None and lb > lev.kl_max:
            done = int(self.extra[c].get("kl_prompts", 0))
            out.append(f"KL >= {lb:.3f} > {lev.kl_max:g} (exact early stop after {done} of "
                       f"{len(self.harmless)} prompts)")
        return out


def _texts_info(texts: Sequence[str]) -> dict[str, Any]:
    import hashlib

    return {"count": len(texts), "sha256": hashlib.sha256("\n".join(texts).encode()).hexdigest()}


def _bootstrap_weights(n: int, b: int, g: torch.Generator) -> Tensor | None:
    """``(b, n)`` resampling weights (counts / n) of ``b`` bootstrap resamples."""
    if b == 0:
        return None
    idx = torch.randint(n, (b, n), generator=g)
    w = torch.zeros((b, n), dtype=torch.float64)
    w.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
    return w / n


# ----------------------------------------------------------------------------- public API
def select_direction(
    model: ChatModel,
    directions: DirectionSet,
    harmful_val: Sequence[str] | None = None,
    harmless_val: Sequence[str] | None = None,
    config: SelectionConfig | None = None,
    *,
    record: bool = True,
    **overrides: Any,
) -> SelectionResult:
    """Choose the refusal direction and record it in ``directions`` (``ds.select(...)``).

    Args:
        harmful_val, harmless_val: validation prompts (default: the shipped ``val`` splits);
            the first ``n_val`` of each are used.
        config: a :class:`SelectionConfig`; keyword ``overrides`` build or update one, e.g.
            ``mode="cosine"``, ``n_val=16``, ``kl_max=0.1``.
        record: call ``directions.select(pos, layer, method=..., ...)`` with the choice.

    Example:
        >>> res = select_direction(model, ds, mode="fast")  # doctest: +SKIP
        >>> ds.refusal_direction().layer == res.layer  # doctest: +SKIP
        True
    """
    from dataclasses import replace

    from refusaldir.data.prompts import load_prompts

    if config is None:
        cfg = SelectionConfig(**overrides)
    else:
        try:
            cfg = replace(config, **overrides)
        except TypeError as exc:
            raise ConfigError(f"unknown selection setting: {exc}") from None
    directions.check_model(model)
    harmful = list(harmful_val if harmful_val is not None else load_prompts("harmful", "val"))
    harmless = list(harmless_val if harmless_val is not None else load_prompts("harmless", "val"))
    harmful, harmless = harmful[: cfg.n_val], harmless[: cfg.n_val]
    if not harmful or not harmless:
        raise PromptFileError("selection needs harmful and harmless validation prompts; got an empty set")
    result = _Selector(model, directions, harmful, harmless, cfg).run()
    if record:
        directions.select(result.pos, result.layer, **result.metadata())
    return result


# ----------------------------------------------------------------------------- figures
def _figures(res: SelectionResult) -> dict[str, go.Figure]:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    cands = res.candidates
    positions = sorted({c.pos for c in cands})
    metrics = [m for m in ("bypass", "induce", "kl", "cosine")
               if any(getattr(c, m) is not None for c in cands)]
    titles = {"bypass": "bypass: refusal log-odds on harmful, direction ablated (lower is better)",
              "induce": "induce: refusal log-odds on harmless, direction added (must be > "
                        f"{res.config.induce_min:g})",
              "kl": f"KL on harmless under ablation (must be <= {res.config.kl_max:g})",
              "cosine": "cosine score (ablation + addition; higher is better)"}
    scores = make_subplots(rows=max(1, len(metrics)), cols=1, shared_xaxes=True,
                           subplot_titles=[titles[m] for m in metrics], vertical_spacing=0.08)
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
              "#7f7f7f"]
    for r, m in enumerate(metrics, start=1):
        for k, p in enumerate(positions):
            pts = sorted((c for c in cands if c.pos == p and getattr(c, m) is not None),
                         key=lambda c: c.layer)
            scores.add_trace(go.Scatter(
                x=[c.layer for c in pts], y=[getattr(c, m) for c in pts], mode="lines+markers",
                name=f"pos {p}", legendgroup=f"pos {p}", showlegend=(r == 1),
                line={"color": colors[k % len(colors)]},
                text=[f"{c.status}: {'; '.join(c.reasons) or 'ok'}" for c in pts],
                hovertemplate="layer %{x}<br>%{y:.3f}<br>%{text}<extra>pos " + str(p) + "</extra>",
            ), row=r, col=1)
        sel = res.selected
        if getattr(sel, m) is not None:
            scores.add_trace(go.Scatter(
                x=[sel.layer], y=[getattr(sel, m)], mode="markers", name="selected",
                legendgroup="selected", showlegend=(r == 1),
                marker={"symbol": "star", "size": 16, "color": "black"},
            ), row=r, col=1)
        if m == "kl":
            scores.add_hline(y=res.config.kl_max, line_dash="dash", row=r, col=1)
            scores.update_yaxes(type="log", row=r, col=1)
        if m == "induce":
            scores.add_hline(y=res.config.induce_min, line_dash="dash", row=r, col=1)
    scores.update_xaxes(title_text="layer", row=max(1, len(metrics)), col=1)
    cap = res.config.max_layer_frac * res.model.get("n_layers", 0)
    if cap:
        scores.add_vline(x=cap, line_dash="dot", line_color="gray")
    scores.update_layout(
        height=260 * max(1, len(metrics)) + 120,
        title=f"refusaldir select ({res.mode}): picked pos {res.pos}, layer {res.layer}"
              + (f" — relaxation: {res.relaxation['step']}" if res.relaxation.get("all_filtered") else ""),
    )

    kl = go.Figure()
    for k, p in enumerate(positions):
        pts = sorted((c for c in cands if c.pos == p and c.kl is not None), key=lambda c: c.layer)
        kl.add_trace(go.Scatter(x=[c.layer for c in pts], y=[c.kl for c in pts],
                                mode="lines+markers", name=f"pos {p}",
                                line={"color": colors[k % len(colors)]}))
    kl.add_hline(y=res.config.kl_max, line_dash="dash", annotation_text="KL bound")
    kl.update_yaxes(type="log", title_text="first-token KL(baseline ‖ ablated), harmless")
    kl.update_xaxes(title_text="layer")
    kl.update_layout(title="KL divergence on harmless prompts under directional ablation")

    winners = res.stability.get("winners", {})
    stab = go.Figure(go.Bar(x=list(winners), y=list(winners.values()),
                            marker_color=["black" if w == f"{res.pos},{res.layer}" else "#1f77b4"
                                          for w in winners]))
    stab.update_layout(
        title=f"bootstrap over validation prompts ({res.stability.get('n', 0)} resamples): "
              f"the pick wins {100 * res.stability.get('top1_share', 0):.0f}%",
        xaxis_title="candidate (pos,layer)", yaxis_title="share of resamples won",
    )
    return {"scores": scores, "kl": kl, "stability": stab}
