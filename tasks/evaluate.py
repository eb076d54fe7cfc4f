"""Evaluation: greedy generation over any record file, WER for transcripts, accuracy per question type."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Iterable

import torch
from tqdm.auto import tqdm

WER_TYPES = {"asr", "transcribe", "repeat"}
_NUM_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty".split())}


def normalize(text: str) -> list[str]:
    """Lowercase words without punctuation; number words up to twenty become digits."""
    words = re.sub(r"[^a-z0-9' ]+", " ", text.lower().replace("-", " ")).split()
    return [_NUM_WORDS.get(w.strip("'"), w.strip("'")) for w in words if w.strip("'")]


def edit_distance(ref: list[str], hyp: list[str]) -> int:
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def wer(refs: Iterable[str], hyps: Iterable[str]) -> float:
    """Corpus WER: total word edits / total reference words (can exceed 1)."""
    errors = words = 0
    for r, h in zip(refs, hyps):
        rw = normalize(r)
        errors += edit_distance(rw, normalize(h))
        words += len(rw)
    return errors / max(1, words)


def trim_repeats(text: str, min_copies: int = 3, max_period: int = 8) -> str:
    """Cut a decoding loop: a tail that repeats one block of 1..``max_period`` words ``min_copies``+ times
    (the last copy may be cut short by max_new_tokens) keeps one copy. Why: greedy decoding of a
    half-trained model can loop until max_new_tokens ("are verifiable and are verifiable and ...", or
    hyphen-joined: "tony-troubled-troubled-..."), and each loop adds dozens of insertions to the WER, as
    Whisper's compression-ratio check guards against. Both scores are reported (``wer`` on trimmed, ``wer_raw`` on raw predictions)."""
    words = re.findall(r"[\s-]*[^\s-]+[\s-]*", text)  # each word with its separators: "a-b-b-b" loops too
    keys = [re.sub(r"[^a-z0-9']", "", w.lower()) for w in words]
    best = len(words)
    for end in (len(keys), len(keys) - 1):  # the last word may be cut off mid-copy
        for n in range(1, max_period + 1):
            run = 0  # how many trailing positions (before ``end``) agree with the position n earlier
            for i in range(end - 1, n - 1, -1):
                if keys[i] != keys[i - n]:
                    break
                run += 1
            start = end - run - n  # the loop's first copy starts here
            if run + n >= min_copies * n and start + n < best:
                best = start + n
    return text if best == len(words) else "".join(words[:best]).strip(" -\t\n")


def answer_correct(reference: str, prediction: str) -> bool:
    """The reference's words appear, in order and contiguous, in the prediction."""
    ref, hyp = normalize(reference), normalize(prediction)
    if not ref:
        return not hyp
    return any(hyp[i:i + len(ref)] == ref for i in range(len(hyp) - len(ref) + 1))


def score(types: list[str], refs: list[str], preds: list[str]) -> dict[str, float]:
    """WER over transcript-type samples; accuracy per other question type and overall."""
    by_type: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for t, r, p in zip(types, refs, preds):
        by_type[t].append((r, p))
    out: dict[str, float] = {}
    wer_pairs = [rp for t in WER_TYPES for rp in by_type.get(t, [])]
    if wer_pairs:
        out["wer"] = round(wer([r for r, _ in wer_pairs], [p for _, p in wer_pairs]), 4)
    acc_total = acc_n = 0
    for t, pairs in sorted(by_type.items()):
        if t in WER_TYPES:
            continue
        hits = sum(answer_correct(r, p) for r, p in pairs)
        out[f"accuracy/{t}"] = round(hits / len(pairs), 4)
        acc_total += hits
        acc_n += len(pairs)
    if acc_n:
        out["accuracy"] = round(acc_total / acc_n, 4)
    out["eval_samples"] = len(refs)
    return out


@torch.no_grad()
def run_generation(model, loader, max_new_tokens: int, predictions_path: Path | None = None,
                   desc: str = "evaluate", decode=None, progress: bool = True) -> dict[str, float]:
    """Generate for every batch of ``loader`` (collator in generate mode); score and save predictions.

    A model whose chain trained CTC classes also reports the adaptor's own greedy spelling (``ctc_wer``,
    ``ctc_readout`` per row): what the speech says before the LLM reads it. ``decode`` (a
    modality.speech.asr.decode.DecodeSpec): beam search and joint CTC/LLM rescoring of transcripts; each rescored row
    then keeps its scored ``candidates``.

    Under FSDP2 (llm.sharding.gathered) every rank runs it over the same loader, in step; give
    ``predictions_path`` and ``progress`` on rank 0 only."""
    from llm.sharding import gathered

    with gathered(model):
        return _run_generation(model, loader, max_new_tokens, predictions_path, desc, decode, progress)


def _run_generation(model, loader, max_new_tokens, predictions_path, desc, decode, progress) -> dict[str, float]:
    from modality.speech.asr.decode import DecodeSpec, joint_decode

    was_training = model.training
    model.eval()
    types, refs, preds, rows, skipped = [], [], [], [], []
    spelled: list[tuple[str, str]] = []  # (reference, CTC readout) of transcript samples, when the chain has one
    phonemes = getattr(model, "ctc_phonemes", None)  # a phoneme chain's readout is phonemes: counted as PER
    for batch in tqdm(loader, desc=desc, leave=False, disable=not progress):
        skipped += batch["skipped"]
        if batch["input_ids"].shape[0] == 0:
            continue
        batch = _to_device(batch, model.device)
        if hasattr(model, "ctc_readout"):  # a MultimodalLM: the adaptor runs once for answer and readout
            outs, readouts, cands = joint_decode(model, batch, max_new_tokens, decode or DecodeSpec(), WER_TYPES)
        else:
            outs = model.generate(batch, max_new_tokens=max_new_tokens)
            readouts = cands = [None] * len(outs)
        for i, (t, r, p, c, cand) in enumerate(zip(batch["types"], batch["references"], outs, readouts, cands)):
            types.append(t)
            refs.append(r or "")
            preds.append(p)
            trimmed = trim_repeats(p)
            rows.append({"id": batch["ids"][i], "type": t, "reference": r, "prediction": trimmed,
                         **({"raw_prediction": p} if trimmed != p else {}),
                         **({"phoneme_readout" if phonemes else "ctc_readout": c} if c is not None else {}),
                         **({"candidates": cand} if cand is not None else {})})
            if c is not None and t in WER_TYPES:
                spelled.append((r or "", c))
    model.train(was_training)
    metrics = score(types, refs, [trim_repeats(p) for p in preds])
    if "wer" in metrics:
        metrics["wer_raw"] = score(types, refs, preds)["wer"]
    if spelled and phonemes:  # the adaptor's own phonemes vs espeak-ng's for the reference
        ref_ph = [model.phonemizer([r])[0] if normalize(r) else [] for r, _ in spelled]
        errors = sum(edit_distance(t, c.split()) for t, (_, c) in zip(ref_ph, spelled))
        metrics["ctc_per"] = round(errors / max(1, sum(len(t) for t in ref_ph)), 4)
    elif spelled:  # the adaptor's own spelling (greedy CTC), beside what the LLM made of it
        metrics["ctc_wer"] = round(wer([r for r, _ in spelled], [c for _, c in spelled]), 4)
    metrics["trimmed_loops"] = sum("raw_prediction" in r for r in rows)
    metrics["eval_skipped"] = len(skipped)
    if predictions_path is not None:
        predictions_path.parent.mkdir(parents=True, exist_ok=True)
        with open(predictions_path, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return metrics


def _to_device(batch: dict, device: torch.device) -> dict:
    def move(x):
        if isinstance(x, torch.Tensor):
            return x.to(device)
        if isinstance(x, dict):
            return {k: move(v) for k, v in x.items()}
        return x

    return move(batch)
