"""Which reference words a transcript got right, by how often the training text had them.

``python -m modality.speech.asr.word_recall <run>/predictions.jsonl --train <train.jsonl> [--train ...] [--field ctc_readout]``

Why: a WER says how wrong, not why. A recognizer that learned the sounds spells a word it never trained
on about as well as a frequent one; one that learned its training sentences gets frequent words and
misses the rest. Recall per frequency band of the training manifests tells the two apart (and whether
more training TEXT or more ACOUSTIC generalisation is what a run lacks).
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from modality.speech.records import read_speech_records
from data.jsonl import read_jsonl
from tasks.evaluate import WER_TYPES, normalize

BANDS: tuple[tuple[str, int, int], ...] = (
    ("0", 0, 0), ("1-3", 1, 3), ("4-19", 4, 19), ("20-99", 20, 99), ("100+", 100, 10**12))


def matched_positions(ref: Sequence[str], hyp: Sequence[str]) -> set[int]:
    """Indices of ``ref`` words marked correct by a minimum-edit alignment with ``hyp`` (of those,
    the one with the most matches: "a b" vs "b a" is two edits either way, and one word is right)."""
    n, m = len(ref), len(hyp)
    # d[i][j]: (edits, -matches) between ref[:i] and hyp[:j], compared lexicographically
    d = [[(i + j, 0) if i == 0 or j == 0 else (0, 0) for j in range(m + 1)] for i in range(n + 1)]
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            e, h = d[i - 1][j - 1]
            diag = (e, h - 1) if ref[i - 1] == hyp[j - 1] else (e + 1, h)
            d[i][j] = min(diag, (d[i - 1][j][0] + 1, d[i - 1][j][1]), (d[i][j - 1][0] + 1, d[i][j - 1][1]))
    hits: set[int] = set()
    i, j = n, m
    while i > 0 and j > 0:  # backtrace along the chosen optimum
        e, h = d[i - 1][j - 1]
        if ref[i - 1] == hyp[j - 1] and d[i][j] == (e, h - 1):
            hits.add(i - 1)
            i, j = i - 1, j - 1
        elif d[i][j] == (e + 1, h):
            i, j = i - 1, j - 1
        elif d[i][j] == (d[i - 1][j][0] + 1, d[i - 1][j][1]):
            i -= 1
        else:
            j -= 1
    return hits


def training_counts(manifests: Iterable[str | Path]) -> Counter:
    """Normalized word counts over what the training records teach: a NeMo line's transcript, a
    conversation's answer turns."""
    counts: Counter = Counter()
    for path in manifests:
        for rec in read_speech_records(path):
            turns = [t["value"] for t in rec["conversations"] if t["from"] in ("gpt", "assistant")]
            counts.update(normalize(rec.get("reference") or " ".join(turns)))
    return counts


def recall_by_band(rows: Iterable[dict], counts: Counter, field: str = "prediction") -> dict[str, dict]:
    """Per band: reference words, how many the ``field`` transcript got right, and that recall."""
    tot: Counter = Counter()
    hit: Counter = Counter()
    for row in rows:
        if row.get("type") not in WER_TYPES or row.get(field) is None:
            continue
        ref = normalize(row.get("reference") or "")
        ok = matched_positions(ref, normalize(row[field]))
        for i, w in enumerate(ref):
            band = next(name for name, lo, hi in BANDS if lo <= counts[w] <= hi)
            tot[band] += 1
            hit[band] += i in ok
    return {name: {"words": tot[name], "correct": hit[name],
                   "recall": round(hit[name] / tot[name], 4) if tot[name] else None}
            for name, _, _ in BANDS}


def main(argv: list[str] | None = None) -> dict[str, dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("predictions", help="predictions.jsonl written by stage=evaluate")
    p.add_argument("--train", action="append", required=True, help="a training manifest (repeatable)")
    p.add_argument("--field", default="prediction", help="prediction (the LLM) or ctc_readout (the adaptor)")
    args = p.parse_args(argv)
    rows = read_jsonl(args.predictions)
    out = recall_by_band(rows, training_counts(args.train), args.field)
    total = sum(b["words"] for b in out.values())
    print(f"{args.field} of {args.predictions}: {total} reference words")
    for name, b in out.items():
        share = b["words"] / total if total else 0.0
        rec = "-" if b["recall"] is None else f"{b['recall']:.0%}"
        print(f"  words seen {name:>5} times in training: {b['words']:5d} ({share:4.0%} of all), recall {rec}")
    return out


if __name__ == "__main__":
    main()
