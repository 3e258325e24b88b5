"""The optimiser's outputs: ``front.json`` (every front member with its parameters, search
scores and, when confirmed, judged rates with Wilson intervals, KL and judge credentials), the
plotly front figure (``front.html``), ``results.md``, and reading one member back
(``front.json#N``) as an :class:`~refusaldir.steer.Edit`.

Example:
    >>> edit, member = load_member("runs/demo/optimize/front.json#0", ds)  # doctest: +SKIP
    >>> hf = edit.orthogonalize(model)[0]  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from refusaldir.directions import DirectionSet
from refusaldir.errors import ArtifactError, ConfigError
from refusaldir.io import atomic_write_files, dumps, read_json
from refusaldir.optimize.config import OptimizeConfig
from refusaldir.optimize.search import directions_sha256, read_subspaces
from refusaldir.optimize.space import build_edit, in_space
from refusaldir.steer import Edit

__all__ = ["FRONT_FILE", "check_front", "front_figure", "front_markdown", "load_member", "parse_member", "save_front",
           "warm_start"]

FRONT_FILE = "front.json"


def _pct(r: dict[str, Any] | None) -> str:
    if not r:
        return "–"
    lo, hi = r.get("ci95", [None, None])
    ci = f" [{100 * lo:.1f}, {100 * hi:.1f}]" if lo is not None else ""
    return f"{100 * r['rate']:.1f}%{ci}"


def front_figure(record: dict[str, Any], others: dict[str, list[dict[str, Any]]] | None = None) -> go.Figure:
    """Refusal against KL: every trial, the front, the rank-1 edit, and other tools' fronts
    (``others``: name → rows with ``refusal_rate`` and ``kl``)."""
    fig = go.Figure()
    rows = [r for r in record["trials"] if not r["skipped"]]
    fig.add_trace(go.Scatter(x=[r["kl"] for r in rows], y=[r["refusal_rate"] for r in rows], mode="markers",
                             name="trials", marker={"color": "#bbbbbb", "size": 6},
                             text=[f"trial {r['trial']}: {r['describe']}" for r in rows]))
    front = record["front"]
    fig.add_trace(go.Scatter(x=[r["kl"] for r in front], y=[r["refusal_rate"] for r in front],
                             mode="lines+markers", name="refusaldir front", marker={"color": "#1f77b4", "size": 9},
                             text=[f"#{i} trial {r['trial']}: {r['describe']}" for i, r in enumerate(front)]))
    if record.get("rank1"):
        r = record["rank1"]
        fig.add_trace(go.Scatter(x=[r["kl"]], y=[r["refusal_rate"]], mode="markers", name="rank-1 edit",
                                 marker={"color": "#d62728", "size": 12, "symbol": "x"}))
    for name, pts in (others or {}).items():
        fig.add_trace(go.Scatter(x=[p["kl"] for p in pts], y=[p["refusal_rate"] for p in pts],
                                 mode="lines+markers", name=name, marker={"size": 9, "symbol": "diamond"}))
    fig.update_layout(title="refusal–damage front (search prompts)",
                      xaxis_title=f"KL over the first {record['config']['kl_tokens']} tokens (harmless val)",
                      yaxis_title=f"refusal rate (harmful val; {search_measure(record['config'])})", xaxis_type="log",
                      template="plotly_white")
    return fig


def search_measure(cfg: dict[str, Any]) -> str:
    """How a saved run's search counted a refusal, in words (records from before ``readout``
    existed used the log-odds)."""
    first = {"greedy": "greedy first token", "log_odds": "first-token log-odds > 0"}[cfg.get("readout", "log_odds")]
    n = int(cfg.get("gen_tokens", 0))
    if not n:
        return first
    judge = cfg.get("gen_judge", "phrase")
    gate = f", KL ≤ {cfg['gen_max_kl']:g}" if cfg.get("gen_max_kl") is not None else ""
    return (f"{first} or a refusal in {n} generated tokens read by the {judge} judge "
            f"(trials with first-token rate ≤ {cfg.get('gen_below', 0.25):g}{gate})")


def front_markdown(record: dict[str, Any]) -> str:
    """``results.md``: the search, the front, and the confirmation on test prompts."""
    cfg = record["config"]
    t = record["timings"]
    lines = [
        "# refusaldir optimize", "",
        f"{record['n_trials']} trials ({cfg['sampler']}, seed {cfg['seed']}) in {t['search_s']:.0f} s "
        f"(setup {t['setup_s']:.0f} s) on {record['prompts']['harmful']} harmful / "
        f"{record['prompts']['harmless']} harmless / {record['prompts']['borderline']} borderline search prompts; "
        f"KL over {cfg['kl_tokens']} tokens; over-refusal limit {record['over_refusal_limit']:.3f}.", "",
        f"## Front (search prompts; refusal: {search_measure(cfg)})", "",
        "| # | trial | refusal rate | KL | over-refusal | edit |", "|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(record["front"]):
        over = "–" if r["over_refusal"] is None else f"{100 * r['over_refusal']:.1f}%"
        how = " (generated tokens judged)" if r.get("generated") else ""
        lines.append(f"| {i} | {r['trial']} | {100 * r['refusal_rate']:.1f}%{how} | {r['kl']:.4f} | {over} | "
                     f"{r['describe']} |")
    conf = record.get("confirmation")
    if conf:
        lines += ["", f"## Confirmed on the test splits ({conf['max_new_tokens']} new tokens, judge "
                  f"{(conf.get('judges') or {}).get('primary', 'default')}; cross-judge disagreement "
                  f"{(conf.get('judges') or {}).get('max_disagreement')})", "",
                  "| condition | harmful refusal | borderline over-refusal | KL | deflection flags (compliant harmful) | edit |",
                  "|---|---|---|---|---|---|"]
        for m in conf["members"]:
            defl = ((m["harmful"] or {}).get("deflection") or {}).get("any")
            lines.append(f"| {m['name']} | {_pct(m['harmful']['refusal'])} | "
                         f"{_pct((m['borderline'] or {}).get('refusal'))} | {m['kl']:.4f} | "
                         f"{_pct(defl) if isinstance(defl, dict) else '–'} | {m['describe']} |")
    return "\n".join(lines) + "\n"


def save_front(folder: str | os.PathLike[str], record: dict[str, Any],
               others: dict[str, list[dict[str, Any]]] | None = None) -> Path:
    """Write ``front.json``, ``front.html`` and ``results.md`` into ``folder`` as one unit
    (completions of the confirmation go to ``completions.jsonl``)."""
    rec = {k: v for k, v in record.items() if k != "completions"}
    conf = rec.get("confirmation")
    comps = None
    if conf and "completions" in conf:
        comps = conf["completions"]
        rec["confirmation"] = {k: v for k, v in conf.items() if k != "completions"}
    fig = front_figure(rec, others)
    files = {"front.html": fig.to_html(include_plotlyjs=True, full_html=True).encode(),
             "results.md": front_markdown(rec).encode(), FRONT_FILE: dumps(rec).encode()}
    if comps is not None:
        files = {"completions.jsonl": "".join(dumps(c, indent=None) + "\n" for c in comps).encode(), **files}
    return atomic_write_files(folder, files)


def parse_member(spec: str) -> tuple[Path, int]:
    """``"runs/demo/optimize/front.json#N"`` → ``(path, N)``; checks the file and the index
    (loads no model)."""
    path, sep, idx = str(spec).rpartition("#")
    if not sep or not idx.isdigit():
        raise ConfigError(f"--edit {spec!r} must look like runs/<model>/optimize/front.json#N (N: a front index)")
    p = Path(path)
    record = read_json(p, "run `refusaldir optimize` to write it")
    front = record.get("front") if isinstance(record, dict) else None
    if not isinstance(front, list):
        raise ArtifactError(f"{p} has no front; it is not a refusaldir optimize record")
    n = int(idx)
    if n >= len(front):
        raise ConfigError(f"--edit {spec!r}: the front in {p} has {len(front)} members (#0–#{len(front) - 1})")
    return p, n


def check_front(front: str | os.PathLike[str], directions: str | os.PathLike[str]) -> None:
    """Raise unless ``front`` (a ``front.json``) was optimised on the direction folder
    ``directions`` as it stands (numbers and selection); loads no model."""
    record = read_json(Path(front), "pass a front.json written by `refusaldir optimize`")
    made_on = (record.get("directions") or {}).get("sha256") if isinstance(record, dict) else None
    have = directions_sha256(DirectionSet.load(directions))
    if made_on != have:
        raise ConfigError(
            f"{front} was optimised on other directions or another selection than {directions} "
            f"(sha256 {str(made_on)[:12]}… vs {have[:12]}…); pass the --directions folder it was made from"
        )


def load_member(spec: str, ds: DirectionSet) -> tuple[Edit, dict[str, Any]]:
    """The :class:`Edit` of front member ``N`` of ``front.json#N`` and its record; raises when
    the front was optimised on other directions (or another selection) than ``ds``."""
    path, n = parse_member(spec)
    record = read_json(path, "run `refusaldir optimize` to write it")
    member = record["front"][n]
    made_on, have = (record.get("directions") or {}).get("sha256"), directions_sha256(ds)
    if made_on != have:
        raise ConfigError(
            f"{path} was optimised on other directions or another selection (sha256 {str(made_on)[:12]}… "
            f"vs {have[:12]}…); pass the --directions folder it was made from"
        )
    extra = None
    if member["params"]["subspace"] in ("categories", "pca"):
        got = read_subspaces(path.parent)
        if got is None:
            raise ArtifactError(f"{path.parent} lacks the subspaces front member #{n} was built on; re-run the optimiser")
        extra = got[0]
    return build_edit(member["params"], ds, int(record["n_layers"]), extra), member


def warm_start(spec: str | os.PathLike[str], ds: DirectionSet, cfg: OptimizeConfig) -> list[dict[str, Any]]:
    """The parameters of a previous run's front members (``front.json``: all of them,
    ``front.json#N``: one), to be tried first in a new study: a study whose scoring changed
    (another readout, a judge on generated tokens) starts from the old front instead of from
    random trials. Members ``cfg``'s space cannot draw are left out; loads no model.

    Example:
        >>> starts = warm_start("runs/demo/optimize/front.json", ds, OptimizeConfig())  # doctest: +SKIP
        >>> optimize_edit(model, ds, cfg, out="runs/demo/optimize-judged", warm_start=starts)  # doctest: +SKIP
    """
    text = str(spec)
    path, n = parse_member(text) if "#" in text else (Path(text), None)
    record = read_json(path, "pass a front.json written by `refusaldir optimize`")
    members = record.get("front") if isinstance(record, dict) else None
    if not isinstance(members, list):
        raise ArtifactError(f"{path} has no front; it is not a refusaldir optimize record")
    members = members if n is None else [members[n]]
    made_on, have = (record.get("directions") or {}).get("sha256"), directions_sha256(ds)
    if made_on != have:
        raise ConfigError(f"--warm-start {text}: that front was optimised on other directions or another "
                          f"selection (sha256 {str(made_on)[:12]}… vs {have[:12]}…); warm-start only from a "
                          "run on the same --directions folder")
    params = [m["params"] for m in members if isinstance(m, dict) and isinstance(m.get("params"), dict)
              and not m.get("rank1")]  # the rank-1 edit is trial 0 of every study anyway
    if not params:
        raise ConfigError(f"--warm-start {text}: that front holds only the rank-1 edit, which every study "
                          "tries first anyway; warm-start from a run with more trials")
    fit = [p for p in params if in_space(p, cfg)]
    if not fit:
        raise ConfigError(f"--warm-start {text}: none of its {len(params)} members lies in this search space "
                          f"(sources {', '.join(cfg.sources)}; subspaces {', '.join(cfg.subspaces)}; variants "
                          f"{', '.join(cfg.variants)}); widen the space or warm-start from another front")
    return fit
