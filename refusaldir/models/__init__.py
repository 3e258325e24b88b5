"""Loading chat models offline (embedded PyPI models, GGUF files, folders, hub ids, loaded
HF models, models split across devices) and the ``ChatModel`` wrapper with its chat template.

Example:
    >>> from refusaldir.models import load_model  # doctest: +SKIP
    >>> model = load_model("smollm2")  # doctest: +SKIP
"""

from refusaldir.models.chat_model import ChatModel, cache_dir, input_device, stop_token_ids
from refusaldir.models.embedded import DEMO_SHA256, EMBEDDED, EmbeddedModel, demo_gguf_parts
from refusaldir.models.identity import (
    cached_sha256,
    folder_hash,
    state_dict_hash,
    weights_fingerprint,
)
from refusaldir.models.load import (
    DTYPES,
    default_device,
    load_model,
    resolve_device,
    resolve_dtype,
)
from refusaldir.models.locate import check_available
from refusaldir.models.residual import check_residual_stream, has_recurrent_layers
from refusaldir.models.templates import ChatTemplate, PromptTruncatedWarning

__all__ = [
    "DEMO_SHA256", "DTYPES", "EMBEDDED", "ChatModel", "ChatTemplate", "EmbeddedModel", "PromptTruncatedWarning", "cache_dir",
    "cached_sha256", "check_available", "check_residual_stream", "has_recurrent_layers", "default_device", "demo_gguf_parts", "folder_hash", "input_device",
    "load_model", "resolve_device", "resolve_dtype", "state_dict_hash",
    "stop_token_ids", "weights_fingerprint",
]
