"""Shapes of LLMs and encoders without their weights: for the memory planner and the GPU benchmark.

A built-in table covers common hub models (no download); a local folder's config.json or a
``tiny`` dict (llm.model.tiny) works for anything else.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelShape:
    """A Llama-family decoder (Llama, Mistral, Qwen2, SmolLM): what sets its parameter count."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool = False
    qkv_bias: bool = False
    head_dim: int | None = None

    def __post_init__(self) -> None:
        if min(self.hidden, self.layers, self.heads, self.kv_heads, self.intermediate, self.vocab) < 1:
            raise ValueError(f"{self.name}: every shape field must be >= 1: {self}")
        if self.heads % self.kv_heads:
            raise ValueError(f"{self.name}: heads={self.heads} not a multiple of kv_heads={self.kv_heads}")

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear in one decoder layer."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.hd, self.kv_heads * self.hd
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def vocab_size(self, extra_tokens: int = 0) -> int:
        return self.vocab + extra_tokens

    def param_counts(self, extra_tokens: int = 0) -> dict[str, int]:
        """Parameter counts by kind; ``decoder_linear`` are the weights 4-bit quantisation replaces."""
        layer_linear = sum(a * b for a, b in self.linears().values())
        bias = (self.heads + 2 * self.kv_heads) * self.hd if self.qkv_bias else 0
        embed = self.vocab_size(extra_tokens) * self.hidden
        counts = {"layer_linear": layer_linear, "decoder_linear": self.layers * layer_linear,
                  "norms_bias": self.layers * (2 * self.hidden + bias) + self.hidden,
                  "embed": embed, "head": 0 if self.tied else embed}
        counts["total"] = counts["decoder_linear"] + counts["norms_bias"] + counts["embed"] + counts["head"]
        return counts

    @classmethod
    def from_hf_config(cls, name: str, c: Mapping[str, Any]) -> ModelShape:
        return cls(name=name, hidden=c["hidden_size"], layers=c["num_hidden_layers"], heads=c["num_attention_heads"],
                   kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
                   intermediate=c["intermediate_size"], vocab=c["vocab_size"],
                   tied=bool(c.get("tie_word_embeddings", False)),
                   qkv_bias=bool(c.get("attention_bias", c.get("model_type") == "qwen2")), head_dim=c.get("head_dim"))


def _s(name, h, L, H, kv, i, V, tied=False, bias=False) -> ModelShape:
    return ModelShape(name, h, L, H, kv, i, V, tied, bias)


KNOWN: dict[str, ModelShape] = {s.name: s for s in [
    _s("llama-3.1-8b", 4096, 32, 32, 8, 14336, 128256),
    _s("llama-3.1-70b", 8192, 80, 64, 8, 28672, 128256),
    _s("llama-3-8b", 4096, 32, 32, 8, 14336, 128256),
    _s("llama-3.2-1b", 2048, 16, 32, 8, 8192, 128256, tied=True),
    _s("llama-3.2-3b", 3072, 28, 24, 8, 8192, 128256, tied=True),
    _s("mistral-7b-v0.3", 4096, 32, 32, 8, 14336, 32768),
    _s("qwen2.5-0.5b", 896, 24, 14, 2, 4864, 151936, tied=True, bias=True),
    _s("qwen2.5-1.5b", 1536, 28, 12, 2, 8960, 151936, tied=True, bias=True),
    _s("qwen2.5-7b", 3584, 28, 28, 4, 18944, 152064, bias=True),
    _s("smollm2-135m", 576, 30, 9, 3, 1536, 49152, tied=True),
    _s("smollm2-360m", 960, 32, 15, 5, 2560, 49152, tied=True),
    _s("smollm2-1.7b", 2048, 24, 32, 32, 8192, 49152, tied=True),
]}


def _key(name: str) -> str:
    """'meta-llama/Llama-3.1-8B-Instruct' -> 'llama-3.1-8b'; 'smollm2-135m-instruct' -> 'smollm2-135m'."""
    k = name.rstrip("/").rsplit("/", 1)[-1].lower()
    k = re.sub(r"^meta-", "", k)
    return re.sub(r"-(instruct|it|chat|base)$", "", k)


def model_shape(name: str, tiny: Mapping[str, Any] | None = None) -> ModelShape:
    """The shape of llm.model ``name`` (with ``tiny``: the random tiny model built with name's tokenizer)."""
    if tiny:
        vocab = model_shape(name).vocab
        return ModelShape(f"tiny({_key(name)} tokenizer)", tiny.get("hidden_size", 64), tiny.get("layers", 2),
                          tiny.get("heads", 4), tiny.get("heads", 4), tiny.get("intermediate_size", 128), vocab, tied=True)
    cfg = Path(name).expanduser() / "config.json"
    if cfg.exists():
        return ModelShape.from_hf_config(name, json.loads(cfg.read_text()))
    key = _key(name)
    if key in KNOWN:
        return KNOWN[key]
    raise ValueError(f"llm.model.name={name}: shape unknown offline; point it at a local folder with config.json "
                     f"or add it to llm/shapes.py KNOWN ({', '.join(sorted(KNOWN))})")


# ------------------------------------------------------------------ encoders
@dataclass(frozen=True)
class EncoderShape:
    """A transformer encoder's shape (its parameters by formula), or (``count``) a parameter count measured from
    an instantiated modality."""

    name: str
    d_model: int = 0
    layers: int = 0
    ffn: int = 0
    mels: int = 80
    positions: int = 1500
    count: int | None = None

    def params(self) -> int:
        if self.count is not None:
            return self.count
        d, f = self.d_model, self.ffn
        conv = self.mels * d * 3 + d + d * d * 3 + d
        layer = 4 * d * d + 3 * d + 2 * d + d * f + f + f * d + d + 2 * d
        return conv + self.positions * d + self.layers * layer + 2 * d


def modality_shapes(modality_cfg: Mapping[str, Any], d_llm: int) -> tuple[EncoderShape, int]:
    """(encoder shape, trainable adaptor parameters) of a modality config: the plugin's own ``planned_shapes``
    (without loading weights) when it has them, else the plugin is instantiated and counted."""
    from hydra.utils import get_object, instantiate

    if not modality_cfg.get("_target_") and modality_cfg.get("plugins"):  # several plugins in one model: their sum
        parts = [modality_shapes(node, d_llm) for node in modality_cfg["plugins"].values()]
        return (EncoderShape(" + ".join(e.name for e, _ in parts), count=sum(e.params() for e, _ in parts)),
                sum(n for _, n in parts))
    planned = get_object(str(modality_cfg["_target_"])).planned_shapes(modality_cfg, d_llm)
    if planned is not None:
        return planned
    module = instantiate(modality_cfg, d_llm=d_llm)
    enc = EncoderShape(type(module).__name__ + " encoder", count=sum(p.numel() for p in module.encoder.parameters()))
    return enc, sum(p.numel() for p in module.adaptor.parameters())
