"""NF4 (QLoRA) on CPU: the quantize helper, the early errors, and a QLoRA step that moves only LoRA + adaptor."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from llm.quant import check_quant, is_quantized, quantization_config, quantize_linear_layers, quantized_bytes
from tests.unit.helpers import batch_for, build, toy_records

bnb = pytest.importorskip("bitsandbytes")


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bitwise view: 4-bit codes packed into bf16 may spell NaN, and NaN != NaN."""
    return t.detach().contiguous().view(torch.uint8).clone()


def test_quantize_replaces_every_linear_but_the_head(tiny_lm):
    model = tiny_lm.model
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    n = quantize_linear_layers(model)
    assert n == 2 * 7  # q k v o gate up down, per layer
    assert is_quantized(model) and type(model.lm_head) is nn.Linear
    q = model.model.layers[0].self_attn.q_proj
    assert type(q).__name__ == "Linear4bit" and q.weight.dtype == torch.bfloat16  # quant_storage: FSDP can shard it
    assert not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        out = model(input_ids=ids).logits
    rel = (out - ref).norm() / ref.norm()
    assert 0 < rel < 0.2  # really 4-bit (not a copy), still the same function


def test_quantized_bytes_equal_what_bitsandbytes_stores():
    for out_f, in_f in ((128, 64), (576, 1536), (1000, 300)):
        lin = nn.Sequential(nn.Linear(in_f, out_f, bias=False))
        quantize_linear_layers(lin, skip=())
        w = lin[0].weight
        qs = w.quant_state
        tensors = [qs.absmax, qs.code, qs.state2.absmax, qs.state2.code, qs.offset]
        measured = w.untyped_storage().nbytes() + sum(t.numel() * t.element_size() for t in tensors)
        assert measured == quantized_bytes(in_f * out_f), (out_f, in_f)


def test_qlora_step_on_cpu_changes_only_lora_and_adaptor(tiny_lm, toy_modality):
    quantize_linear_layers(tiny_lm.model)
    model = build(tiny_lm, toy_modality, "instruct", lr=1e-2)
    batch = batch_for(model, toy_records(4))
    before = {n: _bits(p) for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("modalities.toy.adaptor.") for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        loss = model(batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    changed = {n for n, p in model.named_parameters() if not torch.equal(_bits(p), before[n])}
    assert changed == trainable  # every LoRA / adaptor weight moved; 4-bit base, embeddings, encoder did not
    assert losses[-1] < losses[0]


def test_unknown_quant_is_one_line_error():
    with pytest.raises(ValueError, match=r"llm.model.quant='int3'.*expected one of") as e:
        check_quant("int3")
    assert "\n" not in str(e.value)
    check_quant(None)


def test_nf4_without_bitsandbytes_is_one_line_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    for call in (lambda: check_quant("nf4"), lambda: quantization_config("nf4", torch.bfloat16),
                 lambda: quantize_linear_layers(nn.Linear(4, 4))):
        with pytest.raises(ValueError, match="needs bitsandbytes") as e:
            call()
        assert "\n" not in str(e.value)


def test_quantization_config_is_qlora_with_shardable_storage():
    cfg = quantization_config("nf4", torch.float32)
    assert cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "nf4" and cfg.bnb_4bit_use_double_quant
    assert cfg.bnb_4bit_compute_dtype == torch.bfloat16 and cfg.bnb_4bit_quant_storage == torch.bfloat16
