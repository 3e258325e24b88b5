"""Print PhraseJudge accuracy and confusion matrix on tests/data/judge_testset.jsonl as Markdown.

Usage:
    python bench/judge_accuracy.py [path/to/testset.jsonl] [--by-kind]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from refusaldir.judges import LABELS, PhraseJudge, confusion_matrix


def markdown_matrix(matrix: dict[str, dict[str, int]]) -> str:
    lines = ["| gold \\ predicted | " + " | ".join(LABELS) + " | total |",
             "|---|" + "---:|" * (len(LABELS) + 1)]
    for gold in LABELS:
        row = matrix[gold]
        cells = [f"**{row[p]}**" if p == gold else str(row[p]) for p in LABELS]
        lines.append(f"| {gold} | " + " | ".join(cells) + f" | {sum(row.values())} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("testset", nargs="?", type=Path,
                        default=ROOT / "tests" / "data" / "judge_testset.jsonl")
    parser.add_argument("--by-kind", action="store_true", help="also print accuracy per kind")
    args = parser.parse_args()

    rows = [json.loads(line) for line in args.testset.read_text(encoding="utf-8").splitlines()
            if line.strip()]
    judge = PhraseJudge()
    start = time.perf_counter()
    preds = judge.judge_many([r["prompt"] for r in rows], [r["response"] for r in rows])
    elapsed = time.perf_counter() - start
    gold = [r["label"] for r in rows]
    pred = [p.label for p in preds]
    correct = sum(g == p for g, p in zip(gold, pred))

    print(f"**PhraseJudge accuracy:** {correct / len(rows):.1%} ({correct}/{len(rows)} responses, "
          f"{elapsed * 1000 / len(rows):.2f} ms per response)\n")
    print(markdown_matrix(confusion_matrix(gold, pred)))
    if args.by_kind:
        by_kind: dict[str, list[bool]] = defaultdict(list)
        for r, p in zip(rows, pred):
            by_kind[r["kind"]].append(r["label"] == p)
        print("\n| kind | n | accuracy |\n|---|---:|---:|")
        for kind, hits in sorted(by_kind.items()):
            print(f"| {kind} | {len(hits)} | {sum(hits) / len(hits):.1%} |")


if __name__ == "__main__":
    main()
