"""Measure the speech front end: ct2 import (fresh and cached), encoder time real length vs 30 s, transcripts.

    python -m bench.speech_encoder [--reps 5]

Prints one line per measurement; a benchmark, not a test (numbers depend on the machine's load).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from modality.speech.audio import load_audio

CLIPS = [
    ("en", "Well, that's how I feel all the time."),
    ("en-us", "Please send the quarterly report to the finance team by Friday."),
    ("en", "The quick brown fox jumps over the lazy dog."),
    ("en-us", "Stock prices fell sharply after the central bank raised interest rates again this morning."),
]


def _ms(fn, reps: int) -> str:
    """'min/median ms': the min is the least disturbed by other processes on a shared CPU."""
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return f"{min(times):.0f}/{statistics.median(times):.0f} ms"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    from transformers import WhisperFeatureExtractor

    from modality.speech.plugin import SpeechModality
    from modality.speech.whisper_ct2 import (
        cached_conversion,
        find_packaged_whisper,
        load_ct2_processor,
        load_ct2_whisper,
    )

    src = find_packaged_whisper()
    with tempfile.TemporaryDirectory() as cache:
        t = time.perf_counter()
        cached_conversion(src, cache)
        print(f"ct2 -> HF conversion (fresh cache): {time.perf_counter() - t:.2f} s")
        load_ct2_whisper(src, cache_dir=cache)
        t = time.perf_counter()
        model = load_ct2_whisper(src, cache_dir=cache)
        print(f"load_ct2_whisper from cache: {time.perf_counter() - t:.2f} s")
    proc = load_ct2_processor(src)
    speech = SpeechModality(d_llm=8, hidden=8).eval()
    fe = WhisperFeatureExtractor()
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for i, (voice, text) in enumerate(CLIPS):
            wav = Path(tmp) / f"{i}.wav"
            subprocess.run(["espeak-ng", "-v", voice, "-w", str(wav), text], check=True, capture_output=True)
            wave = load_audio(wav)
            mel = speech.featurize(wave)[None]
            ones = torch.ones(1, mel.shape[1], dtype=torch.bool)
            padded = torch.from_numpy(fe(wave.numpy(), sampling_rate=16000).input_features)
            real_ms = _ms(lambda w=wave, o=ones: speech.encode_frozen(speech.featurize(w)[None], o), args.reps)
            pad_ms = _ms(lambda x=padded: speech.encoder(x), args.reps)
            real, n = speech.encode_frozen(mel, ones)
            ref = speech.encoder(padded).last_hidden_state[:, : int(n)]
            cos = torch.nn.functional.cosine_similarity(real[0], ref[0], dim=-1)
            hyp = proc.tokenizer.batch_decode(model.generate(padded), skip_special_tokens=True)[0].strip()
            print(f"{wave.shape[0] / 16000:.2f} s clip: encoder (min/median) real length {real_ms} (log-mel incl.) vs 30 s padded {pad_ms}; "
                  f"cos(real, padded) mean {cos.mean():.3f} first10 {cos[:10].mean():.3f} min {cos.min():.3f}")
            print(f"    [{voice}] said: {text!r}  heard: {hyp!r}")


if __name__ == "__main__":
    main()
