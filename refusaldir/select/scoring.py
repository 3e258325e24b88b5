"""Per-candidate scoring passes of the ``shared`` method (Arditi et al. 2024, appendix C):

- **bypass**: refusal log-odds on harmful prompts with the direction ablated everywhere;
- **induce**: refusal log-odds on harmless prompts with the raw direction added at the
  candidate's layer (the pass starts there, from the cached baseline residual);
- **KL**: first-token KL(baseline ‖ ablated) on harmless prompts, stopped early, exactly,
  once the running sum proves the mean exceeds the bound.

Several candidates' ablations share batches (:meth:`ForwardEngine.run_many`). The ablation
and addition math is :mod:`refusaldir.steer.ops`; logits, KL and refusal scores come from
:mod:`refusaldir.readout`. Per-prompt scores are stored on the CPU.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from refusaldir.batching import resolve_batch_size
from refusaldir.hooks import hook_name
from refusaldir.judges import RefusalTokens, find_refusal_tokens
from refusaldir.readout import first_token_kl
from refusaldir.select import checkpoint, cosine, naive
from refusaldir.select.config import CANDIDATES_PER_PASS, Key
from refusaldir.select.engine import ForwardEngine, HookList
from refusaldir.select.state import SelectionState
from refusaldir.steer import ABLATION_POINTS, add_vector, project_out, project_out_rows

__all__ = [
    "ablate_many", "ablation_hooks", "ablation_hooks_many", "addition_hooks", "bypass_many",
    "cosine_candidate", "ensure_scores", "kl_many", "kl_priority", "partial_bypass_many",
    "refusal_tokens", "shared_baseline", "shared_induce", "start_resid",
]

log = logging.getLogger(__name__)
Reduce = Callable[[list[int], Tensor], Tensor]


# ----------------------------------------------------------------------------- setup
def refusal_tokens(st: SelectionState) -> None:
    """The refusal tokens: restored from a checkpoint, given, or detected by generation."""
    cfg = st.cfg
    if st.refusal is not None:  # restored from a checkpoint
        pass
    elif cfg.refusal_ids is not None:
        st.refusal = RefusalTokens.from_ids(st.model, cfg.refusal_ids)
    else:
        st.refusal = find_refusal_tokens(
            st.model, st.harmful, st.harmless, n=cfg.n_val,
            max_new_tokens=cfg.detect_max_new_tokens, batch_size=cfg.batch_size,
            progress=cfg.progress,
        )
    checkpoint.save_checkpoint(st, force=True)


def shared_baseline(st: SelectionState) -> None:
    """Unmodified passes: last-position logits, activations at every layer and candidate
    position, and the harmless residual stream (for additions that start late)."""
    cfg = st.cfg
    eng = ForwardEngine(st.model, {"harmful": st.harmful, "harmless": st.harmless},
                        batch_size=resolve_batch_size(cfg.batch_size, st.model), share_prefix=cfg.share_prefix)
    st.eng = eng
    all_layers = list(range(st.model.n_layers))
    task = st.bar.add_task("baseline", total=2)
    lh, ah, _ = eng.run("harmful", st.idx("harmful"), [], key=("base",),
                        collect=(all_layers, st.positions))
    st.bar.advance(task)
    ll, al, resid = eng.run("harmless", st.idx("harmless"), [], key=("base",),
                            collect=(all_layers, st.positions), collect_all=True)
    st.bar.advance(task)
    assert lh is not None and ll is not None and ah is not None and al is not None and resid is not None
    st.base_logits = {"harmful": lh, "harmless": ll}  # model device
    st.base_acts = {"harmful": ah, "harmless": al}  # (n, layer, pos, d), CPU
    st.resid = resid  # per harmless prompt: (n_layers, len, d), model device
    st.cos_layers, layer_cos = cosine.eval_layers(ah, al, st.cfg.cosine_layer_frac, st.model.n_layers)
    st.baseline["layer_cosine_harmful_harmless"] = [round(float(x), 5) for x in layer_cos]
    if st.refusal is not None:  # (replaces the record above, as it always has)
        st.base_scores = {"harmful": st.rscore(lh), "harmless": st.rscore(ll)}
        st.baseline = {
            "refusal_score_harmful": float(st.base_scores["harmful"].mean()),
            "refusal_score_harmless": float(st.base_scores["harmless"].mean()),
        }
    st.baseline["shared_prefix_tokens"] = eng.prefix_len


def start_resid(st: SelectionState, layer: int) -> Callable[[list[int], int], Tensor]:
    """The cached baseline residual at ``layer`` for harmless prompts ``rows``, left-padded
    to ``width`` (model device and dtype)."""
    d = st.model.d_model

    def fn(rows: list[int], width: int) -> Tensor:
        out = torch.zeros((len(rows), width, d), dtype=st.model.dtype, device=st.model.device)
        for r, i in enumerate(rows):
            x = st.resid[i][layer]
            out[r, width - x.shape[0]:] = x
        return out

    return fn


# ----------------------------------------------------------------------------- hooks
def ablation_hooks(st: SelectionState, c: Key) -> HookList:
    """Ablate candidate ``c`` at every layer's ``resid_pre``, ``attn_out`` and ``mlp_out``."""
    u = st.placed_unit(c)

    def ablate(act: Tensor, hook: Any) -> Tensor:
        return project_out(act, u.to(act.device))  # a no-op unless the model is split

    return [(hook_name(p, layer), ablate) for layer in range(st.model.n_layers) for p in ABLATION_POINTS]


def ablation_hooks_many(eng: ForwardEngine, n_layers: int) -> HookList:
    """Ablation hooks for :meth:`ForwardEngine.run_many`: row ``b`` ablates ``eng.row_param[b]``."""

    def ablate(act: Tensor, hook: Any) -> Tensor:
        assert eng.row_param is not None
        return project_out_rows(act, eng.row_param.to(act.device))  # (batch, d_model) unit rows

    return [(hook_name(p, layer), ablate) for layer in range(n_layers) for p in ABLATION_POINTS]


def addition_hooks(st: SelectionState, c: Key) -> HookList:
    """Add candidate ``c``'s raw direction to ``resid_pre`` of its own layer."""
    v = st.placed_vector(c)

    def add(act: Tensor, hook: Any) -> Tensor:
        return add_vector(act, v.to(act.device))

    return [(hook_name("resid_pre", c[1]), add)]


def ablate_many(
    st: SelectionState, name: str, items: Sequence[tuple[Key, Sequence[int]]], *, reduce: Reduce,
    collect: tuple[list[int], list[int]] | None = None,
    stop: Callable[[list[int], Tensor], bool] | None = None,
    priority: Sequence[float] | None = None,
) -> list[tuple[list[int], Tensor, Tensor | None]]:
    """Ablate each candidate of ``items`` on its prompts of set ``name``, all in shared
    batches (see :meth:`ForwardEngine.run_many`)."""
    eng = st.engine
    groups = [(("abl", c), st.placed_unit(c), list(idx)) for c, idx in items]
    out = eng.run_many(
        name, groups, ablation_hooks_many(eng, st.model.n_layers), collect=collect,
        reduce=lambda g, prompts, logits: reduce(prompts, logits),
        stop=None if stop is None else (lambda g, prompts, sc: stop(prompts, sc)),
        priority=priority,
    )
    st.work["candidate_passes"] += len(items)
    return out


# ----------------------------------------------------------------------------- scores
def ensure_scores(st: SelectionState, what: str, cands: list[Key], description: str) -> None:
    """Compute score ``what`` (induce | kl | bypass) for the candidates lacking it."""
    todo = [c for c in cands if what not in st.scores[c]]
    if not todo:
        return
    task = st.bar.add_task(description, total=len(todo))
    with st.timed(what):
        if st.cfg.method == "shared" and what in ("bypass", "kl"):
            for s in range(0, len(todo), CANDIDATES_PER_PASS):
                chunk = todo[s : s + CANDIDATES_PER_PASS]
                if what == "bypass":
                    bypass_many(st, chunk)
                else:
                    kl_many(st, chunk, math.inf)
                st.bar.advance(task, len(chunk))
                log.info("%s %s done (%.1fs elapsed)", what, chunk, st.elapsed())
                checkpoint.save_checkpoint(st)
            return
        for c in todo:
            if st.cfg.method == "naive":
                naive.naive_candidate(st, c)
            else:
                shared_induce(st, c)
            st.bar.advance(task)
            log.info("%s %s done (%.1fs elapsed)", what, c, st.elapsed())
            checkpoint.save_checkpoint(st)


def shared_induce(st: SelectionState, c: Key) -> None:
    """Induce score of ``c``: the addition pass starts at its layer from the cached residual."""
    layer = c[1]
    want_cos = st.cfg.mode != "cosine"
    cl = [e for e in st.cos_layers if e >= layer]
    logits, acts, _ = st.engine.run(
        "harmless", st.idx("harmless"), addition_hooks(st, c), key=("add", c),
        start_layer=layer, start_resid=start_resid(st, layer),
        collect=(cl, st.positions) if (want_cos and cl) else None,
    )
    st.work["candidate_passes"] += 1
    assert logits is not None
    st.scores[c]["induce"] = st.rscore(logits)
    if want_cos:
        cosine.store_acts(st, c, "addition", acts, cl)


def bypass_many(st: SelectionState, cands: Sequence[Key]) -> None:
    """Bypass scores on every harmful prompt (continuing fast-mode partial scores)."""
    n = len(st.harmful)
    heads = {c: st.bypass_head.pop(c, None) for c in cands}
    items = [(c, range(0 if h is None else int(h[0].shape[0]), n)) for c, h in heads.items()]
    items = [(c, idx) for c, idx in items if len(idx)]
    rest = dict(zip((c for c, _ in items), ablate_many(
        st, "harmful", items, reduce=lambda prompts, logits: st.rscore(logits),
        collect=(st.cos_layers, st.positions)))) if items else {}
    for c, head in heads.items():
        parts = ([head] if head is not None else []) + \
            ([(rest[c][1], rest[c][2])] if c in rest else [])
        st.scores[c]["bypass"] = torch.cat([p[0] for p in parts])
        acts = [p[1] for p in parts]
        cosine.store_acts(st, c, "ablation", torch.cat([a for a in acts if a is not None]), st.cos_layers)


def partial_bypass_many(st: SelectionState, cands: Sequence[Key], m: int) -> None:
    """Bypass scores of ``cands`` on the first ``m`` harmful prompts (kept for completion)."""
    out = ablate_many(st, "harmful", [(c, range(m)) for c in cands],
                      reduce=lambda prompts, logits: st.rscore(logits),
                      collect=(st.cos_layers, st.positions))
    for c, (_, head, acts) in zip(cands, out):
        st.extra[c]["bypass_head"] = float(head.mean())
        st.bypass_head[c] = (head, acts)


def kl_priority(kl_sum: Float[Tensor, " n"], kl_seen: Float[Tensor, " n"]) -> list[float] | None:
    """Prompts where earlier candidates moved the output most first (KL is correlated across
    candidates, so a rejected one passes the bound sooner); unseen prompts get the mean."""
    if not bool((kl_seen > 0).any()):
        return None
    seen = kl_seen > 0
    mean = torch.where(seen, kl_sum / kl_seen.clamp_min(1), (kl_sum[seen] / kl_seen[seen]).mean())
    return [float(x) for x in mean.tolist()]


def kl_many(st: SelectionState, cands: Sequence[Key], bound: float) -> None:
    """KL of each candidate, with an exact early exit: per-prompt KL is never negative, so
    once a candidate's running sum exceeds ``bound · n`` its mean is known to exceed
    ``bound`` and its remaining prompts are skipped (``kl_lower_bound`` is recorded
    instead of ``kl``). The candidates share batches; a stopped one leaves them."""
    if st.cfg.method == "naive":
        for c in cands:
            naive.naive_candidate(st, c)
        return
    base = st.base_logits["harmless"]
    n = len(st.harmless)
    stop = (lambda prompts, kl: float(kl.sum()) > bound * n) if math.isfinite(bound) else None
    priority = kl_priority(st.kl_sum, st.kl_seen) if stop is not None else None
    out = ablate_many(
        st, "harmless", [(c, st.idx("harmless")) for c in cands],
        reduce=lambda prompts, logits: first_token_kl(base[prompts], logits).cpu(),
        stop=stop, priority=priority,
    )
    for c, (prompts, kl, _) in zip(cands, out):
        st.kl_sum[prompts] += kl.to(st.kl_sum.device, torch.float64)
        st.kl_seen[prompts] += 1
        if kl.shape[0] == n:
            st.scores[c]["kl"] = kl
            st.extra[c].pop("kl_lower_bound", None)
            st.extra[c].pop("kl_prompts", None)
        else:
            st.extra[c]["kl_lower_bound"] = float(kl.sum()) / n
            st.extra[c]["kl_prompts"] = float(kl.shape[0])


def cosine_candidate(st: SelectionState, c: Key) -> None:
    """Output-free scoring of ``c`` (cosine mode): the passes stop at the deepest evaluation
    layer, and the addition pass starts at the candidate's layer."""
    layer = c[1]
    top = max(st.cos_layers)
    _, acts, _ = st.engine.run("harmful", st.idx("harmful"), ablation_hooks(st, c),
                               key=("abl-cos", c), collect=(st.cos_layers, st.positions),
                               want_logits=False)
    st.work["candidate_passes"] += 1
    cosine.store_acts(st, c, "ablation", acts, st.cos_layers)
    cl = [e for e in st.cos_layers if e >= layer]
    acts = None
    if layer <= top:
        _, acts, _ = st.engine.run(
            "harmless", st.idx("harmless"), addition_hooks(st, c), key=("add-cos", c),
            start_layer=layer, start_resid=start_resid(st, layer),
            collect=(cl, st.positions), want_logits=False,
        )
        st.work["candidate_passes"] += 1
    cosine.store_acts(st, c, "addition", acts, cl)
