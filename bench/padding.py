"""How many LLM token positions a training epoch pays for: random batches vs data.group_by_length.

    python -m bench.padding --manifest data_cache/speech/train.jsonl --batch 8 [--system-prompt ""]

Exact sequence lengths without loading audio: the chat-templated conversation tokenised with
the real SmolLM2 tokenizer, the placeholder expanded to the speech plugin's output_length of the
clip's duration (100 mel frames a second). The LLM's cost per step is ~linear in the padded
positions (../shared/MEASURED.md: ~1 s per 100 tokens of a batch on this CPU), so the ratio of
padded positions is the expected step-time ratio. Averaged over several epochs' orders.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from data.collate import tokenize_conversation
from data.dataset import ConversationDataset
from modality.speech.records import read_speech_records
from data.samplers import LengthGroupedSampler, record_length


def padded_positions(lengths: list[int], order: list[int], batch: int) -> int:
    return sum(batch * max(lengths[i] for i in order[s:s + batch]) for s in range(0, len(order), batch))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--manifest", default="data_cache/speech/train.jsonl")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--stack", type=int, default=4)
    ap.add_argument("--system-prompt", default=None)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from llm.loader import resolve_packaged

    tok = AutoTokenizer.from_pretrained(resolve_packaged("smollm2-135m-instruct"))
    tok.add_special_tokens({"additional_special_tokens": ["<speech>"]})
    records = read_speech_records(Path(args.manifest))
    ds = ConversationDataset(records, {}, system_prompt=args.system_prompt)
    lengths = []
    for i, rec in enumerate(records):
        ids, _ = tokenize_conversation(tok, ds[i]["messages"])
        frames = round(100 * float(rec["duration"]))
        speech = -(-((frames - 1) // 2 + 1) // args.stack)  # output_length: ceil(ceil(T/2) / stack)
        lengths.append(len(ids) - 1 + speech)
    real = sum(lengths)
    rnd, grp = 0, 0
    for epoch in range(args.epochs):
        order = list(range(len(lengths)))
        random.Random(epoch).shuffle(order)
        rnd += padded_positions(lengths, order, args.batch)
        s = LengthGroupedSampler([record_length(r) for r in records], args.batch, seed=0)
        s.set_epoch(epoch)
        grp += padded_positions(lengths, list(s), args.batch)
    rnd, grp = rnd / args.epochs, grp / args.epochs
    print(f"{len(lengths)} samples, mean length {real / len(lengths):.1f} tokens (system prompt: "
          f"{'template default' if args.system_prompt is None else repr(args.system_prompt)})")
    print(f"positions per epoch: real {real}, random batches {rnd:.0f} ({real / rnd:.1%} useful), "
          f"group_by_length {grp:.0f} ({real / grp:.1%} useful); grouped / random = {grp / rnd:.3f}")


if __name__ == "__main__":
    main()
