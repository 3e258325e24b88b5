"""Plotly figures of a selection: scores per layer and position, KL under ablation and
bootstrap stability, and the offline HTML page they are saved in.

Example:
    >>> figs = selection_figures(result)  # doctest: +SKIP
    >>> sorted(figs)  # doctest: +SKIP
    ['kl', 'scores', 'stability']
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import plotly.graph_objects as go
from plotly.subplots import make_subplots

if TYPE_CHECKING:
    from refusaldir.select.result import SelectionResult

__all__ = ["figures_html", "selection_figures"]

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]


def figures_html(figs: dict[str, go.Figure], title: str = "refusaldir selection") -> str:
    """One self-contained HTML page (plotly.js inlined once, works offline)."""
    parts = [fig.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, fig in enumerate(figs.values())]
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}"
        "</title></head><body>" + "\n".join(parts) + "</body></html>"
    )


def selection_figures(res: SelectionResult) -> dict[str, go.Figure]:
    """Plotly figures (returned, not shown): ``scores`` per layer and position, ``kl`` and
    ``stability`` (bootstrap winners)."""
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
    colors = COLORS
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
