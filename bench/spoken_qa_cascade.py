"""The cascade baselines for spoken questions: transcribe the clip, then ask the LLM the transcript typed.

    python -m bench.spoken_qa_cascade data_cache/speech_qa --whisper --transcripts own=<evaluate run>/predictions.jsonl

Why: the speech model answers a spoken question in one pass (behaviour alignment: its target is the LLM's own answer
to the question typed, `make data-qa`); a cascade is what a user could build instead. Each cascade's answers are
scored as the model's are (tasks.evaluate.rouge_l and exact match against the typed-question answer, the held-out
questions and voices of qa_eval.json), with its transcripts' WER beside them. Transcribers: ``--whisper`` (Whisper
tiny.en's own decoder, the packaged weights) and any ``name=predictions.jsonl`` of
``python train.py stage=evaluate modality=speech init_from=<model> data.eval_manifest=<dir>/qa_eval_clips.jsonl``
(the model's own transcripts of the same clips). Answers are cached beside the data (cascade_answers.jsonl).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from data.jsonl import read_jsonl
from modality.speech.audio import load_audio
from modality.speech.corpus.questions import typed_answers
from tasks.evaluate import normalize, rouge_l, trim_repeats, wer


def whisper_transcripts(paths: list[Path], batch_size: int = 1) -> list[str]:
    """Whisper tiny.en's greedy transcripts (its own decoder and tokenizer), one clip at a time: a batched
    generate without an attention mask changes the transcripts."""
    from modality.speech.whisper_ct2 import find_packaged_whisper, load_ct2_processor, load_ct2_whisper

    src = find_packaged_whisper()
    model, proc = load_ct2_whisper(src).eval(), load_ct2_processor(src)
    out: list[str] = []
    for i in range(0, len(paths), batch_size):
        waves = [load_audio(p).numpy() for p in paths[i:i + batch_size]]
        feats = proc.feature_extractor(waves, sampling_rate=16000, return_tensors="pt").input_features
        with torch.no_grad():
            ids = model.generate(feats)
        out += [t.strip() for t in proc.tokenizer.batch_decode(ids, skip_special_tokens=True)]
    return [trim_repeats(t) for t in out]  # a decoding loop cut as the model's own transcripts are (tasks.evaluate)


def score(questions: list[str], transcripts: list[str], gold: list[str], answers: list[str]) -> dict[str, float]:
    return {"wer": round(wer(questions, transcripts), 4),
            "rouge_l": round(sum(map(rouge_l, gold, answers)) / len(gold), 4),
            "exact": round(sum(normalize(g) == normalize(a) for g, a in zip(gold, answers)) / len(gold), 4)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path, help="the make data-qa folder (qa_eval.json, qa_eval_clips.jsonl)")
    ap.add_argument("--whisper", action="store_true", help="cascade through Whisper tiny.en's decoder")
    ap.add_argument("--transcripts", action="append", default=[], metavar="NAME=PREDICTIONS",
                    help="an evaluate run's predictions.jsonl over qa_eval_clips.jsonl (repeatable)")
    ap.add_argument("--limit", type=int, default=None, help="the first N held-out questions only")
    args = ap.parse_args(argv)
    records = json.loads((args.data / "qa_eval.json").read_text())[:args.limit]
    clips = {row["qid"]: row for row in read_jsonl(args.data / "qa_eval_clips.jsonl")}
    rows = [clips[r["id"].removeprefix("qa-eval-")] for r in records]
    questions = [row["text"] for row in rows]
    gold = [r["conversations"][-1]["value"] for r in records]
    cache = args.data / "cascade_answers.jsonl"
    cascades: dict[str, list[str]] = {"typed (the question's own text)": questions}
    if args.whisper:
        t = time.perf_counter()
        cascades["whisper tiny.en -> LLM"] = whisper_transcripts([args.data / row["audio_filepath"] for row in rows])
        print(f"whisper tiny.en transcribed {len(rows)} clips in {time.perf_counter() - t:.0f} s")
    for spec in args.transcripts:
        name, _, path = spec.partition("=")
        preds = {str(p["id"]): p["prediction"] for p in read_jsonl(path)}
        missing = [row["id"] for row in rows if row["id"] not in preds]
        if missing:
            raise ValueError(f"{path}: no transcript for clip {missing[0]} ({len(missing)} missing; evaluate over "
                             f"{args.data / 'qa_eval_clips.jsonl'} with no data.max_eval_samples)")
        cascades[f"{name} -> LLM"] = [preds[row["id"]] for row in rows]
    print(f"| cascade ({len(rows)} held-out questions, held-out voices) | transcript WER | ROUGE-L F1 | exact |")
    print("|---|---|---|---|")
    results = {}
    for name, transcripts in cascades.items():
        answers = typed_answers(transcripts, cache_path=cache, batch_size=48)
        results[name] = score(questions, transcripts, gold, answers)
        m = results[name]
        print(f"| {name} | {100 * m['wer']:.1f} % | {m['rouge_l']:.3f} | {100 * m['exact']:.1f} % |")
    # what agreement is worth by chance: each question scored with the typed answer of the NEXT held-out question
    shifted = gold[1:] + gold[:1]
    chance = score(questions, [""] * len(gold), gold, shifted)
    print(f"| chance: another question's typed answer | - | {chance['rouge_l']:.3f} | {100 * chance['exact']:.1f} % |")
    print("cascade " + " ".join(f"{n.split(' ')[0]}:rouge_l={m['rouge_l']}" for n, m in results.items()))


if __name__ == "__main__":
    main()
