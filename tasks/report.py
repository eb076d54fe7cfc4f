"""Summarise runs for a person: ``python -m tasks.report <run dir> [<run dir> ...]``."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

from data.jsonl import iter_jsonl

KEYS = ("steps", "first_loss_avg", "last_loss_avg", "seconds_per_step", "samples_per_second",
        "trainable_params", "total_params", "checkpoint_mb", "llm_mb", "skipped_samples")


def summarise(run: Path, examples: int = 5) -> str:
    m = json.loads((run / "metrics.json").read_text())
    lines = [f"== {run}  (stage={m.get('stage')}, modality={m.get('modality')}, llm={m.get('llm')})"]
    lines += [f"  {k:>20}: {m[k]}" for k in KEYS if m.get(k) is not None]
    for k in sorted(m):
        if k.startswith(("wer", "accuracy", "before/wer", "before/accuracy")):
            lines.append(f"  {k:>20}: {m[k]}")
    preds = run / "predictions.jsonl"
    if preds.exists():
        rows = [r for _, r in itertools.islice(iter_jsonl(preds), examples)]  # a bad line: named, file and line
        lines.append("  held-out examples:")
        for r in rows:
            lines.append(f"    [{r['type']}] ref: {r['reference']!r}\n{'':14}got: {r['prediction']!r}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    for arg in argv:
        print(summarise(Path(arg)))


if __name__ == "__main__":
    main(sys.argv[1:])
