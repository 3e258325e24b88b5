"""Compact, JSON-ready summaries of the audit's live objects for ``report.json``: the model,
the direction set, the selection and a few sample completions per condition and dataset.

Example:
    >>> sample_completions([{"condition": "baseline", "dataset": "harmful", "prompt": "p",
    ...                      "completion": "c", "label": "refusal"}], 1)
    {'baseline': {'harmful': [{'prompt': 'p', 'completion': 'c', 'label': 'refusal', 'finish_reason': None}]}}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from refusaldir.directions import DirectionSet
from refusaldir.models import ChatModel

__all__ = ["directions_summary", "model_summary", "sample_completions", "selection_summary"]


def selection_summary(d: dict[str, Any]) -> dict[str, Any]:
    """The parts of ``SelectionResult.to_dict()`` the report shows."""
    keep = ("selected", "mode", "method", "relaxation", "top_k", "stability", "cosine_layers", "timings")
    out = {k: d.get(k) for k in keep}
    rt = d.get("refusal_tokens")
    out["refusal_tokens"] = ({k: rt.get(k) for k in ("ids", "tokens", "coverage")} if rt else None)
    out["candidates"] = [
        {k: c.get(k) for k in ("pos", "layer", "bypass", "induce", "kl", "cosine", "proxy", "status",
                               "rank", "reasons", "norm")}
        for c in d["candidates"]
    ]
    out["config"] = {k: (d.get("config") or {}).get(k) for k in ("n_val", "kl_max", "induce_min", "max_layer_frac")}
    return out


def sample_completions(rows: Sequence[dict[str, Any]], n: int) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """The first ``n`` completions of each condition and dataset."""
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in rows:
        bucket = out.setdefault(r["condition"], {}).setdefault(r["dataset"], [])
        if len(bucket) < n:
            bucket.append({k: r.get(k) for k in ("prompt", "completion", "label", "finish_reason")})
    return out


def model_summary(cm: ChatModel) -> dict[str, Any]:
    """``cm.describe()`` plus its chat template's positions and hash."""
    t = cm.template
    return {**cm.describe(), "t_inst": t.t_inst, "positions": t.positions,
            "post_instruction_tokens": t.post_instruction_tokens, "template_hash": t.hash}


def directions_summary(ds: DirectionSet, source: str) -> dict[str, Any]:
    """Where the directions came from and what they cover."""
    return {"source": source, "positions": ds.positions, "layers": ds.layers, "t_inst": ds.t_inst,
            "hook_point": ds.hook_point, "tensors_sha256": ds.metadata.get("tensors_sha256"),
            "selected": ds.metadata.get("selected"), "extract_layer_stats": ds.metadata.get("layer_stats")}
