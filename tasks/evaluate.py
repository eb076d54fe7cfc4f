"""Evaluation: greedy generation over any record file, WER for transcripts, accuracy per question type."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Iterable

import torch
from tqdm.auto import tqdm

from data.jsonl import write_jsonl
from data.records import ROLES

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
    ASR decoders' compression-ratio checks guard against. Both scores are reported (``wer`` on trimmed, ``wer_raw`` on raw predictions)."""
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


def is_agreement_type(type_: str) -> bool:
    """A free-form answer type ("qa", "<kind>_qa"): scored by agreement with a reference answer (ROUGE-L F1 and
    exact match), not by containment. Why: a spoken question's target is the LLM's own answer to it typed (behaviour
    alignment), a sentence or two; no single span in it is "the" answer."""
    return type_ == "qa" or type_.endswith("_qa")


def rouge_l(reference: str, prediction: str) -> float:
    """ROUGE-L F1 over normalised words: the longest common subsequence, as precision and recall's harmonic mean."""
    ref, hyp = normalize(reference), normalize(prediction)
    if not ref or not hyp:
        return float(ref == hyp)
    prev = [0] * (len(hyp) + 1)
    for r in ref:
        cur = [0]
        for j, h in enumerate(hyp, 1):
            cur.append(prev[j - 1] + 1 if r == h else max(prev[j], cur[j - 1]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, rc = lcs / len(hyp), lcs / len(ref)
    return 2 * p * rc / (p + rc)


def answer_correct(reference: str, prediction: str) -> bool:
    """The reference's words appear, in order and contiguous, in the prediction."""
    ref, hyp = normalize(reference), normalize(prediction)
    if not ref:
        return not hyp
    return any(hyp[i:i + len(ref)] == ref for i in range(len(hyp) - len(ref) + 1))


def stated_interval(prediction: str) -> tuple[float, float] | None:
    """The first two percentages a prediction states, low first; None when it states fewer."""
    nums = [float(x) for x in re.findall(r"([+-]?\d+(?:\.\d+)?)\s*%", prediction)[:2]]
    return (min(nums), max(nums)) if len(nums) == 2 else None


def interval_covers(reference: str, prediction: str) -> bool:
    """A ``*_band`` answer: the first two percentages the prediction states bound the realised value
    ``reference`` (a number). Why: a stated range is right when what happened falls inside it."""
    band = stated_interval(prediction)
    return band is not None and band[0] <= float(reference) <= band[1]


def unscorable(sample: str, type_: str, reference: str | None) -> str | None:
    """Why a sample cannot be scored (a one-line error naming it), or None.

    Refused, not skipped: a conversation with no answer turn (nor a ``reference``) has nothing to compare with,
    and a transcript-type sample (WER_TYPES) whose reference has no words would count every predicted word as an
    error against zero reference words (one such sample scored WER 15.0). Skipping would quietly score a
    different set than the file names; the error names the sample so it can be fixed or removed."""
    if reference is None:
        return f"{sample}: no answer turn to score (the conversation must end with an assistant turn, or carry a 'reference')"
    if type_ in WER_TYPES and not normalize(reference):
        return f"{sample}: empty reference transcript (type {type_}): WER needs reference words; fix or remove the sample"
    return None


def check_scorable(records: list[dict]) -> None:
    """Refuse (ValueError) the first evaluation record ``unscorable`` refuses, before any generation (a bad sample
    used to surface, if at all, after the whole set was generated). The reference is read as the collator reads it:
    ``reference``, else the last turn when it is the assistant's; a ``fill`` template's words are known only once
    filled, so run_generation checks those."""
    for rec in records:
        last, ref = rec["conversations"][-1], rec.get("reference")
        if ref is None and ROLES[last["from"]] == "assistant":
            ref = last["value"]
        if ref is not None and rec.get("fill"):
            continue
        where = rec.get("where", rec.get("id"))
        sample = where if rec.get("id") in (None, where) else f"{where} (id {rec['id']})"
        if (why := unscorable(str(sample), rec.get("type", "chat"), ref)) is not None:
            raise ValueError(why)


def score(types: list[str], refs: list[str], preds: list[str], ids: list[str] | None = None) -> dict[str, float]:
    """WER over transcript-type samples; ROUGE-L F1 and exact match per agreement type (``is_agreement_type``) and
    over all of them (``rouge_l``, ``exact``); accuracy per other question type and overall (agreement types are
    not in it). A sample ``unscorable`` refuses raises ValueError naming it (``ids``, else its index)."""
    by_type: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for i, (t, r, p) in enumerate(zip(types, refs, preds)):
        if (why := unscorable(ids[i] if ids else f"sample {i}", t, r)) is not None:
            raise ValueError(why)
        by_type[t].append((r, p))
    out: dict[str, float] = {}
    wer_pairs = [rp for t in WER_TYPES for rp in by_type.get(t, [])]
    if wer_pairs:
        out["wer"] = round(wer([r for r, _ in wer_pairs], [p for _, p in wer_pairs]), 4)
    agree = [(t, r, p) for t, pairs in sorted(by_type.items()) if is_agreement_type(t) for r, p in pairs]
    for t in sorted({t for t, _, _ in agree}):
        pairs = by_type[t]
        out[f"rouge_l/{t}"] = round(sum(rouge_l(r, p) for r, p in pairs) / len(pairs), 4)
        out[f"exact/{t}"] = round(sum(normalize(r) == normalize(p) for r, p in pairs) / len(pairs), 4)
    if agree:
        out["rouge_l"] = round(sum(rouge_l(r, p) for _, r, p in agree) / len(agree), 4)
        out["exact"] = round(sum(normalize(r) == normalize(p) for _, r, p in agree) / len(agree), 4)
    acc_total = acc_n = 0
    for t, pairs in sorted(by_type.items()):
        if t in WER_TYPES or is_agreement_type(t):
            continue
        judge = interval_covers if t.endswith("_band") else answer_correct
        hits = sum(judge(r, p) for r, p in pairs)
        if t.endswith("_band"):  # coverage alone rewards wide bands: report how wide they were
            widths = [b[1] - b[0] for b in map(stated_interval, (p for _, p in pairs)) if b is not None]
            if widths:
                out[f"band_width/{t}"] = round(sum(widths) / len(widths), 2)
        out[f"accuracy/{t}"] = round(hits / len(pairs), 4)
        acc_total += hits
        acc_n += len(pairs)
    if acc_n:
        out["accuracy"] = round(acc_total / acc_n, 4)
    out["eval_samples"] = len(refs)
    return out


def input_sets(batch: dict) -> list[str]:
    """Per sample of a collated batch: the modalities it holds inputs of, joined by '+' ("text": none)."""
    held: list[set[str]] = [set() for _ in batch["ids"]]
    for name, part in batch.get("modal", {}).items():
        for i in part["sample_index"].tolist():
            held[i].add(name)
    return ["+".join(sorted(h)) or "text" for h in held]


def score_by_inputs(held: list[str], types: list[str], refs: list[str], preds: list[str]) -> dict[str, float]:
    """``score`` again per set of inputs (``input_sets``), as ``inputs/<set>/<metric>``, when the evaluation set mixes
    several. Why: one run over several modalities reports each one's numbers (one input alone, another alone, both)
    beside the overall ones, which a larger share of one kind would otherwise hide."""
    if len(set(held)) < 2:
        return {}
    out: dict[str, float] = {}
    for key in sorted(set(held)):
        pick = [i for i, h in enumerate(held) if h == key]
        part = score([types[i] for i in pick], [refs[i] for i in pick], [preds[i] for i in pick])
        out.update({f"inputs/{key}/{k}": v for k, v in part.items()})
    return out


@torch.no_grad()
def run_generation(model, loader, max_new_tokens: int, predictions_path: Path | None = None,
                   desc: str = "evaluate", num_beams: int = 1, progress: bool = True,
                   unanswered_ok: bool = False) -> dict[str, float]:
    """Generate for every batch of ``loader`` (collator in generate mode); score and save predictions.

    A model with a ``decoder`` (modality.base.Decoder, from its plugin) writes its answers that way, with the
    extra prediction-row fields and metrics the decoder adds; otherwise the LLM decodes greedily (or with
    ``num_beams`` beams). Under FSDP2 (llm.sharding.gathered) every rank runs it over the same loader, in step;
    give ``predictions_path`` and ``progress`` on rank 0 only. A sample ``unscorable`` refuses is an error before
    its batch is generated; with ``unanswered_ok`` (chat.py answering a file of questions) a sample with no answer
    turn is answered and left out of the scores instead (``unscored``)."""
    from llm.sharding import gathered

    with gathered(model):
        return _run_generation(model, loader, max_new_tokens, predictions_path, desc, num_beams, progress,
                               unanswered_ok)


def _run_generation(model, loader, max_new_tokens, predictions_path, desc, num_beams, progress,
                    unanswered_ok) -> dict[str, float]:
    was_training = model.training
    model.eval()
    decoder = model.decoder
    types, refs, preds, rows, skipped, ids, held = [], [], [], [], [], [], []
    for batch in tqdm(loader, desc=desc, leave=False, disable=not progress):
        skipped += batch["skipped"]
        if batch["input_ids"].shape[0] == 0:
            continue
        for sample, t, r in zip(batch["ids"], batch["types"], batch["references"]):  # refused before generating
            if (why := unscorable(str(sample), t, r)) is not None and not (unanswered_ok and r is None):
                raise ValueError(why)
        batch = _to_device(batch, model.device)
        if decoder is not None:
            outs, extras = decoder.decode(model, batch, max_new_tokens)
        else:
            outs = model.generate(batch, max_new_tokens=max_new_tokens, num_beams=num_beams)
            extras = [{}] * len(outs)
        inputs = input_sets(batch)
        for i, (t, r, p, extra) in enumerate(zip(batch["types"], batch["references"], outs, extras)):
            if r is not None:  # scored (None: an unanswered question, unanswered_ok)
                held.append(inputs[i])
                types.append(t)
                ids.append(str(batch["ids"][i]))
                refs.append(r)
                preds.append(p)
            trimmed = trim_repeats(p)
            rows.append({"id": batch["ids"][i], "type": t, "inputs": inputs[i], "reference": r, "prediction": trimmed,
                         **({"raw_prediction": p} if trimmed != p else {}), **extra})
    model.train(was_training)
    metrics = score(types, refs, [trim_repeats(p) for p in preds], ids)
    if "wer" in metrics:
        metrics["wer_raw"] = score(types, refs, preds, ids)["wer"]
    metrics.update(score_by_inputs(held, types, refs, [trim_repeats(p) for p in preds]))
    if decoder is not None:
        metrics.update(decoder.metrics(rows))
    metrics["trimmed_loops"] = sum("raw_prediction" in r for r in rows)
    if unanswered_ok:
        metrics["unscored"] = len(rows) - len(refs)
    metrics["eval_skipped"] = len(skipped)
    if skipped:  # which ones, and why (data.skip_bad): nothing is left out unnamed
        metrics["eval_skipped_samples"] = [f"{where}: {why}" for where, why in skipped[:100]]
    if predictions_path is not None:  # strict JSON lines, written atomically (data.jsonl)
        write_jsonl(predictions_path, rows)
    return metrics


def _to_device(batch: dict, device: torch.device) -> dict:
    def move(x):
        if isinstance(x, torch.Tensor):
            return x.to(device)
        if isinstance(x, dict):
            return {k: move(v) for k, v in x.items()}
        return x

    return move(batch)
