"""What the sharded encoder cache costs to build and what it saves in an align epoch, measured in ONE run.

    python -m bench.encoder_cache [--clips 48] [--batch 8] [--manifest data_cache/speech/train.jsonl]

Whisper tiny.en (packaged) + SmolLM2-135M, real espeak clips (read only; the cache goes to a temporary folder):
  1. build: ``precompute_cache`` of every clip (batched, sorted by duration, sharded), cold
  2. warm start: the same call with everything cached (plan + crc32 check of every shard in use)
  3. the encoder side of an epoch alone (read, featurize, encode  vs  read the cache), 3 rounds alternating
  4. an align epoch (adaptor trains, LLM frozen; AdamW) reading the cache  vs  running the encoder live,
     two epochs each, alternating (min: least disturbed by other processes)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", type=int, default=48)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--manifest", default="data_cache/speech/train.jsonl")
    args = ap.parse_args()

    from torch.utils.data import DataLoader

    from data.collate import ConversationCollator
    from data.dataset import ConversationDataset
    from llm.loader import load_llm
    from llm.tokens import add_placeholder_tokens
    from modality.speech.plugin import SpeechModality
    from modality.speech.records import read_speech_records
    from tasks.multimodal import MultimodalLM
    from tasks.stages import StagePolicy

    lm = load_llm()
    ids = add_placeholder_tokens(lm.tokenizer, lm.model, ["<speech>"])
    recs = read_speech_records(args.manifest)[: args.clips]
    tmp = Path(tempfile.mkdtemp(prefix="bench_encoder_cache_"))
    sp = SpeechModality(d_llm=lm.hidden_size, target_rms=lm.embedding_rms, cache_dir=str(tmp))
    paths = [sp.resolve(r["speech"][0], r.get("root")) for r in recs]
    t = time.perf_counter()
    built = sp.precompute_cache(paths, batch_size=16, progress=False)
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    warm = sp.precompute_cache(paths, batch_size=16, progress=False)
    warm_s = time.perf_counter() - t
    shards = list(sp.cache_folder().glob("shard-*.safetensors"))
    mb = sum(s.stat().st_size for s in shards) / 2**20
    seconds = sum(sp.load(p).shape[0] for p in paths) / 16000

    model = MultimodalLM(lm.model, lm.tokenizer, {"speech": sp}, {"speech": ids["<speech>"]}, StagePolicy("align"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    col = ConversationCollator(lm.tokenizer, {"speech": sp}, model.placeholder_ids)

    def epoch(cached: bool) -> float:
        sp.cache_dir = str(tmp) if cached else None  # None: load_features gives log-mels, the encoder runs per step
        loader = DataLoader(ConversationDataset(recs, {"speech": sp}), batch_size=args.batch, collate_fn=col)
        t0 = time.perf_counter()
        for batch in loader:
            opt.zero_grad(set_to_none=True)
            model(batch)["loss"].backward()
            opt.step()
        return time.perf_counter() - t0

    def inputs(cached: bool) -> float:
        """The encoder side of an epoch alone: read + featurize + encode (live) vs read the cache."""
        sp.cache_dir = str(tmp) if cached else None
        loader = DataLoader(ConversationDataset(recs, {"speech": sp}), batch_size=args.batch, collate_fn=col)
        t0 = time.perf_counter()
        for batch in loader:
            if not cached:
                with torch.no_grad():
                    sp.encode_frozen(batch["modal"]["speech"]["values"], batch["modal"]["speech"]["mask"])
        return time.perf_counter() - t0

    side: dict[str, list[float]] = {"live encoder": [], "cached": []}
    for _ in range(3):
        for k, v in side.items():
            v.append(inputs(k == "cached"))
    times: dict[str, list[float]] = {"live encoder": [], "cached": []}
    for _ in range(2):
        for k, v in times.items():
            v.append(epoch(k == "cached"))
    live, cached = min(times["live encoder"]), min(times["cached"])
    print(f"{len(paths)} clips ({seconds:.1f} s of audio), batch {args.batch}, torch threads {torch.get_num_threads()}")
    print(f"build (cold): {build_s:.2f} s, {len(paths) / build_s:.1f} clips/s -> {len(shards)} shard(s), {mb:.1f} MiB; {built}")
    print(f"warm start (all cached, every shard crc-checked): {warm_s:.3f} s; {warm}")
    print("| per epoch | min s | all s |\n|---|---|---|")
    for name, d in (("inputs + encoder only", side), ("align epoch (+ adaptor, LLM fwd/bwd, AdamW)", times)):
        for k, v in d.items():
            print(f"| {name}, {k} | {min(v):.2f} | {' / '.join(f'{x:.2f}' for x in v)} |")
    print(f"inputs + encoder: live/cached {min(side['live encoder']) / min(side['cached']):.1f}x")
    saved = min(side["live encoder"]) - min(side["cached"])
    print(f"ratio live/cached align epoch: {live / cached:.2f}x; the build costs {build_s / max(saved, 1e-9):.2f} "
          f"epochs of live encoding (encoder side)")


if __name__ == "__main__":
    main()
