"""``refusaldir orthogonalize --edit front.json#N``: export an optimiser front member as a plain
Hugging Face folder whose model card states its numbers (every check before the model loads)."""

from __future__ import annotations

import json
from pathlib import Path

from refusaldir.cli import combos
from refusaldir.cli.common import ModelOptions, check_writable, err, out, print_json
from refusaldir.cli.outputs import check_apart
from refusaldir.errors import ConfigError
from refusaldir.io import prepare_out
from refusaldir.optimize import load_member, parse_member
from refusaldir.steer import PROVENANCE_FILE, save_edited

__all__ = ["export_member"]


def export_member(mo: ModelOptions, out_dir: Path, directions: Path | None, edit: str, layer: int | None,
                   pos: int | None, force: bool, allow_model_mismatch: bool, as_json: bool) -> None:
    """``orthogonalize --edit front.json#N``: every check before the model loads."""
    if layer is not None or pos is not None:
        raise ConfigError("--layer/--pos choose the rank-1 direction; a --edit front member carries its own "
                          "directions and strengths, so drop --layer/--pos")
    parse_member(edit)  # the file and the index, before anything else
    prepare_out(out_dir.expanduser(), force)
    check_writable(out_dir)
    ds = combos.read_directions(directions, "orthogonalize --edit")
    check_apart(out_dir, directions, example="ortho")
    member_edit, member = load_member(edit, ds)
    cm = mo.load()
    ds.check_model(cm, strict_hash=not allow_model_mismatch)
    with err.status(f"writing {out_dir} …"):
        folder = save_edited(cm, member_edit, out_dir, directions=ds, numbers=member, force=force)
    info = json.loads((folder / PROVENANCE_FILE).read_text())
    if as_json:
        print_json({"out": str(folder), **info})
        return
    out.print(f"wrote {folder} ({len(info['edited_parameters'])} parameters edited; front member "
              f"trial {member['trial']}: {member['describe']})", highlight=False)
    out.print(f"load it with transformers.AutoModelForCausalLM.from_pretrained({str(folder)!r})")
