"""MultimodalLM: one LLM composed with any set of modality plugins, keyed by name."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data.collate import IGNORE
from llm.lora import LoraSpec, apply_lora, backbone_and_head
from llm.sharding import gathered
from modality.base import Decoder, Objective
from llm.tokens import stop_token_ids
from tasks.merge import merge_embeddings, valid_rows
from tasks.stages import StagePolicy, apply_stage


@dataclass
class OptimSpec:
    lr: float = 1e-3
    lora_lr: float | None = None      # defaults to lr
    weight_decay: float = 0.0
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1          # cosine floor as a fraction of lr
    betas: tuple[float, float] = (0.9, 0.98)

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"bad optim settings: {self}")


class MultimodalLM(L.LightningModule):
    """Interleaves modality embeddings with text embeddings and trains what the stage allows."""

    def __init__(self, llm: nn.Module, tokenizer: Any, modalities: dict[str, nn.Module],
                 placeholder_ids: dict[str, int], stage: StagePolicy, lora: LoraSpec | None = None,
                 optim: OptimSpec | None = None, llm_name: str = "llm", lm_weight: float = 1.0,
                 objectives: dict[str, Objective] | None = None, chain_lora: bool = False):
        super().__init__()
        self.save_hyperparameters({"stage": asdict(stage), "lora": asdict(lora) if lora else None,
                                   "optim": asdict(optim or OptimSpec()), "llm_name": llm_name,
                                   "placeholder_ids": dict(placeholder_ids), "lm_weight": lm_weight,
                                   "objectives": {k: o.weight for k, o in (objectives or {}).items()}})
        weights = [o.weight for o in (objectives or {}).values()]
        if lm_weight < 0 or (lm_weight == 0 and not any(w > 0 for w in weights)):
            raise ValueError(f"lm_weight={lm_weight} with objective weights {weights}: the LM loss weight must be "
                             f">= 0, and some loss must have weight > 0")
        if lm_weight == 0 and stage.lora:
            raise ValueError("lm_weight=0 (auxiliary objectives only) trains nothing in the LLM: set stage.lora=false")
        if stage.lora or chain_lora:  # chain_lora: an earlier stage trained LoRA; this one keeps it (frozen unless stage.lora)
            if lora is None:
                raise ValueError(f"stage={stage.name} needs LoRA layers but no lora spec was given")
            llm = apply_lora(llm, lora)
        self.llm = llm
        self.tokenizer = tokenizer
        self.modalities = nn.ModuleDict(modalities)
        self.placeholder_ids = dict(placeholder_ids)
        self.stage = stage
        self.optim = optim or OptimSpec()
        self.lm_weight = lm_weight
        self.llm_name = llm_name
        apply_stage(self.llm, self.modalities, stage)
        self.objectives = nn.ModuleDict(objectives or {})  # a plugin's extra losses (modality.base.Objective)
        self.decoder: Decoder | None = None  # how evaluation writes answers (modality.base.Decoder); None: greedy
        self.strict_loading = False  # checkpoints hold only what trains
        self.skipped: list[tuple[str, str]] = []

    def train(self, mode: bool = True) -> "MultimodalLM":
        """Frozen parts stay in eval mode (no dropout); Modality.train handles frozen encoders."""
        super().train(mode)
        if mode and not self.stage.lora:
            name = "is_activation_checkpointing" if hasattr(type(self.llm), "is_activation_checkpointing") else "is_gradient_checkpointing"
            if getattr(self.llm, name, False):
                # HF checkpoints only in training mode: keep it, but switch every dropout off instead
                for m in self.llm.modules():
                    if isinstance(m, nn.Dropout):
                        m.eval()
            else:
                self.llm.eval()
        return self

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A resumed run: state a plugin fitted from data (a k-means codebook, tasks.checkpoint.carried_buffers)
        is restored here, before Lightning loads what trains."""
        from tasks.checkpoint import restore_carried

        restore_carried(self, checkpoint.get("state_dict", {}))

    def on_fit_start(self) -> None:
        self.train()  # HF loads models in eval mode; Lightning keeps whatever mode it finds

    # ---------------------------------------------------------------- forward
    def embed(self, batch: dict) -> tuple[Tensor, dict[str, tuple[Tensor, Tensor]], Tensor]:
        """Text embeddings with every modality's adaptor output scattered into its placeholders.

        Returns (embeds [B, L, D], adaptor outputs per modality (as the adaptor gave them), attention mask [B, L]).
        An objective that transforms a modality's output (e.g. compresses it to k positions per clip) fills only
        the first k of its N placeholder slots; the other N - k become holes the attention mask hides, so the
        collator's N = output_length(T) contract holds and the LLM reads k positions.
        """
        input_ids = batch["input_ids"]
        attention_mask = batch["attention_mask"]
        table = self.table() if len(self.objectives) else None
        embeds = self.llm.get_input_embeddings()(input_ids)  # [B, L, D]
        outs = self.adapt_all(batch)
        for name, (out, lengths) in outs.items():
            slots = input_ids == self.placeholder_ids[name]
            kept = lengths
            for objective in self.objectives.values():  # in turn: each reads what the previous one left
                if (changed := objective.transform(name, out, kept, table, source=(outs[name][0], lengths))) is not None:
                    out, kept = changed
            if kept is not lengths:
                filler = valid_rows(torch.arange(out.shape[1], device=out.device).expand(out.shape[0], -1)
                                    >= kept[:, None], lengths)  # [sum(lengths)] True on the slots left empty
                holes = torch.zeros_like(slots)
                holes[slots] = filler
                attention_mask = attention_mask * ~holes
            embeds = merge_embeddings(embeds, slots, valid_rows(out, lengths))
        for name, entry in batch["modal"].items():  # inputs given as symbols: no adaptor, an objective's own rows
            if entry["kind"] == "symbols":
                rows = self.symbol_rows(name, entry["values"], table)
                embeds = merge_embeddings(embeds, input_ids == self.placeholder_ids[name],
                                          valid_rows(rows, entry["mask"].sum(1)))
        return embeds, outs, attention_mask

    def table(self) -> Tensor:
        """The LLM's input table [V, D] for objectives that read rows. Read only when one does: with new vocabulary
        rows (llm.vocab) it is a concatenation of the whole table."""
        return self.llm.get_input_embeddings().weight

    def symbol_rows(self, name: str, symbols: Tensor, table: Tensor) -> Tensor:
        """[n, N, V] class distributions -> [n, N, D] rows from the objective that owns those classes."""
        for objective in self.objectives.values():
            if (rows := objective.symbol_rows(name, symbols, table)) is not None:
                return rows
        raise ValueError(f"{name} inputs given as symbols need an objective of this run that maps its classes to rows "
                         f"(Objective.symbol_rows); this run has {sorted(self.objectives)}")

    def lm_loss(self, embeds: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
        """Next-token CE, with the LM head run only where there are labels (the head is ~20% of compute).

        Positions count attended tokens only, so holes left by a transform do not shift them.
        """
        backbone, head = backbone_and_head(self.llm)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = backbone(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).last_hidden_state
        targets = labels[:, 1:]                    # [B, L-1]
        keep = targets != IGNORE
        logits = head(hidden[:, :-1][keep]).float()  # [n_labels, V]
        return F.cross_entropy(logits, targets[keep])

    def forward(self, batch: dict, with_outputs: bool = False) -> Any:
        """Named losses with their weighted sum as ``loss``; with ``with_outputs`` also each modality's adaptor
        output. Training calls it through ``self(...)``: under FSDP2 the root's hooks gather its weights."""
        if self.lm_weight > 0:
            embeds, outs, attention_mask = self.embed(batch)
            loss = self.lm_loss(embeds, attention_mask, batch["labels"])
            result = {"lm_loss": loss, "loss": self.lm_weight * loss}
        else:  # auxiliary objectives only: the LLM never runs, a step costs the adaptor (and the objectives)
            outs = self.adapt_all(batch)
            result = {"loss": torch.zeros((), device=self.device)}
        table = self.table() if any(o.weight > 0 for o in self.objectives.values()) else None
        for objective in self.objectives.values():
            if objective.weight > 0:
                for k, v in objective.loss(outs, batch, table).items():
                    result[k] = v
                    result["loss"] = result["loss"] + objective.weight * v
        return (result, outs) if with_outputs else result

    def adapt_all(self, batch: dict) -> dict[str, tuple[Tensor, Tensor]]:
        """Every modality's adaptor output (untransformed) without building the LLM's input sequence."""
        outs = {}
        for name, entry in batch["modal"].items():
            m = self.modalities[name]
            if entry["kind"] == "symbols":  # no adaptor output: embed() reads them through symbol_rows
                continue
            if entry["kind"] == "hidden":
                outs[name] = m.adapt(entry["values"], entry["mask"].sum(1))
            else:
                outs[name] = m.encode(entry["values"], entry["mask"])
        return outs

    def _step(self, batch: dict, split: str) -> Tensor:
        if batch["skipped"]:
            self.skipped.extend(batch["skipped"])
        B = batch["input_ids"].shape[0]
        if B == 0:
            return None
        result, outs = self(batch, with_outputs=True)
        if split == "val" and len(self.objectives):
            table = self.table()
            with torch.no_grad():
                for objective in self.objectives.values():
                    objective.validation_batch(outs, batch, table)
        for k, v in result.items():
            self.log(f"{split}/{k}", v, prog_bar=(k == "loss"), batch_size=B, sync_dist=split != "train")
        return result["loss"]

    def on_validation_epoch_end(self) -> None:
        for objective in self.objectives.values():
            for k, v in objective.validation_metrics().items():
                self.log(k, v, sync_dist=True)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    # ---------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, batch: dict, max_new_tokens: int = 64, num_beams: int = 1, **kwargs: Any) -> list[str]:
        """Greedy (or beam-search) decoding from a left-padded prompt batch (collator with generate=True).
        Under FSDP2 every rank must call it with the same batch (llm.sharding.gathered)."""
        tok = self.tokenizer
        with gathered(self):
            embeds, _, attention_mask = self.embed(batch)
            out = self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask,
                                    max_new_tokens=max_new_tokens, do_sample=False, num_beams=num_beams,
                                    early_stopping=num_beams > 1,
                                    pad_token_id=tok.pad_token_id, eos_token_id=stop_token_ids(tok), use_cache=True,
                                    **kwargs)
        return [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]

    # ---------------------------------------------------------------- optimisation
    def configure_model(self) -> None:
        """FSDP2 (trainer=fsdp): shard the LLM layers + root, frozen encoders replicated; else a no-op."""
        from llm.sharding import configure_sharding

        configure_sharding(self)

    def configure_optimizers(self):
        lora = [p for n, p in self.named_parameters() if p.requires_grad and "lora_" in n]
        rest = [p for n, p in self.named_parameters() if p.requires_grad and "lora_" not in n]
        groups = [g for g in ({"params": rest, "lr": self.optim.lr},
                              {"params": lora, "lr": self.optim.lora_lr or self.optim.lr}) if g["params"]]
        if not groups:
            raise ValueError(f"stage={self.stage.name}: nothing to train")
        opt = torch.optim.AdamW(groups, weight_decay=self.optim.weight_decay, betas=self.optim.betas)
        total = max(1, int(self.trainer.max_steps if self.trainer and self.trainer.max_steps > 0 else 1000))
        warm, floor = self.optim.warmup_steps, self.optim.min_lr_ratio

        def schedule(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            progress = min(1.0, (step - warm) / max(1, total - warm))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
