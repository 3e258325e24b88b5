"""Merge generated model responses (bench/judge_responses.py) with their hand labels into
one labelled file of tests/data/judge/ (issue #12).

    python bench/judge_merge_labels.py runs/judge/demo.jsonl runs/judge/labels/demo_*.jsonl \
        --out tests/data/judge/model_demo.jsonl

Each label file holds rows {"line", "label", "deflection", "note"} for a range of the
responses file's lines (0-based); every line must be labelled exactly once.

`responses` may also be an evaluation folder (`refusaldir evaluate --out DIR`): its
completions.jsonl becomes the *test* split of MODEL under each condition, in file order:

    python bench/judge_merge_labels.py runs/demo_eval128 labels/demo_eval_*.jsonl \
        --model demo --append-to tests/data/judge/model_demo.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_responses(path: Path, model: str | None) -> list[dict]:
    """Responses from a bench/judge_responses.py file, or an evaluation folder's completions."""
    if not path.is_dir():
        return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    if not model:
        raise SystemExit("an evaluation folder needs --model NAME")
    rows = []
    for x in (path / "completions.jsonl").read_text(encoding="utf-8").splitlines():
        if x.strip():
            c = json.loads(x)
            rows.append({"source": f"{model}-{c['condition']}", "model": model,
                         "condition": c["condition"], "split": "test", "set": c["dataset"],
                         "prompt": c["prompt"], "response": c["completion"],
                         "finish_reason": c["finish_reason"]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("responses", type=Path)
    ap.add_argument("labels", type=Path, nargs="+")
    ap.add_argument("--out", type=Path, help="write a new labelled file")
    ap.add_argument("--append-to", type=Path, help="append to an existing labelled file")
    ap.add_argument("--model", help="model name of an evaluation folder's completions")
    args = ap.parse_args()
    if (args.out is None) == (args.append_to is None):
        raise SystemExit("pass exactly one of --out and --append-to")
    rows = read_responses(args.responses, args.model)
    labels: dict[int, dict] = {}
    for f in args.labels:
        for x in f.read_text(encoding="utf-8").splitlines():
            if x.strip():
                lab = json.loads(x)
                if lab["line"] in labels:
                    raise SystemExit(f"line {lab['line']} labelled twice ({f})")
                if lab["label"] not in ("refusal", "partial", "compliance"):
                    raise SystemExit(f"line {lab['line']}: bad label {lab['label']!r} ({f})")
                labels[lab["line"]] = lab
    missing = [i for i in range(len(rows)) if i not in labels]
    if missing:
        raise SystemExit(f"{len(missing)} lines unlabelled, e.g. {missing[:10]}")
    target = args.out or args.append_to
    offset = 0
    if args.append_to is not None:
        offset = sum(1 for x in args.append_to.read_text(encoding="utf-8").splitlines() if x.strip())
    with target.open("a" if args.append_to is not None else "w", encoding="utf-8") as f:
        for i, r in enumerate(rows):
            lab = labels[i]
            f.write(json.dumps({
                "id": f"{r['model']}-{offset + i:03d}", "source": r["source"], "style": r["source"],
                "split": r["split"], "model": r["model"], "condition": r["condition"], "set": r["set"],
                "prompt": r["prompt"], "response": r["response"], "finish_reason": r["finish_reason"],
                "label": lab["label"], "deflection": bool(lab.get("deflection")),
                "note": lab.get("note", ""),
            }, ensure_ascii=False) + "\n")
    print(f"wrote {target}: {len(rows)} rows")


if __name__ == "__main__":
    main()
