"""Difference-of-means refusal and harmfulness directions, and their on-disk artifacts.

- **refusal** directions: ``mean(harmful) - mean(harmless)`` at every post-instruction
  position and layer (Arditi et al. 2024);
- **harmfulness** directions: the same difference at ``t_inst``, the last instruction token
  (Zhao et al. 2025).

Example:
    >>> ds = extract(model, harmful, harmless)  # doctest: +SKIP
    >>> ds.save("runs/demo")  # doctest: +SKIP
    >>> DirectionSet.load("runs/demo").refusal_direction(layer=12, pos=-1).shape  # doctest: +SKIP
    torch.Size([896])
"""

from refusaldir.directions.direction import Direction
from refusaldir.directions.extract import extract, layer_stats
from refusaldir.directions.set import METADATA_FILE, TENSORS_FILE, DirectionSet
from refusaldir.directions.subspace import Subspaces, subspaces

__all__ = ["METADATA_FILE", "TENSORS_FILE", "Direction", "DirectionSet", "Subspaces", "extract", "layer_stats",
           "subspaces"]
