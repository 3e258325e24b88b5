"""The audit's optimised edit: the cheapest front member that brings refusal under the
threshold, evaluated beside the rank-1 edit.

With ``AuditConfig.front`` (a ``front.json`` from ``refusaldir optimize``) or
``AuditConfig.optimize_trials > 0`` (a search run inside the audit, its study kept in the
report folder's ``optimize/``), the member with the lowest KL among those whose refusal rate is
below ``refusal_threshold`` (confirmed test rates when the front has them, else the search's)
joins the evaluation as condition ``optimized``; the verdict reports which layers it edits, how
strongly, its KL and over-refusal, next to the rank-1 edit.

Example:
    >>> cheapest_under([{"trial": 1, "kl": 0.02, "refusal_rate": 0.0},
    ...                 {"trial": 2, "kl": 0.01, "refusal_rate": 0.3}], 0.05)["trial"]
    1
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from refusaldir.directions import DirectionSet
from refusaldir.evaluate import Condition
from refusaldir.io import read_json
from refusaldir.optimize import FRONT_FILE, OptimizeConfig, load_member, optimize_edit

if TYPE_CHECKING:
    from refusaldir.models import ChatModel

__all__ = ["cheapest_under", "optimized_condition", "optimized_verdict"]


def _rate(row: dict[str, Any]) -> float:
    conf = ((row.get("confirmed") or {}).get("harmful") or {}).get("refusal") or {}
    return float(conf["rate"]) if conf.get("rate") is not None else float(row["refusal_rate"])


def cheapest_under(front: list[dict[str, Any]], threshold: float) -> dict[str, Any] | None:
    """The lowest-KL member whose refusal rate is below ``threshold``; else the lowest-refusal one."""
    if not front:
        return None
    under = [r for r in front if _rate(r) < threshold]
    if under:
        cheap: dict[str, Any] = min(under, key=lambda r: (r["kl"], r["trial"]))
        return {**cheap, "under_threshold": True}
    best: dict[str, Any] = min(front, key=lambda r: (_rate(r), r["kl"]))
    return {**best, "under_threshold": False}


def optimized_condition(model: ChatModel, ds: DirectionSet, *, front: str | None, trials: int,
                        threshold: float, folder: Path, seed: int = 0, progress: bool = True,
                        ) -> tuple[Condition | None, dict[str, Any] | None]:
    """The ``optimized`` condition and its front record (``None`` when the audit has none)."""
    if front is None and not trials:
        return None, None
    if front is None:
        optimize_edit(model, ds, OptimizeConfig(n_trials=trials, seed=seed, confirm=0, progress=progress), out=folder)
    path = Path(front) if front is not None else folder / FRONT_FILE
    rec = read_json(path, "pass a front.json written by `refusaldir optimize`")
    member = cheapest_under(rec.get("front") or [], threshold)
    if member is None:
        return None, {"front_size": 0}
    index = next(i for i, r in enumerate(rec["front"]) if r["trial"] == member["trial"])
    edit, _ = load_member(f"{path}#{index}", ds)  # checks the directions and reads any subspaces
    info = {"member": member, "front_size": len(rec["front"]), "n_trials": rec["n_trials"], "index": index,
            "source": str(front) if front is not None else "searched in this audit"}
    return Condition("optimized", (edit,), description=member["describe"], info={"front": info}), info


def optimized_verdict(conds: dict[str, Any], info: dict[str, Any] | None, threshold: float) -> dict[str, Any] | None:
    """The verdict's ``optimized`` entry: the member's edit and its measured test numbers."""
    if info is None or "optimized" not in conds:
        return None
    m = info["member"]
    c = conds["optimized"]
    p = m["params"]
    return {
        "describe": m["describe"], "trial": m["trial"], "front_size": info["front_size"],
        "n_trials": info["n_trials"], "source": info["source"],
        "attn": {"peak_layer": p["attn_peak"], "weight": p["attn_weight"], "width": p["attn_width"],
                 "floor": p["attn_floor"] * p["attn_weight"]},
        "mlp": {"peak_layer": p["mlp_peak"], "weight": p["mlp_weight"], "width": p["mlp_width"],
                "floor": p["mlp_floor"] * p["mlp_weight"]},
        "embed": p["embed"], "variant": p["variant"], "direction_source": p["source"], "subspace": p["subspace"],
        "harmful_refusal": c["datasets"]["harmful"]["refusal"],
        "kl_harmless": (c.get("kl_harmless") or {}).get("mean"),
        "over_refusal": (c["datasets"].get("borderline") or {}).get("refusal"),
        "search": {"refusal_rate": m["refusal_rate"], "kl": m["kl"], "over_refusal": m.get("over_refusal")},
        "under_threshold_in_search": m["under_threshold"],
        "answer": ("yes" if (c["datasets"]["harmful"]["refusal"]["rate"] or 0) < threshold else "no"),
    }
