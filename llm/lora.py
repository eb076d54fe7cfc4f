"""LoRA on the LLM only: the adapter is applied to the LLM module, never to modality encoders
(whose layers share names like ``q_proj``)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn


@dataclass
class LoraSpec:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def __post_init__(self) -> None:
        if self.r <= 0 or self.alpha <= 0:
            raise ValueError(f"lora.r and lora.alpha must be positive, got r={self.r} alpha={self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError("lora.targets is empty")


def apply_lora(llm: nn.Module, spec: LoraSpec) -> nn.Module:
    """Wrap ``llm`` in a PEFT LoRA model; only LoRA weights require grad afterwards."""
    from peft import LoraConfig, get_peft_model

    names = [n for n, m in llm.named_modules() if isinstance(m, nn.Linear) or "Linear" in type(m).__name__]
    for t in spec.targets:
        if not any(re.fullmatch(t, n.rsplit(".", 1)[-1]) or n.endswith(t) for n in names):
            raise ValueError(f"lora.targets: {t!r} matches no linear layer of the LLM "
                             f"(examples: {sorted({n.rsplit('.', 1)[-1] for n in names})[:8]})")
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=list(spec.targets), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(llm, config)


def backbone_and_head(llm: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The decoder stack and LM head of an HF causal LM, through a PEFT wrapper if any."""
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    return base.get_decoder(), base.get_output_embeddings()
