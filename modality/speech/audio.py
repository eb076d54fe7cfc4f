"""Audio loading for the speech modality: any file soundfile reads -> float32 mono at 16 kHz.

Why a module of its own: every bad-input case (missing, empty, undecodable, zero-length,
NaN, over-long) must fail with one line naming the file, before a worker hands a broken
tensor to the encoder where the failure would be far from its cause.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF
from torch import Tensor

OVERLONG_POLICIES = ("error", "truncate")


def audio_info(path: str | os.PathLike) -> tuple[int, int]:
    """(frames, sample_rate) from the header only; used to sort clips by length cheaply."""
    path = str(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: audio file not found")
    try:
        info = sf.info(path)
    except (RuntimeError, TypeError, ValueError, OSError) as e:  # LibsndfileError is a RuntimeError
        raise ValueError(f"{path}: not a readable audio file ({_first_line(e)})") from None
    return int(info.frames), int(info.samplerate)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def load_audio(
    path: str | os.PathLike,
    target_sr: int = 16000,
    max_seconds: float | None = None,
    overlong: Literal["error", "truncate"] = "error",
) -> Tensor:
    """Read ``path`` -> float32 mono waveform [S] at ``target_sr``.

    Stereo is averaged to mono, any sample rate is resampled. Clips longer than
    ``max_seconds`` (Whisper's window is 30 s) raise (``overlong="error"``) or are cut
    (``"truncate"``); use :func:`chunk_waveform` to split long audio on purpose instead.
    """
    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"overlong must be one of {OVERLONG_POLICIES}, got {overlong!r}")
    path = str(path)
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{path}: audio file not found")
    if p.stat().st_size == 0:
        raise ValueError(f"{path}: audio file is empty (0 bytes)")
    try:
        data, sr = sf.read(path, dtype="float32", always_2d=True)  # [S, C]
    except (RuntimeError, TypeError, ValueError, OSError) as e:
        raise ValueError(f"{path}: cannot decode audio ({_first_line(e)})") from None
    if data.shape[0] == 0 or data.shape[1] == 0:
        raise ValueError(f"{path}: audio has zero length")
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise ValueError(f"{path}: audio has {bad} NaN/inf samples")
    wave = torch.from_numpy(data).mean(dim=1)  # [S, C] -> [S] mono
    if max_seconds is not None:
        limit = round(max_seconds * sr)
        if wave.shape[0] > limit:
            if overlong == "error":
                raise ValueError(f"{path}: audio is {wave.shape[0] / sr:.2f} s, longer than max_seconds={max_seconds} (overlong='truncate' cuts it)")
            wave = wave[:limit]
    if sr != target_sr:
        wave = AF.resample(wave, sr, target_sr)
    return wave.contiguous()


def chunk_waveform(wave: Tensor, sample_rate: int = 16000, seconds: float = 30.0) -> list[Tensor]:
    """Split a long waveform [S] into consecutive pieces of at most ``seconds`` (the last one shorter)."""
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    step = round(seconds * sample_rate)
    return [wave[i : i + step] for i in range(0, wave.shape[0], step)]
