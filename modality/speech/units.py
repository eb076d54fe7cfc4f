"""Discrete speech: semantic units (k-means over frozen Whisper frames) + prosody tokens, as REAL tokens of the
LLM's vocabulary (``<unit_17>``, ``<pitch_3>``, ``<register_2>``, ``<dur_1>``, ``<rate_0>``, ...).

Why a second speech path: text drops tone. A clip becomes a token sequence (layout: modality.speech.prosody)
that the LLM reads through new rows of its own input table and can WRITE through new rows of its head
(llm.vocab: old rows frozen bitwise, the new ones train as this plugin's adaptor). ``bind_llm`` adds the tokens;
the collator still expands ``<speech>`` to one slot per token and ``adapt`` fills the slots with the LLM's own
embeddings of those ids, so placeholder counts and the rest of the contract are unchanged.

The whole front end (audio -> Whisper -> k-means, audio -> F0/energy) is frozen and runs on the data side, once
per clip, with its ids cached. The k-means codebook is a buffer the checkpoints carry (``carried_centroids``,
tasks.checkpoint): a run evaluated on a machine without the codebook file reads it from the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from data.jsonl import read_jsonl
from llm.vocab import NewRows, add_tokens
from modality.base import Modality
from modality.speech.plugin import PACKAGED, SpeechModality
from modality.speech.prosody import UnitsHParams, frame_prosody, kmeans, layout
from modality.speech.records import manifest_record

log = logging.getLogger(__name__)


class CpuState(nn.Module):
    """Holds buffers that stay on the CPU, in float32, whatever the model is moved or cast to: the data side
    (DataLoader workers included, which must never touch a GPU) reads them."""

    def _apply(self, fn: Any, recurse: bool = True) -> "CpuState":
        return self


class SpeechUnitsModality(Modality):
    """Speech as discrete tokens of the LLM: frozen Whisper + k-means codebook + prosody bins; trainable rows.

    ``codebook`` is a safetensors file of centroids, read when it exists; otherwise the codebook comes from the
    checkpoint chain (``init_from``) or, at first use, is fitted on ``fit_clips`` clips of ``fit_manifest`` (a
    NeMo manifest) and saved there. ``cache_dir`` keeps each clip's token ids (and, below it, the encoder outputs
    used to fit and tokenise, unless ``encoder_cache_dir`` names another folder: the continuous path's cache is
    the same format).
    """

    name = "speech"
    placeholder = "<speech>"
    input_key = "audio"

    def __init__(self, *, d_llm: int, codebook: str, fit_manifest: str | None = None, fit_clips: int = 600,
                 encoder_name: str = PACKAGED, n_units: int = 128, pitch_bins: int = 7, energy_bins: int = 4,
                 unit_stack: int = 2, prosody_every: float = 0.2, dedup: bool = True, f0_min: float = 60.0,
                 f0_max: float = 400.0, energy_floor: float = -60.0, target_rms: float | None = None,
                 pitch_semitones: float = 6.0, register_bins: int = 8, dur_edges: tuple[int, ...] = (2, 3, 5),
                 rate_bins: int = 4, max_seconds: float = 30.0, overlong: str = "error", cache_dir: str | None = None,
                 encoder_cache_dir: str | None = None, tiny: bool | dict = False, front: SpeechModality | None = None):
        super().__init__()
        self.hp = UnitsHParams(int(d_llm), n_units, pitch_bins, energy_bins, unit_stack, prosody_every, dedup,
                               f0_min, f0_max, energy_floor, target_rms, pitch_semitones, register_bins,
                               tuple(dur_edges), rate_bins)
        self.save_hyperparameters(ignore=["front"])
        self.d_llm, self.cache_dir = self.hp.d_llm, cache_dir
        # The Whisper front end lives outside the module tree: it only ever runs data-side (CPU, frozen),
        # so it is never moved to a device, sharded, counted as a model parameter or checkpointed.
        # ``front``: a continuous speech plugin to read frames from instead (modality.speech.hybrid shares its own).
        if front is None:
            enc_cache = encoder_cache_dir or (str(Path(cache_dir) / "encoder") if cache_dir else None)
            front = SpeechModality(d_llm=1, hidden=1, encoder_name=encoder_name, tiny=tiny, max_seconds=max_seconds,
                                   overlong=overlong, cache_dir=enc_cache).eval()
        object.__setattr__(self, "front", front)
        self.codebook_path, self.fit_manifest, self.fit_clips = Path(codebook), fit_manifest, fit_clips
        self.encoder = CpuState()  # holds the frozen codebook: a buffer checkpoints carry (NaN until known)
        self.encoder.register_buffer("carried_centroids", self._read_codebook())
        self.adaptor = NewRows(self.hp.vocab, self.d_llm, std=self.hp.target_rms or 1.0)  # the new vocabulary rows
        object.__setattr__(self, "llm_embed", None)  # the LLM's (grown) input table, once bound
        self.first_id: int | None = None            # the LLM id of local token 0, once bound
        self.set_trainable(encoder=False, adaptor=True)

    # ------------------------------------------------------------------ vocabulary
    def token_names(self) -> list[str]:
        return self.hp.token_names()

    def describe(self, ids: Tensor) -> str:
        names = self.token_names()
        return " ".join(names[int(i)] for i in ids)

    def bind_llm(self, tokenizer: Any, llm: nn.Module) -> None:
        """Add this plugin's tokens to the LLM's vocabulary (llm.vocab.add_tokens: rows = this adaptor)."""
        self.first_id = add_tokens(tokenizer, llm, self.token_names(), self.adaptor)
        object.__setattr__(self, "llm_embed", llm.get_input_embeddings())

    # ------------------------------------------------------------------ codebook
    @property
    def centroids(self) -> Tensor:
        """The codebook [n_units, H]: read, carried by the checkpoint chain, or fitted now (first use)."""
        c = self.encoder.carried_centroids
        if not bool(torch.isfinite(c).all()):
            with torch.no_grad():
                c.copy_(self._fit_codebook())
        return c

    def _read_codebook(self) -> Tensor:
        path, shape = self.codebook_path, (self.hp.n_units, self.front.hidden_size)
        if not path.is_file():
            return torch.full(shape, float("nan"))
        c = load_file(str(path))["centroids"].float()
        if c.shape != shape:
            raise ValueError(f"{path}: codebook of shape {tuple(c.shape)}, need {shape} for n_units="
                             f"{self.hp.n_units} and this encoder")
        return c

    def _fit_codebook(self) -> Tensor:
        path, manifest = self.codebook_path, self.fit_manifest
        if path.is_file():  # written since (e.g. by another rank)
            return self._read_codebook()
        if not manifest or not Path(manifest).is_file():
            raise ValueError(f"{path}: no unit codebook; set modality.fit_manifest=<train manifest> to fit one "
                             f"(k-means over encoder frames, saved there), or init_from=<a run that carries it>")
        rows = read_jsonl(manifest)[:self.fit_clips]
        paths = [self.front.resolve(r["audio_filepath"], str(Path(manifest).parent)) for r in rows]
        frames = torch.cat([self._pooled(self._hidden(p)) for p in self._progress(paths, "unit codebook: encode")])
        log.info("fitting %d units on %d frames of %d clips", self.hp.n_units, frames.shape[0], len(paths))
        c = kmeans(frames, self.hp.n_units)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"centroids": c.contiguous()}, str(path), metadata={"manifest": str(manifest), "clips": str(len(paths))})
        return c

    def fingerprint(self) -> str:
        """What the cached ids depend on: the front end, the layout and the codebook."""
        key = self.front.fingerprint + json.dumps(asdict(self.hp), sort_keys=True) + str(self.centroids.sum().item())
        return hashlib.sha1(key.encode()).hexdigest()[:16]

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
    def units(self, hidden: Tensor) -> Tensor:
        """Encoder output [T', H] -> the nearest centroid per unit frame [U]."""
        pooled = self._pooled(hidden)
        return torch.cdist(pooled, self.centroids.to(pooled.device)).argmin(1).cpu()

    def tokens(self, hidden: Tensor, wave: Tensor) -> Tensor:
        """Encoder output [T', H] + waveform [S] -> local token ids [N] (layout: modality.speech.prosody)."""
        f0, db = frame_prosody(wave, self.hp.f0_min, self.hp.f0_max)
        return layout(self.hp, self.units(hidden), f0, db)

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
        key = f"{path.resolve()}|{st.st_mtime_ns}|{st.st_size}|{self.fingerprint()}"
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
        """Local ids [B, N] -> (the LLM's input rows of those tokens [B, N, d_llm], lengths); padding gives zeros.
        Bound to an LLM, rows come through its own (grown) input table exactly as a written ``<unit_k>`` would."""
        w = self.adaptor.weight
        ids = hidden.to(w.device).long().clamp(0, self.hp.vocab - 1)
        valid = torch.arange(ids.shape[1], device=w.device)[None, :] < lengths.to(w.device)[:, None]
        rows = self.adaptor(ids) if self.llm_embed is None else self.llm_embed(ids + self.first_id)
        return rows * valid[..., None].to(rows), lengths.to(w.device)

    def extra_repr(self) -> str:
        return f"{asdict(self.hp)}, vocab={self.hp.vocab}"
