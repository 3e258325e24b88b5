"""One error family for everything refusaldir raises on purpose.

Every message names the offending value, what was expected, and how to fix it, so the
CLI can print it as a single red line.
"""

from __future__ import annotations


class RefusalDirError(Exception):
    """Base class for every error refusaldir raises on purpose."""


class ModelLoadError(RefusalDirError):
    """A model spec could not be resolved or loaded."""


class TemplateError(RefusalDirError):
    """A chat template is missing or its positions cannot be determined."""


class PromptFileError(RefusalDirError):
    """A prompt file is missing, empty or has no usable column."""


class HookError(RefusalDirError):
    """A hook name or layer does not exist on the model."""


class ArtifactError(RefusalDirError):
    """A saved artifact is missing, truncated, or does not match the model."""


class ConfigError(RefusalDirError):
    """An argument has an invalid value (layer out of range, NaN coefficient, ...)."""


class ResourceError(RefusalDirError):
    """The machine cannot run the work as asked (out of memory even at batch size 1, ...)."""
