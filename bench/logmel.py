"""Batched log-mel (modality.speech.logmel) vs transformers' WhisperFeatureExtractor on the same 64 real clips.

    python -m bench.logmel [--clips 64] [--reps 5] [--device cuda|cpu] [--threads N]
        [--manifest data_cache/speech_long/eval.jsonl]

Clips: the manifest's wav files when present, else sentences spoken by espeak-ng (resampled to 16 kHz) in a
temp dir. Every row gives each clip's real-length frames (the extractor's default pads to 30 s = 3,000 frames;
that row is shown for scale, compared on the real frames only). maxdiff: the largest |difference| from the
extractor called clip by clip at real length over every valid frame of every clip. The last line is
`speedup <ratio> maxdiff <value>`: the fastest extractor row that is at equal output (maxdiff <= 1e-3) over
the batched path, end to end (CPU waveforms in, CPU features out, the copies to and from --device included),
ratio of the min times (the min is the least disturbed by other processes on a shared CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from modality.speech.audio import load_audio
from modality.speech.logmel import log_mel, log_mel_batch, mel_filters, pad_waves

SENTENCES = [
    "Well, that's how I feel all the time.",
    "Please send the quarterly report to the finance team by Friday.",
    "The quick brown fox jumps over the lazy dog.",
    "Stock prices fell sharply after the central bank raised interest rates again this morning.",
]
VOICES = ["en", "en-us", "en-gb-scotland", "en-029"]


def real_clips(manifest: Path, n: int) -> list[torch.Tensor] | None:
    """The first ``n`` clips of a NeMo manifest whose wav files exist, or None when there are fewer."""
    if not manifest.is_file():
        return None
    paths = []
    for line in manifest.read_text().splitlines():
        p = manifest.parent / json.loads(line)["audio_filepath"]
        if p.is_file():
            paths.append(p)
        if len(paths) == n:
            return [load_audio(p) for p in paths]
    return None


def espeak_clips(n: int) -> list[torch.Tensor]:
    """``n`` espeak-ng clips across voices and speeds (espeak writes 22.05 kHz; load_audio resamples to 16 kHz)."""
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            wav = Path(tmp) / f"{i}.wav"
            cmd = ["espeak-ng", "-v", VOICES[i % len(VOICES)], "-s", str(120 + 10 * (i % 8)), "-w", str(wav),
                   SENTENCES[i % len(SENTENCES)]]
            subprocess.run(cmd, check=True, capture_output=True)
            out.append(load_audio(wav))
    return out


def timed(fns: list[Callable[[], list[np.ndarray]]], reps: int) -> list[tuple[list[np.ndarray], float, float]]:
    """Per fn: (output, min ms, median ms) after one warm-up call each. Round robin, so a neighbour's load on a
    shared CPU falls on every row alike."""
    outs = [fn() for fn in fns]
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            outs[i] = fn()
            times[i].append((time.perf_counter() - t) * 1000)
    return [(o, min(t), statistics.median(t)) for o, t in zip(outs, times)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--n-mels", type=int, default=80)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--manifest", default="data_cache/speech_long/eval.jsonl")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import WhisperFeatureExtractor

    waves = real_clips(Path(args.manifest), args.clips)
    source = args.manifest
    if waves is None:
        waves, source = espeak_clips(args.clips), "espeak-ng"
    arrays = [w.numpy() for w in waves]
    frames = [w.shape[0] // 160 for w in waves]
    secs = [w.shape[0] / 16000 for w in waves]
    print(f"{len(waves)} clips from {source}: {min(secs):.2f}-{max(secs):.2f} s, {sum(secs):.1f} s in all; "
          f"device {args.device}, {torch.get_num_threads()} CPU threads")
    fe = WhisperFeatureExtractor(feature_size=args.n_mels)
    fb = mel_filters(args.n_mels)
    fb_dev = fb.to(args.device)

    def fe_each(device: str = "cpu") -> list[np.ndarray]:
        return [fe(a, sampling_rate=16000, padding="longest", return_tensors="np", device=device).input_features[0].T
                for a in arrays]

    def fe_batch() -> list[np.ndarray]:
        out = fe(arrays, sampling_rate=16000, padding="longest", return_tensors="np").input_features
        return [out[i].T[:t] for i, t in enumerate(frames)]

    def fe_30s() -> list[np.ndarray]:
        out = fe(arrays, sampling_rate=16000, return_tensors="np").input_features
        return [out[i].T[:t] for i, t in enumerate(frames)]

    def ours_each() -> list[np.ndarray]:
        return [log_mel(w, fb).numpy() for w in waves]

    def ours_batch() -> list[np.ndarray]:
        feats, _ = log_mel_batch(*pad_waves(waves, args.device), fb_dev)
        feats = feats.cpu()  # blocks until the device is done
        return [feats[i, :t].numpy() for i, t in enumerate(frames)]

    rows = [("WhisperFeatureExtractor, clip by clip, real length", fe_each, True),
            ("WhisperFeatureExtractor, one call, padding=longest", fe_batch, True),
            ("WhisperFeatureExtractor, one call, default 30 s", fe_30s, True),
            *([(f"WhisperFeatureExtractor, clip by clip, device={args.device}", lambda: fe_each(args.device), True)]
              if args.device != "cpu" else []),
            ("log_mel, clip by clip (old precompute path, CPU)", ours_each, False),
            (f"log_mel_batch, one call ({args.device})", ours_batch, False)]
    results = []
    print(f"{'path':<52} {'min ms':>8} {'median ms':>10} {'maxdiff':>9}")
    timings = timed([fn for _, fn, _ in rows], args.reps)
    ref = timings[0][0]  # the extractor clip by clip: what each clip gets alone
    for (name, _, is_fe), (out, t_min, t_med) in zip(rows, timings):
        diff = max(float(np.abs(o - r).max()) for o, r in zip(out, ref))
        results.append((name, t_min, diff, is_fe))
        print(f"{name:<52} {t_min:>8.1f} {t_med:>10.1f} {diff:>9.2e}")
    base = min((r for r in results if r[3] and r[2] <= 1e-3), key=lambda r: r[1])
    ours = results[-1]
    print(f"baseline: {base[0]} ({base[1]:.1f} ms)")
    print(f"speedup {base[1] / ours[1]:.2f} maxdiff {ours[2]:.2e}")


if __name__ == "__main__":
    main()
