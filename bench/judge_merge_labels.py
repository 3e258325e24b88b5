"""Merge generated model responses (bench/judge_responses.py) with their hand labels into
one labelled file of tests/data/judge/ (issue #12).

    python bench/judge_merge_labels.py runs/judge/demo.jsonl runs/judge/labels/demo_*.jsonl \
        --out tests/data/judge/model_demo.jsonl

Each label file holds rows {"line", "label", "deflection", "note"} for a range of the
responses file's lines (0-based); every line must be labelled exactly once.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("responses", type=Path)
    ap.add_argument("labels", type=Path, nargs="+")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    rows = [json.loads(x) for x in args.responses.read_text(encoding="utf-8").splitlines() if x.strip()]
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
    with args.out.open("w", encoding="utf-8") as f:
        for i, r in enumerate(rows):
            lab = labels[i]
            f.write(json.dumps({
                "id": f"{r['model']}-{i:03d}", "source": r["source"], "style": r["source"],
                "split": r["split"], "model": r["model"], "condition": r["condition"], "set": r["set"],
                "prompt": r["prompt"], "response": r["response"], "finish_reason": r["finish_reason"],
                "label": lab["label"], "deflection": bool(lab.get("deflection")),
                "note": lab.get("note", ""),
            }, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}: {len(rows)} rows")


if __name__ == "__main__":
    main()
