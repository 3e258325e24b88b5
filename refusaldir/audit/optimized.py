"""The audit's optimised edit: the cheapest front member that brings refusal under the
threshold, evaluated beside the rank-1 edit.

With ``AuditConfig.front`` (a ``front.json`` from ``refusaldir optimize``) or
``AuditConfig.optimize_trials > 0`` (a search run inside the audit, its study kept in the
report folder's ``optimize/``), the member with the lowest KL among those whose refusal rate is
below ``refusal_threshold`` (among confirmed members by their test numbers when the front has
any, else by the search's) joins the evaluation as condition ``optimized``; the verdict reports
which layers it edits, how strongly, its KL and over-refusal, next to the rank-1 edit.

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


def _confirmed(row: dict[str, Any]) -> tuple[float, float] | None:
    conf = row.get("confirmed") or {}
    rate = ((conf.get("harmful") or {}).get("refusal") or {}).get("rate")
    return None if rate is None or conf.get("kl") is None else (float(rate), float(conf["kl"]))


def cheapest_under(front: list[dict[str, Any]], threshold: float) -> dict[str, Any] | None:
    """The lowest-KL member whose refusal rate is below ``threshold``; else the lowest-refusal one.

    When the front holds confirmed members, only they compete, on their confirmed (test) refusal
    and KL: a search rate is not comparable with a judged test rate.
    """
    if not front:
        return None
    confirmed = [(r, c) for r in front if (c := _confirmed(r)) is not None]
    scored = confirmed or [(r, (float(r["refusal_rate"]), float(r["kl"]))) for r in front]
    under = [(r, c) for r, c in scored if c[0] < threshold]
    if under:
        cheap = min(under, key=lambda rc: (rc[1][1], rc[0]["trial"]))[0]
        return {**cheap, "under_threshold": True, "numbers": "confirmed" if confirmed else "search"}
    best = min(scored, key=lambda rc: (rc[1][0], rc[1][1]))[0]
    return {**best, "under_threshold": False, "numbers": "confirmed" if confirmed else "search"}


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
        "under_threshold_when_chosen": m["under_threshold"], "chosen_by": m.get("numbers", "search"),
        "answer": ("yes" if (c["datasets"]["harmful"]["refusal"]["rate"] or 0) < threshold else "no"),
    }
