"""Pick *the* refusal direction among the |positions| × |layers| candidates, and say why.

Three modes:

- ``exact`` (Arditi et al. 2024, appendix C). For every candidate ``(pos, layer)``:
  **bypass** = mean refusal log-odds on harmful validation prompts with the direction ablated
  everywhere (``resid_pre`` of every layer, every ``attn_out`` and ``mlp_out``, all positions);
  **induce** = mean refusal log-odds on harmless validation prompts with the raw direction
  added to ``resid_pre`` of its own layer; **KL** = first-token KL(baseline ‖ ablated) on
  harmless prompts. Candidates must pass ``KL <= kl_max``, ``induce > induce_min`` and
  ``layer < max_layer_frac * n_layers``; the lowest bypass wins. The refusal log-odds use
  the model's own refusal tokens (:func:`refusaldir.judges.find_refusal_tokens`).
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

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import fields, replace
from typing import TYPE_CHECKING, Any

from refusaldir.data import check_prompts, load_prompts
from refusaldir.errors import ConfigError
from refusaldir.select import checkpoint, criteria, naive, report, scoring, stability
from refusaldir.select.config import CANDIDATES_PER_PASS, Key, SelectionConfig
from refusaldir.select.criteria import Level
from refusaldir.select.result import SelectionResult
from refusaldir.select.state import SelectionState

if TYPE_CHECKING:
    from refusaldir.directions import DirectionSet
    from refusaldir.models import ChatModel

__all__ = ["run_selection", "select_direction"]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the walk
def lockstep(st: SelectionState, order: list[Key], lev: Level, limit: int, label: str) -> tuple[list[Key], int]:
    """Accept candidates of ``order`` that pass ``lev``, in order, until ``limit`` are
    accepted; returns them and how far the walk went.

    A one-by-one walk would compute KL for each undecided candidate it reaches. With ``k``
    acceptances still needed, it surely reaches the next ``k`` candidates that are not
    already rejected, so their KL is computed together (shared batches, each with its own
    exact early exit). The result is the one-by-one walk's.
    """
    accepted: list[Key] = []
    p = 0
    todo_all = [c for c in order if criteria.passes(st, c, lev) is None]
    task = st.bar.add_task(label, total=len(todo_all)) if todo_all else None
    while p < len(order) and len(accepted) < limit:
        ahead: list[Key] = []
        for c in order[p:]:
            if criteria.passes(st, c, lev) is not False:
                ahead.append(c)
                if len(ahead) >= limit - len(accepted):
                    break
        todo = [c for c in ahead if criteria.passes(st, c, lev) is None]
        if todo and not math.isinf(lev.kl_max):
            with st.timed("kl"):
                scoring.kl_many(st, todo, lev.kl_max)
            if task is not None:
                st.bar.advance(task, len(todo))
            log.info("kl %s done (%.1fs elapsed)", todo, st.elapsed())
            checkpoint.save_checkpoint(st)
        # every candidate up to the last of ``ahead`` is decided now
        last = order.index(ahead[-1]) if ahead else len(order) - 1
        while p <= last and len(accepted) < limit:
            c = order[p]
            p += 1
            if criteria.passes(st, c, lev):
                accepted.append(c)
    if task is not None:
        st.bar.remove_task(task)
    return accepted, p


def walk(st: SelectionState, elig: list[Key], lev: Level, limit: int | None = None) -> list[Key]:
    """Accept candidates best first (lowest bypass; cosine mode: highest cosine score),
    computing KL only when needed, until ``limit`` (default ``top_k``) are accepted."""
    if st.cfg.mode == "cosine":
        order = sorted(elig, key=lambda c: (-st.extra[c]["cosine"], c[1], c[0]))
    else:
        order = sorted(elig, key=lambda c: (st.mean(c, "bypass"), c[1], c[0]))
    return lockstep(st, order, lev, limit or st.cfg.top_k, "KL (lazy)")[0]


# ----------------------------------------------------------------------------- exact / fast
def select_exact(st: SelectionState) -> tuple[int, Key]:
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
    the one built by :func:`fast_pool` instead of every candidate.
    """
    cfg = st.cfg
    pool = [c for c in st.cands if c not in st.degenerate]
    if cfg.score_all or cfg.method == "naive":
        for what in ("induce", "kl", "bypass"):
            scoring.ensure_scores(st, what, pool, f"{what} (all)")
    if cfg.mode == "fast":
        pool = fast_pool(st, pool)
    for li, lev in enumerate(criteria.levels(cfg)):
        cand = [c for c in pool if criteria.passes(st, c, lev) is not False]
        if lev.induce:
            scoring.ensure_scores(st, "induce", cand, "induce")
        cand = [c for c in cand if criteria.passes(st, c, lev.without_kl())]
        scoring.ensure_scores(st, "bypass", cand, "bypass")
        accepted = walk(st, cand, lev)
        if accepted:
            return li, accepted[0]
    raise criteria.all_filtered(st)


def fast_pool(st: SelectionState, valid: list[Key]) -> list[Key]:
    """Fast mode: rank the candidates by their bypass score on the first ``fast_prompts``
    harmful validation prompts (a quarter of the work of a full bypass pass), walk that
    ranking checking KL (with the exact early exit) until ``fast_keep`` candidates pass
    it, and hand the walked pool to exact mode (which finishes their bypass on the
    remaining prompts, reusing the first ones).

    The strongest directions rank first and are the ones KL tends to reject, so the walk
    pays one (often truncated) KL pass per rejected candidate and full scoring only for
    the few survivors. If no candidate passes KL, the pool is every valid candidate.
    """
    cfg = st.cfg
    m = min(cfg.fast_prompts, len(st.harmful))
    ranked = [c for c in valid if st.layer_ok(c)]
    todo = [c for c in ranked if "bypass" not in st.scores[c] and c not in st.bypass_head]
    task = st.bar.add_task(f"fast: bypass on {m} prompts", total=len(todo))
    with st.timed("bypass"):
        for s in range(0, len(todo), 4 * CANDIDATES_PER_PASS):
            chunk = todo[s : s + 4 * CANDIDATES_PER_PASS]
            scoring.partial_bypass_many(st, chunk, m)
            st.bar.advance(task, len(chunk))
    st.bar.remove_task(task)

    def head(c: Key) -> float:
        s = st.scores[c].get("bypass")
        return float(s[:m].mean()) if s is not None else float(st.extra[c]["bypass_head"])

    ranked.sort(key=lambda c: (head(c), c[1], c[0]))
    kl_level = Level("kl", False, cfg.kl_max, True)
    accepted, walked = lockstep(st, ranked, kl_level, cfg.fast_keep, "fast: KL in that order")
    pool = ranked[:walked]
    return pool if accepted else pool + [c for c in valid if c not in pool]


# ----------------------------------------------------------------------------- cosine
def select_cosine(st: SelectionState) -> tuple[int, Key]:
    """Cosine mode: score the candidates below the layer cap (every valid one with
    ``score_all``), then accept by cosine score with KL checked lazily."""
    cfg = st.cfg
    valid = [c for c in st.cands if c not in st.degenerate]
    pool = [c for c in valid if st.layer_ok(c)] or valid
    todo = [c for c in (valid if cfg.score_all else pool) if "cosine" not in st.extra[c]]
    task = st.bar.add_task("cosine", total=len(todo))
    with st.timed("cosine"):
        for c in todo:
            scoring.cosine_candidate(st, c)
            st.bar.advance(task)
            log.info("cosine %s done (%.1fs elapsed)", c, st.elapsed())
            checkpoint.save_checkpoint(st)
    limit = len(valid) if cfg.score_all else cfg.top_k
    for li, lev in enumerate(criteria.levels(cfg)):
        cheap = Level(lev.step, False, math.inf, lev.layer)
        elig = [c for c in valid if "cosine" in st.extra[c] and criteria.passes(st, c, cheap)]
        accepted = walk(st, elig, lev, limit)
        if accepted:
            return li, accepted[0]
    raise criteria.all_filtered(st)


# ----------------------------------------------------------------------------- one run
def run_selection(st: SelectionState) -> SelectionResult:
    """Baseline, scoring stages, relaxation, bootstrap and report of one selection."""
    cfg = st.cfg
    t_all = time.perf_counter()
    checkpoint.load_checkpoint(st)
    with st.bar:
        if cfg.mode in ("exact", "fast"):
            with st.timed("refusal_tokens"):
                scoring.refusal_tokens(st)
        with st.timed("baseline"):
            if cfg.method == "naive":
                naive.naive_baseline(st)
            else:
                scoring.shared_baseline(st)
        if cfg.method == "shared":
            with st.timed("proxy"):
                stability.proxies(st)
        level, pick = select_cosine(st) if cfg.mode == "cosine" else select_exact(st)
        checkpoint.save_checkpoint(st, force=True)
        with st.timed("bootstrap"):
            stable = stability.bootstrap(st, level, pick)
    st.timings["total"] = time.perf_counter() - t_all
    return report.build_result(st, level, pick, stable)


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
    unknown = sorted(set(overrides) - {f.name for f in fields(SelectionConfig)})
    if unknown:
        raise ConfigError(f"unknown selection setting(s) {unknown}; see refusaldir.select.SelectionConfig")
    cfg = SelectionConfig(**overrides) if config is None else replace(config, **overrides)
    harmful = check_prompts(harmful_val if harmful_val is not None else load_prompts("harmful", "val"),
                            "harmful_val")[: cfg.n_val]
    harmless = check_prompts(harmless_val if harmless_val is not None else load_prompts("harmless", "val"),
                             "harmless_val")[: cfg.n_val]
    directions.check_model(model)
    model.template.check_lengths(harmful, what="harmful_val")
    model.template.check_lengths(harmless, what="harmless_val")
    result = run_selection(SelectionState.create(model, directions, harmful, harmless, cfg))
    if record:
        directions.select(result.pos, result.layer, **result.metadata())
    return result
