"""Selection checkpoints: per-prompt scores (and detected refusal tokens) saved as they are
computed, so that a rerun with the same model, directions, prompts and scoring settings
resumes instead of recomputing (``SelectionConfig(checkpoint=...)``).

The file is written atomically (:func:`refusaldir.io.atomic_write`); one from other inputs
or settings is ignored with a warning, as is an unreadable one.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from refusaldir.io import atomic_write, sha256_bytes
from refusaldir.judges import RefusalTokens
from refusaldir.select.config import Key
from refusaldir.select.state import SelectionState, texts_info

__all__ = ["checkpoint_key", "load_checkpoint", "save_checkpoint"]

log = logging.getLogger(__name__)
#: Seconds between two periodic (not forced) checkpoint writes.
SAVE_EVERY_S = 30
#: Scalar details worth keeping (the rest is recomputed or derived).
KEPT_DETAILS = ("cosine", "cos_ablation", "cos_addition", "kl_lower_bound", "kl_prompts")


def checkpoint_key(st: SelectionState) -> str:
    """Hash of everything the saved scores depend on."""
    cfg = st.cfg
    blob = json.dumps({
        "model": st.model.weights_hash,
        "directions": sha256_bytes(st.ds.refusal.detach().float().cpu().numpy().tobytes()),
        "harmful": texts_info(st.harmful), "harmless": texts_info(st.harmless),
        "refusal_ids": cfg.refusal_ids, "detect": cfg.detect_max_new_tokens,
        "cosine": [cfg.cosine_layer_frac, cfg.cosine_center], "seed": cfg.seed,
        "n_bootstrap": cfg.n_bootstrap, "dtype": str(st.model.dtype),
    }, sort_keys=True)
    return sha256_bytes(blob)


def _key(text: str) -> Key:
    p, layer = (int(x) for x in text.split(","))
    return (p, layer)


def load_checkpoint(st: SelectionState) -> None:
    """Restore scores from ``st.cfg.checkpoint`` when it exists and matches these inputs."""
    path = st.cfg.checkpoint
    if not path or not Path(path).is_file():
        return
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a corrupt checkpoint is just ignored
        log.warning("ignoring unreadable checkpoint %s (%s)", path, exc)
        return
    if data.get("key") != checkpoint_key(st):
        log.warning("checkpoint %s belongs to other inputs or settings; starting afresh", path)
        return
    n = 0
    for k, v in data.get("scores", {}).items():
        c = _key(k)
        if c in st.scores:
            st.scores[c].update(v)
            n += len(v)
    for k, v in data.get("extra", {}).items():
        c = _key(k)
        if c in st.extra:
            st.extra[c].update({kk: float(vv) for kk, vv in v.items()})
    for k, v in data.get("boot_cos", {}).items():
        st.boot_cos[_key(k)] = v
    if data.get("refusal"):
        st.refusal = RefusalTokens(**json.loads(data["refusal"]))
    st.work["resumed_scores"] = n


def save_checkpoint(st: SelectionState, force: bool = False) -> None:
    """Write the checkpoint (at most every :data:`SAVE_EVERY_S` seconds unless ``force``)."""
    path = st.cfg.checkpoint
    if not path or (not force and time.perf_counter() - st.ckpt_t < SAVE_EVERY_S):
        return
    st.ckpt_t = time.perf_counter()
    data: dict[str, Any] = {
        "key": checkpoint_key(st),
        "scores": {f"{p},{layer}": {k: t.cpu() for k, t in v.items()}
                   for (p, layer), v in st.scores.items() if v},
        "extra": {f"{p},{layer}": {k: float(x) for k, x in v.items() if k in KEPT_DETAILS}
                  for (p, layer), v in st.extra.items()},
        "boot_cos": {f"{p},{layer}": v.cpu() for (p, layer), v in st.boot_cos.items()},
        "refusal": json.dumps(st.refusal.to_dict()) if st.refusal else "",
    }
    atomic_write(Path(path), lambda tmp: torch.save(data, tmp))
