"""The forward engine behind selection: shared-prefix KV caching, late starts from a cached
residual stream, early stops and several interventions scored in shared batches.

Example:
    >>> eng = ForwardEngine(model, {"a": prompts}, batch_size=8, share_prefix=True)  # doctest: +SKIP
    >>> logits, _, _ = eng.run("a", range(len(prompts)), [])  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from refusaldir.hooks import (
    StopForward,
    bridge_kv_cache,
    bypass_modules,
    hook_name,
    hooks,
    module_forward_hook,
    stop_forward,
)
from refusaldir.readout import decoder_of, final_logits
from refusaldir.select.prefix import (
    PrefixBanks,
    PromptRows,
    TokenizedSets,
    left_pad_suffixes,
    new_kv_cache,
)

if TYPE_CHECKING:
    from refusaldir.models import ChatModel

__all__ = ["ForwardEngine", "Group", "HookList"]

HookList = list[tuple[str, Callable[..., Any]]]
#: One intervention of :meth:`ForwardEngine.run_many`: ``(key, param, prompt indices)``.
Group = tuple[Hashable, Tensor, Sequence[int]]


class ForwardEngine:
    """Forward passes with shared-prefix KV caching, late starts and early stops.

    ``run`` evaluates one intervention (a list of hooks) on a subset of prompts. The shared
    prefix (everything before the first token that differs between prompts, e.g. the system
    prompt) is run once per intervention and its KV cache is expanded over the batch; the
    suffixes are left-padded after it, with position ids that continue the prefix.

    Device policy: logits and the ``collect_all`` residuals stay on the model's device (they
    are compared with other model outputs or fed back in); collected activations are
    returned on the CPU in float32.
    """

    def __init__(self, model: ChatModel, sets: dict[str, list[str]], *, batch_size: int,
                 share_prefix: bool) -> None:
        self.model = model
        self.batch_size = batch_size
        self.decoder = decoder_of(model)
        self.blocks = self.decoder.layers
        params = inspect.signature(self.decoder.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.pad_id = model.template.pad_id
        tok = TokenizedSets(model, sets, share_prefix=share_prefix)
        self.prefix_len = tok.prefix_len
        self.prefix_ids = tok.prefix_ids
        self.sets: dict[str, PromptRows] = tok.sets
        self.phase = "suffix"  # "prefix" while the shared prefix runs (hooks may skip it)
        self.inject: Tensor | None = None  # residual fed into the start layer (late start)
        self.tuple_out: bool | None = None  # do decoder blocks return tuples?
        self.caches = PrefixBanks()
        self.forward_tokens = 0  # tokens pushed through the decoder (work counter)
        self.row_param: Tensor | None = None  # run_many: per-row intervention parameters

    @property
    def banks(self) -> list[tuple[dict[Hashable, int], Any]]:
        """The batched prefix caches kept by :meth:`run_many` (newest last)."""
        return self.caches.banks

    def continued(self, name: str, base: str, extra: Sequence[Sequence[int]]) -> None:
        """Add set ``name``: the prompts of ``base`` each followed by the token ids ``extra[i]``
        (e.g. a greedy continuation, scored with ``run(..., last_n=...)``)."""
        rows = self.sets[base]
        if len(extra) != len(rows.suffix):
            raise ValueError(f"{len(extra)} continuations for {len(rows.suffix)} prompts of {base!r}")
        self.sets[name] = PromptRows(name, list(rows.texts),
                                     [list(s) + [int(t) for t in e] for s, e in zip(rows.suffix, extra)])

    # ------------------------------------------------------------------ batches
    def batches(self, ps: PromptRows, idx: Sequence[int]) -> Iterator[tuple[list[int], dict[str, Tensor]]]:
        for s in range(0, len(idx), self.batch_size):
            chunk = list(idx[s : s + self.batch_size])
            yield chunk, self.encode([ps.suffix[i] for i in chunk])

    def encode(self, seqs: list[list[int]]) -> dict[str, Tensor]:
        """Suffixes left-padded after the shared prefix, on the model's device."""
        return left_pad_suffixes(seqs, prefix_len=self.prefix_len, pad_id=self.pad_id,
                                 device=self.model.device)

    # ------------------------------------------------------------------ plumbing
    def _probe_output_type(self) -> AbstractContextManager[Any]:
        """Learn whether blocks return tuples (needed to bypass them) on the first pass."""
        if self.tuple_out is not None:
            return nullcontext()

        def fn(module: Any, args: Any, output: Any) -> None:
            self.tuple_out = isinstance(output, tuple)

        return module_forward_hook(self.blocks[0], fn)

    def _skip_below(self, layer: int | None) -> AbstractContextManager[Any]:
        """Blocks below ``layer`` return their input (their output is replaced by the cached
        residual at ``layer`` anyway)."""
        if not layer:
            return nullcontext()
        return bypass_modules([self.blocks[i] for i in range(layer)], tuple_out=bool(self.tuple_out))

    def _prefix_pass(self, fwd: HookList, rows: int) -> Any:
        """KV cache of the shared prefix under the hooks ``fwd``, ``rows`` copies in a batch."""
        assert self.prefix_ids is not None
        cache = new_kv_cache(self.model.hf.config)
        ids = self.prefix_ids.to(self.model.device).expand(rows, -1)
        self.phase = "prefix"
        try:
            with hooks(self.model, fwd), torch.inference_mode(), bridge_kv_cache(), stop_forward():
                self.decoder(input_ids=ids, attention_mask=torch.ones_like(ids),
                             position_ids=torch.arange(ids.shape[1], device=ids.device)[None].expand(rows, -1),
                             use_cache=True, **{self.cache_kw: cache})
        finally:
            self.phase = "suffix"
        self.forward_tokens += ids.numel()
        return cache

    def _prefix(self, key: Hashable | None, fwd: HookList) -> Any:
        """KV cache of the shared prefix under the hooks ``fwd`` (cached per ``key``)."""
        if key is not None and (hit := self.caches.get(key)) is not None:
            return hit
        cache = self._prefix_pass(fwd, 1)
        if key is not None:
            self.caches.put(key, cache)
        return cache

    def _grab_hooks(self, layers: Sequence[int], buf: dict[int, Tensor], stop_at: int | None = None) -> HookList:
        """Hooks storing ``resid_pre`` of ``layers`` (suffix passes only) in ``buf``; the one
        at ``stop_at`` ends the pass."""
        out: HookList = []
        for layer in sorted(set(layers)):
            def grab(act: Tensor, hook: Any, layer: int = layer) -> None:
                if self.phase == "suffix":
                    buf[layer] = act.detach()
                if layer == stop_at:
                    raise StopForward

            out.append((hook_name("resid_pre", layer), grab))
        return out

    # ------------------------------------------------------------------ one pass
    def run(
        self,
        set_name: str,
        idx: Sequence[int],
        fwd: HookList,
        *,
        key: Hashable | None = None,
        start_layer: int | None = None,
        start_resid: Callable[[list[int], int], Tensor] | None = None,
        collect: tuple[list[int], list[int]] | None = None,
        collect_all: bool = False,
        want_logits: bool = True,
        last_n: int = 1,
    ) -> tuple[Float[Tensor, "n vocab"] | None, Float[Tensor, "n layer pos d_model"] | None,
               list[Tensor] | None]:
        """Run ``fwd`` hooks over prompts ``idx`` of ``set_name``.

        Returns ``(logits, acts, resid)``: last-position logits ``(n, vocab)`` (model device);
        activations at ``collect = (layers, positions)`` ``(n, layers, positions, d)`` (CPU,
        float32); with ``collect_all``, per prompt the ``resid_pre`` of every layer over its
        suffix ``(n_layers, len, d)`` (model device and dtype). ``start_layer`` skips the
        blocks below it and feeds ``start_resid(rows, width)`` (the cached residual) into it.

        ``last_n > 1`` returns the logits of the last ``last_n`` positions ``(n, last_n, vocab)``
        (e.g. prompts followed by a continuation, for multi-token KL).
        Prompts are batched in order of suffix length (less padding); results come back in
        ``idx`` order. Several ablations at once, with early stops: :meth:`run_many`.
        """
        ps = self.sets[set_name]
        logits_out: list[Tensor] = []
        acts_out: list[Tensor] = []
        resid_out: list[Tensor] = []
        buf: dict[int, Tensor] = {}
        stop_at = max(collect[0]) if collect is not None and not want_logits else None
        c_layers = collect[0] if collect is not None else []
        c_pos = torch.tensor(collect[1] if collect is not None else [], dtype=torch.long)
        all_layers = list(range(self.model.n_layers)) if collect_all else []
        extra = self._grab_hooks([*c_layers, *all_layers], buf, stop_at)
        pre: HookList = []
        if start_layer is not None:
            def inject(act: Tensor, hook: Any) -> Tensor | None:
                if self.phase == "suffix" and self.inject is not None:
                    return self.inject
                return None

            pre.append((hook_name("resid_pre", start_layer), inject))
        all_hooks = pre + list(fwd) + extra
        cache0 = self._prefix(None if key is None else (key, stop_at), all_hooks) \
            if self.prefix_len else None
        order = sorted(idx, key=lambda i: len(ps.suffix[i]))
        done: list[int] = []
        with ExitStack() as stack:
            stack.enter_context(self._probe_output_type())
            stack.enter_context(hooks(self.model, all_hooks))
            stack.enter_context(torch.inference_mode())
            stack.enter_context(bridge_kv_cache())
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
                    if start_layer is not None:
                        assert start_resid is not None, "start_layer needs start_resid"
                        self.inject = start_resid(rows, width)
                    with stop_forward(), self._skip_below(start_layer):
                        out = self.decoder(**kw)
                finally:
                    self.inject = None
                if want_logits:
                    if out is None:
                        raise RuntimeError("forward stopped before the last layer")
                    last = out.last_hidden_state[:, -last_n:] if last_n > 1 else out.last_hidden_state[:, -1]
                    logits_out.append(final_logits(self.model, last))
                if collect is not None:
                    acts_out.append(torch.stack(
                        [buf[layer][:, c_pos.to(buf[layer].device)].float().cpu() for layer in c_layers],
                        dim=1))
                if collect_all:
                    lens = [len(ps.suffix[i]) for i in rows]
                    stacked = torch.stack([buf[layer].to(self.model.device) for layer in all_layers], dim=1)
                    for r, n in enumerate(lens):
                        resid_out.append(stacked[r, :, width - n:].clone())
        logits = torch.cat(logits_out) if logits_out else None
        acts = torch.cat(acts_out) if acts_out else None
        where = {i: r for r, i in enumerate(done)}  # back to the caller's order
        perm = torch.tensor([where[i] for i in idx], dtype=torch.long)
        if logits is not None:
            logits = logits[perm.to(logits.device)]
        if acts is not None:
            acts = acts[perm]
        if collect_all:
            resid_out = [resid_out[r] for r in perm.tolist()]
        return logits, acts, (resid_out if collect_all else None)

    # ------------------------------------------------------------------ many interventions
    def _bank(self, groups: Sequence[Group], fwd: HookList) -> tuple[Any, list[int]]:
        """Prefix KV cache with one row per group (from a cached bank when one holds every
        group's key; otherwise one batched prefix pass over all groups)."""
        keys = [g[0] for g in groups]
        keyed = all(k is not None for k in keys)
        if keyed and (hit := self.caches.find(keys)) is not None:
            return hit
        self.row_param = torch.stack([g[1] for g in groups])
        try:
            cache = self._prefix_pass(fwd, len(groups))
        finally:
            self.row_param = None
        if keyed:
            self.caches.add(keys, cache)
        return cache, list(range(len(groups)))

    def _row_order(self, ps: PromptRows, groups: Sequence[Group],
                   priority: Sequence[float] | None) -> list[tuple[int, int, int]]:
        """``(sort key, prompt, group)`` per row: by suffix length, or by ``priority``."""
        if priority is None:
            return sorted((len(ps.suffix[i]), i, g) for g, grp in enumerate(groups) for i in grp[2])
        ranked = sorted(range(len(ps.suffix)), key=lambda i: (-priority[i], len(ps.suffix[i]), i))
        rank = {i: r for r, i in enumerate(ranked)}
        return sorted((rank[i], i, g) for g, grp in enumerate(groups) for i in grp[2])

    def run_many(
        self,
        set_name: str,
        groups: Sequence[Group],
        fwd: HookList,
        *,
        reduce: Callable[[int, list[int], Tensor], Tensor],
        collect: tuple[list[int], list[int]] | None = None,
        stop: Callable[[int, list[int], Tensor], bool] | None = None,
        priority: Sequence[float] | None = None,
    ) -> list[tuple[list[int], Tensor, Tensor | None]]:
        """Evaluate several interventions of one kind in shared batches.

        ``groups[g] = (key, param, idx)``: prompts ``idx`` of ``set_name`` under intervention
        ``g``. The hooks ``fwd`` read ``self.row_param``, every batch row's ``param`` stacked
        ``(batch, ...)`` (``param`` must already be on the model's device). Rows are batched
        by suffix length (one prompt under several interventions shares a width, so there is
        little padding); the groups' prefix caches come from one batched prefix pass, kept
        per ``key``. ``reduce(g, prompts, logits)`` turns group ``g``'s last-position logits
        in a batch into per-prompt scores; after each batch ``stop(g, prompts_so_far,
        scores_so_far)`` may drop ``g`` from later batches; batches then hold at most
        ``batch_size // 2`` prompts per running group, so a group is checked at least that
        often. ``priority`` (per prompt of the set, higher first) replaces the length order,
        e.g. to reach an early stop in fewer prompts.

        Returns per group ``(prompts, scores, acts)``: in ``idx`` order when the group ran to
        the end, else in the order run; ``acts`` ``(n, layers, positions, d)`` (CPU, float32)
        with ``collect``.
        """
        ps = self.sets[set_name]
        dev = self.model.device
        c_layers = collect[0] if collect is not None else []
        c_pos = torch.tensor(collect[1] if collect is not None else [], dtype=torch.long, device=dev)
        buf: dict[int, Tensor] = {}
        all_hooks = list(fwd) + self._grab_hooks(c_layers, buf)
        bank, bank_rows = self._bank(groups, all_hooks) if self.prefix_len else (None, [])
        params = [g[1] for g in groups]
        rows = self._row_order(ps, groups, priority)
        every = max(1, self.batch_size // 2)
        active = [True] * len(groups)
        done: list[list[int]] = [[] for _ in groups]
        scores: list[list[Tensor]] = [[] for _ in groups]
        acts: list[list[Tensor]] = [[] for _ in groups]
        pos_ = 0
        with ExitStack() as stack:
            stack.enter_context(self._probe_output_type())
            stack.enter_context(hooks(self.model, all_hooks))
            stack.enter_context(torch.inference_mode())
            stack.enter_context(bridge_kv_cache())
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
                kw: dict[str, Any] = self.encode([ps.suffix[i] for _, i in chunk])
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
                logits = final_logits(self.model, out.last_hidden_state[:, -1])
                got = None
                if collect is not None:
                    got = torch.stack([buf[layer][:, c_pos.to(buf[layer].device)].float().cpu()
                                       for layer in c_layers], dim=1)
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
        out_: list[tuple[list[int], Tensor, Tensor | None]] = []
        for g, grp in enumerate(groups):
            s = torch.cat(scores[g]) if scores[g] else torch.zeros(0)
            a = torch.cat(acts[g]) if acts[g] else None
            target = list(grp[2]) if len(done[g]) == len(grp[2]) else done[g]
            where = {i: r for r, i in enumerate(done[g])}
            perm = torch.tensor([where[i] for i in target], dtype=torch.long)
            out_.append((target, s[perm.to(s.device)], None if a is None else a[perm.to(a.device)]))
        return out_
