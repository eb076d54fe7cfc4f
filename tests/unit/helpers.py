"""Build a tiny MultimodalLM around the toy modality for unit tests."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn

from data.collate import ConversationCollator
from data.dataset import ConversationDataset
from llm.lora import LoraSpec
from llm.tokens import add_placeholder_tokens
from tasks.multimodal import MultimodalLM, OptimSpec
from tasks.stages import StagePolicy

STAGES = {"align": StagePolicy("align"), "instruct": StagePolicy("instruct", lora=True, requires="align")}


def toy_records(n: int = 8) -> list[dict]:
    return [{"id": f"r{i}", "where": f"toy.jsonl:{i + 1}", "root": None, "toy": [str(3 + i % 5)],
             "conversations": [{"from": "human", "value": "<toy>\nWhat is it?"},
                               {"from": "gpt", "value": f"It is number {3 + i % 5}."}]} for i in range(n)]


def build(lm, modality, stage: str = "align", lr: float = 1e-2, objectives=None, lm_weight: float = 1.0) -> MultimodalLM:
    """``objectives``: None, or a function (placeholder id) -> {key: Objective} (the id is known only here)."""
    ids = add_placeholder_tokens(lm.tokenizer, lm.model, [modality.placeholder])
    pid = ids[modality.placeholder]
    return MultimodalLM(lm.model, lm.tokenizer, {modality.name: modality}, {modality.name: pid},
                        STAGES[stage], lora=LoraSpec(r=4, alpha=8, dropout=0.0), optim=OptimSpec(lr=lr, warmup_steps=0),
                        llm_name=lm.name, lm_weight=lm_weight, objectives=objectives(pid) if objectives else None)


def ctc(lm, modality, weight: float = 1.0, **kw):
    """An objectives factory for build(): the speech CTC objective on the toy modality (cosine over all rows unless
    ``vocab`` / ``phonemes`` are given)."""
    from modality.speech.asr.objective import CtcObjective

    return lambda pid: {f"{modality.name}_ctc": CtcObjective(modality.name, lm.tokenizer, pid,
                                                             lm.model.get_input_embeddings().weight.shape[1],
                                                             weight=weight, **kw)}


def batch_for(model: MultimodalLM, records: list[dict], generate: bool = False) -> dict:
    ds = ConversationDataset(records, dict(model.modalities))
    col = ConversationCollator(model.tokenizer, dict(model.modalities), model.placeholder_ids, generate=generate)
    return col([ds[i] for i in range(len(ds))])


class TinyLightning(L.LightningModule):
    """A two-weight LightningModule with a fixed dataset: for callback and checkpoint tests that need a real Trainer."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.w(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(64, 2, generator=torch.Generator().manual_seed(0)), batch_size=2)
