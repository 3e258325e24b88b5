"""The optimiser: the refusal edit on a refusal–damage Pareto front.

- :mod:`~refusaldir.optimize.config`: :class:`OptimizeConfig` (validated before any model loads);
- :mod:`~refusaldir.optimize.space`: what a trial varies and the :class:`~refusaldir.steer.Edit` it means;
- :mod:`~refusaldir.optimize.objective`: the cheap inner loop on selection's forward engine;
- :mod:`~refusaldir.optimize.search`: the resumable Optuna study and its front;
- :mod:`~refusaldir.optimize.confirm`: front members generated and judged on the test splits;
- :mod:`~refusaldir.optimize.front`: ``front.json``, the figure, ``results.md``, ``front.json#N``;
- :mod:`~refusaldir.optimize.run`: :func:`optimize_edit`, all of the above in one call.

Example:
    >>> import refusaldir as rd  # doctest: +SKIP
    >>> model, ds = rd.load_model("demo"), rd.DirectionSet.load("runs/demo")  # doctest: +SKIP
    >>> rec = rd.optimize_edit(model, ds, rd.OptimizeConfig(n_trials=60), out="runs/demo/optimize")  # doctest: +SKIP
"""

from refusaldir.optimize.config import SAMPLERS, OptimizeConfig, make_sampler
from refusaldir.optimize.confirm import choose_members, confirm_front
from refusaldir.optimize.front import (
    FRONT_FILE,
    check_front,
    front_figure,
    front_markdown,
    load_member,
    parse_member,
    save_front,
    warm_start,
)
from refusaldir.optimize.objective import TrialScorer, multi_token_kl
from refusaldir.optimize.prompts import borderline_half
from refusaldir.optimize.run import optimize_edit
from refusaldir.optimize.search import (
    OWN_FILES,
    STUDY_FILE,
    check_sources,
    check_study,
    directions_sha256,
    pareto,
    read_subspaces,
    search_front,
)
from refusaldir.optimize.space import build_edit, describe, in_space, rank1_params

__all__ = [
    "OWN_FILES", "check_front", "check_sources", "read_subspaces",
    "FRONT_FILE", "SAMPLERS", "STUDY_FILE", "OptimizeConfig", "TrialScorer", "borderline_half",
    "build_edit", "check_study", "choose_members", "directions_sha256", "confirm_front", "describe", "front_figure",
    "front_markdown", "in_space", "load_member", "make_sampler", "multi_token_kl", "optimize_edit", "pareto",
    "parse_member", "rank1_params", "save_front", "search_front", "warm_start",
]
