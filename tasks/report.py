"""Summarise runs for a person: ``python -m tasks.report <run dir> [<run dir> ...]``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from data.jsonl import iter_jsonl

KEYS = ("steps", "first_loss_avg", "last_loss_avg", "seconds_per_step", "samples_per_second",
        "trainable_params", "total_params", "checkpoint_mb", "llm_mb", "skipped_samples")


def examples_by_type(rows: list[dict], n: int) -> list[dict]:
    """Up to ``n`` prediction rows, one per question type first (in file order), then the rest: a person reads one
    answer of each kind before a second of any."""
    firsts, rest, seen = [], [], set()
    for r in rows:
        (rest if r.get("type") in seen else firsts).append(r)
        seen.add(r.get("type"))
    return (firsts + rest)[:n]


def summarise(run: Path, examples: int = 8) -> str:
    m = json.loads((run / "metrics.json").read_text())
    lines = [f"== {run}  (stage={m.get('stage')}, modality={m.get('modality')}, llm={m.get('llm')})"]
    lines += [f"  {k:>20}: {m[k]}" for k in KEYS if m.get(k) is not None]
    for k in sorted(m):
        if k.startswith(("wer", "accuracy", "before/wer", "before/accuracy")):
            lines.append(f"  {k:>20}: {m[k]}")
    preds = run / "predictions.jsonl"
    if preds.exists():
        rows = examples_by_type([r for _, r in iter_jsonl(preds)], examples)  # a bad line: named, file and line
        lines.append("  held-out examples:")
        for r in rows:
            lines.append(f"    [{r['type']}] ref: {r['reference']!r}\n{'':14}got: {r['prediction']!r}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    for arg in argv:
        print(summarise(Path(arg)))


if __name__ == "__main__":
    main(sys.argv[1:])
