"""Whisper's log-mel front end in torch: one clip (the reference) and a batch on any device.

Why a batched path: ``precompute_cache`` used to featurize clip by clip on the CPU and then pad; the
batch computes every clip of a chunk in one STFT + one matmul on the device the encoder sits on, and
gives each clip exactly what it gets alone (tests/unit/modality/speech/test_logmel.py), so cached
encoder outputs do not depend on which clips shared a batch.

Per-clip equality needs two things a plain ``torch.stft`` over a zero-padded batch does not give:
each clip's end is reflect-padded from its own samples (not from the zeros after it), and Whisper's
"max - 8 dB" floor uses the clip's own valid frames only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchaudio.functional as AF
from torch import Tensor

SAMPLE_RATE, N_FFT, HOP = 16000, 400, 160  # Whisper's front end: 25 ms window, 10 ms hop
HALF = N_FFT // 2  # torch.stft(center=True) reflect-pads this much on each side


def mel_filters(n_mels: int) -> Tensor:
    """Slaney-scale, slaney-normalised triangular filters [N_FFT//2+1, n_mels], as Whisper/librosa."""
    return AF.melscale_fbanks(N_FFT // 2 + 1, 0.0, 8000.0, n_mels, SAMPLE_RATE, norm="slaney", mel_scale="slaney")


def log_mel(wave: Tensor, filters: Tensor) -> Tensor:
    """Waveform [S] at 16 kHz -> Whisper log-mel [S // 160, n_mels] on the real length (no 30 s padding)."""
    if wave.shape[0] <= N_FFT // 2:  # reflect padding needs more than half a window: pad very short clips with silence
        wave = F.pad(wave, (0, N_FFT + 1 - wave.shape[0]))
    stft = torch.stft(wave, N_FFT, HOP, window=torch.hann_window(N_FFT, device=wave.device), return_complex=True)
    power = stft[:, :-1].abs() ** 2  # [F, T]; Whisper drops the last frame
    log = (filters.T.to(power) @ power).clamp(min=1e-10).log10()  # [n_mels, T]
    log = torch.maximum(log, log.max() - 8.0)
    return ((log + 4.0) / 4.0).T.contiguous()  # [T, n_mels]


def frame_counts(lengths: Tensor) -> Tensor:
    """Mel frames per clip of ``lengths`` samples, as :func:`log_mel` gives them (very short clips: 2)."""
    return torch.where(lengths <= HALF, N_FFT + 1, lengths) // HOP


def pad_waves(waves: list[Tensor], device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Mono clips [S_i] -> (zero-padded float32 [B, S_max], lengths [B]), both on ``device`` (default: the first
    clip's). One host-to-device copy for the batch, not one per clip."""
    if not waves:
        raise ValueError("pad_waves needs at least one clip")
    lengths = torch.tensor([w.shape[0] for w in waves], dtype=torch.long)
    out = torch.zeros(len(waves), max(int(lengths.max()), 1), dtype=torch.float32)
    for i, w in enumerate(waves):
        if w.ndim != 1:
            raise ValueError(f"clip {i}: expected a mono waveform [S], got shape {tuple(w.shape)}")
        out[i, : w.shape[0]] = w.detach().to("cpu", torch.float32)
    device = waves[0].device if device is None else device
    return out.to(device, non_blocking=True), lengths.to(device)


def _own_padding(waves: Tensor, lengths: Tensor, n: Tensor) -> Tensor:
    """[B, S] -> [B, max(S, N_FFT + 1) + N_FFT]: row i is clip i reflect-padded by HALF at both of its own ends, as
    ``torch.stft(center=True)`` pads it alone (clips of <= HALF samples first get silence up to ``n`` = N_FFT + 1,
    as in :func:`log_mel`). The frames of clip i read no sample past ``lengths[i]``; one full copy, the rest small."""
    s = waves.shape[1]
    if s < N_FFT + 1:  # room for the silence of very short clips (and reflect padding needs > HALF samples)
        waves = F.pad(waves, (0, N_FFT + 1 - s))
    out = F.pad(waves[:, None], (HALF, HALF), mode="reflect")[:, 0]  # the left end is right for clips > HALF
    head = torch.arange(N_FFT + 1, device=waves.device)[None, :]
    head = waves[:, : N_FFT + 1] * ((head < lengths[:, None]) | (lengths[:, None] > HALF)).to(waves.dtype)
    out[:, : HALF + N_FFT + 1] = F.pad(head[:, None], (HALF, 0), mode="reflect")[:, 0]  # short clips: silence
    k = torch.arange(HALF, device=waves.device)[None, :]
    out.scatter_(1, n[:, None] + HALF + k, out.gather(1, n[:, None] + HALF - 2 - k))  # the right end: its own
    return out


def log_mel_batch(waves: Tensor, lengths: Tensor, filters: Tensor) -> tuple[Tensor, Tensor]:
    """Waveforms [B, S] at 16 kHz with ``lengths`` [B] -> (log-mel [B, T_max, n_mels], mask [B, T_max]).

    Row i equals ``log_mel(waves[i, :lengths[i]], filters)`` on its first ``lengths[i] // 160`` frames and is zero
    after them (as ``collate_features`` pads); samples past ``lengths[i]`` are never read. Runs on the device of
    ``waves``; ``filters`` follows it. The FFT and the mel matmul run on the clips' own frames only, so the cost
    follows their total length, not B x the longest.
    """
    if waves.ndim != 2 or lengths.shape != waves.shape[:1]:
        raise ValueError(f"log_mel_batch expects waves [B, S] and lengths [B], got {tuple(waves.shape)} and "
                         f"{tuple(lengths.shape)}")
    lengths = lengths.to(waves.device, torch.long)
    if bool((lengths > waves.shape[1]).any()):
        raise ValueError(f"a length exceeds the waves' {waves.shape[1]} samples: {lengths.tolist()}")
    if not waves.is_floating_point():
        waves = waves.float()
    n = torch.where(lengths <= HALF, N_FFT + 1, lengths)  # effective length, as log_mel extends short clips
    frames = frame_counts(lengths)  # n // HOP: stft's 1 + n // HOP, the last one dropped as Whisper does
    t_max = int(frames.max())
    mask = torch.arange(t_max, device=waves.device)[None, :] < frames[:, None]  # [B, t_max]
    clip, frame = mask.nonzero(as_tuple=True)  # every clip's own frames, packed
    windows = _own_padding(waves, lengths, n).unfold(1, N_FFT, HOP)[clip, frame]  # [sum(frames), N_FFT], a copy
    spec = torch.fft.rfft(windows.mul_(torch.hann_window(N_FFT, device=waves.device, dtype=waves.dtype)))
    squares = torch.view_as_real(spec).square_().flatten(1)  # [sum(frames), 2F]: re^2, im^2 side by side
    fb = filters.to(squares).repeat_interleave(2, dim=0)  # so the matmul adds re^2 + im^2 = |z|^2, no sqrt
    log = (squares @ fb).clamp_(min=1e-10).log10_()  # [sum(frames), n_mels]
    peak = log.new_full((mask.shape[0],), float("-inf")).scatter_reduce_(0, clip, log.amax(dim=1), "amax")
    log = torch.maximum(log, (peak - 8.0)[clip, None]).add_(4.0).div_(4.0)  # floor: each clip's own max - 8
    out = log.new_zeros(*mask.shape, log.shape[1])
    out[clip, frame] = log
    return out, mask
