"""Interventions: directional ablation, activation addition, conditional steering, weight
orthogonalization and its export as a normal model folder."""

from refusaldir.steer.interventions import *  # noqa: F401,F403 (split in progress)
from refusaldir.steer.orthogonalize import orthogonalize, plain_copy, save_orthogonalized  # noqa: F401
