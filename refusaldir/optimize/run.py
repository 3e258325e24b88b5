"""``optimize_edit``: search the front, confirm it on held-out prompts, write the outputs.

Example:
    >>> rec = optimize_edit(model, ds, OptimizeConfig(n_trials=40), out="runs/demo/optimize")  # doctest: +SKIP
    >>> rec["front"][0]["describe"]  # doctest: +SKIP
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from refusaldir.directions import DirectionSet
from refusaldir.io import versions
from refusaldir.optimize.config import OptimizeConfig
from refusaldir.optimize.confirm import confirm_front
from refusaldir.optimize.front import save_front
from refusaldir.optimize.search import directions_sha256, read_subspaces, search_front

if TYPE_CHECKING:
    from refusaldir.models import ChatModel

__all__ = ["optimize_edit"]


def optimize_edit(
    model: ChatModel,
    ds: DirectionSet,
    cfg: OptimizeConfig | None = None,
    *,
    out: str | os.PathLike[str],
    resume: bool = False,
    harmful: Sequence[str] | None = None,
    harmless: Sequence[str] | None = None,
    borderline: Sequence[str] | None = None,
    refusal_ids: Sequence[int] | None = None,
    test_sets: dict[str, Sequence[str]] | None = None,
    warm_start: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """Search (:func:`~refusaldir.optimize.search_front`), confirm ``cfg.confirm`` members and
    the rank-1 edit on the test splits (``test_sets`` overrides ``harmful`` / ``harmless`` /
    ``borderline`` there), and write ``front.json``, ``front.html`` and ``results.md`` to ``out``.
    ``warm_start``: trials to try first (:func:`~refusaldir.optimize.warm_start`).

    Returns the record ``front.json`` holds; confirmed front members carry ``confirmed``.
    """
    cfg = cfg or OptimizeConfig()
    rec = search_front(model, ds, cfg, out=out, resume=resume, harmful=harmful, harmless=harmless,
                       borderline=borderline, refusal_ids=refusal_ids, warm_start=warm_start)
    have = read_subspaces(out) if rec.get("subspaces") else None
    extra = have[0] if have is not None else None
    rec.update(model=model.describe(), versions=versions(),
               directions={"selected": ds.metadata.get("selected"), "sha256": directions_sha256(ds)})
    if cfg.confirm:
        t = time.perf_counter()
        test = test_sets or {}
        conf = confirm_front(model, ds, rec, cfg, extra=extra, harmful=test.get("harmful"),
                             harmless=test.get("harmless"), borderline=test.get("borderline"))
        conf["seconds"] = round(time.perf_counter() - t, 2)
        rec["confirmation"] = conf
        by_trial = {m["trial"]: m for m in conf["members"] if m["trial"] is not None}
        for row in [*rec["front"], *([rec["rank1"]] if rec.get("rank1") else [])]:
            if row["trial"] in by_trial:
                m = by_trial[row["trial"]]
                row["confirmed"] = {k: m[k] for k in ("harmful", "borderline", "kl", "kl_tokens")}
                row["confirmed"]["judges"] = conf.get("judges")
    save_front(out, rec)
    return rec
