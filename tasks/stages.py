"""Each stage fixes its trainable set ONCE, here. A test checks the result by parameter name."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class StagePolicy:
    name: str
    encoder: bool = False      # modality encoders train
    adaptor: bool = True       # modality adaptors train
    lora: bool = False         # LoRA on the LLM trains
    requires: str | None = None  # the stage whose checkpoint init_from must point at
    standalone: bool = False   # the modality trains alone with its own Lightning hooks (no LLM): its encoder

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a stage needs a name")
        if self.standalone and (self.adaptor or self.lora):
            raise ValueError(f"stage={self.name}: a standalone stage trains the modality's encoder alone (no adaptor, "
                             f"no LoRA)")


def apply_stage(llm: nn.Module, modalities: nn.ModuleDict, policy: StagePolicy) -> None:
    """Freeze everything but what ``policy`` trains. LoRA layers must already wrap ``llm``.

    New vocabulary rows a plugin added (llm.vocab) train exactly when adaptors do (align, instruct; not
    evaluate): they are how the LLM reads that plugin's inputs. The LLM's own rows stay frozen."""
    from llm.vocab import new_rows

    for name, p in llm.named_parameters():
        p.requires_grad_(policy.lora and "lora_" in name)
    for m in modalities.values():
        m.set_trainable(encoder=policy.encoder, adaptor=policy.adaptor)
    for rows in new_rows(llm):
        rows.requires_grad_(policy.adaptor)


def trainable_names(module: nn.Module) -> list[str]:
    return [n for n, p in module.named_parameters() if p.requires_grad]
