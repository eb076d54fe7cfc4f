"""Build the synthetic speech data: align manifests (ASR) and instruct conversations.

    python -m modality.speech.corpus.build --out data_cache/speech --n-align 3000 --n-instruct 800 --jobs 2

Writes under --out: train.jsonl / val.jsonl / eval.jsonl (NeMo manifests; eval = held-out
voices), arith_train.jsonl / arith_eval.jsonl (spoken arithmetic clips),
instruct_train.json / instruct_eval.json (conversations), wavs/ (16 kHz mono). Re-running
reuses every clip whose parameters are unchanged.

    python -m modality.speech.corpus.build --out data_cache/speech_wordnet --wordnet-train 24000

writes only train.jsonl: WordNet example sentences (never a held-out fortune sentence) in the
training voices, extra training text for the long alignment recipe.

    python -m modality.speech.corpus.build --out data_cache/speech_text --text-train 60000

writes only train.jsonl of text-only lines (no audio): reading practice for the LLM (asr.text_reading).

    python -m modality.speech.corpus.build --out data_cache/speech_qa --questions 2000 --n-qa-eval 200 --qa-text 8000 --jobs 1

writes only the spoken-question data (modality.speech.corpus.questions): questions.jsonl, qa_train_text.json
(text-only speech refs), qa_train.json + qa_train_clips.jsonl (training voices), qa_eval.json + qa_eval_clips.jsonl
(held-out questions, held-out voices); the targets are the base LLM's own answers to the typed questions.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import sys
import time
from pathlib import Path

from modality.speech.corpus.sentences import load_sentences, split_sentences, wordnet_examples
from modality.speech.corpus.conversations import (
    expected_arithmetic,
    make_conversations,
    make_problem,
)
from data.jsonl import read_jsonl
from modality.speech.corpus import questions as Q
from modality.speech.corpus.tts import (
    build_corpus,
    plan_split,
    prune,
    render,
    sample_spec,
    split_voices,
    write_manifest,
)


def write_records(path: Path, records: list[dict]) -> None:
    """JSON list, one record per line (readable, diff-able), written atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n")
    os.replace(tmp, path)


def build_align(out: Path, n_align: int, jobs: int, seed: int) -> dict:
    """Sentences -> TTS corpus manifests (train/val/eval)."""
    pools = split_sentences(load_sentences(seed=seed))
    return build_corpus(out, n_align, pools, jobs=jobs, seed=seed)


def build_wordnet_train(out: Path, n: int, jobs: int, seed: int, part: str = "examples") -> dict:
    """``n`` training clips of WordNet text (one per sentence up to their count), training voices.

    ``part``: examples | definitions (see :func:`modality.speech.corpus.sentences.wordnet_examples`).
    """
    pools = split_sentences(load_sentences(seed=seed))
    texts = wordnet_examples(seed=seed, exclude=pools["eval"] + pools["val"], part=part)
    voices, variants = split_voices()["train"]
    name = "wordnet" if part == "examples" else f"wordnet-{part}"
    specs = plan_split(texts, n, name, seed, voices, variants)
    rows, errors = render(specs, out, f"wavs/{name}", "train", jobs, previous=out / "train.jsonl")
    write_manifest(out / "train.jsonl", rows)
    return {"train": len(rows), "sentences": len(texts), "failed": len(errors), "errors": errors[:3],
            "pruned": prune(out, f"wavs/{name}", rows), "hours": round(sum(r["duration"] for r in rows) / 3600, 3)}


def build_text_train(out: Path, n: int, seed: int) -> dict:
    """``n`` text-only transcription lines (``"from_text": true``, no audio: modality.speech.asr.text_reading):
    the fortune train pool, then WordNet's examples and definitions, never a held-out sentence."""
    pools = split_sentences(load_sentences(seed=seed))
    held = pools["eval"] + pools["val"]
    texts = list(dict.fromkeys(pools["train"] + wordnet_examples(seed=seed, exclude=held)
                               + wordnet_examples(seed=seed, exclude=held, part="definitions")))
    rows = [{"id": f"text-{i:06d}", "text": t, "from_text": True} for i, t in enumerate(texts[:n])]
    write_manifest(out / "train.jsonl", rows)
    return {"train": len(rows), "sentences": len(texts)}


def build_instruct(out: Path, n_train: int, n_eval: int, jobs: int, seed: int) -> dict:
    """Spoken-arithmetic clips + conversations over the align clips (eval over held-out voices)."""
    stats: dict = {"failed": 0, "errors": []}
    voices = split_voices()
    arith_rows_all = []
    for split, n, manifest in (("train", n_train, "train.jsonl"), ("eval", n_eval, "eval.jsonl")):
        if not (out / manifest).exists():
            raise FileNotFoundError(f"{out / manifest} is missing: build the align manifests first")
        pool = read_jsonl(out / manifest)
        k = expected_arithmetic(n, seed, split)
        problems = [make_problem(random.Random(f"{seed}:arith:{split}:{i}")) for i in range(k)]
        specs = [sample_spec(p.text, random.Random(f"{seed}:arith-voice:{split}:{i}"), *voices[split]) for i, p in enumerate(problems)]
        rows, errors = render(specs, out, f"wavs/arith/{split}", split, jobs, extras=[{"answer": p.answer} for p in problems],
                              previous=out / f"arith_{split}.jsonl")
        write_manifest(out / f"arith_{split}.jsonl", rows)
        arith_rows_all += rows
        stats["failed"] += len(errors)
        stats["errors"] += errors[:3]
        records = make_conversations(pool, rows, n, seed, split, max_followups=2 if split == "train" else 0)
        write_records(out / f"instruct_{split}.json", records)
        stats[f"instruct_{split}"] = len(records)
        stats[f"arith_{split}"] = len(rows)
        stats[f"types_{split}"] = dict(sorted(collections.Counter(r["type"] for r in records).items()))
    stats["pruned"] = prune(out, "wavs/arith", arith_rows_all)
    return stats


def build_qa(out: Path, n_audio: int, n_eval: int, n_text: int, jobs: int, seed: int, sources: Path | None = None,
             llm: str = "smollm2-135m-instruct", max_new_tokens: int = 48, batch_size: int = 16) -> dict:
    """Spoken questions whose targets are the LLM's typed answers; only the questions used are answered."""
    wheels = Q.ensure_wheels(sources or out / "sources")
    questions, read = Q.load_questions(wheels, seed=seed)
    cache = out / "typed_answers.jsonl"

    def answer(texts: list[str]) -> list[str]:
        return Q.typed_answers(texts, llm_name=llm, max_new_tokens=max_new_tokens, batch_size=batch_size, cache_path=cache)

    train, empty_train = Q.answered(Q.ordered(questions, "train", seed), max(n_text, n_audio), answer)
    evals, empty_eval = Q.answered(Q.ordered(questions, "eval", seed), n_eval, answer)
    answers = {q.id: a for q, a in train + evals}
    write_manifest(out / "questions.jsonl", (Q.question_row(q, answers.get(q.id)) for q in questions))
    write_records(out / "qa_train_text.json", [Q.qa_record(q, a, {"text": q.question}, f"qa-text-{q.id}") for q, a in train[:n_text]])
    stats: dict = {"failed": 0, "errors": [], "empty": empty_train + empty_eval, "read": read, "text": min(n_text, len(train)),
                   "pool": collections.Counter((q.source, q.split) for q in questions), "used": collections.Counter()}
    rows_all: list[dict] = []
    for split, pairs in (("train", train[:n_audio]), ("eval", evals)):
        voices, variants = split_voices()[split]
        specs = [sample_spec(q.question, random.Random(f"{seed}:qa:{split}:{i}"), voices, variants) for i, (q, _) in enumerate(pairs)]
        rows, errors = render(specs, out, f"wavs/qa/{split}", split, jobs, extras=[{"qid": q.id, "source": q.source} for q, _ in pairs],
                              previous=out / f"qa_{split}_clips.jsonl")
        write_manifest(out / f"qa_{split}_clips.jsonl", rows)
        by_id = {q.id: (q, a) for q, a in pairs}
        records = [Q.qa_record(*by_id[r["qid"]], r["audio_filepath"], f"qa-{split}-{r['qid']}") for r in rows]
        write_records(out / f"qa_{split}.json", records)
        stats[split] = len(records)
        stats["failed"] += len(errors)
        stats["errors"] += errors[:3]
        stats["used"].update((q.source, split) for q, _ in pairs)
        rows_all += rows
    stats["used"].update((q.source, "text") for q, _ in train[:n_text])
    stats["pruned"] = prune(out, "wavs/qa", rows_all)
    return stats


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("data_cache/speech"))
    p.add_argument("--n-align", type=int, default=3000, help="align clips in all (train+val+eval)")
    p.add_argument("--n-instruct", type=int, default=800, help="instruct training conversations")
    p.add_argument("--n-instruct-eval", type=int, default=None, help="eval conversations (default n-instruct/4)")
    p.add_argument("--jobs", type=int, default=2, help="parallel espeak-ng processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--align-only", action="store_true", help="build only the align manifests (e.g. a larger corpus for speech_align_long)")
    p.add_argument("--wordnet-train", type=int, default=0, metavar="N",
                   help="build ONLY a train.jsonl of N clips of WordNet text (apt: wordnet-base)")
    p.add_argument("--text-train", type=int, default=0, metavar="N",
                   help="write ONLY a train.jsonl of N text-only transcription lines (no audio; reading practice)")
    p.add_argument("--wordnet-part", choices=("examples", "definitions"), default="examples",
                   help="with --wordnet-train: the glosses' example sentences or their definitions")
    p.add_argument("--questions", type=int, default=0, metavar="N",
                   help="build ONLY the spoken-question data, N training clips (see modality.speech.corpus.questions)")
    p.add_argument("--tone", type=int, default=0, metavar="N",
                   help="only N more training conversations about the voice (instruct_tone_train.json; no new audio)")
    p.add_argument("--qa-text", type=int, default=0, metavar="N", help="with --questions: N text-only training questions")
    p.add_argument("--n-qa-eval", type=int, default=200, metavar="N", help="with --questions: N held-out spoken questions")
    p.add_argument("--qa-llm", default="smollm2-135m-instruct", help="the LLM whose typed answers are the targets")
    p.add_argument("--qa-max-new-tokens", type=int, default=48)
    p.add_argument("--qa-batch-size", type=int, default=16)
    p.add_argument("--sources", type=Path, default=None, help="folder with the source wheels (default <out>/sources)")
    return p.parse_args(argv)


# how the voice sounds, comparisons twice as often: two clips' tone positions compared is what instruct saw least
TONE_WEIGHTS = {"pitch": 1.0, "speed": 1.0, "gender": 0.5, "accent_region": 0.5, "compare_pitch": 2.0,
                "compare_speed": 2.0}


def build_tone(out: Path, n: int, seed: int) -> dict:
    """``n`` more training conversations about the voice only (TONE_WEIGHTS), over the align training clips
    already built: no new audio. Ids ``tone-NNNNNN``; a different draw than instruct_train.json."""
    if not (out / "train.jsonl").exists():
        raise FileNotFoundError(f"{out / 'train.jsonl'} is missing: build the align manifests first")
    records = make_conversations(read_jsonl(out / "train.jsonl"), [], n, seed, "tone", weights=TONE_WEIGHTS)
    write_records(out / "instruct_tone_train.json", records)
    return dict(sorted(collections.Counter(r["type"] for r in records).items()))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    n_eval = args.n_instruct_eval if args.n_instruct_eval is not None else max(1, args.n_instruct // 4)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.questions or args.qa_text:
        qa = build_qa(args.out, args.questions, args.n_qa_eval, args.qa_text, args.jobs, args.seed, args.sources,
                      args.qa_llm, args.qa_max_new_tokens, args.qa_batch_size)
        for name, c in qa["read"].items():
            print(f"  {name:14s} read {c['read']}, kept {c['kept']}, unspeakable {c['unspeakable']}, duplicate {c['duplicate']}")
        for name in qa["read"]:
            pool, used = qa["pool"], qa["used"]
            print(f"  {name:14s} pool train {pool[name, 'train']} / eval {pool[name, 'eval']}; "
                  f"used text {used[name, 'text']}, train audio {used[name, 'train']}, eval audio {used[name, 'eval']}")
        print(f"spoken QA: {qa['text']} text-only, {qa['train']} train clips, {qa['eval']} eval clips; "
              f"{qa['empty']} empty answers dropped, {qa['failed']} skipped (espeak failed), {qa['pruned']} stale removed, "
              f"{time.perf_counter() - t0:.1f}s")
        for e in qa["errors"]:
            print(f"  skipped: {e}", file=sys.stderr)
        return 0
    if args.tone:
        types = build_tone(args.out, args.tone, args.seed)
        print(f"tone conversations: {sum(types.values())} ({types}) -> {args.out / 'instruct_tone_train.json'}, "
              f"{time.perf_counter() - t0:.1f}s")
        return 0
    if args.text_train:
        got = build_text_train(args.out, args.text_train, args.seed)
        print(f"text-only train: {got['train']} lines of {got['sentences']} sentences, {time.perf_counter() - t0:.1f}s")
        return 0
    if args.wordnet_train:
        wn = build_wordnet_train(args.out, args.wordnet_train, args.jobs, args.seed, args.wordnet_part)
        print(f"wordnet {args.wordnet_part} train: {wn['train']} clips of {wn['sentences']} sentences ({wn['hours']} h audio), "
              f"{wn['failed']} skipped (espeak failed), {wn['pruned']} stale removed, {time.perf_counter() - t0:.1f}s")
        for e in wn["errors"]:
            print(f"  skipped: {e}", file=sys.stderr)
        return 0
    align = build_align(args.out, args.n_align, args.jobs, args.seed)
    t1 = time.perf_counter()
    print(f"align: train {align['train']}, val {align['val']}, eval {align['eval']} clips "
          f"({align['hours']} h audio), {align['failed']} skipped (espeak failed), "
          f"{align['pruned']} stale removed, {t1 - t0:.1f}s")
    for e in align["errors"]:
        print(f"  skipped: {e}", file=sys.stderr)
    if args.align_only:
        return 0
    inst = build_instruct(args.out, args.n_instruct, n_eval, args.jobs, args.seed)
    t2 = time.perf_counter()
    print(f"instruct: train {inst['instruct_train']}, eval {inst['instruct_eval']} conversations; "
          f"arithmetic clips train {inst['arith_train']}, eval {inst['arith_eval']}, "
          f"{inst['failed']} skipped (espeak failed), {t2 - t1:.1f}s")
    print(f"types train: {inst['types_train']}")
    print(f"types eval:  {inst['types_eval']}")
    for e in inst["errors"]:
        print(f"  skipped: {e}", file=sys.stderr)
    print(f"wrote {args.out} in {t2 - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
