"""4-bit quantisation (QLoRA): bitsandbytes NF4, double quantisation, bf16 compute.

Two ways in, one result: ``quantization_config`` for ``from_pretrained`` (real checkpoints) and
``quantize_linear_layers`` for a model already built in memory (tiny test models, random
benchmark models). Both store the packed 4-bit weights in a float dtype (``quant_storage``) so
FSDP2 can shard them next to the bf16 LoRA weights, as Answer.AI's FSDP+QLoRA does.
Checked before any weights load, so a missing backend fails fast with one line.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterable

import torch
from torch import nn

SUPPORTED = ("nf4", "fp4")
DEFAULT_SKIP = ("lm_head",)  # HF's bnb integration keeps the output head in the compute dtype too


def check_quant(quant: str | None) -> None:
    """One-line ValueError for an unknown quant type or a missing bitsandbytes; None passes."""
    if quant is None:
        return
    if quant not in SUPPORTED:
        raise ValueError(f"llm.model.quant={quant!r}: expected one of {SUPPORTED} or null")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"llm.model.quant={quant} needs bitsandbytes: pip install 'mmlm[quant]'")


def storage_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """4-bit weights are packed into this float dtype; fp32 models compute (and store) in bf16."""
    return torch.bfloat16 if compute_dtype == torch.float32 else compute_dtype


def quantization_config(quant: str, compute_dtype: torch.dtype):
    """bitsandbytes NF4 with double quantisation; weights stored in ``compute_dtype`` so FSDP can shard them."""
    check_quant(quant)
    from transformers import BitsAndBytesConfig

    dtype = storage_dtype(compute_dtype)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant,
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
                              bnb_4bit_quant_storage=dtype)


def _skipped(name: str, skip: Iterable[str]) -> bool:
    return any(name == s or name.endswith("." + s) or re.fullmatch(s, name) for s in skip)


def quantize_linear_layers(model: nn.Module, quant: str = "nf4", skip: Iterable[str] = DEFAULT_SKIP,
                           compute_dtype: torch.dtype = torch.bfloat16,
                           quant_storage: torch.dtype | None = None, double_quant: bool = True,
                           device: str | torch.device = "cpu") -> int:
    """Replace every ``nn.Linear`` of ``model`` (except names matching ``skip``) by a frozen bnb
    ``Linear4bit`` holding the same weights, quantised on ``device``. Returns how many were replaced.

    Why: ``from_pretrained(quantization_config=...)`` only applies to checkpoints on disk; models
    built from a config (tests, benchmarks) get the identical layer type this way.
    """
    check_quant(quant)
    import bitsandbytes as bnb

    storage = quant_storage or storage_dtype(compute_dtype)
    targets = [(n, m) for n, m in model.named_modules()
               if type(m) is nn.Linear and not _skipped(n, skip)]
    for name, lin in targets:
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=double_quant,
                              quant_type=quant, quant_storage=storage, device="meta")
        q.weight = bnb.nn.Params4bit(lin.weight.data.to(compute_dtype), requires_grad=False,
                                     compress_statistics=double_quant, quant_type=quant,
                                     quant_storage=storage, module=q)
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data.to(compute_dtype), requires_grad=False)
        q = q.to(device)  # quantisation happens on this move
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, q)
    return len(targets)


def is_quantized(module: nn.Module) -> bool:
    return any(type(m).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4") for m in module.modules())


def quantized_bytes(numel: int, double_quant: bool = True, blocksize: int = 64) -> int:
    """Bytes of ONE NF4/FP4 weight matrix of ``numel`` values, as bitsandbytes stores it.

    4-bit codes (numel / 2) + one absmax per block of 64: 8-bit with double quantisation (plus an
    fp32 scale per 256 blocks and a 256-entry fp32 code book), else fp32; + the 16-entry code book.
    """
    blocks = -(-numel // blocksize)
    if double_quant:
        absmax = blocks + 4 * -(-blocks // 256) + 256 * 4 + 4
    else:
        absmax = 4 * blocks
    return -(-numel // 2) + absmax + 16 * 4
