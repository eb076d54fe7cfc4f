"""Synthetic speech corpus: espeak-ng voices x variants x pitch x speed -> 16 kHz mono WAVs.

Why: a multi-accent, multi-speaker, paralinguistically labelled ASR corpus built offline in
about a minute. Pitch, speed, accent and gender are known by construction, so instruct
questions about *how* something is said have exact answers. Whole voices (accents) are
held out for evaluation. Manifests are NeMo-style JSONL (one clip a line, paths relative to
the manifest).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import subprocess
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly
from tqdm import tqdm
from data.jsonl import read_jsonl

SAMPLE_RATE = 16_000
SYNTH_VERSION = 1  # bump to force every clip to be re-synthesised

# espeak-ng voice -> (human accent name, coarse region). Region is what eval asks about:
# held-out accents are never seen in training, but their region is.
VOICES: dict[str, tuple[str, str]] = {
    "en-us": ("American English", "American"),
    "en-us-nyc": ("New York City English", "American"),
    "en-gb": ("British English", "British"),
    "en-gb-x-rp": ("Received Pronunciation", "British"),
    "en-gb-scotland": ("Scottish English", "British"),
    "en-gb-x-gbclan": ("Lancashire English", "British"),
    "en-gb-x-gbcwmd": ("West Midlands English", "British"),
    "en-029": ("Caribbean English", "Caribbean"),
}
HELD_OUT_VOICES: tuple[str, ...] = ("en-gb-scotland", "en-us-nyc")
# espeak-ng variant ("" = the voice's default) -> speaker gender (from the variant files).
VARIANTS: dict[str, str] = {
    "": "male", "m1": "male", "m2": "male", "m3": "male", "m4": "male", "m5": "male",
    "m6": "male", "m7": "male", "klatt": "male",
    "f1": "female", "f2": "female", "f3": "female", "f4": "female", "f5": "female",
}
HELD_OUT_VARIANTS: tuple[str, ...] = ("m6", "f4")  # unseen speakers too, only in eval

# espeak -p is relative to each variant's own pitch range (a female voice at p=5 is still
# higher than a male one at p=95), so pitch_class means "low/high for this speaker"; the
# measured median F0 is recorded as f0_hz for absolute comparisons.
PITCH_RANGES: dict[str, tuple[int, int]] = {"low": (5, 25), "medium": (40, 60), "high": (75, 95)}
SPEED_RANGES: dict[str, tuple[int, int]] = {"slow": (95, 130), "normal": (155, 195), "fast": (230, 290)}


def pitch_class(pitch: int) -> str:
    """espeak -p (0..99) -> "low" (<=25), "high" (>=75) or "medium"."""
    return "low" if pitch <= 25 else "high" if pitch >= 75 else "medium"


def speed_class(speed: int) -> str:
    """espeak -s (words/min) -> "slow" (<=130), "fast" (>=220) or "normal"."""
    return "slow" if speed <= 130 else "fast" if speed >= 220 else "normal"


class TTSError(RuntimeError):
    """espeak-ng failed or produced no audio for one clip."""


@dataclass(frozen=True)
class ClipSpec:
    """Everything that determines one synthesised clip (and so its cache key)."""

    text: str
    voice: str = "en-us"
    variant: str = ""
    pitch: int = 50
    speed: int = 175

    def __post_init__(self) -> None:
        if not self.text.strip():
            raise ValueError("ClipSpec.text must not be empty")
        if self.voice not in VOICES:
            raise ValueError(f"unknown espeak voice {self.voice!r}; known: {sorted(VOICES)}")
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown espeak variant {self.variant!r}; known: {sorted(VARIANTS)}")
        if not 0 <= self.pitch <= 99:
            raise ValueError(f"pitch must be in 0..99, got {self.pitch}")
        if not 80 <= self.speed <= 450:
            raise ValueError(f"speed must be in 80..450 words/min, got {self.speed}")

    @property
    def key(self) -> str:
        """Content hash: a clip file is reused only when every parameter matches."""
        blob = json.dumps([asdict(self), SAMPLE_RATE, SYNTH_VERSION], sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]

    def labels(self) -> dict:
        accent, region = VOICES[self.voice]
        return {
            "pitch_class": pitch_class(self.pitch),
            "speed_class": speed_class(self.speed),
            "accent": accent,
            "accent_region": region,
            "gender": VARIANTS[self.variant],
        }

    def espeak_args(self) -> list[str]:
        voice = self.voice + (f"+{self.variant}" if self.variant else "")
        return ["espeak-ng", "--stdout", "-v", voice, "-p", str(self.pitch), "-s", str(self.speed), "--", self.text]


def median_f0(wav: np.ndarray, sr: int, fmin: float = 60.0, fmax: float = 450.0) -> float:
    """Median F0 (Hz) over voiced 40 ms frames by autocorrelation; nan when nothing is voiced."""
    n, hop = int(0.04 * sr), int(0.01 * sr)
    if len(wav) < n:
        return float("nan")
    frames = np.lib.stride_tricks.sliding_window_view(wav.astype(np.float64), n)[::hop]  # [F, n]
    frames = frames - frames.mean(axis=1, keepdims=True)
    energy = (frames**2).sum(axis=1)
    if not (energy > 0).any():
        return float("nan")
    frames = frames[energy > 0.1 * np.median(energy[energy > 0])]  # drop silence / weak frames
    if len(frames) == 0:
        return float("nan")
    spec = np.fft.rfft(frames, 2 * n, axis=1)
    ac = np.fft.irfft(np.abs(spec) ** 2, axis=1)[:, :n]  # [F, n] autocorrelation by lag
    lo, hi = int(sr / fmax), int(sr / fmin)
    lag = lo + ac[:, lo:hi].argmax(axis=1)
    voiced = ac[np.arange(len(ac)), lag] > 0.5 * ac[:, 0]
    return float(np.median(sr / lag[voiced])) if voiced.any() else float("nan")


def synthesize(spec: ClipSpec, path: str | Path, timeout: float = 60.0) -> None:
    """Run espeak-ng for ``spec`` and write a 16 kHz mono PCM16 WAV atomically at ``path``."""
    try:
        proc = subprocess.run(spec.espeak_args(), capture_output=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise TTSError(f"espeak-ng failed for {spec.text!r}: {e}") from e
    if proc.returncode != 0 or len(proc.stdout) <= 44:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        raise TTSError(f"espeak-ng exit {proc.returncode} for {spec.text!r}: {err[-1] if err else 'no audio'}")
    wav, sr = sf.read(io.BytesIO(proc.stdout), dtype="float32")
    if wav.ndim == 2:
        wav = wav.mean(axis=1)
    if wav.size == 0 or not np.any(wav):
        raise TTSError(f"espeak-ng produced silence for {spec.text!r}")
    g = np.gcd(SAMPLE_RATE, sr)
    wav = np.clip(resample_poly(wav, SAMPLE_RATE // g, sr // g), -1.0, 1.0).astype(np.float32)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    sf.write(tmp, wav, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    os.replace(tmp, path)


def _clip_job(args: tuple[ClipSpec, str, bool]) -> tuple[dict | None, str | None]:
    """Worker: synthesise unless a valid file is already there; measure duration and F0."""
    spec, path, reuse = args
    try:
        if not (reuse and _valid_wav(path)):
            synthesize(spec, path)
        wav, sr = sf.read(path, dtype="float32")
        return {"duration": round(len(wav) / sr, 4), "f0_hz": round(median_f0(wav, sr), 1)}, None
    except (TTSError, RuntimeError, OSError) as e:
        return None, str(e).splitlines()[0] if str(e) else type(e).__name__


def _valid_wav(path: str) -> bool:
    try:
        info = sf.info(path)
    except (RuntimeError, OSError):
        return False
    return info.samplerate == SAMPLE_RATE and info.channels == 1 and info.frames > 0


def synthesize_many(
    specs: Sequence[ClipSpec], paths: Sequence[str | Path], jobs: int = 2, desc: str = "tts", reuse: bool = True
) -> tuple[list[dict | None], list[str]]:
    """Synthesise clips in parallel (process pool when jobs > 1) with a progress bar.

    Returns (per-clip {"duration", "f0_hz"} or None where espeak failed, error messages).
    Existing valid files are reused (their name is the content hash of the parameters).
    """
    if len(specs) != len(paths):
        raise ValueError(f"{len(specs)} specs but {len(paths)} paths")
    work = [(s, str(p), reuse) for s, p in zip(specs, paths)]
    bar = {"total": len(work), "desc": desc, "unit": "clip", "leave": False, "disable": None}
    if jobs <= 1 or len(work) < 8:
        results = [_clip_job(w) for w in tqdm(work, **bar)]
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            results = list(tqdm(pool.map(_clip_job, work, chunksize=8), **bar))
    return [r for r, _ in results], [e for _, e in results if e is not None]


def sample_spec(text: str, rng: random.Random, voices: Sequence[str], variants: Sequence[str]) -> ClipSpec:
    """Random voice/variant (gender balanced) with pitch and speed drawn per class (balanced)."""
    by_gender = {g: [v for v in variants if VARIANTS[v] == g] for g in ("male", "female")}
    genders = [g for g, vs in by_gender.items() if vs]
    variant = rng.choice(by_gender[rng.choice(genders)])
    p_lo, p_hi = PITCH_RANGES[rng.choice(sorted(PITCH_RANGES))]
    s_lo, s_hi = SPEED_RANGES[rng.choice(sorted(SPEED_RANGES))]
    return ClipSpec(text, rng.choice(list(voices)), variant, rng.randint(p_lo, p_hi), rng.randint(s_lo, s_hi))


def split_voices() -> dict[str, tuple[list[str], list[str]]]:
    """Split -> (voices, variants): eval gets only held-out voices (and every variant)."""
    train_voices = [v for v in VOICES if v not in HELD_OUT_VOICES]
    train_variants = [v for v in VARIANTS if v not in HELD_OUT_VARIANTS]
    return {
        "train": (train_voices, train_variants),
        "val": (train_voices, train_variants),
        "eval": (list(HELD_OUT_VOICES), list(VARIANTS)),
    }


def plan_split(texts: Sequence[str], n: int, split: str, seed: int, voices: Sequence[str], variants: Sequence[str]) -> list[ClipSpec]:
    """``n`` specs for one split; clip i depends only on (seed, split, i), so plans are prefix-stable."""
    if n > 0 and not texts:
        raise ValueError(f"no sentences for split {split!r}")
    return [sample_spec(texts[i % len(texts)], random.Random(f"{seed}:{split}:{i}"), voices, variants) for i in range(n)]


def manifest_row(spec: ClipSpec, rel_path: str, meta: dict, split: str, **extra) -> dict:
    return {
        "audio_filepath": rel_path, "text": spec.text, "duration": meta["duration"], "id": spec.key,
        "voice": spec.voice, "variant": spec.variant or "default", "pitch": spec.pitch, "speed": spec.speed,
        **spec.labels(), "f0_hz": meta["f0_hz"], "split": split, **extra,
    }


def write_manifest(path: str | Path, rows: Iterable[dict]) -> int:
    """Write JSONL atomically; returns the number of rows."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    n = 0
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def render(
    specs: Sequence[ClipSpec], out_dir: Path, wav_subdir: str, split: str, jobs: int,
    extras: Sequence[dict] | None = None, previous: str | Path | None = None,
) -> tuple[list[dict], list[str]]:
    """Synthesise ``specs`` under out_dir/wav_subdir and return their manifest rows (failures dropped).

    ``previous``: an earlier manifest; clips listed there whose file still exists are reused
    without reading their audio (fast re-runs).
    """
    rel = [f"{wav_subdir}/{s.key}.wav" for s in specs]
    known: dict[str, dict] = {}
    if previous is not None and Path(previous).exists():
        try:
            known = {r["audio_filepath"]: r for r in read_jsonl(previous)}
        except (ValueError, KeyError):
            known = {}  # unreadable old manifest: re-measure everything
    todo = [i for i, r in enumerate(rel) if r not in known or not (out_dir / r).is_file()]
    metas: list[dict | None] = [{"duration": known[r]["duration"], "f0_hz": known[r]["f0_hz"]} if r in known else None for r in rel]
    new, errors = synthesize_many([specs[i] for i in todo], [out_dir / rel[i] for i in todo], jobs=jobs, desc=f"tts {split}")
    for i, m in zip(todo, new):
        metas[i] = m
    rows = [manifest_row(s, r, m, split, **(extras[i] if extras else {}))
            for i, (s, r, m) in enumerate(zip(specs, rel, metas)) if m is not None]
    return rows, errors


def prune(out_dir: Path, wav_subdir: str, keep: Iterable[dict]) -> int:
    """Delete WAVs under wav_subdir that no manifest row references (stale parameters)."""
    wanted = {row["audio_filepath"] for row in keep}
    n = 0
    for p in (out_dir / wav_subdir).rglob("*.wav"):
        if p.relative_to(out_dir).as_posix() not in wanted:
            p.unlink()
            n += 1
    return n


def build_corpus(
    out_dir: str | Path,
    n_clips: int,
    sentences: dict[str, Sequence[str]],
    jobs: int = 2,
    seed: int = 0,
    eval_fraction: float = 0.1,
    val_fraction: float = 0.05,
) -> dict:
    """Build train/val/eval manifests (+ WAVs under out_dir/wavs/align) for ``n_clips`` clips.

    ``sentences`` maps split -> texts (disjoint pools, see modality.speech.corpus.sentences.split_sentences).
    Eval uses only HELD_OUT_VOICES. Clips espeak fails on are skipped and counted. Returns
    counts per split, "failed", and "errors" (first few messages).
    """
    if n_clips < 3:
        raise ValueError(f"n_clips must be >= 3 (one per split), got {n_clips}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_eval = max(1, round(n_clips * eval_fraction))
    n_val = max(1, round(n_clips * val_fraction))
    counts = {"train": n_clips - n_eval - n_val, "val": n_val, "eval": n_eval}
    stats: dict = {"failed": 0, "errors": []}
    all_rows: list[dict] = []
    for split, (voices, variants) in split_voices().items():
        specs = plan_split(sentences[split], counts[split], split, seed, voices, variants)
        rows, errors = render(specs, out_dir, f"wavs/align/{split}", split, jobs, previous=out_dir / f"{split}.jsonl")
        write_manifest(out_dir / f"{split}.jsonl", rows)
        stats[split] = len(rows)
        stats["failed"] += len(errors)
        stats["errors"] += errors[:3]
        all_rows += rows
    stats["pruned"] = prune(out_dir, "wavs/align", all_rows)
    stats["hours"] = round(sum(r["duration"] for r in all_rows) / 3600, 3)
    return stats
