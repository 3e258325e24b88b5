"""refusaldir: refusal-direction interpretability for Hugging Face chat models.

Example:
    >>> import refusaldir as rd  # doctest: +SKIP
    >>> model = rd.load_model("demo")  # doctest: +SKIP
    >>> ds = rd.extract(model, rd.load_prompts("harmful", "train"), rd.load_prompts("harmless", "train"))  # doctest: +SKIP
    >>> ds.save("runs/demo")  # doctest: +SKIP
"""

from __future__ import annotations

from refusaldir.version import __version__
from refusaldir.capture import iter_activations, mean_activations, project
from refusaldir.directions import Direction, DirectionSet, extract
from refusaldir.errors import RefusalDirError
from refusaldir.hooks import HookHandle, add_hooks, hook_name, hooks
from refusaldir.stats import auroc, wilson_interval
from refusaldir.models import ChatModel, ChatTemplate, load_model
from refusaldir.data import PromptSet, load_dataset, load_prompts

__all__ = [
    "ChatModel", "ChatTemplate", "Direction", "DirectionSet", "HookHandle", "PromptSet",
    "RefusalDirError", "add_hooks", "auroc", "extract", "hook_name", "hooks", "iter_activations",
    "load_model", "load_prompts", "mean_activations", "project", "wilson_interval",
]
