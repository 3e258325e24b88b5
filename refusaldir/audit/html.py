"""The self-contained ``report.html``: plotly.js inlined once, every figure a ``<div>``, all text
HTML-escaped; rendered from ``report.json`` data alone.

Example:
    >>> table(["a"], [["<b>"]])
    '<table><thead><tr><th>a</th></tr></thead><tbody><tr><td>&lt;b&gt;</td></tr></tbody></table>'
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from typing import Any

from refusaldir.audit.figures import make_figures
from refusaldir.audit.verdict import num, pct

__all__ = ["CSS", "card", "escape", "render_html", "table"]

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;color:#222;background:#fafafa}
main{max-width:1200px;margin:0 auto;padding:16px 28px 60px}
h1{margin:8px 0 4px;font-size:26px} h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:36px}
.sub{color:#666;margin-bottom:16px}
.warn{background:#fff3cd;border:1px solid #e0b84d;padding:6px 10px}
table{border-collapse:collapse;margin:8px 0;font-size:14px;background:#fff}
td,th{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f0f0f0}
.verdict{display:grid;grid-template-columns:repeat(auto-fit,minmax(260px,1fr));gap:12px}
.card{background:#fff;border:1px solid #ddd;border-left:6px solid #999;border-radius:6px;padding:10px 14px}
.card.yes{border-left-color:#d62728}.card.no{border-left-color:#2ca02c}.card.info{border-left-color:#1f77b4}
.card .big{font-size:22px;font-weight:700;margin:4px 0}
.card .rule{color:#666;font-size:12px}
.fig{background:#fff;border:1px solid #e3e3e3;border-radius:6px;margin:12px 0;padding:4px}
pre.c{white-space:pre-wrap;margin:0;font-size:13px;max-width:640px}
details{margin:6px 0} summary{cursor:pointer;font-weight:600}
code{background:#f0f0f0;padding:1px 4px;border-radius:3px}
"""


def escape(x: Any) -> str:
    """``str(x)`` HTML-escaped, quotes included."""
    return html.escape(str(x), quote=True)


def table(head: Sequence[str], rows: Sequence[Sequence[Any]], raw: bool = False) -> str:
    """An HTML table; cells are escaped unless ``raw``."""
    h = "".join(f"<th>{escape(c)}</th>" for c in head)
    body = "".join("<tr>" + "".join(f"<td>{c if raw else escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def card(title: str, big: str, detail: str, rule: str, cls: str) -> str:
    """One verdict card (``cls``: ``yes``, ``no`` or ``info``)."""
    return (f"<div class='card {cls}'><div>{escape(title)}</div><div class='big'>{escape(big)}</div>"
            f"<div>{escape(detail)}</div><div class='rule'>{escape(rule)}</div></div>")


def _figure_divs(data: dict[str, Any]) -> dict[str, str]:
    """Each figure as a ``<div>``; only the first one carries plotly.js."""
    divs: dict[str, str] = {}
    for i, (name, fig) in enumerate(make_figures(data).items()):
        divs[name] = "<div class='fig'>" + fig.to_html(
            full_html=False, include_plotlyjs=(i == 0), div_id=f"fig-{name}",
            config={"displaylogo": False, "responsive": True},
        ) + "</div>"
    return divs


def _header(data: dict[str, Any]) -> list[str]:
    m = data["model"]
    return [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>refusaldir audit: {escape(m['spec'])}</title>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<style>{CSS}</style></head><body><main>",
        f"<h1>Refusal audit: {escape(m['spec'])}</h1>",
        f"<div class='sub'>{escape(m['architecture'])} · {escape(m['n_layers'])} layers · "
        f"d_model {escape(m['d_model'])} · refusaldir {escape(data['refusaldir_version'])} · "
        f"{escape(data['created'])} · {escape(round(data.get('timings', {}).get('total', 0)))} s</div>",
    ]


def _removable_card(rem: dict[str, Any]) -> str:
    if "edited_refusal" not in rem:
        return card("Refusal removable by a rank-1 edit", "not measured", "", rem["rule"], "info")
    return card("Refusal removable by a rank-1 edit", rem["answer"].upper(),
                f"harmful refusal {pct(rem['baseline_refusal'])} → {pct(rem['edited_refusal'])} "
                f"({rem['judged_on']}); harmless KL {num(rem['kl_harmless'], '.4f')}"
                + (f". Caveat: {rem['caveat']}" if rem.get("caveat") else ""),
                rem["rule"], "yes" if rem["answer"] == "yes" else "no")


def _verdict_section(data: dict[str, Any]) -> list[str]:
    v = data["verdict"]
    conc, harm, d = v["concentration"], v["harmfulness"], v["direction"]
    curve = ", ".join(f"k={i + 1}: {num(r, '.0%') if r is not None else '—'}" for i, r in enumerate(conc["curve"]))
    beh = ", ".join(f"{k}: {num(a)}" for k, a in harm["behaviour_auroc_borderline"].items())
    over = "; ".join(f"{c} {pct(r)}" for c, r in v.get("over_refusal", {}).items())
    parts = [
        "<h2 id='verdict'>Verdict for auditors</h2><div class='verdict'>",
        _removable_card(v["removable"]),
        card(f"Directions needed for < {100 * v['thresholds']['refusal']:.0f}% refusal", conc["answer"],
             f"refusal rate with k directions ablated: {curve} (n={conc['n']})",
             "ranked candidates from other layers/positions are Gram–Schmidt-orthonormalized and ablated together",
             "info"),
        card("Model still represents harmfulness", harm["answer"].upper(),
             f"latent guard AUROC {num(harm['guard_auroc'])} (refusal ablated: "
             f"{num(harm['guard_auroc_refusal_ablated'])}); harmful vs borderline-safe: guard "
             f"{num(harm['guard_auroc_borderline'])} vs behavioural refusal {beh}",
             harm["rule"], "info"),
        card("Where refusal lives", f"layer {d['layer']}, pos {d['pos']}",
             f"cos(refusal, harmfulness) = {num(d['cos_refusal_harmfulness'])}; over-refusal on "
             f"borderline-safe prompts: {over}",
             f"selection mode: {data['selection']['mode']}", "info"),
        "</div>",
    ]
    return parts + [f"<p><b>Note:</b> {escape(note)}</p>" for note in data.get("notes", [])]


def _model_section(data: dict[str, Any], divs: dict[str, str]) -> list[str]:
    m, dirs = data["model"], data["directions"]
    facts = [(k, m.get(k)) for k in ("spec", "architecture", "n_layers", "d_model", "n_params", "dtype",
                                     "device", "weights_hash", "revision", "t_inst", "positions")]
    facts.append(("post-instruction tokens", " ".join(repr(t) for t in m.get("post_instruction_tokens", []))))
    facts += [("directions", dirs["source"]), ("directions sha256", dirs.get("tensors_sha256")),
              ("hook point", dirs["hook_point"])]
    return [
        "<h2 id='model'>Model</h2>", table(["fact", "value"], facts),
        "<h2 id='layers'>Refusal and harmfulness across layers</h2>",
        "<p>Refusal directions are differences of mean activations (harmful − harmless) at the "
        "post-instruction positions; harmfulness directions at the last instruction token "
        "<code>t_inst</code> (Zhao et al. 2025). AUROCs are on the held-out test prompts.</p>",
        divs["layers"] + divs["proj_refusal"] + divs["proj_harmfulness"],
    ]


def _selection_section(data: dict[str, Any], divs: dict[str, str]) -> list[str]:
    s = data["selection"]
    rows = [[t.get("rank"), t["pos"], t["layer"], num(t.get("bypass")), num(t.get("induce")),
             num(t.get("kl"), ".4f"), num(t.get("cosine"))] for t in s.get("top_k") or []]
    relax = s.get("relaxation") or {}
    tokens = (s.get("refusal_tokens") or {}).get("tokens", "not used (cosine mode)")
    return [
        "<h2 id='selection'>Direction selection</h2>",
        table(["rank", "pos", "layer", "bypass", "induce", "KL", "cosine"], rows),
        f"<p>Relaxation step: {escape(relax.get('step', 'none'))}. Refusal tokens: {escape(tokens)}.</p>",
        divs["selection"],
    ]


def _condition_row(c: str, body: dict[str, Any], datasets: Sequence[str]) -> list[Any]:
    kl = body.get("kl_harmless")
    loss = body.get("loss_baseline_completions")
    emp = max(body["datasets"][d]["empty"]["rate"] or 0 for d in datasets)
    rep = max(body["datasets"][d]["repetitive"]["rate"] or 0 for d in datasets)
    return ([c, body.get("description", "")]
            + [pct(body["datasets"][d]["refusal"]) + (
                f"; broad {pct(body['datasets'][d]['broad'])}" if "broad" in body["datasets"][d] else "")
               for d in datasets]
            + [f"{num(kl['mean'], '.4f')} ± {num(kl['ci95_halfwidth'], '.4f')}" if kl else "—",
               f"{num(loss['ce'])} (ppl {num(loss['ppl'], '.2f')})" if loss else "—",
               f"{100 * emp:.1f}% / {100 * rep:.1f}%"])


def _judges_paragraph(block: dict[str, Any] | None) -> str:
    if not block:
        return ""
    cred = block["credentials"].get(block["primary"])
    how = (f"measured accuracy on refusaldir's labelled test split {pct(cred['accuracy'])}, 3-way "
           f"agreement {pct(cred['agreement_3way'])}" if cred else "not measured on refusaldir's labelled set")
    dis = "; ".join(f"disagreement with {escape(k)}: {pct(d)}" for k, d in block["disagreement"].items())
    warn = (f"<p class='warn'><b>Flagged:</b> the judges disagree on more than "
            f"{100 * block['flag_threshold']:.0f}% of responses; the rates depend on which judge you "
            "believe. Read the completions below.</p>" if block["flag"] else "")
    return f"<p>Judge {escape(block['primary'])}: {how}. {dis or 'No cross-check judge ran.'}</p>{warn}"


def _rates_section(data: dict[str, Any], divs: dict[str, str]) -> list[str]:
    ev = data["evaluation"]
    head = ["condition", "description"] + [f"{d} refusal, strict; broad [95% CI]" for d in ev["datasets"]] + \
        ["KL (harmless)", "CE (baseline completions)", "empty / repetitive"]
    rows = [_condition_row(c, body, ev["datasets"]) for c, body in ev["conditions"].items()]
    st = ev.get("settings", {})
    return [
        "<h2 id='rates'>Refusal, over-refusal and damage per condition</h2>", table(head, rows),
        f"<p>Greedy decoding, {escape(st.get('max_new_tokens'))} new tokens, judge: {escape(st.get('judge'))}; "
        "rates are strict (refusal only); over-refusal = refusal of the borderline-but-safe prompts.</p>",
        _judges_paragraph(ev.get("judges")),
        divs["rates"] + divs["kl_loss"],
    ]


def _concentration_section(data: dict[str, Any], divs: dict[str, str]) -> list[str]:
    cc = data["concentration"]
    rows = [[c["k"], f"{c['added']['pos']}, {c['added']['layer']}", c["added"]["residual_norm"], pct(c)]
            for c in cc["curve"]]
    return [
        "<h2 id='concentration'>How concentrated is refusal?</h2>",
        table(["k", "added direction (pos, layer)", "residual norm", "refusal [95% CI]"], rows),
        f"<p>Measured on {cc['n']} harmful test prompts, {cc['max_new_tokens']} new tokens; stops below "
        f"{cc['threshold']:.0%} or at k_max = {cc['k_max']}. Skipped near-duplicates: {len(cc['skipped'])}.</p>",
        divs["concentration"],
    ]


def _guard_row(who: str, prompts: str, r: dict[str, Any]) -> list[Any]:
    return [who, prompts, num(r["auroc"]), num(r.get("tpr"), ".2f"), num(r.get("fpr"), ".2f"),
            f"{r['n_pos']} / {r['n_neg']}"]


def _guard_section(data: dict[str, Any], divs: dict[str, str]) -> list[str]:
    g = data["guard"]
    rows = [_guard_row("guard", "harmful vs harmless (test)", g["test"]),
            _guard_row("guard", "harmful vs borderline-safe", g["borderline"])]
    if g.get("under_ablation"):
        rows.append(_guard_row("guard, refusal direction ablated", "harmful vs harmless (test)",
                               g["under_ablation"]))
    for k, b in g["behaviour"].items():
        if "error" in b:
            rows.append([f"behaviour ({k})", "harmful vs borderline-safe", "—", "—", "—", b["error"]])
        else:
            rows.append(_guard_row(f"behaviour ({k}): {b['score']}", "harmful vs borderline-safe", b))
    return [
        "<h2 id='guard'>Latent guard</h2>",
        f"<p>Method <code>{escape(g['method'])}</code> at <code>t_inst</code> = {escape(g['t_inst'])}, layers "
        f"{escape(g['layers'])}; threshold {num(g['threshold'])} calibrated on harmless validation prompts for "
        f"a target false-positive rate of {num(g['target_fpr'], '.0%')}. The model's own refusal is read "
        "as a classifier on the same harmful vs borderline-safe prompts (refused ⇒ predicted harmful).</p>",
        table(["classifier", "prompts", "AUROC", "TPR", "FPR", "n (pos / neg)"], rows),
        divs["guard_roc"],
    ]


def _samples_section(data: dict[str, Any]) -> list[str]:
    parts = ["<h2 id='samples'>Sample completions</h2>"]
    for cond, by_ds in data["samples"].items():
        parts.append(f"<details{' open' if cond == 'baseline' else ''}><summary>{escape(cond)}</summary>")
        rows = [[escape(dname), f"<pre class='c'>{escape(it['prompt'])}</pre>",
                 f"<pre class='c'>{escape(it['completion'])}</pre>", escape(it.get("label"))]
                for dname, items in by_ds.items() for it in items]
        parts += [table(["dataset", "prompt", "completion", "judge"], rows, raw=True), "</details>"]
    return parts


def _settings_section(data: dict[str, Any]) -> list[str]:
    timings = sorted((data.get("timings") or {}).items(), key=lambda kv: kv[0] == "total")
    return [
        "<h2 id='settings'>Settings and timings</h2>",
        "<details><summary>audit configuration</summary><pre class='c'>"
        + escape(json.dumps(data["config"], indent=1)) + "</pre></details>",
        table(["stage", "seconds"], timings),
        "<p>Every number above is in <code>report.json</code>; completions in "
        "<code>evaluation/completions.jsonl</code>.</p>",
        "</main></body></html>",
    ]


def render_html(data: dict[str, Any]) -> str:
    """The self-contained report page (plotly.js inlined once; all text HTML-escaped)."""
    divs = _figure_divs(data)
    parts = [*_header(data), *_verdict_section(data), *_model_section(data, divs),
             *_selection_section(data, divs), *_rates_section(data, divs),
             *_concentration_section(data, divs), *_guard_section(data, divs), *_samples_section(data),
             *_settings_section(data)]
    return "\n".join(parts)
