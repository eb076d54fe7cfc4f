"""Hybrid speech: for one clip the LLM reads the continuous adaptor's embeddings AND the clip's unit/prosody
tokens, in one sequence at the one ``<speech>`` placeholder.

Why: the continuous path carries what the words sound like in detail, the discrete path carries tone as tokens
the LLM can name (and write); reading both lets training decide what each contributes.

Composition, not inheritance: a continuous :class:`SpeechModality` (its frozen Whisper encoder and trainable
adaptor) and a :class:`SpeechUnitsModality` (k-means codebook, prosody, new vocabulary rows) reading its frames
through the same encoder. The hybrid registers their parts as ``encoder.{continuous,units}`` and
``adaptor.{continuous,units}``, so the stage policy, FSDP (frozen encoders replicated) and checkpoints (adaptors
+ new rows + the carried codebook) treat them like any plugin's.

Data side, per clip, one tensor [n_c + K, stack * H + 1] (one row per LLM position, so the collator's
``output_length`` is the identity): n_c rows of ``stack`` encoder frames side by side whose last column counts the
real frames in the row, then K rows whose first column is a local token id and last column -1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modality.base import Modality
from modality.speech.plugin import PACKAGED, SpeechModality
from modality.speech.records import manifest_record
from modality.speech.units import SpeechUnitsModality

UNIT_ROW = -1.0


class SpeechHybridModality(Modality):
    """Continuous speech embeddings followed by the clip's unit and prosody tokens, at one placeholder."""

    name = "speech"
    placeholder = "<speech>"
    input_key = "audio"

    def __init__(self, *, d_llm: int, codebook: str, fit_manifest: str | None = None, fit_clips: int = 600,
                 encoder_name: str = PACKAGED, stack: int = 4, adaptor: str = "mlp", hidden: int = 1024,
                 layers: int = 2, heads: int = 8, target_rms: float | None = None, n_units: int = 128,
                 pitch_bins: int = 7, energy_bins: int = 4, unit_stack: int = 2, prosody_every: float = 0.2,
                 dedup: bool = True, f0_min: float = 60.0, f0_max: float = 400.0, energy_floor: float = -60.0,
                 pitch_semitones: float = 6.0, register_bins: int = 8, dur_edges: tuple[int, ...] = (2, 3, 5),
                 rate_bins: int = 4, max_seconds: float = 30.0, overlong: str = "error", cache_dir: str | None = None,
                 units_cache_dir: str | None = None, tiny: bool | dict = False):
        super().__init__()
        self.save_hyperparameters()
        continuous = SpeechModality(d_llm=d_llm, encoder_name=encoder_name, stack=stack, adaptor=adaptor, hidden=hidden,
                                    layers=layers, heads=heads, target_rms=target_rms, max_seconds=max_seconds,
                                    overlong=overlong, cache_dir=cache_dir, tiny=tiny)
        units = SpeechUnitsModality(d_llm=d_llm, codebook=codebook, fit_manifest=fit_manifest, fit_clips=fit_clips,
                                    n_units=n_units, pitch_bins=pitch_bins, energy_bins=energy_bins,
                                    unit_stack=unit_stack, prosody_every=prosody_every, dedup=dedup, f0_min=f0_min,
                                    f0_max=f0_max, energy_floor=energy_floor, target_rms=target_rms,
                                    pitch_semitones=pitch_semitones, register_bins=register_bins,
                                    dur_edges=dur_edges, rate_bins=rate_bins, cache_dir=units_cache_dir,
                                    front=continuous)
        object.__setattr__(self, "continuous", continuous)  # held, not registered: their parts are, below
        object.__setattr__(self, "units", units)
        self.d_llm, self.cache_dir, self.stack = int(d_llm), cache_dir or units_cache_dir, int(stack)
        self.encoder = nn.ModuleDict({"continuous": continuous.encoder, "units": units.encoder})
        self.adaptor = nn.ModuleDict({"continuous": continuous.adaptor, "units": units.adaptor})
        self.set_trainable(encoder=False, adaptor=True)

    def bind_llm(self, tokenizer: Any, llm: nn.Module) -> None:
        self.units.bind_llm(tokenizer, llm)

    # ------------------------------------------------------------------ data side
    def read_record(self, line: dict, where: str, rng: Any) -> dict | None:
        return manifest_record(line, where, rng, self.name, self.placeholder)

    def resolve(self, ref: Any, root: str | None = None) -> Path:
        return self.continuous.resolve(ref, root)

    def load(self, ref: Any, root: str | None = None) -> Tensor:
        return self.continuous.load(ref, root)

    def pack(self, hidden: Tensor, ids: Tensor) -> Tensor:
        """Encoder frames [T', H] + local token ids [K] -> [ceil(T' / stack) + K, stack * H + 1] (module docstring)."""
        t, h = hidden.shape
        s = self.stack
        blocks = F.pad(hidden.float(), (0, 0, 0, -t % s)).reshape(-1, s * h)
        real = (torch.arange(blocks.shape[0]) * s).neg().add(t).clamp(max=s).float()
        rows = torch.zeros(len(ids), s * h + 1)
        rows[:, 0], rows[:, -1] = ids.float(), UNIT_ROW
        return torch.cat([torch.cat([blocks, real[:, None]], 1), rows])

    def featurize(self, raw: Any) -> Tensor:
        wave = torch.as_tensor(raw, dtype=torch.float32)
        hidden = self.units._encode_wave(wave)
        return self.pack(hidden, self.units.tokens(hidden, wave))

    def load_features(self, ref: Any, root: str | None = None) -> tuple[Tensor, str]:
        """(packed rows, "features"): frames from the continuous plugin's encoder cache when it has one, ids from
        the units' cache when it has one."""
        path = self.resolve(ref, root)
        ids = self.units.load_features(path)[0]
        return self.pack(self.units._hidden(path), ids), "features"

    def precompute_cache(self, refs: list, device: Any = None) -> dict[str, int]:
        """Encoder outputs first (batched, on ``device``), then the token ids (which read them)."""
        if self.continuous.cache_dir is not None:
            self.continuous.precompute_cache(refs, device=device)
        return self.units.precompute_cache(refs, device=device) if self.units.cache_dir is not None else {}

    def output_length(self, feature_length: int) -> int:
        return feature_length  # one packed row per LLM position

    # ------------------------------------------------------------------ model side
    def encode_frozen(self, features: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """The frozen work (encoder, tokenising) ran on the data side: packed rows pass through."""
        return features, mask.sum(1)

    def adapt(self, hidden: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Packed rows [B, N, W] -> ([B, N, d_llm]: continuous embeddings then token rows, per clip; lengths)."""
        w = self.continuous.adaptor.fc2.weight
        x, lengths = hidden.to(w.device).float(), lengths.to(w.device)
        b, n, _ = x.shape
        pos = torch.arange(n, device=x.device)[None, :]
        valid = pos < lengths[:, None]
        flag = torch.where(valid, x[..., -1], torch.zeros_like(x[..., -1]))
        cont = flag > 0
        n_c = cont.sum(1)                                               # continuous positions per clip
        frames = (flag * cont).sum(1).long()                            # real encoder frames per clip
        width = max(1, int(n_c.max()))
        blocks = x[:, :width, :-1] * cont[:, :width, None]
        emb, _ = self.continuous.adapt(blocks.reshape(b, width * self.stack, -1), frames)
        k = lengths - n_c
        shifted = (pos + n_c[:, None]).clamp(max=n - 1)                 # token j of a clip sits at row n_c + j
        ids = x[..., 0].gather(1, shifted).round().long() * (pos < k[:, None])
        rows, _ = self.units.adapt(ids[:, :max(1, int(k.max()))], k)
        e = F.pad(emb, (0, 0, 0, max(0, n - emb.shape[1])))[:, :n]
        r = rows.gather(1, (pos - n_c[:, None]).clamp(0, rows.shape[1] - 1)[..., None].expand(-1, -1, rows.shape[2]))
        out = torch.where((pos < n_c[:, None])[..., None], e.to(r.dtype), r)
        return out * valid[..., None].to(out), lengths

    def extra_repr(self) -> str:
        return f"stack={self.stack}, units={self.units.hp.vocab} tokens"
