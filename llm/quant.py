"""4-bit quantisation (QLoRA). Checked before any weights load, so a missing backend fails fast."""

from __future__ import annotations

import importlib.util

import torch

SUPPORTED = ("nf4", "fp4")


def quantization_config(quant: str, compute_dtype: torch.dtype):
    """bitsandbytes NF4 with double quantisation; weights stored in ``compute_dtype`` so FSDP can shard them."""
    if quant not in SUPPORTED:
        raise ValueError(f"llm.quant={quant!r}: expected one of {SUPPORTED} or null")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"llm.quant={quant} needs bitsandbytes: pip install 'mmlm[quant]'")
    from transformers import BitsAndBytesConfig

    if compute_dtype == torch.float32:
        compute_dtype = torch.bfloat16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant,
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_quant_storage=compute_dtype)
