"""Side-by-side cost of one align step on the real embedded default, measured in ONE run.

    python -m bench.align_step [--batch 8] [--reps 3] [--manifest data_cache/speech/train.jsonl]

Compares, on the same batch of real espeak clips with Whisper tiny.en + SmolLM2-135M:
  A. live encoder (log-mel -> Whisper on real length -> adaptor -> LLM)  vs  cached encoder output
  B. LM head on labelled positions only (what MultimodalLM does)  vs  full logits then CE (plain HF)
Timings alternate between the variants (min of reps: least disturbed by other processes).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def timed(fn, reps: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--manifest", default="data_cache/speech/train.jsonl")
    args = ap.parse_args()

    from data.collate import ConversationCollator
    from data.dataset import ConversationDataset
    from modality.speech.records import read_speech_records
    from llm.loader import load_llm
    from llm.tokens import add_placeholder_tokens
    from modality.speech.plugin import SpeechModality
    from tasks.multimodal import MultimodalLM
    from tasks.stages import StagePolicy

    lm = load_llm()
    sp = SpeechModality(d_llm=lm.hidden_size, target_rms=lm.embedding_rms)
    ids = add_placeholder_tokens(lm.tokenizer, lm.model, ["<speech>"])
    model = MultimodalLM(lm.model, lm.tokenizer, {"speech": sp}, {"speech": ids["<speech>"]}, StagePolicy("align"))
    model.train()
    recs = read_speech_records(Path(args.manifest))[: args.batch]
    ds = ConversationDataset(recs, {"speech": sp})
    col = ConversationCollator(lm.tokenizer, {"speech": sp}, model.placeholder_ids)
    live = col([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        hidden, lengths = sp.encode_frozen(live["modal"]["speech"]["values"], live["modal"]["speech"]["mask"])
    valid = torch.arange(hidden.shape[1])[None] < lengths[:, None]
    cached = {**live, "modal": {"speech": {"kind": "hidden", "values": hidden.half().float(), "mask": valid,
                                           "sample_index": live["modal"]["speech"]["sample_index"]}}}

    def step(batch, full_logits: bool = False):
        model.zero_grad(set_to_none=True)
        if full_logits:
            embeds, _, _ = model.embed(batch)
            logits = model.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=-100)
        else:
            loss = model(batch)["loss"]
        loss.backward()

    variants = {"A1 live encoder + adaptor + LLM": lambda: step(live),
                "A2 cached encoder output + adaptor + LLM": lambda: step(cached),
                "B1 head on labelled positions (mmlm)": lambda: step(cached),
                "B2 full logits + CE (plain HF)": lambda: step(cached, full_logits=True)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.reps):  # alternate so machine load hits every variant alike
        for k, fn in variants.items():
            times[k] += timed(fn, 1)
    tokens = int(live["attention_mask"].sum())
    labelled = int((live["labels"] != -100).sum())
    print(f"batch {args.batch} clips, {tokens} tokens ({labelled} labelled), torch threads {torch.get_num_threads()}")
    print("| variant | min s/step | median s/step |\n|---|---|---|")
    for k, v in times.items():
        print(f"| {k} | {min(v):.2f} | {statistics.median(v):.2f} |")
    a = min(times["A1 live encoder + adaptor + LLM"]) / min(times["A2 cached encoder output + adaptor + LLM"])
    b = min(times["B2 full logits + CE (plain HF)"]) / min(times["B1 head on labelled positions (mmlm)"])
    print(f"ratio live/cached encoder: {a:.2f}x; full-logits/labelled-head: {b:.2f}x")


if __name__ == "__main__":
    main()
