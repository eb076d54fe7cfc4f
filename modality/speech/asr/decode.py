"""Joint CTC / LLM decoding of transcripts: the LLM proposes, the adaptor's CTC classifier checks the audio.

Why: in the two-phase recipe the LLM reads the adaptor's spelling and, where that spelling is unsure, writes
a fluent sentence the audio does not hold (on held-out voices it was worse than the spelling on 43 of 100
clips, better on 18). Scoring each candidate transcript by both models, as hybrid CTC/attention decoders do
(Watanabe et al. 2017; ESPnet's ``joint_weight``), keeps the LLM's spelling fixes and drops its inventions:

    score(t) = (1 - w) * log p_LLM(t | prompt, speech) + w * log p_CTC(t | speech) + bonus * tokens(t)

Candidates: the LLM's ``num_beams`` beams, the greedy CTC readout and, with ``ctc_beams`` > 0, that many
more spellings from a CTC prefix beam search (the readout's acoustically close alternatives, for the LLM
score to choose among). Only single-clip transcript
samples (type asr / transcribe / repeat) are rescored; every other sample keeps the LLM's best beam.
``python -m modality.speech.asr.decode <predictions.jsonl> --weights 0,0.3,0.5 --bonus 0,1`` re-picks from the scores a
run stored (no model needed), so a weight is chosen on one split and reported on another.
"""

from __future__ import annotations

import argparse
import inspect
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from llm.lora import backbone_and_head
from llm.tokens import stop_token_ids


@dataclass
class DecodeSpec:
    """eval.num_beams / eval.joint_weight / eval.length_bonus: how transcripts are decoded."""

    num_beams: int = 1
    joint_weight: float = 0.0
    length_bonus: float = 0.0
    ctc_beams: int = 0
    score_batch: int = 0  # candidate sequences per teacher-forced LLM forward (0: a batch's all at once)

    def __post_init__(self) -> None:
        if self.num_beams < 1 or not 0 <= self.joint_weight <= 1 or self.ctc_beams < 0 or self.score_batch < 0:
            raise ValueError("eval.num_beams must be >= 1, eval.joint_weight in [0, 1], eval.ctc_beams and "
                             f"eval.score_batch >= 0, got {self}")

    @property
    def joint(self) -> bool:
        return self.joint_weight > 0


def combine(lm: float, ctc: float | None, tokens: int, weight: float, bonus: float) -> float:
    """The joint score; ``ctc`` None (or -inf): a text the CTC classes cannot spell or align."""
    if weight == 0:
        return lm + bonus * tokens  # (0 * -inf would be nan)
    if ctc is None or not math.isfinite(ctc):
        return -math.inf
    return (1 - weight) * lm + weight * ctc + bonus * tokens


def pick(candidates: list[dict], weight: float, bonus: float) -> str:
    """The best candidate's text; ties go to the earlier one (the LLM's own ranking)."""
    best = max(range(len(candidates)), key=lambda k: (combine(candidates[k]["lm"], candidates[k]["ctc"],
                                                              candidates[k]["tokens"], weight, bonus), -k))
    return candidates[best]["text"]


def _cache_name(backbone: torch.nn.Module) -> str:
    """The KV cache's keyword and output field: ``cache`` in transformers >= 5.2x, ``past_key_values`` before
    (still accepted there, with a warning, until its removal)."""
    return "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"


@torch.no_grad()
def lm_logprobs(llm: torch.nn.Module, embeds: Tensor, mask: Tensor, owner: list[int], cands: list[list[int]]) -> Tensor:
    """Sum of log p(candidate tokens | prompt) under the LLM, teacher-forced in one batch.

    embeds [B, L, D] / mask [B, L]: the left-padded prompts (speech merged in); owner[k]: the prompt of
    candidate k; cands[k]: its token ids (the stop token included). Returns [n_candidates] (float).
    Each prompt runs once; its KV cache is copied to its candidates (a prompt is ~2/3 of the tokens).
    """
    dev = embeds.device
    n, lc = len(cands), max(len(c) for c in cands)
    ids = torch.zeros(n, lc, dtype=torch.long, device=dev)
    cmask = torch.zeros(n, lc, dtype=torch.long, device=dev)
    for k, c in enumerate(cands):
        ids[k, : len(c)] = torch.tensor(c, device=dev)
        cmask[k, : len(c)] = 1
    rows = torch.tensor(owner, device=dev)
    backbone, head = backbone_and_head(llm)
    mask = mask.to(torch.long)
    first = backbone(inputs_embeds=embeds, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                     use_cache=True)
    name = _cache_name(backbone)
    cache = getattr(first, name)
    cache.reorder_cache(rows)                                               # B prompts -> n copies
    m = torch.cat([mask[rows], cmask], dim=1)                               # [n, L + lc]
    pos = mask[rows].sum(-1, keepdim=True) + torch.arange(lc, device=dev)   # [n, lc]: after each prompt
    x = llm.get_input_embeddings()(ids).to(embeds)                          # [n, lc, D]
    hidden = backbone(inputs_embeds=x, attention_mask=m, position_ids=pos, use_cache=True,
                      **{name: cache}).last_hidden_state                    # [n, lc, D]
    hidden = torch.cat([first.last_hidden_state[rows, -1:], hidden[:, :-1]], dim=1)  # position j predicts ids[:, j]
    lp = head(hidden).float().log_softmax(-1).gather(-1, ids[..., None])[..., 0]    # [n, lc]
    return (lp * cmask).sum(-1)


@torch.no_grad()
def ctc_logprobs(logits: Tensor, length: int, targets: list[list[int] | None], blank: int) -> list[float]:
    """log p_CTC(target | one clip's class logits [N, V]) per class-index target; -inf when it cannot align."""
    ok = [k for k, t in enumerate(targets) if t and len(t) <= length]
    out = [-math.inf] * len(targets)
    if not ok:
        return out
    logp = logits[:length].float().log_softmax(-1)                       # [N, V]
    logp = logp[:, None].expand(-1, len(ok), -1)                        # [N, n, V]
    flat = torch.tensor([c for k in ok for c in targets[k]], device=logits.device)
    tlen = torch.tensor([len(targets[k]) for k in ok], device=logits.device)
    ilen = torch.full((len(ok),), length, dtype=torch.long, device=logits.device)
    nll = F.ctc_loss(logp, flat, ilen, tlen, blank=blank, reduction="none", zero_infinity=False)
    for k, v in zip(ok, nll.tolist()):
        out[k] = -v
    return out


def _logaddexp(a: float, b: float) -> float:
    """log(e^a + e^b) on Python floats (the prefix search's inner loop; -inf is an empty sum)."""
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    return max(a, b) + math.log1p(math.exp(-abs(a - b)))


def ctc_prefix_beams(logits: Tensor, length: int, blank: int, beam: int, prune: int = 8) -> list[tuple[list[int], float]]:
    """CTC prefix beam search over one clip's class logits [N, V]: the ``beam`` most probable label sequences
    (class indices) with their log p (summed over alignments), best first. Per position only the ``prune``
    likeliest classes extend a prefix (the blank always closes one)."""
    logp = logits[:length].float().log_softmax(-1).cpu()               # [n, V]
    top = logp.topk(min(prune, logp.shape[1]), dim=-1).indices.tolist()
    lp = logp.tolist()
    ninf = -math.inf
    lse = _logaddexp
    beams: dict[tuple[int, ...], list[float]] = {(): [0.0, ninf]}       # prefix -> [log p ending in blank, in a label]
    for t in range(len(lp)):
        nxt: dict[tuple[int, ...], list[float]] = {}
        for prefix, (pb, pnb) in beams.items():
            total = lse(pb, pnb)
            cell = nxt.setdefault(prefix, [ninf, ninf])
            cell[0] = lse(cell[0], total + lp[t][blank])
            for c in top[t]:
                if c == blank:
                    continue
                new = nxt.setdefault(prefix + (c,), [ninf, ninf])
                if prefix and prefix[-1] == c:                             # a repeat needs a blank between
                    new[1] = lse(new[1], pb + lp[t][c])
                    cell[1] = lse(cell[1], pnb + lp[t][c])                  # ... else it merges into the run
                else:
                    new[1] = lse(new[1], total + lp[t][c])
        live = [(k, v) for k, v in nxt.items() if lse(*v) > ninf]    # a repeat with no blank before: impossible
        beams = dict(sorted(live, key=lambda kv: -lse(*kv[1]))[:beam])
    return [(list(p), lse(*v)) for p, v in beams.items()]


def chunk_prompts(owner: list[int], limit: int) -> list[list[int]]:
    """Consecutive groups of prompt indices whose candidates number <= ``limit`` (a prompt is never split;
    one with more candidates than the limit is a group alone). ``owner``: each candidate's prompt, sorted."""
    per: dict[int, int] = {}
    for b in owner:
        per[b] = per.get(b, 0) + 1
    groups: list[list[int]] = []
    n = 0
    for b, c in per.items():
        if groups and n + c <= limit:
            groups[-1].append(b)
            n += c
        else:
            groups.append([b])
            n = c
    return groups


def score_candidates(llm: torch.nn.Module, embeds: Tensor, mask: Tensor, owner: list[int], cands: list[list[int]],
                     limit: int = 0) -> list[float]:
    """lm_logprobs in forwards of at most ``limit`` candidates (0: one forward): an 8B LLM's full-vocabulary
    logits for ~100 candidates do not fit beside it. Same scores either way (each prompt still runs once)."""
    if not limit:
        return lm_logprobs(llm, embeds, mask, owner, cands).tolist()
    out: list[float] = []
    for group in chunk_prompts(owner, limit):
        rows = torch.tensor(group, device=embeds.device)
        local = {b: i for i, b in enumerate(group)}
        ks = [k for k, b in enumerate(owner) if b in local]
        out += lm_logprobs(llm, embeds[rows], mask[rows], [local[owner[k]] for k in ks], [cands[k] for k in ks]).tolist()
    return out


@torch.no_grad()
def joint_decode(model: Any, objective: Any, batch: dict, max_new_tokens: int, spec: DecodeSpec,
                 transcript_types: set[str]) -> tuple[list[str], list[str | None], list[list[dict] | None]]:
    """Decode a generate-mode batch with ``spec``; returns (texts, CTC readouts, candidates per sample or None).

    ``model``: a MultimodalLM (its llm, tokenizer, embed); ``objective``: the chain's token CtcObjective (its
    logits, classes and segmenter), or None without one. The adaptor runs once per batch: the LLM's prompt, the
    readout, the spellings and the CTC scores share it.
    """
    if spec.joint and (objective is None or (objective.vocab is None and not objective.phonemes)):
        raise ValueError("eval.joint_weight > 0 needs a chain trained with CTC classes (stage.ctc_vocab=corpus, "
                         "e.g. experiment=speech_align_ctc); this model has none: set eval.joint_weight=0")
    tok = model.tokenizer
    B, K = batch["input_ids"].shape[0], spec.num_beams
    embeds, outs, mask = model.embed(batch)  # outs: each modality's uncompressed adaptor output, reused below
    stops = stop_token_ids(tok)
    stop = stops[0]  # what a finished answer ends with
    seqs = model.llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                              do_sample=False, num_beams=K, num_return_sequences=K, early_stopping=K > 1,
                              pad_token_id=tok.pad_token_id, eos_token_id=stops, use_cache=True)  # [B*K, T]
    texts = [t.strip() for t in tok.batch_decode(seqs, skip_special_tokens=True)]
    beams = [texts[b * K : (b + 1) * K] for b in range(B)]
    best = [b[0] for b in beams]
    cands: list[list[dict] | None] = [None] * B
    table = model.llm.get_input_embeddings().weight
    readouts = objective.readout(batch, outs, table) if objective is not None else [None] * B
    if not spec.joint:
        return best, readouts, cands
    todo = [b for b in range(B) if batch["types"][b] in transcript_types and readouts[b] is not None]
    if not todo:
        return best, readouts, cands
    words = objective.phonemes is None  # a token chain's readout and spellings are text candidates too
    spelled = _ctc_spellings(objective, batch, outs, table, spec.ctc_beams) if spec.ctc_beams and words else {}
    for b in todo:
        seen = dict.fromkeys([*beams[b], *([readouts[b]] if words else []), *spelled.get(b, [])])  # the LLM's first
        cands[b] = [{"text": t, "source": "llm" if t in beams[b] else "ctc"} for t in seen if t] or None
    todo = [b for b in todo if cands[b] is not None]
    if not todo:
        return best, readouts, cands
    # LLM scores, teacher-forced (in forwards of <= spec.score_batch candidates)
    flat = [(b, c) for b in todo for c in cands[b]]
    ids = [tok.encode(c["text"], add_special_tokens=False) + [stop] for _, c in flat]
    lm = score_candidates(model.llm, embeds, mask, [b for b, _ in flat], ids, spec.score_batch)
    for (b, c), v, i in zip(flat, lm, ids):
        c["lm"], c["tokens"] = v, len(i)
    # CTC scores, per clip
    out, lengths = outs[objective.modality]
    logits = objective.logits(out, table)                                 # [n_clips, N, V]
    for k, b in enumerate(batch["modal"][objective.modality]["sample_index"].tolist()):
        if cands[b] is None:
            continue
        targets = objective.text_targets([c["text"] for c in cands[b]])
        scores = ctc_logprobs(logits[k], int(lengths[k]), targets, objective.blank)
        for c, v in zip(cands[b], scores):
            c["ctc"] = v if math.isfinite(v) else None  # strict JSON in predictions.jsonl (no -Infinity)
    for b in todo:
        best[b] = pick(cands[b], spec.joint_weight, spec.length_bonus)
    return best, readouts, cands


def _ctc_spellings(objective: Any, batch: dict, outs: dict[str, tuple[Tensor, Tensor]], table: Tensor,
                   n: int) -> dict[int, list[str]]:
    """Sample index -> the ``n`` best CTC prefix-beam spellings of its clip, as text (one-clip samples)."""
    vocab = objective.vocab
    out: dict[int, list[str]] = {}
    adapted, lengths = outs[objective.modality]
    logits = objective.logits(adapted, table)
    owners = batch["modal"][objective.modality]["sample_index"].tolist()
    for k, b in enumerate(owners):
        if owners.count(b) == 1:
            hyps = ctc_prefix_beams(logits[k], int(lengths[k]), objective.blank, n)
            out[b] = [objective.tokenizer.decode(vocab[p].tolist()).strip() for p, _ in hyps if p]
    return out


def _transcript_rows(rows: list[dict]) -> list[dict]:
    from tasks.evaluate import WER_TYPES

    rows = [r for r in rows if r.get("type") in WER_TYPES and r.get("candidates")]
    if not rows:
        raise ValueError("no transcript rows with candidates: evaluate with eval.joint_weight > 0 first")
    return rows


def oracle(rows: list[dict]) -> dict:
    """WER when each clip takes its best stored candidate: the floor for ANY rescoring of these candidates.

    Why: it tells a scoring problem (the right text is among the candidates) from a recognition one (it is not).
    """
    from tasks.evaluate import edit_distance, normalize, trim_repeats

    rows = _transcript_rows(rows)
    errors = words = 0
    sources: Counter[str] = Counter()
    for r in rows:
        ref = normalize(r["reference"] or "")
        dist, i = min((edit_distance(ref, normalize(trim_repeats(c["text"]))), i) for i, c in enumerate(r["candidates"]))
        errors += dist
        words += len(ref)
        sources[r["candidates"][i].get("source", "?")] += 1
    return {"wer": round(errors / max(1, words), 4), "samples": len(rows), "best_source": dict(sorted(sources.items()))}


def sweep(rows: list[dict], weights: list[float], bonuses: list[float]) -> list[dict]:
    """WER of the transcript rows of a predictions file re-picked at each (weight, bonus)."""
    from tasks.evaluate import trim_repeats, wer

    rows = _transcript_rows(rows)
    refs = [r["reference"] or "" for r in rows]
    out = []
    for w in weights:
        for bonus in bonuses:
            hyps = [trim_repeats(pick(r["candidates"], w, bonus)) for r in rows]
            out.append({"joint_weight": w, "length_bonus": bonus, "wer": round(wer(refs, hyps), 4), "samples": len(rows)})
    return out


def main(argv: list[str] | None = None) -> None:
    from data.jsonl import read_jsonl

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("predictions", help="predictions.jsonl of an evaluation run with eval.joint_weight > 0")
    ap.add_argument("--weights", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1")
    ap.add_argument("--bonus", default="0", help="length bonuses (per token), comma-separated")
    a = ap.parse_args(argv)
    rows = read_jsonl(a.predictions)
    table = sweep(rows, [float(x) for x in a.weights.split(",")], [float(x) for x in a.bonus.split(",")])
    print("joint_weight  length_bonus  wer")
    for r in table:
        print(f"{r['joint_weight']:>10}  {r['length_bonus']:>12}  {100 * r['wer']:.1f} %")
    best = min(table, key=lambda r: r["wer"])
    print(f"best: joint_weight={best['joint_weight']} length_bonus={best['length_bonus']} wer={100 * best['wer']:.1f} % "
          f"({best['samples']} transcripts)")
    o = oracle(rows)
    print(f"oracle (each clip's best candidate, the floor for any scoring): wer={100 * o['wer']:.1f} % "
          f"best from {o['best_source']}")


if __name__ == "__main__":
    main()
