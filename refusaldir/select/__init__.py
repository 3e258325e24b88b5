"""Direction selection: pick *the* refusal direction among the (position, layer) candidates
of a :class:`~refusaldir.directions.DirectionSet`, and say why.

- :func:`select_direction`: the entry point (modes ``exact``, ``fast``, ``cosine``; methods
  ``shared`` and the straightforward ``naive`` loop);
- :class:`SelectionConfig`: its settings; :class:`SelectionResult` / :class:`CandidateScore`:
  what it found, saved as ``selection.json`` + ``selection.html`` and loaded back with
  :meth:`SelectionResult.load`.

Modules: ``config`` (settings), ``result`` (results), ``engine`` / ``prefix`` (forward
passes with shared-prefix KV caching), ``scoring`` / ``cosine`` / ``naive`` (per-candidate
scores), ``criteria`` (filters, relaxation, reasons), ``search`` (the searches),
``stability`` (bootstrap, proxies), ``checkpoint``, ``report``, ``figures``.

Example:
    >>> from refusaldir.select import SelectionConfig, select_direction
    >>> SelectionConfig(mode="fast").fast_keep
    2
    >>> res = select_direction(model, ds, mode="fast")  # doctest: +SKIP
    >>> SelectionResult.load(res.save("runs/demo")).layer == res.layer  # doctest: +SKIP
    True
"""

from refusaldir.select.config import (
    FIGURES_FILE,
    METHODS,
    MODES,
    RELAXATIONS,
    SELECTION_FILE,
    SelectionConfig,
)
from refusaldir.select.engine import ForwardEngine
from refusaldir.select.result import CandidateScore, SelectionResult
from refusaldir.select.search import select_direction

__all__ = [
    "FIGURES_FILE",
    "METHODS",
    "MODES",
    "RELAXATIONS",
    "SELECTION_FILE",
    "CandidateScore",
    "ForwardEngine",
    "SelectionConfig",
    "SelectionResult",
    "select_direction",
]
