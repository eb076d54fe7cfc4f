"""Speech modality: frozen Whisper encoder on the real length of the clip + frame-stacking adaptor.

Why real length: Whisper pads every clip to 30 s (1,500 encoder frames); a 4 s clip would
cost 7x the encoder compute and carry 1,300 frames of silence into the LLM. We run conv1,
conv2, the first T' positional embeddings and the layers ourselves, with attention masked
over padded frames, so a clip gives the same frames alone or padded in a batch.

Measured (tiny.en, espeak clips of 2.4-5.2 s): per-frame cosine similarity of real-length vs
30 s padded encoder outputs is 0.94-0.98 on average, 0.97-0.99 over the first 10 frames; the
last frames differ most (the padded run sees trailing silence there). Whisper's own decoder
reading real-length outputs gets the words but may not stop: it never saw short contexts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modality.speech.asr.text_reading import PhonemeNoise, TextPhonemes
from modality.speech.audio import audio_info, load_audio
from modality.speech.cache import SHARD_BYTES, EncoderCache, WeightsKey, tensor_sha1
from modality.base import Modality
from modality.speech.adaptor import SpeechAdaptor, encoder_states
from modality.speech.logmel import SAMPLE_RATE, log_mel, log_mel_batch, mel_filters, pad_waves
from modality.speech.records import manifest_record
from modality.speech.shapes import TINY_ENCODER
from modality.speech.tone import pooled

PACKAGED = "packaged:whisper-tiny.en"


@dataclass
class SpeechHParams:
    """Shape-setting hyperparameters, validated up front so a bad config fails at construction."""

    d_llm: int
    stack: int = 4
    adaptor: str = "mlp"
    hidden: int = 1024
    target_rms: float | None = None
    max_seconds: float = 30.0
    overlong: str = "error"
    layers: int = 2      # transformer adaptor only: self-attention layers over the stacked positions
    heads: int = 8

    def __post_init__(self) -> None:
        if self.d_llm is None or int(self.d_llm) < 1:
            raise ValueError(f"d_llm must be a positive int (the LLM hidden width), got {self.d_llm!r}")
        if self.stack < 1:
            raise ValueError(f"stack must be >= 1, got {self.stack}")
        if self.adaptor not in ("mlp", "conv", "transformer"):
            raise ValueError(f"adaptor must be 'mlp', 'conv' or 'transformer', got {self.adaptor!r}")
        if self.adaptor == "transformer" and (self.layers < 1 or self.heads < 1 or self.hidden % self.heads):
            raise ValueError(f"transformer adaptor needs layers >= 1 and hidden ({self.hidden}) divisible by heads "
                             f"({self.heads}), got layers={self.layers}")
        if self.hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {self.hidden}")
        if self.target_rms is not None and not self.target_rms > 0:
            raise ValueError(f"target_rms must be > 0 or None, got {self.target_rms}")
        if not 0 < self.max_seconds <= 30:
            raise ValueError(f"max_seconds must be in (0, 30] (Whisper's window), got {self.max_seconds}")
        if self.overlong not in ("error", "truncate"):
            raise ValueError(f"overlong must be 'error' or 'truncate', got {self.overlong!r}")


def _load_encoder(encoder_name: str, tiny: bool | dict) -> nn.Module:
    """A transformers ``WhisperEncoder``: tiny random (tests), the packaged CTranslate2 import, or a HF id/path."""
    from transformers import WhisperConfig, WhisperModel
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    if tiny:
        cfg = WhisperConfig(**{**TINY_ENCODER, **(tiny if isinstance(tiny, dict) else {})})
        cfg._attn_implementation = "sdpa"
        return WhisperEncoder(cfg)
    if encoder_name == PACKAGED or encoder_name.startswith("ct2:"):
        from modality.speech.whisper_ct2 import find_packaged_whisper, load_ct2_whisper

        src = find_packaged_whisper() if encoder_name == PACKAGED else Path(encoder_name[4:])
        full = load_ct2_whisper(src)
    else:  # a hub id or a local folder the user named
        full = WhisperModel.from_pretrained(encoder_name, attn_implementation="sdpa")
    encoder = full.get_encoder()
    del full
    return encoder


def compress_mode(value: bool | str | None) -> str | bool:
    """modality.ctc_compress: false | true (= "mean") | "mean" | "soft" -> False or the mode."""
    if value in (None, False, "false", "none"):
        return False
    if value is True or value in ("true", "mean"):
        return "mean"
    if value == "soft":
        return value
    raise ValueError(f"ctc_compress must be false, true/'mean' or 'soft', got {value!r}")


def _seconds(path: Path) -> float:
    frames, sr = audio_info(path)  # header only; a missing or bad file raises here, naming it
    return frames / sr


class SpeechModality(Modality):
    """Whisper encoder (frozen) + frame-stacking adaptor; speech refs are audio file paths."""

    name = "speech"
    placeholder = "<speech>"
    input_key = "audio"

    def __init__(
        self,
        *,
        d_llm: int,
        encoder_name: str = PACKAGED,
        stack: int = 4,
        adaptor: str = "mlp",
        hidden: int = 1024,
        target_rms: float | None = None,
        max_seconds: float = 30.0,
        overlong: str = "error",
        cache_dir: str | None = None,
        tiny: bool | dict = False,
        layers: int = 2,
        heads: int = 8,
        ctc_compress: bool | str = False,
        time_mask: float = 0.0,
        encoder_layers: str | list = "last",
        text_noise: dict | None = None,
    ):
        super().__init__()
        self.hp = SpeechHParams(int(d_llm), stack, adaptor, hidden, target_rms, max_seconds, overlong, layers, heads)
        self.save_hyperparameters()
        self.encoder_name = "tiny" if tiny else encoder_name
        self.cache_dir = cache_dir
        # MultimodalLM drops CTC blanks and merges repeats (modality.speech.asr.ctc): "mean" of the adaptor outputs, or
        # "soft": each position's class distribution mapped through the LLM's embedding rows (text it knows)
        self.ctc_compress = compress_mode(ctc_compress)
        if not 0 <= time_mask < 1:
            raise ValueError(f"time_mask must be in [0, 1), got {time_mask}")
        self.time_mask = float(time_mask)
        self.text_noise = PhonemeNoise(**(text_noise or {}))  # text-only reading practice (asr.text_reading)
        self.text_reader: TextPhonemes | None = None  # set by objectives() when the chain reads phonemes
        self.d_llm = self.hp.d_llm
        self.encoder = _load_encoder(encoder_name, tiny)
        cfg = self.encoder.config
        self.n_mels, self.hidden_size = cfg.num_mel_bins, cfg.d_model
        self.max_frames = cfg.max_source_positions  # encoder positions; 1500 = 30 s
        self.states = encoder_states(encoder_layers, cfg.encoder_layers)
        self.register_buffer("mel_fb", mel_filters(self.n_mels), persistent=False)
        self.adaptor = SpeechAdaptor(self.hidden_size, self.d_llm, self.hp.stack, self.hp.hidden, self.hp.adaptor,
                                     self.hp.target_rms, self.hp.layers, self.hp.heads, n_states=len(self.states))
        self._weights_key = WeightsKey(self.encoder)
        self._cache: EncoderCache | None = None
        self.pooled_width = 2 * self.hidden_size * len(self.states)  # the tone heads' input: mean + std of the states
        self.pooled: Tensor | None = None
        _ = self.fingerprint  # now, while the encoder is on the CPU (DataLoader workers may not touch CUDA)
        self.set_trainable(encoder=False, adaptor=True)

    # ------------------------------------------------------------------ data side
    def resolve(self, ref: Any, root: str | None = None) -> Path:
        p = Path(str(ref)).expanduser()
        return p if p.is_absolute() or root is None else Path(root) / p

    def load(self, ref: Any, root: str | None = None) -> Tensor:
        """Audio path -> float32 mono waveform [S] at 16 kHz (bad files: one-line ValueError naming them)."""
        return load_audio(self.resolve(ref, root), SAMPLE_RATE, self.hp.max_seconds, self.hp.overlong)

    @torch.no_grad()
    def featurize(self, raw: Any) -> Tensor:
        """Waveform [S] (16 kHz) -> log-mel [T, n_mels], T = S // 160, matching WhisperFeatureExtractor frames."""
        wave = torch.as_tensor(raw, dtype=torch.float32).cpu()
        if wave.ndim != 1:
            raise ValueError(f"featurize expects a mono waveform [S], got shape {tuple(wave.shape)}")
        return log_mel(wave, self.mel_fb.cpu())

    def output_length(self, feature_length: int) -> int:
        return self.adapted_length(self.hidden_length(feature_length))

    def hidden_length(self, feature_length: int) -> int:
        """Encoder frames for T mel frames: conv2 has stride 2 and padding 1 -> ceil(T / 2)."""
        if feature_length < 1:
            raise ValueError(f"feature_length must be >= 1, got {feature_length}")
        return (feature_length - 1) // 2 + 1

    def adapted_length(self, hidden_length: int) -> int:
        return -(-hidden_length // self.hp.stack)  # ceil: the adaptor pads to a multiple of stack

    # ------------------------------------------------------------------ model side
    def encode_frozen(self, features: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """log-mel [B, T, n_mels] + mask [B, T] -> (hidden [B, T', K*H], lengths [B]), T' = ceil(T / 2).

        K = the number of ``encoder_layers`` states, side by side (K = 1, the final layer, by default).
        """
        enc = self.encoder
        p = next(enc.parameters())
        mask = mask.to(p.device)
        in_len = mask.sum(dim=1)
        x = (features.to(p) * mask[..., None].to(p)).transpose(1, 2)  # [B, n_mels, T], zeros past each length
        x = F.gelu(enc.conv1(x)) * mask[:, None, :].to(p)  # conv2 must see zeros past the end, as when alone
        x = F.gelu(enc.conv2(x)).transpose(1, 2)  # [B, T', H]
        t_out = x.shape[1]
        if t_out > self.max_frames:
            raise ValueError(f"speech input of {features.shape[1]} mel frames exceeds the encoder's {self.max_frames * 2} (30 s)")
        lengths = (in_len - 1) // 2 + 1
        valid = torch.arange(t_out, device=p.device)[None, :] < lengths[:, None]  # [B, T']
        x = x + enc.embed_positions.weight[:t_out].to(p)
        x = F.dropout(x, p=enc.config.dropout, training=enc.training)
        bias = torch.zeros(valid.shape, dtype=p.dtype, device=p.device).masked_fill(~valid, torch.finfo(p.dtype).min)
        bias = bias[:, None, None, :].expand(-1, 1, t_out, -1)  # [B, 1, T'(query), T'(key)]: no key past the end
        states = []  # index i: the residual stream after i layers; the last one layer-normed
        for layer in enc.layers:
            states.append(x)
            x = layer(x, bias)
        states.append(enc.layer_norm(x))  # the final state as Whisper's decoder reads it
        x = torch.cat([states[i] for i in self.states], dim=-1)  # K x [B, T', H] -> [B, T', K*H]
        return x * valid[..., None].to(p), lengths

    def adapt(self, hidden: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """hidden [B, T', H] -> (embeddings [B, ceil(T'/stack), d_llm], lengths ceil(len/stack))."""
        w = self.adaptor.fc2.weight
        lengths = lengths.to(w.device)
        t = hidden.shape[1]
        valid = torch.arange(t, device=w.device)[None, :] < lengths[:, None]
        x = hidden.to(w) * valid[..., None].to(w)  # padded rows must not leak into a block or conv window
        self.pooled = pooled(x.detach().float(), lengths)  # [B, 2*K*H]: how the voice sounds (modality.speech.tone)
        if self.time_mask > 0 and self.adaptor.training:
            x = x * ~self._time_spans(lengths, t)[..., None]
        pad = -t % self.hp.stack
        x = F.pad(x, (0, 0, 0, pad))  # [B, T' + pad, H]
        out_len = -(-lengths // self.hp.stack)
        return self.adaptor(x, out_len), out_len

    def _time_spans(self, lengths: Tensor, t: int, span: int = 10) -> Tensor:
        """SpecAugment-style time masking of the encoder frames (training only): spans of ``span`` frames
        (0.2 s) at random places, ~``time_mask`` of each clip in all. Why: the adaptor must read a word from
        its context too, which is what unseen voices and unseen sentences need. Returns [B, t] bool (True = masked)."""
        masked = torch.zeros(len(lengths), t, dtype=torch.bool, device=lengths.device)
        for b, n in enumerate(lengths.tolist()):
            for _ in range(int(n * self.time_mask / span + 0.5)):
                start = int(torch.randint(0, max(1, n - span), ()))
                masked[b, start:start + span] = True
        return masked

    # ------------------------------------------------------------------ encoder-output cache (speech.cache)
    @property
    def fingerprint(self) -> str:
        """Names the whole encoder (every weight, its architecture) and the featurizer settings, so a cache
        never mixes encoders or settings; recomputed when a weight is changed in place."""
        return self._weights_key(self._cache_settings)

    def _cache_settings(self) -> dict:
        arch = ("d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim", "num_mel_bins",
                "max_source_positions", "activation_function", "scale_embedding")
        return {"kind": "whisper-encoder", "arch": {k: getattr(self.encoder.config, k, None) for k in arch},
                "sample_rate": SAMPLE_RATE, "mel_fb": tensor_sha1(self.mel_fb), "max_seconds": self.hp.max_seconds,
                "overlong": self.hp.overlong, "states": list(self.states)}

    @property
    def cache(self) -> EncoderCache:
        """The sharded cache under ``cache_dir`` (modality.speech.cache)."""
        if self.cache_dir is None:
            raise ValueError("cache_dir is not set")
        if self._cache is None or self._cache.root != Path(self.cache_dir):
            self._cache = EncoderCache(self.cache_dir)
        return self._cache

    def cache_folder(self) -> Path:
        """Where this encoder's shards live: one folder per encoder + featurizer key."""
        return self.cache.store(self.fingerprint).folder

    def cached(self, ref: Any, root: str | None = None) -> bool:
        """Whether the clip's encoder output is in the cache (verified on reading, not here)."""
        store = self.cache.store(self.fingerprint)
        return store.key_of(self.resolve(ref, root)) in store

    def load_features(self, ref: Any, root: str | None = None) -> tuple[Tensor, str]:
        """(log-mel, "features"); with ``cache_dir`` set, (cached encoder output [T', K*H], "hidden"); a ``{"text":
        ...}`` ref: (its noised phoneme distributions [N, V], "symbols"), reading practice without audio."""
        if isinstance(ref, dict):
            if set(ref) != {"text"} or not str(ref["text"]).strip():
                raise ValueError(f"a speech input is an audio path or {{'text': <transcript>}}, got {ref!r}")
            if self.text_reader is None:
                raise ValueError("speech inputs given as text need a phoneme chain read softly (init_from a "
                                 "stage.ctc_vocab=phonemes run, modality.ctc_compress=soft)")
            return self.text_reader(str(ref["text"])), "symbols"
        if self.cache_dir is None:
            return self.featurize(self.load(ref, root)), "features"
        path = self.resolve(ref, root)
        if not path.is_file():
            raise ValueError(f"{path}: audio file not found")
        hidden = self.cache.get(self.fingerprint, path)
        if hidden is not None:
            return hidden, "hidden"
        p = next(self.encoder.parameters())
        if p.device.type != "cpu" and torch.utils.data.get_worker_info() is not None:
            raise RuntimeError(f"{path}: speech cache miss in a DataLoader worker with the encoder on {p.device}; run SpeechModality.precompute_cache first")
        hidden = self._encode_paths([path])[0].half().float()  # as stored: a hit later returns the same values
        self.cache.put(self.fingerprint, path, hidden)
        return hidden, "hidden"

    @torch.no_grad()
    def _encode_paths(self, paths: list[Path]) -> list[Tensor]:
        """Clips -> their frozen encoder outputs [T'_i, K*H] (float32, CPU), one padded batch on the encoder's
        device; each equals the clip encoded alone (``encode_frozen`` masks the padding)."""
        was_training = self.encoder.training
        self.encoder.eval()
        device = next(self.encoder.parameters()).device
        feats, mask = log_mel_batch(*pad_waves([self.load(p) for p in paths], device), self.mel_fb.to(device))
        hidden, lengths = self.encode_frozen(feats, mask)
        self.encoder.train(was_training)
        return [h[:n].clone() for h, n in zip(hidden.float().cpu(), lengths.tolist())]

    def precompute_cache(self, paths: list, batch_size: int = 16, root: str | None = None, progress: bool = True,
                         device: torch.device | str | None = None, shard_bytes: int = SHARD_BYTES) -> dict[str, int]:
        """Encode every clip not yet cached, batched (sorted by length, so little padding), on ``device`` (the
        run's accelerator; default where the encoder is), into shards under ``cache_dir``. Under torch.distributed
        every rank passes the same list, encodes its share once and then reads all (modality.speech.cache).

        Returns counts {"computed", "cached", "damaged", "encoded_here"}. Bad files raise as in :meth:`load`.
        """
        resolved = list(dict.fromkeys(self.resolve(ref, root) for ref in paths))
        key = self.fingerprint  # here, in the main process, before any worker forks
        home = next(self.encoder.parameters()).device
        if device is not None:
            self.encoder.to(device)
        try:
            return self.cache.precompute(key, resolved, self._encode_paths, _seconds, batch_size, progress,
                                         shard_bytes=shard_bytes)
        finally:
            self.encoder.to(home)

    def extra_repr(self) -> str:
        return f"encoder={self.encoder_name!r}, {asdict(self.hp)}"

    # ------------------------------------------------------------------ extension points (modality.base)
    def read_record(self, line: dict, where: str, rng: Any) -> dict | None:
        return manifest_record(line, where, rng, self.name, self.placeholder)

    def objectives(self, settings, inherited, train_records, tokenizer, placeholder_id, trainable) -> list:
        from modality.speech.asr.objective import build_ctc_objective
        from modality.speech.tone import build_tone_objective

        ctc = build_ctc_objective(self, settings, inherited, train_records, tokenizer, placeholder_id, trainable)
        tone = build_tone_objective(self, settings, inherited, train_records, tokenizer)
        if ctc is not None and ctc.phonemes and ctc.compress == "soft":
            self.text_reader = TextPhonemes(ctc.phonemizer, ctc.phonemes, self.text_noise)
        return [o for o in (ctc, tone) if o is not None]  # in this order: tone positions follow the phonemes

    def decoder(self, settings, objectives, inherited, train_files) -> Any:
        from modality.speech.asr.decoder import build_speech_decoder

        return build_speech_decoder(settings, objectives, train_files)

    @classmethod
    def planned_shapes(cls, cfg: Any, d_llm: int) -> Any:
        from modality.speech.shapes import speech_shapes

        return speech_shapes(cfg, d_llm)
