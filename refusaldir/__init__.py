"""refusaldir: refusal-direction interpretability for Hugging Face chat models.

The notebook API, one import away; every name also lives in its stage's subpackage
(``refusaldir.models``, ``.data``, ``.directions``, ``.steer``, ``.generation``, ``.judges``,
``.select``, ``.evaluate``, ``.guard``, ``.optimize``, ``.audit``; see docs/architecture.md). The two stage
functions named like their packages are imported from them:
``from refusaldir.evaluate import evaluate`` and ``from refusaldir.audit import audit``.

Example:
    >>> import refusaldir as rd  # doctest: +SKIP
    >>> model = rd.load_model("demo")  # doctest: +SKIP
    >>> ds = rd.extract(model, rd.load_prompts("harmful", "train"), rd.load_prompts("harmless", "train"))  # doctest: +SKIP
    >>> ds.save("runs/demo")  # doctest: +SKIP
    >>> with rd.ablate(model, ds.refusal_direction(layer=14, pos=-1)):  # doctest: +SKIP
    ...     print(rd.generate(model, ["How do I pick a lock?"])[0].completion)
"""

from __future__ import annotations

from refusaldir.audit import AuditConfig, AuditReport
from refusaldir.capture import iter_activations, mean_activations, project
from refusaldir.data import PromptSet, load_dataset, load_prompts
from refusaldir.directions import Direction, DirectionSet, extract, layer_stats
from refusaldir.errors import RefusalDirError
from refusaldir.evaluate import EvaluationResult
from refusaldir.generation import Completion, generate
from refusaldir.guard import LatentGuard
from refusaldir.hooks import HookHandle, add_hooks, hook_name
from refusaldir.judges import PhraseJudge, make_judge
from refusaldir.models import ChatModel, ChatTemplate, load_model
from refusaldir.optimize import OptimizeConfig, load_member, optimize_edit
from refusaldir.select import SelectionConfig, SelectionResult, select_direction
from refusaldir.stats import auroc, wilson_interval
from refusaldir.steer import (
    Ablation,
    Addition,
    ConditionalSteering,
    Edit,
    Kernel,
    ablate,
    add,
    orthogonalize,
    save_orthogonalized,
    steer_if,
)
from refusaldir.version import __version__

__all__ = [
    "Ablation", "Addition", "AuditConfig", "AuditReport", "ChatModel", "ChatTemplate", "Completion",
    "ConditionalSteering", "Direction", "Edit", "Kernel", "OptimizeConfig", "DirectionSet", "EvaluationResult", "HookHandle",
    "LatentGuard", "PhraseJudge", "PromptSet", "RefusalDirError", "SelectionConfig",
    "SelectionResult", "__version__", "ablate", "add", "add_hooks", "auroc",
    "extract", "generate", "hook_name", "iter_activations", "layer_stats", "load_dataset",
    "load_member", "load_model", "load_prompts", "make_judge", "mean_activations", "optimize_edit", "orthogonalize", "project",
    "save_orthogonalized", "select_direction", "steer_if", "wilson_interval",
]
