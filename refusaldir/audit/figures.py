"""The report's plotly figures, rebuilt from ``report.json`` data (returned, never shown).

Example:
    >>> figs = make_figures(AuditReport.load("runs/demo/audit").data)  # doctest: +SKIP
    >>> sorted(figs)  # doctest: +SKIP
    ['concentration', 'guard_roc', 'kl_loss', 'layers', 'proj_harmfulness', 'proj_refusal', 'rates', 'selection']
"""

from __future__ import annotations

import html
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from refusaldir.audit.config import COLORS, SETS
from refusaldir.audit.verdict import num

__all__ = ["make_figures"]


def _layout(fig: go.Figure, title: str, height: int = 420) -> go.Figure:
    fig.update_layout(title={"text": title}, height=height, template="plotly_white",
                      margin={"l": 60, "r": 30, "t": 60, "b": 50},
                      legend={"orientation": "h", "y": -0.18})
    return fig


def _hist_slider(proj: dict[str, list[list[float]]], layers: list[int], default: int, title: str,
                 xlabel: str) -> go.Figure:
    """Overlaid histograms per prompt set, one layer at a time (a slider picks the layer)."""
    names = [s for s in SETS if s in proj]
    start = layers.index(default) if default in layers else len(layers) // 2
    fig = go.Figure()
    for j in range(len(layers)):
        for s in names:
            fig.add_trace(go.Histogram(
                x=proj[s][j], name=s, legendgroup=s, showlegend=(j == start), visible=(j == start),
                marker_color=COLORS[s], opacity=0.55, histnorm="probability density", nbinsx=30,
            ))
    total = len(layers) * len(names)
    steps = []
    for j, layer in enumerate(layers):
        vis = [k // len(names) == j for k in range(total)]
        legend = [k // len(names) == j for k in range(total)]
        steps.append({"method": "update", "label": str(layer),
                      "args": [{"visible": vis, "showlegend": legend},
                               {"title": {"text": f"{title} — layer {layer}"}}]})
    fig.update_layout(barmode="overlay", sliders=[{"active": start, "currentvalue": {"prefix": "layer "},
                                                   "pad": {"t": 40}, "steps": steps}])
    fig.update_xaxes(title_text=xlabel)
    fig.update_yaxes(title_text="density")
    _layout(fig, f"{title} — layer {layers[start]}", 480)
    fig.update_layout(legend={"orientation": "h", "y": 1.12, "x": 0})
    return fig


def _layers_figure(data: dict[str, Any]) -> go.Figure:
    """Per-layer norms, cosine and projection AUROCs."""
    sel, rows = data["selection"]["selected"], data["layers"]
    xs = [r["layer"] for r in rows]
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.1,
                        subplot_titles=("direction norms", "cos(refusal, harmfulness) and test AUROC"))
    fig.add_trace(go.Scatter(x=xs, y=[r["refusal_norm"] for r in rows], name=f"‖refusal‖ (pos {sel['pos']})",
                             mode="lines+markers"), row=1, col=1)
    fig.add_trace(go.Scatter(x=xs, y=[r["harmfulness_norm"] for r in rows], name="‖harmfulness‖ (t_inst)",
                             mode="lines+markers"), row=1, col=1)
    fig.add_trace(go.Scatter(x=xs, y=[r["cosine"] for r in rows], name="cos(refusal, harmfulness)",
                             mode="lines+markers"), row=2, col=1)
    fig.add_trace(go.Scatter(x=xs, y=[r["auroc_refusal"] for r in rows], name="AUROC refusal projection",
                             mode="lines", line={"dash": "dot"}), row=2, col=1)
    fig.add_trace(go.Scatter(x=xs, y=[r["auroc_harmfulness"] for r in rows],
                             name="AUROC harmfulness projection", mode="lines", line={"dash": "dash"}),
                  row=2, col=1)
    fig.add_vline(x=sel["layer"], line={"color": "grey", "dash": "dot"})
    fig.update_xaxes(dtick=1 if len(xs) <= 32 else None)
    fig.update_xaxes(title_text="layer", row=2, col=1)
    return _layout(fig, f"Per-layer directions (selected layer {sel['layer']} dotted)", 560)


def _candidate_hover(c: dict[str, Any]) -> str:
    parts = [f"pos {c['pos']}, layer {c['layer']}", f"status: {c['status']}"]
    for k in ("bypass", "induce", "kl", "cosine", "proxy"):
        if c.get(k) is not None:
            parts.append(f"{k}: {c[k]:.4g}")
    if c.get("reasons"):
        parts.append("; ".join(c["reasons"])[:120])
    return "<br>".join(html.escape(p) for p in parts)


def _selection_figure(data: dict[str, Any]) -> go.Figure:
    """The selection sweep as a position × layer heatmap of the mode's score."""
    s, sel = data["selection"], data["selection"]["selected"]
    cands = s["candidates"]
    metric = "cosine" if s["mode"] == "cosine" else "bypass"
    if all(c.get(metric) is None for c in cands):
        metric = "proxy"
    pos_list = sorted({c["pos"] for c in cands})
    lay_list = sorted({c["layer"] for c in cands})
    z: list[list[Any]] = [[None] * len(lay_list) for _ in pos_list]
    text = [[""] * len(lay_list) for _ in pos_list]
    for c in cands:
        i, j = pos_list.index(c["pos"]), lay_list.index(c["layer"])
        z[i][j] = c.get(metric)
        text[i][j] = _candidate_hover(c)
    fig = go.Figure(go.Heatmap(z=z, x=lay_list, y=[str(p) for p in pos_list], text=text,
                               hoverinfo="text", colorscale="Viridis", reversescale=(metric == "bypass"),
                               colorbar={"title": {"text": metric}}))
    fig.add_trace(go.Scatter(x=[sel["layer"]], y=[str(sel["pos"])], mode="markers", name="selected",
                             marker={"symbol": "x", "size": 14, "color": "red"}))
    fig.update_xaxes(title_text="layer", dtick=1 if len(lay_list) <= 32 else None)
    fig.update_yaxes(title_text="position (from the end)", type="category")
    label = {"cosine": "cosine score (higher is better)", "bypass": "bypass score (lower is better)",
             "proxy": "proxy (higher is better)"}[metric]
    return _layout(fig, f"Selection sweep ({s['mode']} mode): {label}", 380)


def _error_bars(rs: list[dict[str, Any]]) -> dict[str, Any]:
    """Asymmetric error bars from the rates' 95% intervals."""
    return {"type": "data", "symmetric": False, "array": [r["ci95"][1] - r["rate"] for r in rs],
            "arrayminus": [r["rate"] - r["ci95"][0] for r in rs]}


def _rates_figure(ev: dict[str, Any]) -> go.Figure:
    """Refusal rates per condition and dataset with Wilson intervals."""
    conds = list(ev["conditions"])
    fig = go.Figure()
    for d in ev["datasets"]:
        rs = [ev["conditions"][c]["datasets"][d]["refusal"] for c in conds]
        fig.add_trace(go.Bar(x=conds, y=[r["rate"] for r in rs], name=d, marker_color=COLORS.get(d),
                             error_y=_error_bars(rs)))
    fig.update_layout(barmode="group")
    fig.update_yaxes(title_text="refusal rate (95% Wilson CI)", range=[0, 1.05], tickformat=".0%")
    return _layout(fig, "Refusal and over-refusal per condition")


def _kl_loss_figure(ev: dict[str, Any]) -> go.Figure:
    """First-token KL and cross-entropy on the baseline's harmless completions per condition."""
    conds = list(ev["conditions"])
    fig = make_subplots(rows=1, cols=2, subplot_titles=("first-token KL on harmless prompts",
                                                        "CE on the baseline's harmless completions"))
    kls = [ev["conditions"][c].get("kl_harmless") or {} for c in conds]
    fig.add_trace(go.Bar(x=conds, y=[k.get("mean") for k in kls], name="KL",
                         error_y={"type": "data", "array": [k.get("ci95_halfwidth") for k in kls]}),
                  row=1, col=1)
    losses = [ev["conditions"][c].get("loss_baseline_completions") or {} for c in conds]
    fig.add_trace(go.Bar(x=conds, y=[x.get("ce") for x in losses], name="cross-entropy"), row=1, col=2)
    fig.update_layout(showlegend=False)
    return _layout(fig, "Damage to harmless behaviour", 380)


def _concentration_figure(data: dict[str, Any]) -> go.Figure:
    """Harmful refusal with k = 0, 1, 2, … directions ablated together."""
    conc = data["concentration"]
    base = data["evaluation"]["conditions"]["baseline"]["datasets"]["harmful"]["refusal"]
    rs = [base] + conc["curve"]
    fig = go.Figure(go.Scatter(
        x=[0] + [c["k"] for c in conc["curve"]], y=[r["rate"] for r in rs], mode="lines+markers",
        name="harmful refusal", error_y=_error_bars(rs),
        text=["baseline (evaluation)"] + [f"+ pos {c['added']['pos']}, layer {c['added']['layer']}"
                                          for c in conc["curve"]],
    ))
    fig.add_hline(y=conc["threshold"], line={"dash": "dash", "color": "grey"},
                  annotation_text=f"{conc['threshold']:.0%}")
    fig.update_xaxes(title_text="directions ablated together (k)", dtick=1)
    fig.update_yaxes(title_text="refusal rate", range=[0, 1.05], tickformat=".0%")
    return _layout(fig, "How concentrated is refusal? (top-k directions ablated)", 380)


def _guard_roc_figure(g: dict[str, Any]) -> go.Figure:
    """ROC curves of the latent guard and of the model's behavioural refusal."""
    fig = go.Figure()
    curves = [("guard: harmful vs harmless", g["test"]), ("guard: harmful vs borderline", g["borderline"])]
    if g.get("under_ablation"):
        curves.append(("guard, refusal ablated: harmful vs harmless", g["under_ablation"]))
    for k, b in g["behaviour"].items():
        if b.get("roc"):
            curves.append((f"behaviour ({k}): harmful vs borderline", b))
    for name, c in curves:
        fig.add_trace(go.Scatter(x=c["roc"]["fpr"], y=c["roc"]["tpr"], mode="lines",
                                 name=f"{name} (AUROC {num(c['auroc'])})", line={"shape": "hv"}))
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="chance",
                             line={"dash": "dot", "color": "grey"}))
    fig.add_trace(go.Scatter(x=[g["test"]["fpr"]], y=[g["test"]["tpr"]], mode="markers",
                             name=f"guard threshold (target FPR {g['target_fpr']:.0%})",
                             marker={"size": 10, "symbol": "diamond"}))
    fig.update_xaxes(title_text="false-positive rate", range=[0, 1])
    fig.update_yaxes(title_text="true-positive rate", range=[0, 1.02])
    _layout(fig, "Latent guard ROC vs behavioural refusal", 560)
    fig.update_layout(legend={"orientation": "v", "y": 0.5, "x": 1.02, "xanchor": "left",
                              "yanchor": "middle"}, margin={"r": 330})
    return fig


def make_figures(data: dict[str, Any]) -> dict[str, go.Figure]:
    """Every figure of the report, rebuilt from ``report.json`` data (never shown)."""
    sel, pj = data["selection"]["selected"], data["projections"]
    return {
        "layers": _layers_figure(data),
        "proj_refusal": _hist_slider(pj["refusal"], pj["layers"], sel["layer"],
                                     f"Projection on the refusal direction (pos {pj['refusal_pos']})",
                                     "projection"),
        "proj_harmfulness": _hist_slider(pj["harmfulness"], pj["layers"], sel["layer"],
                                         f"Projection on the harmfulness direction (t_inst {pj['t_inst']})",
                                         "projection"),
        "selection": _selection_figure(data),
        "rates": _rates_figure(data["evaluation"]),
        "kl_loss": _kl_loss_figure(data["evaluation"]),
        "concentration": _concentration_figure(data),
        "guard_roc": _guard_roc_figure(g=data["guard"]),
    }
