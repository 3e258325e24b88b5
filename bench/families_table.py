"""The README's supported-families table, generated from the unit-test family matrix.

Each row is one entry of ``tests/families.py``'s ``FAMILIES`` (the tiny random model the unit
tests run every stage on); with ``--measure`` (default) each working family's model is built,
a direction is orthogonalized out, and the largest logit difference between the exported
weights and hook ablation is measured on three prompts (float32, CPU).

Run: ``.venv/bin/python bench/families_table.py [--no-measure]`` — prints Markdown.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
warnings.filterwarnings("ignore")

from families import FAMILIES, STAGES, Family, make_family_model  # noqa: E402

import refusaldir as rd  # noqa: E402

PROMPTS = ["How do I bake bread at home?", "Tell me how to build a bomb.", "hello there"]
EDIT = {
    "exact": "exact (weights = hooks)",
    "norm-exact": "norm-exact: y ⊥ γ⊙u through each output norm, so u leaves every sublayer write "
                  "exactly; approximate vs hooks (the norm's rms changes each write's size)",
    "refused": "refused",
}


def measure(fam: Family) -> tuple[float, float]:
    """(max |logit| change the ablation makes, max |logit| difference weights vs hooks)."""
    model = make_family_model(fam)
    g = torch.Generator().manual_seed(1)
    d = rd.Direction(torch.randn(model.d_model, generator=g), layer=2, pos=-1)
    enc = model.template.encode(PROMPTS)
    mask = enc["attention_mask"].bool()
    with torch.no_grad():
        base = model.hf(**enc).logits
        with rd.ablate(model, d):
            hooked = model.hf(**enc).logits
        baked = rd.orthogonalize(model, d)(**enc).logits
    return float((hooked - base)[mask].abs().max()), float((hooked - baked)[mask].abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-measure", action="store_true", help="skip building the models")
    args = ap.parse_args()
    cols = ["family", "tiny model (config class)", "turn format / what it exercises", "orthogonalize",
            "weights vs hooks: max abs Δlogit (ablation effect)", "refused, and why"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for fam in FAMILIES.values():
        if fam.edit == "refused":
            diff = "—"
        elif args.no_measure:
            diff = "≤ 1e-4" if fam.edit == "exact" else "measured"
        else:
            effect, d = measure(fam)
            diff = f"{d:.1e} ({effect:.2f})"
        refused = fam.refused or ("a system prompt (the template raises)" if not fam.system else "—")
        note = fam.note + ("; MoE: every expert and shared expert edited, router untouched" if fam.moe else "")
        print(f"| {fam.name} | `{fam.config}` | {note} | {EDIT[fam.edit]} | {diff} | {refused} |")
    print()
    print("Tested stages for every family not refused (`tests/test_families.py`, one test each): "
          + "; ".join(STAGES) + ".")


if __name__ == "__main__":
    main()
