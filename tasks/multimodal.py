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
from llm.tokens import stop_token_ids
from modality.speech.asr.ctc import (UnitSegmenter, class_index, cosine_logits, ctc_compress, ctc_loss, greedy_ctc_decode,
                      linear_head, to_classes)
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
                 optim: OptimSpec | None = None, aux_weight: float = 0.0, llm_name: str = "llm",
                 ctc_weight: float = 0.0, lm_weight: float = 1.0):
        super().__init__()
        self.save_hyperparameters({"stage": asdict(stage), "lora": asdict(lora) if lora else None,
                                   "optim": asdict(optim or OptimSpec()), "aux_weight": aux_weight,
                                   "llm_name": llm_name, "placeholder_ids": dict(placeholder_ids),
                                   "ctc_weight": ctc_weight, "lm_weight": lm_weight})
        if lm_weight < 0 or ctc_weight < 0 or (lm_weight == 0 and ctc_weight == 0):
            raise ValueError(f"lm_weight={lm_weight}, ctc_weight={ctc_weight}: both >= 0 and at least one > 0")
        if lm_weight == 0 and stage.lora:
            raise ValueError("lm_weight=0 (CTC only) trains nothing in the LLM: set stage.lora=false")
        if stage.lora:
            if lora is None:
                raise ValueError(f"stage={stage.name} trains LoRA but no lora spec was given")
            llm = apply_lora(llm, lora)
        self.llm = llm
        self.tokenizer = tokenizer
        self.modalities = nn.ModuleDict(modalities)
        self.placeholder_ids = dict(placeholder_ids)
        self.stage = stage
        self.optim = optim or OptimSpec()
        self.aux_weight = aux_weight
        self.ctc_weight = ctc_weight
        self.lm_weight = lm_weight
        self.llm_name = llm_name
        apply_stage(self.llm, self.modalities, stage)
        self.ctc_vocab: Tensor | None = None  # set_ctc_vocab(): CTC over the corpus's tokens only
        self.ctc_segmenter: UnitSegmenter | None = None
        self.ctc_heads = nn.ModuleDict()  # set_ctc_vocab(classifier="linear"): a trained classifier per modality
        self.ctc_phonemes: list[str] | None = None  # set_ctc_phonemes(): CTC over espeak-ng phonemes instead
        self.phonemizer: Any = None
        self.ctc_language: str | None = None
        self._phoneme_index: dict[str, int] = {}
        self.word_decoder: Any = None  # modality.speech.asr.lexicon.LexiconDecoder: words from phonemes at evaluation
        self.strict_loading = False  # checkpoints hold only what trains
        self.skipped: list[tuple[str, str]] = []
        self._ctc_counts = [0, 0]  # validation: word edits, reference words of the greedy CTC readout

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

    def set_ctc_vocab(self, vocab: Tensor | None, classifier: str = "cosine") -> None:
        """Restrict the CTC classes (modality.speech.asr.ctc.corpus_vocab); None: the whole LLM vocabulary. Targets are then
        re-spelled with those classes (modality.speech.asr.ctc.UnitSegmenter).

        ``classifier``: "cosine" scores adaptor outputs against the frozen embedding rows; "linear" adds a
        trained Linear(d_llm -> classes) per modality, part of what the adaptor trains (and checkpoints).
        Why linear: measured on the 10,200-clip corpus (experiment=speech_align_ctc), held-out greedy CTC WER
        after 200 / 800 steps was 66 / 59 % with it and 91 / 87 % with the frozen rows (classes that cannot
        move toward the sound learn far more slowly).
        With soft compression the LLM still reads only embedding rows (p @ E), whichever classifier.
        """
        if classifier not in ("cosine", "linear"):
            raise ValueError(f"ctc classifier must be 'cosine' or 'linear', got {classifier!r}")
        if classifier == "linear" and vocab is None:
            raise ValueError("a linear CTC classifier needs a class vocabulary (stage.ctc_vocab=corpus)")
        self.ctc_vocab = vocab
        self.ctc_segmenter = UnitSegmenter(self.tokenizer, vocab) if vocab is not None else None
        self.ctc_heads = nn.ModuleDict()
        if classifier == "linear":
            w = self.llm.get_input_embeddings().weight
            for name in self.modalities:
                head = linear_head(w.shape[1], len(vocab)).to(device=w.device)
                head.requires_grad_(self.stage.adaptor and self.ctc_weight > 0)  # no CTC loss: it would get no gradient
                self.ctc_heads[name] = head

    def set_ctc_phonemes(self, classes: list[str], language: str = "en-us", phonemizer: Any = None) -> None:
        """CTC over phoneme ``classes`` (modality.speech.asr.phonemes; blank first) with a trained linear head per modality;
        targets are the canonical espeak-ng phonemes of each transcript (stage.ctc_vocab=phonemes).

        Why: the token-level classes learn words, not sounds; a phoneme recognizer plus a lexicon
        (modality.speech.asr.lexicon, at evaluation) can write words no training clip said.
        """
        from modality.speech.asr.phonemes import BLANK, WORD, Phonemizer

        if not classes or classes[0] != BLANK or WORD not in classes:
            raise ValueError(f"phoneme classes must start with {BLANK!r} and hold {WORD!r}")
        if any(getattr(m, "ctc_compress", False) for m in self.modalities.values()):
            raise ValueError("a phoneme CTC chain feeds no LLM: set modality.ctc_compress=false")
        self.ctc_vocab, self.ctc_segmenter = None, None
        self.ctc_phonemes, self.ctc_language = list(classes), language
        self.phonemizer = phonemizer if phonemizer is not None else Phonemizer(language)
        self._phoneme_index = {p: i for i, p in enumerate(classes)}
        w = self.llm.get_input_embeddings().weight
        self.ctc_heads = nn.ModuleDict()
        for name in self.modalities:
            head = linear_head(w.shape[1], len(classes)).to(device=w.device)
            head.requires_grad_(self.stage.adaptor and self.ctc_weight > 0)  # no CTC loss: it would get no gradient
            self.ctc_heads[name] = head

    def phoneme_targets(self, batch: dict) -> list[list[int] | None]:
        """Class indices of each transcript sample's phonemes (None: not a transcript, or a phoneme outside the
        classes, which leaves the sample out of the loss as an unspellable token target does)."""
        out: list[list[int] | None] = []
        for ids, ref in zip(batch["ctc_targets"], batch["references"]):
            if not ids or not ref:
                out.append(None)
                continue
            try:
                seq = self.phonemizer([ref])[0]
            except ValueError:
                out.append(None)
                continue
            idx = [self._phoneme_index.get(p) for p in seq]
            out.append(None if None in idx else idx)
        return out

    @property
    def ctc_classifier(self) -> str:
        return "linear" if len(self.ctc_heads) else "cosine"

    def ctc_logits(self, name: str, out: Tensor) -> Tensor:
        """Adaptor output [n, N, D] -> class logits [n, N, V] over ``ctc_vocab`` (all rows without one)."""
        if name in self.ctc_heads:
            return self.ctc_heads[name](out).float()
        table = self.llm.get_input_embeddings().weight
        return cosine_logits(out, table if self.ctc_vocab is None else table[self.ctc_vocab.to(table.device)])

    def on_fit_start(self) -> None:
        self.train()  # HF loads models in eval mode; Lightning keeps whatever mode it finds

    # ---------------------------------------------------------------- forward
    def embed(self, batch: dict) -> tuple[Tensor, dict[str, tuple[Tensor, Tensor]], Tensor]:
        """Text embeddings with every modality's adaptor output scattered into its placeholders.

        Returns (embeds [B, L, D], adaptor outputs per modality (uncompressed), attention mask [B, L]).
        A modality with ``ctc_compress`` fills only the first k of its N placeholder slots per clip
        (modality.speech.asr.ctc.ctc_compress); the other N - k become holes the attention mask hides, so the
        collator's N = output_length(T) contract holds and the LLM reads k positions.
        """
        input_ids = batch["input_ids"]
        attention_mask = batch["attention_mask"]
        embeds = self.llm.get_input_embeddings()(input_ids)  # [B, L, D]
        outs = self.adapt_all(batch)
        for name, (out, lengths) in outs.items():
            m = self.modalities[name]
            slots = input_ids == self.placeholder_ids[name]
            if getattr(m, "ctc_compress", False):
                out, kept = ctc_compress(out, lengths, self.llm.get_input_embeddings().weight, self.placeholder_ids[name],
                                         vocab=self.ctc_vocab, soft=m.ctc_compress == "soft", hard=m.ctc_compress == "hard", logits=self.ctc_logits(name, out))
                filler = valid_rows(torch.arange(out.shape[1], device=out.device).expand(out.shape[0], -1) >= kept[:, None],
                                    lengths)  # [sum(lengths)] True on the slots left empty
                holes = torch.zeros_like(slots)
                holes[slots] = filler
                attention_mask = attention_mask * ~holes
            embeds = merge_embeddings(embeds, slots, valid_rows(out, lengths))
        return embeds, outs, attention_mask

    def lm_loss(self, embeds: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
        """Next-token CE, with the LM head run only where there are labels (the head is ~20% of compute).

        Positions count attended tokens only, so holes left by compression do not shift them.
        """
        backbone, head = backbone_and_head(self.llm)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = backbone(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).last_hidden_state
        targets = labels[:, 1:]                    # [B, L-1]
        keep = targets != IGNORE
        logits = head(hidden[:, :-1][keep]).float()  # [n_labels, V]
        return F.cross_entropy(logits, targets[keep])

    def forward(self, batch: dict) -> dict[str, Tensor]:
        if self.lm_weight > 0:
            embeds, outs, attention_mask = self.embed(batch)
            loss = self.lm_loss(embeds, attention_mask, batch["labels"])
            result = {"lm_loss": loss, "loss": self.lm_weight * loss}
        else:  # CTC only: the LLM never runs, a step costs the adaptor (and the classifier over the vocab)
            outs = self.adapt_all(batch)
            result = {"loss": torch.zeros((), device=self.device)}
        if self.ctc_weight > 0:
            targets = batch["ctc_targets"]
            if self.ctc_segmenter is not None:
                targets = [self.ctc_segmenter(t) for t in targets]
            vocab = None if self.ctc_vocab is None else self.ctc_vocab.to(self.device)
            targets = self.phoneme_targets(batch) if self.ctc_phonemes else to_classes(targets, vocab)
            for name, (out, lengths) in outs.items():
                blank = 0 if self.ctc_phonemes else class_index(vocab, self.placeholder_ids[name])
                ctc = ctc_loss(self.ctc_logits(name, out), lengths, batch["modal"][name]["sample_index"].to(out.device),
                               targets, blank)
                if ctc is not None:
                    result[f"ctc_{name}"] = ctc
                    result["loss"] = result["loss"] + self.ctc_weight * ctc
        if self.aux_weight > 0:
            for name, (out, lengths) in outs.items():
                aux = self.modalities[name].aux_loss(out, lengths, batch)
                if aux is not None:
                    result[f"aux_{name}"] = aux
                    result["loss"] = result["loss"] + self.aux_weight * aux
        return result

    def adapt_all(self, batch: dict) -> dict[str, tuple[Tensor, Tensor]]:
        """Every modality's adaptor output (uncompressed) without building the LLM's input sequence."""
        outs = {}
        for name, entry in batch["modal"].items():
            m = self.modalities[name]
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
        result = self(batch)
        if split == "val" and self.ctc_weight > 0:
            self._count_ctc_errors(batch)
        for k, v in result.items():
            self.log(f"{split}/{k}", v, prog_bar=(k == "loss"), batch_size=B, sync_dist=split != "train")
        return result["loss"]

    @torch.no_grad()
    def ctc_readout(self, batch: dict, outs: dict[str, tuple[Tensor, Tensor]] | None = None) -> list[str | None]:
        """Greedy CTC readout per sample: the text the adaptor alone spells, without the LLM; None for a sample
        without exactly one clip, or for every sample when the chain trained no CTC classes (``ctc_vocab``).
        Why: in the two-phase recipe it splits the error between the spelling and the LLM's reading of it.
        ``outs``: adapt_all's result when the caller already has it (the adaptor then does not run again)."""
        texts: list[str | None] = [None] * batch["input_ids"].shape[0]
        if self.ctc_vocab is None:
            return texts
        table = self.llm.get_input_embeddings().weight
        clips = [0] * len(texts)
        for name, (out, lengths) in (outs if outs is not None else self.adapt_all(batch)).items():
            owner = batch["modal"][name]["sample_index"].tolist()
            hyps = greedy_ctc_decode(out, lengths, table, self.placeholder_ids[name], vocab=self.ctc_vocab,
                                     logits=self.ctc_logits(name, out))
            for k, i in enumerate(owner):
                clips[i] += 1
                texts[i] = self.tokenizer.decode(hyps[k]).strip()
        return [t if n == 1 else None for t, n in zip(texts, clips)]

    @torch.no_grad()
    def phoneme_readout(self, batch: dict, outs: dict[str, tuple[Tensor, Tensor]] | None = None) -> list[list[str] | None]:
        """Greedy phoneme readout per one-clip sample (phoneme chains): blanks dropped, repeats merged."""
        seqs: list[list[str] | None] = [None] * batch["input_ids"].shape[0]
        clips = [0] * len(seqs)
        for name, (out, lengths) in (outs if outs is not None else self.adapt_all(batch)).items():
            logits = self.ctc_logits(name, out)
            runs = greedy_ctc_decode(out, lengths, None, 0, logits=logits)  # class indices, blank 0
            for k, i in enumerate(batch["modal"][name]["sample_index"].tolist()):
                clips[i] += 1
                seqs[i] = [self.ctc_phonemes[t] for t in runs[k]]
        return [s if n == 1 else None for s, n in zip(seqs, clips)]

    def _count_ctc_errors(self, batch: dict) -> None:
        """Greedy CTC readout of single-clip transcript samples vs their references (val/ctc_wer): what the
        adaptor alone 'says', without the LLM. The measure of a CTC-only run (stage.lm_weight=0). A phoneme
        chain counts phoneme edits instead (val/ctc_per)."""
        from tasks.evaluate import edit_distance, normalize

        if self.ctc_phonemes:
            for hyp, tgt in zip(self.phoneme_readout(batch), self.phoneme_targets(batch)):
                if hyp is not None and tgt:
                    self._ctc_counts[0] += edit_distance([self.ctc_phonemes[t] for t in tgt], hyp)
                    self._ctc_counts[1] += len(tgt)
            return
        for i, hyp in enumerate(self.ctc_readout(batch)):
            if hyp is not None and batch["ctc_targets"][i]:
                ref = normalize(batch["references"][i] or "")
                self._ctc_counts[0] += edit_distance(ref, normalize(hyp))
                self._ctc_counts[1] += len(ref)

    def on_validation_epoch_end(self) -> None:
        errors, words = self._ctc_counts
        if words:
            self.log("val/ctc_per" if self.ctc_phonemes else "val/ctc_wer", errors / words, sync_dist=True)
        self._ctc_counts = [0, 0]

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    # ---------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, batch: dict, max_new_tokens: int = 64, **kwargs: Any) -> list[str]:
        """Greedy decoding from a left-padded prompt batch (collator with generate=True).
        Under FSDP2 every rank must call it with the same batch (llm.sharding.gathered)."""
        tok = self.tokenizer
        with gathered(self):
            embeds, _, attention_mask = self.embed(batch)
            out = self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask,
                                    max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
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
