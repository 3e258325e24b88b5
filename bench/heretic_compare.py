"""Benchmark (#24): heretic side by side with ``refusaldir optimize``, judged by refusaldir.

heretic (``heretic-llm`` on PyPI) is never a refusaldir dependency and none of its code is in
this repository: this script installs it into its own virtualenv (``bench/.heretic-venv``,
CPU torch first so pip does not pull a CUDA build), runs it offline on the demo model's
dequantized HF folder with refusaldir's prompt files (train split → its refusal directions,
the first ``--n-eval`` val prompts → its per-trial refusal count and first-token KL, the
same prompts ``refusaldir optimize`` searches on) for ``--trials`` trials, and answers its
interactive menus from a small driver run by that venv's python, which saves the chosen
Pareto members as merged HF folders. The members are picked by the rule refusaldir's
confirmation uses (lowest KL among those refusing at most ``--target`` of the search
prompts, then lowest refusal count).

Each saved member is then loaded with ``refusaldir.load_model`` and measured as
``refusaldir optimize``'s confirmation measures its own members: greedy generation of
``--max-new-tokens`` tokens on the harmful **test** split and the borderline set's test half,
labelled by the default judge (cross-checked by the prefix judge), and the multi-token KL
(``refusaldir.optimize.multi_token_kl``) over the unedited model's greedy ``--kl-tokens``
continuation of the harmless test prompts, teacher-forced in both models.

Usage:
    python bench/heretic_compare.py --trials 60                  # full run (see README of #24)
    python bench/heretic_compare.py --trials 2 --limit-test 8 --members 1 --response-prefix ''
    python bench/heretic_compare.py --trials 60 --ours runs/demo/optimize/front.json
    python bench/heretic_compare.py --trials 10 --ours-only --ours runs/demo/optimize-h10/front.json

Writes ``bench/heretic_compare.json`` (after every stage, so a failure leaves its exact
error there); heretic's log, study and saved models stay in ``--work``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
VENV = REPO / "bench" / ".heretic-venv"
TORCH = "2.13.0"

# Run by the heretic venv's python (argv[1]: plan JSON). It answers heretic's menus instead of
# a person: pick the members, save each merged, exit; then dumps the study's trials.
DRIVER = r'''
import json, os, sys, time
import tomli_w
plan = json.load(open(sys.argv[1]))
with open("config.toml", "wb") as f:
    tomli_w.dump(plan["settings"], f)
import heretic.main as hm
from questionary import Choice

state = {"queue": None, "current": None, "saved": [], "asked": []}

def row(t):
    ua = t.user_attrs
    return {"trial": ua.get("index"), "number": t.number, "refusals": ua.get("refusals"),
            "n_bad_prompts": ua.get("n_bad_prompts"), "base_refusals": ua.get("base_refusals"),
            "kl": ua.get("kl_divergence"), "values": list(t.values) if t.values else None,
            "params": dict(t.params), "direction_index": ua.get("direction_index"),
            "parameters": ua.get("parameters"),
            "seconds": (t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete and t.datetime_start else None}

def pick(front):
    n, target = plan["members"], plan["target"]
    rate = lambda r: r["refusals"] / max(1, r["n_bad_prompts"])
    under = sorted((r for r in front if rate(r) <= target), key=lambda r: (r["kl"], r["trial"]))
    rest = sorted((r for r in front if rate(r) > target), key=lambda r: (r["refusals"], r["kl"]))
    return [r["trial"] for r in (under + rest)[:n]]

def select(message, choices):
    vals = [c.value if isinstance(c, Choice) else c for c in choices]
    state["asked"].append(message)
    if message.startswith("Which trial"):
        trials = {t.user_attrs["index"]: t for t in vals if not isinstance(t, str)}
        if state["queue"] is None:
            front = [row(t) for t in trials.values()]
            state["queue"] = pick(front)
            json.dump({"front": front, "chosen": state["queue"]}, open(plan["front_file"], "w"), indent=1)
        if state["queue"]:
            state["current"] = trials[state["queue"].pop(0)]
            return state["current"]
        return ""
    if message.startswith("What do you want to do"):
        idx = state["current"].user_attrs["index"]
        if idx not in state["saved"]:
            state["saved"].append(idx)
            return "Save the model to a local folder"
        return ""
    raise RuntimeError(f"the driver has no answer for heretic's question {message!r} ({vals!r})")

def path(message):
    idx = state["current"].user_attrs["index"]
    out = os.path.join(plan["models"], f"trial{idx}")
    state.setdefault("started", {})[idx] = time.time()
    return out

def text(message, *a, **k):
    raise RuntimeError(f"the driver has no answer for heretic's question {message!r}")

hm.prompt_select, hm.prompt_path, hm.prompt_text, hm.prompt_password = select, path, text, text
sys.argv = ["heretic"]
t0 = time.time()
hm.run()
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
ck = plan["settings"]["study_checkpoint_dir"]
files = [os.path.join(ck, f) for f in os.listdir(ck) if f.endswith(".jsonl")]
trials = []
for fn in files:
    st = JournalStorage(JournalFileBackend(fn, lock_obj=JournalFileOpenLock(fn)))
    for s in st.get_all_studies():
        trials += [row(t) for t in st.get_all_trials(s._study_id) if t.state.name == "COMPLETE"]
done = json.load(open(plan["front_file"])) if os.path.exists(plan["front_file"]) else {}
done.update(trials=trials, saved=state["saved"], asked=state["asked"], seconds=time.time() - t0)
json.dump(done, open(plan["front_file"], "w"), indent=1)
'''


def sh(cmd: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> dict[str, Any]:
    """Run ``cmd`` with its output appended to ``log``; its exit status, seconds and output tail."""
    t = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd).returncode
    tail = log.read_text(errors="replace")[-4000:]
    return {"cmd": " ".join(cmd), "rc": rc, "seconds": round(time.perf_counter() - t, 1), "tail": tail}


def install(version: str, log: Path, reinstall: bool) -> dict[str, Any]:
    """``bench/.heretic-venv`` with torch (CPU build) and ``heretic-llm==version``."""
    py = VENV / "bin" / "python"
    have = subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('heretic-llm'))"],
                          capture_output=True, text=True) if py.exists() else None
    if have is not None and have.returncode == 0 and have.stdout.strip() == version and not reinstall:
        return {"status": "present", "venv": str(VENV.relative_to(REPO)), "heretic": version}
    steps = [] if py.exists() else [sh(["python3", "-m", "venv", str(VENV)], log)]
    for spec in (f"torch=={TORCH}", f"heretic-llm=={version}"):
        if steps and steps[-1]["rc"]:
            break
        steps.append(sh([str(py), "-m", "pip", "install", spec], log))
    ok = bool(steps) and all(s["rc"] == 0 for s in steps)
    return {"status": "installed" if ok else "failed", "venv": str(VENV.relative_to(REPO)),
            "steps": steps, "log": str(log)}


def venv_versions() -> dict[str, str]:
    code = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
            "('heretic-llm', 'torch', 'transformers', 'peft', 'optuna', 'accelerate')}))")
    out = subprocess.run([str(VENV / "bin" / "python"), "-c", code], capture_output=True, text=True)
    return json.loads(out.stdout) if out.returncode == 0 else {"error": out.stderr[-2000:]}


def template_system_prompt(folder: Path) -> str | None:
    """The system prompt the folder's chat template inserts when a chat has none (Qwen's)
    — what refusaldir's prompts carry, so heretic is given the same."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    text = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    m = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", str(text), re.S)
    return m.group(1) if m else None


def write_prompts(work: Path, n_eval: int) -> dict[str, Any]:
    """refusaldir's splits as heretic's plain-text prompt files (one prompt a line)."""
    from refusaldir.data import load_prompts

    files: dict[str, Any] = {}
    for kind, split, n in (("harmful", "train", None), ("harmless", "train", None),
                           ("harmful", "val", n_eval), ("harmless", "val", n_eval)):
        texts = [" ".join(t.split()) for t in load_prompts(kind, split)][:n]
        path = work / f"{kind}_{split}.txt"
        path.write_text("\n".join(texts) + "\n")
        files[f"{kind}_{split}"] = {"path": str(path), "n": len(texts)}
    return files


def run_heretic(args: argparse.Namespace, work: Path, folder: Path, prompts: dict[str, Any],
                system: str | None) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "model": str(folder), "n_trials": args.trials, "seed": args.seed, "batch_size": args.batch_size,
        "device_map": "cpu", "export_strategy": "merge", "max_response_length": args.max_response_length,
        "study_checkpoint_dir": str(work / "checkpoints"),
        "good_prompts": {"dataset": prompts["harmless_train"]["path"]},
        "bad_prompts": {"dataset": prompts["harmful_train"]["path"]},
        "good_evaluation_prompts": {"dataset": prompts["harmless_val"]["path"]},
        "bad_evaluation_prompts": {"dataset": prompts["harmful_val"]["path"]},
    }
    if system is not None:
        settings["system_prompt"] = system
    if args.response_prefix is not None:
        settings["response_prefix"] = args.response_prefix
    if args.startup is not None:
        settings["n_startup_trials"] = args.startup
    plan = {"settings": settings, "members": args.members, "target": args.target,
            "models": str(work / "models"), "front_file": str(work / "heretic_front.json")}
    (work / "plan.json").write_text(json.dumps(plan, indent=1))
    (work / "driver.py").write_text(DRIVER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1", "TERM": "dumb", "COLUMNS": "200"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    res = sh([str(VENV / "bin" / "python"), str(work / "driver.py"), str(work / "plan.json")],
             work / "heretic.log", env=env, cwd=work)
    out: dict[str, Any] = {"settings": settings, "rc": res["rc"], "seconds": res["seconds"],
                           "log": str(work / "heretic.log")}
    if res["rc"]:
        out["error"] = res["tail"]
    front_file = Path(plan["front_file"])
    if front_file.exists():
        out.update(json.loads(front_file.read_text()))
    done = [t["seconds"] for t in out.get("trials", []) if t.get("seconds")]
    if done:
        out["seconds_per_trial"] = round(sum(done) / len(done), 1)
    return out


def brief(s: dict[str, Any]) -> dict[str, Any]:
    """The per-dataset numbers ``front.json``'s confirmation keeps."""
    return {k: s.get(k) for k in ("refusal", "broad", "n", "deflection", "disagreement", "repetitive", "empty")}


class BaseKL:
    """KL(unedited ‖ other model) as ``refusaldir optimize`` confirms it: per prompt, the mean
    over the unedited model's greedy ``kl_tokens`` continuation, teacher-forced in both."""

    def __init__(self, base: Any, harmful: list[str], harmless: list[str], kl_tokens: int) -> None:
        from refusaldir.optimize import OptimizeConfig, TrialScorer

        self.cfg = OptimizeConfig(kl_tokens=kl_tokens, progress=False)
        # the refusal token only feeds the scorer's refusal score, which KL does not use
        ids = base.tokenizer.encode("I", add_special_tokens=False)[:1]
        scorer = TrialScorer(base, self.cfg, harmful, harmless, [], ids)
        self.harmless = harmless
        self.cont = scorer.base["continuation"]
        self.logits = scorer.base["kl_logits"]

    def __call__(self, other: Any) -> float:
        from refusaldir.batching import resolve_batch_size
        from refusaldir.optimize import multi_token_kl
        from refusaldir.select import ForwardEngine

        eng = ForwardEngine(other, {"harmless": list(self.harmless)},
                            batch_size=resolve_batch_size(self.cfg.batch_size, other), share_prefix=True)
        eng.continued("kl", "harmless", self.cont)
        logits, _, _ = eng.run("kl", list(range(len(self.cont))), [], last_n=self.cfg.kl_tokens)
        assert logits is not None
        return float(multi_token_kl(self.logits, logits.reshape(self.logits.shape).to(self.logits.device)).mean())


def judge_members(args: argparse.Namespace, folder: Path, heretic: dict[str, Any], save: Any) -> dict[str, Any]:
    import refusaldir as rd
    from refusaldir.data import load_prompts
    from refusaldir.evaluate import Condition, evaluate
    from refusaldir.optimize import borderline_half

    lim = args.limit_test
    harmful = list(load_prompts("harmful", "test"))[:lim]
    harmless = list(load_prompts("harmless", "test"))[:lim]
    borderline = borderline_half("test")[:lim]
    datasets = {"harmful": harmful, "borderline": borderline}
    t = time.perf_counter()
    base = rd.load_model(str(folder), device="cpu")
    kl = BaseKL(base, harmful, harmless, args.kl_tokens)
    out: dict[str, Any] = {"prompts": {"harmful": len(harmful), "borderline": len(borderline),
                                       "harmless_kl": len(harmless)},
                           "max_new_tokens": args.max_new_tokens, "kl_tokens": args.kl_tokens,
                           "judge": args.judge or "default", "cross_judges": ["prefix"],
                           "kl_self_check": round(kl(base), 8), "members": [],
                           "base_seconds": round(time.perf_counter() - t, 1)}
    rows = {r["trial"]: r for r in heretic.get("front", [])}
    named: list[tuple[str, Any, dict[str, Any] | None]] = []
    if args.baseline:
        named.append(("baseline", base, None))
    named += [(f"heretic_trial{i}", None, rows.get(i)) for i in heretic.get("saved", [])]
    for name, model, row in named:
        t = time.perf_counter()
        try:
            if model is None:
                model = rd.load_model(str(Path(heretic["models"]) / name.removeprefix("heretic_")), device="cpu")
            desc = "unedited" if row is None else f"heretic trial {row['trial']}"
            res = evaluate(model, None, datasets=datasets, judge=args.judge, cross_judges=("prefix",),
                           max_new_tokens=args.max_new_tokens, progress=not args.quiet,
                           prebuilt=[Condition(name, (), description=desc)])
            summ = res.results["conditions"][name]["datasets"]
            member = {"name": name, "trial": None if row is None else row["trial"],
                      "heretic": None if row is None else {k: row[k] for k in ("refusals", "n_bad_prompts", "kl")},
                      "harmful": brief(summ["harmful"]), "borderline": brief(summ["borderline"]),
                      "kl": round(kl(model) if row is not None else 0.0, 6),
                      "judges": res.results.get("judges"),
                      "completions": str(Path(heretic["models"]).parent / f"{name}_completions.jsonl")}
            Path(member["completions"]).write_text("".join(json.dumps(c, default=str) + "\n" for c in res.completions))
        except Exception as e:  # a member that fails is reported, the others still run
            member = {"name": name, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        member["seconds"] = round(time.perf_counter() - t, 1)
        out["members"].append(member)
        if model is not base:
            del model
        save()
    return out


def ours(path: str | None, budget: int | None = None) -> dict[str, Any] | None:
    """Our confirmed members from a ``front.json`` of ``refusaldir optimize`` (same test sets).

    ``budget``: our front as a search of that many trials would have found it — the study's
    first ``budget`` trials, which a seeded sequential sampler draws the same whatever the total
    — so the comparison is at heretic's trial budget; confirmed members past it are left out.
    """
    if not path:
        return None
    from refusaldir.optimize import pareto

    rec = json.loads(Path(path).read_text())
    conf = rec.get("confirmation") or {}
    n = rec.get("n_trials")
    front = rec.get("front", [])
    if budget is not None and budget < (n or 0):
        front = pareto([r for r in rec["trials"] if r["trial"] < budget])
        n = budget
    keep = {r["trial"] for r in front} | {(rec.get("rank1") or {}).get("trial")}
    return {"front_json": path, "n_trials": n, "kl_tokens": (rec.get("config") or {}).get("kl_tokens"),
            "front": [{k: r.get(k) for k in ("trial", "refusal", "refusal_rate", "kl", "describe")} for r in front],
            "members": [{k: m.get(k) for k in ("name", "trial", "describe", "harmful", "borderline", "kl")}
                        for m in conf.get("members", []) if m.get("trial") is None or m.get("trial") in keep],
            "seconds": rec.get("timings")}


def comparison_figure(rec: dict[str, Any]) -> Any:
    """Both fronts in one figure: each tool's search front on its own measure (left), and the
    confirmed members on the shared one — judged test refusal against multi-token KL (right)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(cols=2, subplot_titles=("search fronts (val prompts, each tool's own measure)",
                                                "confirmed (test prompts, our judge, same KL)"))
    her = rec.get("heretic") or {}
    hf = sorted(her.get("front") or [], key=lambda r: r["kl"])
    fig.add_trace(go.Scatter(x=[r["kl"] for r in hf], y=[r["refusals"] / max(1, r["n_bad_prompts"]) for r in hf],
                             mode="lines+markers", name="heretic front (generated refusals, first-token KL)",
                             marker={"symbol": "diamond", "size": 9, "color": "#ff7f0e"},
                             text=[f"heretic trial {r['trial']}" for r in hf]), row=1, col=1)
    us = rec.get("ours") or {}
    of = us.get("front") or []
    fig.add_trace(go.Scatter(x=[r["kl"] for r in of], y=[r["refusal_rate"] for r in of], mode="lines+markers",
                             name=f"refusaldir front (first-token refusal, KL over {us.get('kl_tokens')} tokens)",
                             marker={"size": 9, "color": "#1f77b4"},
                             text=[f"trial {r['trial']}: {r['describe']}" for r in of]), row=1, col=1)
    pts = [("heretic", m) for m in (rec.get("judged") or {}).get("members", []) if "error" not in m]
    pts += [("refusaldir", m) for m in us.get("members", [])]
    colour = {"heretic": "#ff7f0e", "refusaldir": "#1f77b4"}
    for tool, m in pts:
        if m.get("trial") is None:
            continue
        h = m["harmful"]["refusal"]
        lo, hi = h.get("ci95") or (h["rate"], h["rate"])
        fig.add_trace(go.Scatter(x=[m["kl"]], y=[h["rate"]], mode="markers+text", text=[m["name"]],
                                 textposition="top center", showlegend=False,
                                 error_y={"type": "data", "symmetric": False, "array": [hi - h["rate"]],
                                          "arrayminus": [h["rate"] - lo]},
                                 marker={"size": 11, "color": colour[tool],
                                         "symbol": "diamond" if tool == "heretic" else "circle"}), row=1, col=2)
    fig.update_xaxes(type="log", title_text="KL on harmless val prompts", row=1, col=1)
    fig.update_xaxes(type="log", title_text="KL over the unedited greedy continuation (harmless test)", row=1, col=2)
    fig.update_yaxes(title_text="refusal rate (harmful val)", row=1, col=1)
    fig.update_yaxes(title_text="judged strict refusal (harmful test, 95% CI)", row=1, col=2)
    fig.update_layout(template="plotly_white", title="heretic and refusaldir optimize at the same trial budget",
                      legend={"orientation": "h", "y": -0.2})
    return fig


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=60, help="heretic's n_trials (refusaldir optimize's default: 60)")
    ap.add_argument("--version", default="1.4.0", help="heretic-llm version to install")
    ap.add_argument("--model-folder", default=None, help="HF folder (default: the dequantized demo model)")
    ap.add_argument("--work", default="/tmp/heretic_compare", help="heretic's study, log and saved models")
    ap.add_argument("--out", default=str(REPO / "bench" / "heretic_compare.json"))
    ap.add_argument("--n-eval", type=int, default=48, help="val prompts per set heretic scores trials on "
                    "(refusaldir optimize's n_harmful/n_harmless)")
    ap.add_argument("--members", type=int, default=3, help="heretic front members to save and judge")
    ap.add_argument("--target", type=float, default=0.05, help="refusal rate the member choice aims under")
    ap.add_argument("--batch-size", type=int, default=16, help="heretic's batch_size (0: its slow auto sweep)")
    ap.add_argument("--max-response-length", type=int, default=100, help="heretic's own (default 100)")
    ap.add_argument("--response-prefix", default=None,
                    help="heretic's response_prefix; default: its automatic check; '' skips it")
    ap.add_argument("--startup", type=int, default=None, help="heretic's n_startup_trials (default: its own)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="OMP threads for heretic")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="confirmation's (OptimizeConfig default)")
    ap.add_argument("--kl-tokens", type=int, default=3)
    ap.add_argument("--judge", default=None, help="judge spec (default: refusaldir's default judge)")
    ap.add_argument("--limit-test", type=int, default=None, help="first N test prompts per set (smoke runs)")
    ap.add_argument("--baseline", action="store_true", help="also judge the unedited model")
    ap.add_argument("--ours", default=None, help="front.json of `refusaldir optimize` to put alongside")
    ap.add_argument("--ours-trials", type=int, default=None,
                    help="our front after this many trials (default: --trials, heretic's budget)")
    ap.add_argument("--reinstall", action="store_true")
    ap.add_argument("--skip-heretic", action="store_true", help="reuse --work's finished heretic run")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--ours-only", action="store_true",
                    help="keep --out's heretic run and judged members; replace only our side (--ours) and the figure")
    args = ap.parse_args()
    if args.ours_only:
        if not args.ours:
            ap.error("--ours-only needs --ours FRONT_JSON")
        kept = json.loads(Path(args.out).read_text())
        kept["ours"] = ours(args.ours, args.ours_trials or args.trials)
        kept["ours_replaced"] = time.strftime("%Y-%m-%d %H:%M:%S")
        Path(args.out).write_text(json.dumps(kept, indent=1, default=str) + "\n")
        comparison_figure(kept).write_html(Path(args.out).with_suffix(".html"), include_plotlyjs=True)
        return 0

    work = Path(args.work)
    (work / "models").mkdir(parents=True, exist_ok=True)
    out_path = Path(args.out)
    rec: dict[str, Any] = {"issue": 24, "argv": sys.argv[1:], "started": time.strftime("%Y-%m-%d %H:%M:%S")}

    def save() -> None:
        out_path.write_text(json.dumps(rec, indent=1, default=str) + "\n")

    if args.model_folder:
        folder = Path(args.model_folder)
    else:
        found = sorted((Path.home() / ".cache" / "refusaldir" / "models").glob("demo-*"))
        if not found:
            rec["error"] = "no dequantized demo folder in ~/.cache/refusaldir/models; run `refusaldir info demo` once"
            save()
            return 1
        folder = found[0]
    rec["model_folder"] = str(folder)
    stage = "install"
    try:
        rec["install"] = install(args.version, work / "install.log", args.reinstall)
        save()
        if rec["install"]["status"] == "failed":
            rec["error"] = "heretic-llm did not install; see install.steps"
            save()
            return 1
        rec["versions"] = {"heretic_venv": venv_versions()}
        from refusaldir.io import versions

        rec["versions"]["refusaldir_venv"] = versions()
        stage = "heretic"
        if args.skip_heretic:
            rec["heretic"] = {**json.loads((work / "heretic_front.json").read_text()), "reused": str(work)}
        else:
            system = template_system_prompt(folder)
            prompts = write_prompts(work, args.n_eval)
            rec["prompts"] = prompts
            rec["heretic"] = run_heretic(args, work, folder, prompts, system)
        rec["heretic"]["models"] = str(work / "models")
        save()
        if not rec["heretic"].get("saved"):
            rec["error"] = "heretic saved no model; see heretic.error / heretic.log"
            save()
            return 1
        stage = "judge"
        rec["judged"] = judge_members(args, folder, rec["heretic"], save)
        rec["ours"] = ours(args.ours, args.ours_trials or args.trials)
    except Exception as e:
        rec["error"] = {"stage": stage, "message": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        save()
        raise
    rec["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    save()
    comparison_figure(rec).write_html(out_path.with_suffix(".html"), include_plotlyjs=True)
    for m in rec["judged"]["members"]:
        if "error" in m:
            print(f"{m['name']}: {m['error']}")
            continue
        h = m["harmful"]["refusal"]
        b = m["borderline"]["refusal"]
        print(f"{m['name']}: heretic {m['heretic']} | harmful refusal {h} | borderline {b} | KL {m['kl']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
