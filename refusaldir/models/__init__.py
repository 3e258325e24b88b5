"""Loading chat models offline (embedded PyPI models, GGUF files, folders, hub ids, loaded
HF models) and the ``ChatModel`` wrapper with its chat template.

Example:
    >>> from refusaldir.models import load_model  # doctest: +SKIP
    >>> model = load_model("smollm2")  # doctest: +SKIP
"""

from refusaldir.models.chat_model import ChatModel, cache_dir
from refusaldir.models.load import EMBEDDED, demo_gguf_parts, load_model, state_dict_hash
from refusaldir.models.templates import ChatTemplate

__all__ = ["EMBEDDED", "ChatModel", "ChatTemplate", "cache_dir", "demo_gguf_parts", "load_model",
           "state_dict_hash"]
