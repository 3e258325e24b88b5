"""Latent guard: flag harmful prompts from the model's harmfulness representation at
``t_inst``, and compare it with the model's own (behavioural) refusal.

Example:
    >>> from refusaldir.guard import LatentGuard  # doctest: +SKIP
    >>> guard = LatentGuard.fit(model, ds, target_fpr=0.05)  # doctest: +SKIP
    >>> guard.save("runs/demo/guard")  # doctest: +SKIP
"""

from refusaldir.guard.behaviour import behavioural_scores, guard_vs_behaviour
from refusaldir.guard.latent import GUARD_METHODS, LatentGuard

__all__ = ["GUARD_METHODS", "LatentGuard", "behavioural_scores", "guard_vs_behaviour"]
