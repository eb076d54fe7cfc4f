"""A tuning split of a held-out manifest: its voices, none of the reported clips' sentences.

    python -m modality.speech.corpus.dev_split data_cache/speech_long/eval.jsonl --skip 100 --n 100 --out data_cache/speech_long/eval_dev.jsonl

Why: decoder weights (eval.lexicon.ngram_weight, word_score, llm_weight) tuned on the clips they are reported on
would flatter the result, and the training voices (val.jsonl) are easier than held-out ones (greedy phoneme
error 13.9 % vs 21.5 % at step 500), so weights tuned there trust the recognizer too much. This takes the
manifest's first ``skip`` clips as the reported set and returns ``n`` later clips, one per sentence, whose
sentence none of those has. The rows keep their relative audio paths, so write the file beside the manifest.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from data.jsonl import read_jsonl


def dev_split(rows: list[dict], skip: int, n: int) -> list[dict]:
    reported = {r["text"] for r in rows[:skip]}
    seen: set[str] = set()
    out = []
    for r in rows[skip:]:
        if r["text"] in reported or r["text"] in seen:
            continue
        seen.add(r["text"])
        out.append(r)
        if len(out) == n:
            break
    if len(out) < n:
        raise ValueError(f"only {len(out)} clips with new sentences after the first {skip} (asked for {n})")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("manifest")
    ap.add_argument("--skip", type=int, default=100, help="the reported clips: the first N of the manifest")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    try:
        rows = read_jsonl(args.manifest)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    dev = dev_split(rows, args.skip, args.n)
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in dev))
    print(f"{args.out}: {len(dev)} clips, sentences disjoint from the first {args.skip} of {args.manifest}")


if __name__ == "__main__":
    main()
