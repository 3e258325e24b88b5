"""Prompt sets: the shipped harmful / harmless / borderline splits and user datasets
(AdvBench, HarmBench, … loaded from a path the user gives).

Example:
    >>> from refusaldir.data import load_prompts
    >>> len(load_prompts("harmful", "test"))
    60
"""

from refusaldir.data.datasets import load_dataset
from refusaldir.data.prompts import (
    SHIPPED,
    SPLITS,
    PromptSet,
    as_prompt_list,
    check_limit,
    check_prompts,
    load_prompts,
    prompts_dir,
)
from refusaldir.data.readers import PromptCommentWarning

__all__ = [
    "SHIPPED", "SPLITS", "PromptCommentWarning", "PromptSet", "as_prompt_list", "check_limit", "check_prompts", "load_dataset",
    "load_prompts", "prompts_dir",
]
