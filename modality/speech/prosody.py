"""The discrete speech path's token layout and its signal side: F0/energy per 10 ms, k-means, and the rules that
turn (units, F0, energy) into one token sequence.

Per clip: ``<register_k>`` (the clip's median F0, absolute: who speaks how high), then per ``prosody_every``
window ``<pitch_k>`` (the window's F0 RELATIVE to the clip's median, in semitones: intonation, the same for a
low and a high voice saying it the same way), ``<energy_k>``, ``<rate_k>`` (unit runs per unit slot of the
window: how fast the sounds change), then the window's units, each run of one repeated unit written once and
followed by ``<dur_k>`` when it lasted 2+ unit frames (so collapsing repeats keeps the timing):

    <register_3> <pitch_3> <energy_2> <rate_2> <unit_17> <dur_0> <unit_3> <unit_88> <pitch_4> ...
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from modality.speech.logmel import SAMPLE_RATE

FRAME = SAMPLE_RATE // 100  # prosody frames: 10 ms hop
ENCODER_HZ = 50             # Whisper encoder frames per second


@dataclass
class UnitsHParams:
    d_llm: int
    n_units: int = 128
    pitch_bins: int = 7          # relative to the clip's median F0, uniform over +-pitch_semitones; + "unvoiced"
    energy_bins: int = 4         # uniform over [energy_floor, 0] dBFS
    unit_stack: int = 2          # encoder frames averaged per unit: 50 Hz -> 25 Hz
    prosody_every: float = 0.2   # seconds per (pitch, energy, rate) triple
    dedup: bool = True           # collapse repeated units into one + a duration token
    f0_min: float = 60.0
    f0_max: float = 400.0
    energy_floor: float = -60.0
    target_rms: float | None = None
    pitch_semitones: float = 6.0  # half-range of the relative pitch bins
    register_bins: int = 8        # the clip's median F0, log-spaced over [f0_min, f0_max]; + "unvoiced"
    dur_edges: tuple[int, ...] = field(default=(2, 3, 5))  # run lengths (unit frames) starting each <dur_k>
    rate_bins: int = 4            # unit runs per unit slot of a window, uniform over (0, 1]

    def __post_init__(self) -> None:
        if self.d_llm is None or int(self.d_llm) < 1:
            raise ValueError(f"d_llm must be a positive int, got {self.d_llm!r}")
        for k in ("n_units", "pitch_bins", "energy_bins", "unit_stack", "register_bins", "rate_bins"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        window = self.prosody_every * ENCODER_HZ / self.unit_stack
        if window < 1 or abs(window - round(window)) > 1e-6:
            raise ValueError(f"prosody_every ({self.prosody_every} s) must hold a whole number >= 1 of units "
                             f"({ENCODER_HZ}/{self.unit_stack} per second)")
        if not 0 < self.f0_min < self.f0_max:
            raise ValueError(f"need 0 < f0_min < f0_max, got {self.f0_min}, {self.f0_max}")
        if not self.energy_floor < 0:
            raise ValueError(f"energy_floor must be < 0 dBFS, got {self.energy_floor}")
        if not self.pitch_semitones > 0:
            raise ValueError(f"pitch_semitones must be > 0, got {self.pitch_semitones}")
        self.dur_edges = tuple(int(e) for e in self.dur_edges)
        if not self.dur_edges or self.dur_edges[0] != 2 or list(self.dur_edges) != sorted(set(self.dur_edges)):
            raise ValueError(f"dur_edges must be increasing run lengths starting at 2 (every collapsed run gets a "
                             f"duration), got {list(self.dur_edges)}")

    # ------------------------------------------------------------------ layout: local ids, in this order
    @property
    def pitch0(self) -> int:
        return self.n_units

    @property
    def energy0(self) -> int:
        return self.pitch0 + self.pitch_bins + 1

    @property
    def register0(self) -> int:
        return self.energy0 + self.energy_bins

    @property
    def dur0(self) -> int:
        return self.register0 + self.register_bins + 1

    @property
    def rate0(self) -> int:
        return self.dur0 + len(self.dur_edges)

    @property
    def vocab(self) -> int:
        return self.rate0 + self.rate_bins

    @property
    def units_per_window(self) -> int:
        return round(self.prosody_every * ENCODER_HZ / self.unit_stack)

    def token_names(self) -> list[str]:
        return ([f"<unit_{i}>" for i in range(self.n_units)] + [f"<pitch_{i}>" for i in range(self.pitch_bins)] +
                ["<pitch_uv>"] + [f"<energy_{i}>" for i in range(self.energy_bins)] +
                [f"<register_{i}>" for i in range(self.register_bins)] + ["<register_uv>"] +
                [f"<dur_{i}>" for i in range(len(self.dur_edges))] + [f"<rate_{i}>" for i in range(self.rate_bins)])


def frame_prosody(wave: Tensor, f0_min: float = 60.0, f0_max: float = 400.0) -> tuple[Tensor, Tensor]:
    """Waveform [S] (16 kHz) -> (F0 Hz [F] with NaN where unvoiced, energy dBFS [F]), one per 10 ms.

    Autocorrelation over 40 ms windows: the smallest lag whose peak reaches 0.9 of the best one in
    [1/f0_max, 1/f0_min] (the plain argmax halves F0 on high voices), voiced when that peak holds
    half the frame's energy and the frame is not near-silent.
    """
    n = 4 * FRAME
    wave = wave.float()
    frames_out = max(1, wave.shape[0] // FRAME)
    x = F.pad(wave, (n // 2, n // 2 + FRAME * frames_out))
    frames = x.unfold(0, n, FRAME)[:frames_out]                      # [F, n]
    frames = frames - frames.mean(1, keepdim=True)
    energy = frames.pow(2).mean(1)                                   # [F]
    db = 10 * torch.log10(wave.unfold(0, FRAME, FRAME).pow(2).mean(1).clamp(min=1e-10)) if wave.shape[0] >= FRAME \
        else torch.full((1,), -100.0)
    db = F.pad(db, (0, frames_out - db.shape[0]), value=-100.0)[:frames_out]
    spec = torch.fft.rfft(frames, 2 * n, dim=1)
    ac = torch.fft.irfft(spec.abs().pow(2), dim=1)[:, :n]            # [F, n] autocorrelation by lag
    lo, hi = int(SAMPLE_RATE / f0_max), min(n - 1, int(SAMPLE_RATE / f0_min))
    seg = ac[:, lo - 1:hi + 2]                                       # [F, lags + 2]: a neighbour each side
    mid = seg[:, 1:-1]
    peaks = (mid >= seg[:, :-2]) & (mid >= seg[:, 2:])               # local maxima only (not the lag-0 slope)
    best = torch.where(peaks, mid, torch.full_like(mid, -float("inf"))).max(1).values
    first = (peaks & (mid >= 0.9 * best[:, None])).float().argmax(1)  # the smallest near-best peak
    lag = lo + first
    peak = ac.gather(1, lag[:, None]).squeeze(1)
    loud = energy > 0.05 * energy.max().clamp(min=1e-12)
    voiced = loud & (peak > 0.5 * ac[:, 0].clamp(min=1e-12))
    f0 = torch.where(voiced, SAMPLE_RATE / lag.float(), torch.full_like(peak, float("nan")))
    return f0, db


def kmeans(x: Tensor, k: int, iters: int = 25, seed: int = 0) -> Tensor:
    """Lloyd's k-means with k-means++ seeding on rows of x [N, D] -> centroids [k, D]."""
    if x.shape[0] < k:
        raise ValueError(f"k-means needs at least k={k} frames, got {x.shape[0]}")
    g = torch.Generator().manual_seed(seed)
    c = x[torch.randint(x.shape[0], (1,), generator=g)]
    d2 = torch.cdist(x, c).squeeze(1).pow(2)
    for _ in range(1, k):
        nxt = torch.multinomial(d2.clamp(min=1e-12), 1, generator=g)
        c = torch.cat([c, x[nxt]])
        d2 = torch.minimum(d2, (x - x[nxt]).pow(2).sum(1))
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(1)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).clamp(min=1)[:, None].to(x)
        empty = torch.bincount(assign, minlength=k) == 0
        c = torch.where(empty[:, None], c, sums / counts)
    return c


def _bin(x: float, n: int) -> int:
    """x in [0, 1] -> one of n uniform bins (clamped)."""
    return int(min(n - 1, max(0.0, x * n)))


def layout(h: UnitsHParams, units: Tensor, f0: Tensor, db: Tensor) -> Tensor:
    """Units [U] + F0 [F] (NaN unvoiced) + energy dBFS [F] (10 ms frames) -> local token ids [N] (module docstring)."""
    voiced = f0[~f0.isnan()]
    log_span = math.log(h.f0_max) - math.log(h.f0_min)
    if voiced.numel():
        median = float(voiced.median())
        out = [h.register0 + _bin((math.log(median) - math.log(h.f0_min)) / log_span, h.register_bins)]
    else:
        median, out = float("nan"), [h.register0 + h.register_bins]
    per, fpw = h.units_per_window, round(h.prosody_every * 100)  # unit frames / 10 ms frames per window
    for w in range(math.ceil(units.shape[0] / per)):
        f = f0[w * fpw:(w + 1) * fpw]
        v = f[~f.isnan()]
        if v.numel() >= max(1, f.numel() // 4) and not math.isnan(median):
            semitones = 12 * math.log2(float(v.median()) / median)
            pitch = h.pitch0 + _bin((semitones + h.pitch_semitones) / (2 * h.pitch_semitones), h.pitch_bins)
        else:
            pitch = h.pitch0 + h.pitch_bins  # unvoiced
        e = db[w * fpw:(w + 1) * fpw]
        level = float(e.mean()) if e.numel() else -100.0
        energy = h.energy0 + _bin((level - h.energy_floor) / -h.energy_floor, h.energy_bins)
        chunk = units[w * per:(w + 1) * per].tolist()
        runs: list[list[int]] = []  # [unit, length], within this window (timing stays exact per window)
        for u in chunk:
            if runs and runs[-1][0] == u and h.dedup:
                runs[-1][1] += 1
            else:
                runs.append([u, 1])
        rate = h.rate0 + _bin((len(runs) - 1) / max(1, len(chunk) - 1) if len(chunk) > 1 else 1.0, h.rate_bins)
        out += [pitch, energy, rate]
        for u, n in runs:
            out.append(u)
            if n > 1:
                out.append(h.dur0 + sum(1 for edge in h.dur_edges[1:] if n >= edge))
    return torch.tensor(out, dtype=torch.long)
