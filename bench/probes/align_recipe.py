"""What each cheap-step option of experiment=speech_align_long saves, measured side by side in ONE run.

    python -m bench.probes.align_recipe [--batches 6] [--batch 8] [--manifest data_cache/speech/train.jsonl]

Real embedded default (Whisper tiny.en outputs + SmolLM2-135M, align stage, LM + 0.3 CTC loss).
Each variant draws the SAME number of batches from the manifest with its own sampler and prompt
format and times forward + backward on each (the encoder output is computed once up front, as the
encoder cache does in training). Variants alternate batch by batch so machine load hits them alike:

  base        random batches, the chat template's default system turn, CTC over all 49k rows
  +group      data.group_by_length=true
  +system     data.system_prompt=''
  +ctc_vocab  stage.ctc_vocab=corpus
  all         the three together (what experiment=speech_align_long runs)
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--manifest", default="data_cache/speech/train.jsonl")
    args = ap.parse_args()

    from data.collate import ConversationCollator, ctc_target
    from data.dataset import ConversationDataset
    from modality.speech.records import read_speech_records
    from data.samplers import LengthGroupedSampler, record_length
    from llm.loader import load_llm
    from llm.tokens import add_placeholder_tokens
    from modality.speech.plugin import SpeechModality
    from modality.speech.asr.ctc import corpus_vocab
    from tasks.multimodal import MultimodalLM
    from tasks.stages import StagePolicy

    torch.manual_seed(0)
    lm = load_llm()
    sp = SpeechModality(d_llm=lm.hidden_size, target_rms=lm.embedding_rms)
    ids = add_placeholder_tokens(lm.tokenizer, lm.model, ["<speech>"])
    model = MultimodalLM(lm.model, lm.tokenizer, {"speech": sp}, {"speech": ids["<speech>"]}, StagePolicy("align"),
                         ctc_weight=0.3)
    model.train()
    recs = read_speech_records(Path(args.manifest))
    vocab = corpus_vocab([t for r in recs if (t := ctc_target(lm.tokenizer, r))], [ids["<speech>"]])
    n = args.batches * args.batch
    rnd = list(range(len(recs)))
    random.Random(0).shuffle(rnd)
    grouped = list(LengthGroupedSampler([record_length(r) for r in recs], args.batch, seed=0))
    orders = {"random": rnd[:n], "group": grouped[args.batch: args.batch + n]}  # skip the longest-first batch
    col = ConversationCollator(lm.tokenizer, {"speech": sp}, model.placeholder_ids)
    cache: dict[int, torch.Tensor] = {}

    def batches(order: str, system: str | None) -> list[dict]:
        idx = orders[order]
        ds = ConversationDataset([recs[i] for i in idx], {"speech": sp}, system_prompt=system)
        out = []
        for b in range(args.batches):
            items = [ds[j] for j in range(b * args.batch, (b + 1) * args.batch)]
            for k, it in zip(idx[b * args.batch:], items):  # encoder output once per clip (the cache's job)
                if k not in cache:
                    with torch.no_grad():
                        f = it["inputs"]["speech"][0]
                        h, _ = sp.encode_frozen(f[None], torch.ones(1, f.shape[0], dtype=torch.bool))
                    cache[k] = h[0].half().float()
                it["inputs"]["speech"], it["kinds"]["speech"] = [cache[k]], "hidden"
            out.append(col(items))
        return out

    variants = {"base": ("random", None, None), "+group": ("group", None, None), "+system": ("random", "", None),
                "+ctc_vocab": ("random", None, vocab), "all": ("group", "", vocab)}
    data = {k: batches(o, s) for k, (o, s, _) in variants.items()}

    def step(batch: dict, v: torch.Tensor | None) -> float:
        model.set_ctc_vocab(v)
        model.zero_grad(set_to_none=True)
        t = time.perf_counter()
        model(batch)["loss"].backward()
        return time.perf_counter() - t

    step(data["base"][0], None)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in variants}
    positions = {k: sum(int(b["input_ids"].numel()) for b in data[k]) for k in variants}
    for b in range(args.batches):
        for k, (_, _, v) in variants.items():
            times[k].append(step(data[k][b], v))
    base = sum(times["base"])
    print(f"{args.batches} batches x {args.batch} clips per variant, torch threads {torch.get_num_threads()}, "
          f"CTC classes {len(vocab)} (corpus) vs {lm.model.get_input_embeddings().weight.shape[0]} (all)")
    print("| variant | padded positions | s/step (mean) | median | vs base |\n|---|---|---|---|---|")
    for k, v in times.items():
        print(f"| {k} | {positions[k]} | {sum(v) / len(v):.2f} | {statistics.median(v):.2f} | {sum(v) / base:.2f} |")


if __name__ == "__main__":
    main()
