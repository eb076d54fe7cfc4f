"""Discrete speech: semantic units (k-means over frozen Whisper frames) + pitch and energy tokens.

Why a second speech path: text drops tone. Here a clip becomes a token sequence the LLM reads
through NEW vocabulary rows (this plugin's trainable embedding table, merged at ``<speech>``
exactly like the continuous path): every ``prosody_every`` seconds a pitch token (log-F0 bin, or
unvoiced) and an energy token (dB bin), then the de-duplicated semantic units of that window.

    <pitch_5> <energy_2> <unit_17> <unit_3> <unit_88> <pitch_5> <energy_2> <unit_40> ...

The whole front end (audio -> Whisper -> k-means, audio -> F0/energy) is frozen and runs on the
data side, once per clip, with its ids cached: the model side is an embedding lookup. The rows
are input-only: SmolLM2 ties input and output embeddings, so adding them to its matrix would
also add unit logits to every text answer. They are saved as the adaptor (what trains).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from data.jsonl import read_jsonl
from modality.base import Modality
from modality.speech.records import manifest_record
from modality.speech.plugin import PACKAGED, SAMPLE_RATE, SpeechModality

log = logging.getLogger(__name__)
FRAME = SAMPLE_RATE // 100  # prosody frames: 10 ms hop
ENCODER_HZ = 50             # Whisper encoder frames per second


@dataclass
class UnitsHParams:
    d_llm: int
    n_units: int = 128
    pitch_bins: int = 8          # log-spaced over [f0_min, f0_max]; plus one "unvoiced" token
    energy_bins: int = 4         # uniform over [energy_floor, 0] dBFS
    unit_stack: int = 2          # encoder frames averaged per unit: 50 Hz -> 25 Hz
    prosody_every: float = 0.2   # seconds per (pitch, energy) pair
    dedup: bool = True           # collapse repeated units (HuBERT-style)
    f0_min: float = 60.0
    f0_max: float = 400.0
    energy_floor: float = -60.0
    target_rms: float | None = None

    def __post_init__(self) -> None:
        if self.d_llm is None or int(self.d_llm) < 1:
            raise ValueError(f"d_llm must be a positive int, got {self.d_llm!r}")
        for k in ("n_units", "pitch_bins", "energy_bins", "unit_stack"):
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

    @property
    def vocab(self) -> int:
        return self.n_units + self.pitch_bins + 1 + self.energy_bins

    @property
    def units_per_window(self) -> int:
        return round(self.prosody_every * ENCODER_HZ / self.unit_stack)


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


class SpeechUnitsModality(Modality):
    """Speech as discrete tokens: frozen Whisper + k-means codebook + prosody bins; trainable rows.

    ``codebook`` is a safetensors file of centroids; when it does not exist it is fitted once on
    ``fit_clips`` clips of ``fit_manifest`` (a NeMo manifest) and saved there. ``cache_dir`` keeps
    each clip's token ids (and, below it, the encoder outputs used to fit and tokenise, unless
    ``encoder_cache_dir`` names another folder: the continuous path's cache is the same format).
    """

    name = "speech"
    placeholder = "<speech>"
    input_key = "audio"

    def __init__(self, *, d_llm: int, codebook: str, fit_manifest: str | None = None, fit_clips: int = 600,
                 encoder_name: str = PACKAGED, n_units: int = 128, pitch_bins: int = 8, energy_bins: int = 4,
                 unit_stack: int = 2, prosody_every: float = 0.2, dedup: bool = True, f0_min: float = 60.0,
                 f0_max: float = 400.0, energy_floor: float = -60.0, target_rms: float | None = None,
                 max_seconds: float = 30.0, overlong: str = "error", cache_dir: str | None = None,
                 encoder_cache_dir: str | None = None, tiny: bool | dict = False):
        super().__init__()
        self.hp = UnitsHParams(int(d_llm), n_units, pitch_bins, energy_bins, unit_stack, prosody_every, dedup,
                               f0_min, f0_max, energy_floor, target_rms)
        self.save_hyperparameters()
        self.d_llm, self.cache_dir = self.hp.d_llm, cache_dir
        # The Whisper front end lives outside the module tree: it only ever runs data-side (CPU, frozen),
        # so it is never moved to a device, sharded, counted as a model parameter or checkpointed.
        enc_cache = encoder_cache_dir or (str(Path(cache_dir) / "encoder") if cache_dir else None)
        front = SpeechModality(d_llm=1, hidden=1, encoder_name=encoder_name, tiny=tiny, max_seconds=max_seconds,
                               overlong=overlong, cache_dir=enc_cache)
        object.__setattr__(self, "front", front.eval())
        self.encoder = nn.Module()  # holds the frozen codebook (a buffer; no parameters)
        self.encoder.register_buffer("centroids", self._codebook(Path(codebook), fit_manifest, fit_clips))
        self.adaptor = nn.Embedding(self.hp.vocab, self.d_llm)  # the new vocabulary rows
        nn.init.normal_(self.adaptor.weight, std=self.hp.target_rms or 1.0)  # RMS of the LLM's own rows
        self._fingerprint = hashlib.sha1((front.fingerprint + json.dumps(asdict(self.hp), sort_keys=True) +
                                          str(self.encoder.centroids.sum().item())).encode()).hexdigest()[:16]
        self.set_trainable(encoder=False, adaptor=True)

    # ------------------------------------------------------------------ vocabulary
    def token_names(self) -> list[str]:
        h = self.hp
        return ([f"<unit_{i}>" for i in range(h.n_units)] + [f"<pitch_{i}>" for i in range(h.pitch_bins)] +
                ["<pitch_uv>"] + [f"<energy_{i}>" for i in range(h.energy_bins)])

    def describe(self, ids: Tensor) -> str:
        names = self.token_names()
        return " ".join(names[int(i)] for i in ids)

    # ------------------------------------------------------------------ codebook
    def _codebook(self, path: Path, manifest: str | None, clips: int) -> Tensor:
        if path.is_file():
            c = load_file(str(path))["centroids"].float()
            if c.shape != (self.hp.n_units, self.front.hidden_size):
                raise ValueError(f"{path}: codebook of shape {tuple(c.shape)}, need ({self.hp.n_units}, "
                                 f"{self.front.hidden_size}) for n_units={self.hp.n_units} and this encoder")
            return c
        if not manifest:
            raise ValueError(f"{path}: no unit codebook; set modality.fit_manifest=<train manifest> to fit one "
                             f"(k-means over encoder frames, saved there)")
        rows = read_jsonl(manifest)[:clips]
        paths = [self.front.resolve(r["audio_filepath"], str(Path(manifest).parent)) for r in rows]
        frames = torch.cat([self._pooled(self._hidden(p)) for p in self._progress(paths, "unit codebook: encode")])
        log.info("fitting %d units on %d frames of %d clips", self.hp.n_units, frames.shape[0], len(paths))
        c = kmeans(frames, self.hp.n_units)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"centroids": c.contiguous()}, str(path), metadata={"manifest": str(manifest), "clips": str(len(paths))})
        return c

    @staticmethod
    def _progress(items: list, desc: str) -> Any:
        from tqdm.auto import tqdm

        return tqdm(items, desc=desc, unit="clip")

    def _hidden(self, path: Path) -> Tensor:
        if self.front.cache_dir is not None:
            return self.front.load_features(path)[0]
        return self._encode_wave(self.front.load(path))

    @torch.no_grad()
    def _encode_wave(self, wave: Tensor) -> Tensor:
        """Waveform [S] -> frozen Whisper output [T', H] on the real length."""
        feats = self.front.featurize(wave)
        return self.front.encode_frozen(feats[None], torch.ones(1, feats.shape[0], dtype=torch.bool))[0][0]

    def _pooled(self, hidden: Tensor) -> Tensor:
        """[T', H] -> [ceil(T' / unit_stack), H] frame means (the last block may be partial)."""
        s = self.hp.unit_stack
        t = hidden.shape[0]
        pad = -t % s
        x = F.pad(hidden.float(), (0, 0, 0, pad)).view(-1, s, hidden.shape[1])  # [U, s, H]
        n = torch.full((x.shape[0],), float(s))
        n[-1] = s - pad
        return x.sum(1) / n[:, None]

    # ------------------------------------------------------------------ tokenising
    def tokens(self, hidden: Tensor, wave: Tensor) -> Tensor:
        """Encoder output [T', H] + waveform [S] -> token ids [N] in this plugin's vocabulary."""
        h = self.hp
        units = torch.cdist(self._pooled(hidden), self.encoder.centroids).argmin(1)   # [U]
        f0, db = frame_prosody(wave, h.f0_min, h.f0_max)                                # [F], [F]
        per = h.units_per_window
        fpw = round(h.prosody_every * 100)  # 10 ms frames per window
        out: list[int] = []
        prev = -1
        p0, e0 = h.n_units, h.n_units + h.pitch_bins + 1
        for w in range(math.ceil(units.shape[0] / per)):
            f = f0[w * fpw:(w + 1) * fpw]
            voiced = f[~f.isnan()]
            if voiced.numel() >= max(1, f.numel() // 4):
                pos = (voiced.median().log() - math.log(h.f0_min)) / (math.log(h.f0_max) - math.log(h.f0_min))
                pitch = p0 + int((pos * h.pitch_bins).clamp(0, h.pitch_bins - 1))
            else:
                pitch = p0 + h.pitch_bins  # unvoiced
            e = db[w * fpw:(w + 1) * fpw]
            level = float(e.mean()) if e.numel() else -100.0
            energy = e0 + int(min(h.energy_bins - 1, max(0.0, (level - h.energy_floor) / -h.energy_floor * h.energy_bins)))
            out += [pitch, energy]
            for u in units[w * per:(w + 1) * per].tolist():
                if not (h.dedup and u == prev):
                    out.append(u)
                prev = u
        return torch.tensor(out, dtype=torch.long)

    # ------------------------------------------------------------------ data side
    def read_record(self, line: dict, where: str, rng: Any) -> dict | None:
        return manifest_record(line, where, rng, self.name, self.placeholder)

    def resolve(self, ref: Any, root: str | None = None) -> Path:
        return self.front.resolve(ref, root)

    def load(self, ref: Any, root: str | None = None) -> Tensor:
        return self.front.load(ref, root)

    def featurize(self, raw: Any) -> Tensor:
        """Waveform [S] (16 kHz) -> token ids [N] (runs the frozen encoder)."""
        wave = torch.as_tensor(raw, dtype=torch.float32)
        return self.tokens(self._encode_wave(wave), wave)

    def _ids_path(self, path: Path) -> Path:
        st = path.stat()
        key = f"{path.resolve()}|{st.st_mtime_ns}|{st.st_size}|{self._fingerprint}"
        digest = hashlib.sha1(key.encode()).hexdigest()
        return Path(self.cache_dir) / "ids" / digest[:2] / f"{digest}.safetensors"

    def load_features(self, ref: Any, root: str | None = None) -> tuple[Tensor, str]:
        """(token ids [N], "features"); cached under ``cache_dir``/ids when set."""
        path = self.resolve(ref, root)
        if self.cache_dir is None:
            return self.featurize(self.front.load(path)), "features"
        if not path.is_file():
            raise ValueError(f"{path}: audio file not found")
        cp = self._ids_path(path)
        if cp.is_file():  # a cache hit reads no audio
            return load_file(str(cp))["ids"].long(), "features"
        wave = self.front.load(path)  # bad audio fails here with one line naming the file
        ids = self.tokens(self._hidden(path), wave)
        cp.parent.mkdir(parents=True, exist_ok=True)
        tmp = cp.with_suffix(f".{os.getpid()}.tmp")
        save_file({"ids": ids.to(torch.int16).contiguous()}, str(tmp))
        os.replace(tmp, cp)
        return ids, "features"

    def precompute_cache(self, paths: list, root: str | None = None, progress: bool = True,
                         device: Any = None) -> dict[str, int]:
        """Tokenise every clip once up front (encoder outputs batched first, on the CPU: the front end never
        leaves it). Under torch.distributed every rank calls the front's build, even with nothing to do."""
        todo = [p for p in (self.resolve(r, root) for r in paths) if not (p.is_file() and self._ids_path(p).is_file())]
        if self.front.cache_dir is not None:
            self.front.precompute_cache(todo, progress=progress)
        for p in (self._progress(todo, "speech units") if progress else todo):
            self.load_features(p)
        return {"computed": len(todo), "cached": len(paths) - len(todo)}

    def output_length(self, feature_length: int) -> int:
        return feature_length  # one LLM position per token

    # ------------------------------------------------------------------ model side
    def encode_frozen(self, features: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Token ids [B, N] are already the frozen front end's output: -> (ids, lengths)."""
        return features, mask.sum(1)

    def adapt(self, hidden: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """ids [B, N] -> (rows [B, N, d_llm], lengths); padded positions give zeros."""
        w = self.adaptor.weight
        ids = hidden.to(w.device).long()
        valid = torch.arange(ids.shape[1], device=w.device)[None, :] < lengths.to(w.device)[:, None]
        return self.adaptor(ids.clamp(0, self.hp.vocab - 1)) * valid[..., None].to(w), lengths.to(w.device)

    def extra_repr(self) -> str:
        return f"{asdict(self.hp)}, vocab={self.hp.vocab}"
