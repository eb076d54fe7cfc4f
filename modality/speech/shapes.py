"""The speech plugin's shapes for the memory planner (llm.plan), without loading any weights."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from llm.shapes import EncoderShape

TINY_ENCODER = {"d_model": 16, "encoder_layers": 2, "encoder_attention_heads": 2, "encoder_ffn_dim": 32, "num_mel_bins": 80}  # a tiny random Whisper encoder (tests)
WHISPER = {"tiny": (384, 4, 1536, 80), "base": (512, 6, 2048, 80), "small": (768, 12, 3072, 80),
           "medium": (1024, 24, 4096, 80), "large": (1280, 32, 5120, 80), "large-v3": (1280, 32, 5120, 128),
           "large-v3-turbo": (1280, 32, 5120, 128), "turbo": (1280, 32, 5120, 128)}


def whisper_shape(encoder_name: str) -> EncoderShape | None:
    m = re.search(r"whisper-(large-v3-turbo|large-v3|large-v2|large|medium|small|base|tiny|turbo)", encoder_name.lower())
    if not m:
        return None
    size = "large" if m.group(1) == "large-v2" else m.group(1)
    d, L, f, mels = WHISPER[size]
    return EncoderShape(f"whisper-{m.group(1)}", d, L, f, mels)


def speech_shapes(cfg: Mapping[str, Any], d_llm: int) -> tuple[EncoderShape, int] | None:
    """(Whisper encoder shape, trainable adaptor parameters); the adaptor is built (no weights loaded) and
    counted, so the count is exact for every adaptor kind and setting. None: an encoder the table lacks."""
    from modality.speech.adaptor import SpeechAdaptor, encoder_states

    tiny = cfg.get("tiny")
    if tiny:
        c = {**TINY_ENCODER, **(dict(tiny) if isinstance(tiny, Mapping) else {})}
        enc = EncoderShape("whisper(tiny random)", c["d_model"], c["encoder_layers"], c["encoder_ffn_dim"],
                           c["num_mel_bins"], c.get("max_source_positions", 1500))
    else:
        enc = whisper_shape(str(cfg.get("encoder_name", "")))
    if enc is None:
        return None
    adaptor = SpeechAdaptor(enc.d_model, d_llm, int(cfg.get("stack", 4)), int(cfg.get("hidden", 1024)),
                            str(cfg.get("adaptor", "mlp")), cfg.get("target_rms"), int(cfg.get("layers", 2)),
                            int(cfg.get("heads", 8)), n_states=len(encoder_states(cfg.get("encoder_layers", "last"),
                                                                                  enc.layers)))
    return enc, sum(p.numel() for p in adaptor.parameters())
