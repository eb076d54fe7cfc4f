"""Transfer to real human speech: the speech model's transcripts next to Whisper tiny.en's own decoder, same clips.

    python -m modality.speech.corpus.real --out data_cache/speech_real        # the clips (a shipped recording)
    python train.py stage=evaluate modality=speech init_from=models/speech-smollm2-135m \\
        data.eval_manifest=data_cache/speech_real/eval.jsonl paths.output_dir=<run>
    python -m bench.real_speech data_cache/speech_real/eval.jsonl --predictions <run>/predictions.jsonl

Whisper tiny.en is the frozen encoder the speech model listens through, with the decoder it was trained with:
the goal (issue 19, item 4) is the model's WER within 2x of it. Last line: ``ratio <model WER / whisper WER>``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.spoken_qa_cascade import whisper_transcripts
from tasks.evaluate import wer


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("manifest", type=Path)
    ap.add_argument("--predictions", type=Path, default=None, help="an evaluate run's predictions.jsonl")
    args = ap.parse_args(argv)
    rows = [json.loads(x) for x in args.manifest.read_text().splitlines() if x.strip()]
    refs = [r["text"] for r in rows]
    whisper = whisper_transcripts([args.manifest.parent / r["audio_filepath"] for r in rows])
    w = wer(refs, whisper)
    print(f"whisper tiny.en (own decoder): WER {100 * w:.1f} % on {len(rows)} clips, "
          f"{sum(len(t.split()) for t in refs)} words")
    model = None
    if args.predictions:
        preds = {p["id"]: p for p in map(json.loads, args.predictions.read_text().splitlines())}
        missing = [r["id"] for r in rows if r["id"] not in preds]
        if missing:
            raise SystemExit(f"{args.predictions}: no prediction for {len(missing)} clip(s), e.g. {missing[0]}")
        hyps = [preds[r["id"]]["prediction"] for r in rows]
        model = wer(refs, hyps)
        print(f"speech model (the LLM's greedy transcript): WER {100 * model:.1f} %")
    print("\n| clip | reference | whisper tiny.en |" + (" model |" if model is not None else "") + "\n|---|---|---|"
          + ("---|" if model is not None else ""))
    for i, r in enumerate(rows):
        cells = [r["id"], r["text"], whisper[i]] + ([preds[r["id"]]["prediction"]] if model is not None else [])
        print("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    if model is not None:
        print(f"ratio {model / w:.2f}" if w else "ratio inf (whisper made no error)")


if __name__ == "__main__":
    main()
