"""How the voice sounds, handed to the LLM as words it knows: paralinguistic heads on the speech adaptor.

Why: the phoneme chain hands the LLM what was SAID (soft phonemes); pitch, speed, gender and accent are gone
from that. A probe (bench/probes/tone_probe.py) reads them off the mean and spread over time of the frozen
Whisper states at 97-99 % (gender, pitch, speed) on held-out voices, but off the phoneme adaptor's output only at
72 % for pitch (it learned to ignore the voice): so the heads read the encoder states the adaptor was given
(``SpeechModality.pooled``, set by each ``adapt``), without the LLM, as CTC taught the adaptor words. Each
head's class distribution @ the LLM's own rows for the class names ("male", "high", "fast", "British") becomes
one position after the clip's phonemes: the LLM reads the label as (soft) text and, after instruct, says it.

Labels come from the manifest line of each clip (``gender``, ``pitch_class``, ``speed_class``, ``accent_region``;
modality.speech.records puts them in ``clip_labels``); the heads train with ``stage.tone_weight`` > 0 (their own
trainable set: the adaptor may stay frozen) and are read by every later stage of the chain.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modality.base import Objective, text_rows

TONE_LABELS = ("gender", "pitch_class", "speed_class", "accent_region")


def pooled(out: Tensor, lengths: Tensor) -> Tensor:
    """x [n, T, H], lengths [n] -> [n, 2H]: mean and standard deviation over each clip's valid frames."""
    valid = (torch.arange(out.shape[1], device=out.device)[None, :] < lengths[:, None].to(out.device))[..., None]
    w = valid.to(out.dtype)
    n = w.sum(1).clamp(min=1)
    mean = (out * w).sum(1) / n
    var = (((out - mean[:, None]) * w) ** 2).sum(1) / n
    return torch.cat([mean, var.clamp(min=1e-8).sqrt()], dim=-1)


class ToneObjective(Objective):
    """Cross-entropy heads for the voice's labels; with ``read`` their answers join the LLM's input."""

    name = "tone"

    def __init__(self, modality: str, tokenizer: Any, d_in: int, classes: Mapping[str, Sequence[str]],
                 features: Callable[[], Tensor], weight: float = 0.0, read: bool = True, hidden: int = 128):
        super().__init__(weight)
        if not classes or any(len(c) < 2 for c in classes.values()):
            raise ValueError(f"tone heads need >= 2 classes per label, got {dict(classes)}")
        self.modality, self.tokenizer, self.read, self.features = modality, tokenizer, read, features
        self.classes = {k: list(v) for k, v in classes.items()}
        # one shared trunk, a linear head per label: 0.5 M parameters over the 3,840 pooled features (one trunk per
        # label was 4 M, which a shipped model of <= 25 MB cannot carry beside the 8.6 M adaptor)
        self.trunk = nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, hidden), nn.GELU(), nn.Dropout(0.1))
        self.heads = nn.ModuleDict({k: nn.Linear(hidden, len(v)) for k, v in self.classes.items()})
        self.requires_grad_(weight > 0)  # the tone stage trains them; every later stage only reads them
        self._counts: dict[str, list[int]] = {k: [0, 0] for k in self.classes}
        self._tables: dict[tuple[str, int], Tensor] = {}

    def logits(self, rows: Tensor | None = None) -> dict[str, Tensor]:
        """label -> [n, C] for the clips of the modality's last ``adapt`` (``rows`` of them: a subset)."""
        x = self.features()
        if rows is not None:
            x = x[rows.to(x.device)]
        h = self.trunk(x.to(next(self.trunk.parameters()).dtype))
        return {k: head(h).float() for k, head in self.heads.items()}

    def _targets(self, batch: dict) -> tuple[list[int], dict[str, Tensor]]:
        """The clips whose sample has one clip with labels, and their class indices per label (-100: unknown)."""
        owner = batch["modal"][self.modality]["sample_index"].tolist()
        labels = batch.get("clip_labels") or [None] * len(batch["ids"])
        rows = [k for k, b in enumerate(owner) if owner.count(b) == 1 and labels[b]]
        ys = {lab: torch.tensor([self.classes[lab].index(v) if (v := labels[owner[k]][0].get(lab)) in self.classes[lab]
                                 else -100 for k in rows], dtype=torch.long) for lab in self.classes}
        return rows, ys

    def loss(self, outs: dict[str, tuple[Tensor, Tensor]], batch: dict, embeddings: Tensor) -> dict[str, Tensor]:
        if self.modality not in outs:
            return {}
        rows, ys = self._targets(batch)
        if not rows:
            return {}
        out, _ = outs[self.modality]
        logits = self.logits(torch.tensor(rows))
        losses = [F.cross_entropy(logits[k], ys[k].to(out.device), ignore_index=-100)
                  for k in self.classes if bool((ys[k] >= 0).any())]
        return {f"tone_{self.modality}": torch.stack(losses).mean()} if losses else {}

    def table(self, label: str, embeddings: Tensor) -> Tensor:
        """[C, D]: each class name's LLM rows, averaged (" high" -> its token rows)."""
        key = (label, embeddings.data_ptr())
        if key not in self._tables:
            self._tables[key] = text_rows(self.tokenizer, embeddings, [" " + c for c in self.classes[label]])
        return self._tables[key]

    def transform(self, name: str, out: Tensor, lengths: Tensor, embeddings: Tensor,
                  source: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor] | None:
        """Append one position per label after each clip's ``lengths`` positions: softmax(head) @ the class names'
        rows (the heads read the encoder states of the same clips, ``features``)."""
        if name != self.modality or not self.read:
            return None
        logits = self.logits()
        extra = torch.stack([logits[k].softmax(-1).to(embeddings) @ self.table(k, embeddings) for k in self.classes],
                            dim=1).to(out.dtype)                                  # [n, L, D]
        n_lab = extra.shape[1]
        if out.shape[1] < n_lab + 1:
            raise ValueError(f"a {name} clip of {out.shape[1]} positions has no room for {n_lab} tone positions")
        keep = lengths.to(out.device).clamp(max=out.shape[1] - n_lab)               # phonemes beyond the room: cut
        pos = keep[:, None] + torch.arange(n_lab, device=out.device)[None, :]       # [n, L] where each label goes
        out = out * (torch.arange(out.shape[1], device=out.device)[None, :] < keep[:, None])[..., None].to(out.dtype)
        out = out.scatter(1, pos[..., None].expand(-1, -1, out.shape[2]), extra)
        return out, keep + n_lab

    def predictions(self, outs: dict[str, tuple[Tensor, Tensor]], batch: dict) -> list[dict[str, str] | None]:
        """Per sample, the heads' labels for its one clip (None: no clip, or several)."""
        res: list[dict[str, str] | None] = [None] * len(batch["ids"])
        if self.modality not in outs:
            return res
        owner = batch["modal"][self.modality]["sample_index"].tolist()
        with torch.no_grad():
            logits = self.logits()
        for k, b in enumerate(owner):
            if owner.count(b) == 1:
                res[b] = {lab: self.classes[lab][int(logits[lab][k].argmax())] for lab in self.classes}
        return res

    def validation_batch(self, outs: dict[str, tuple[Tensor, Tensor]], batch: dict, embeddings: Tensor) -> None:
        if self.modality not in outs:
            return
        rows, ys = self._targets(batch)
        if not rows:
            return
        with torch.no_grad():
            logits = self.logits(torch.tensor(rows))
        for lab, y in ys.items():
            ok = y >= 0
            self._counts[lab][0] += int((logits[lab].argmax(-1).cpu()[ok] == y[ok]).sum())
            self._counts[lab][1] += int(ok.sum())

    def validation_metrics(self) -> dict[str, float]:
        res = {f"val/tone_{k}": hit / n for k, (hit, n) in self._counts.items() if n}
        self._counts = {k: [0, 0] for k in self.classes}
        return res

    def meta(self) -> dict[str, Any]:
        return {"tone_classes": self.classes}


def tone_classes(records: Sequence[dict]) -> dict[str, list[str]]:
    """The labels the TRAIN manifest lines carry (each with >= 2 values), sorted."""
    seen: dict[str, set[str]] = {k: set() for k in TONE_LABELS}
    for r in records:
        for labels in r.get("clip_labels") or []:
            for k in TONE_LABELS:
                if labels and labels.get(k) is not None:
                    seen[k].add(str(labels[k]))
    return {k: sorted(v) for k, v in seen.items() if len(v) >= 2}


def build_tone_objective(modality: Any, settings: Mapping[str, Any], inherited: Sequence[Mapping[str, Any]],
                         train_records: Any, tokenizer: Any) -> ToneObjective | None:
    """The chain's trained tone heads (read by this stage), or new ones when ``stage.tone_weight`` > 0."""
    weight = float(settings.get("tone_weight", 0.0) or 0.0)
    chain = next((m["tone_classes"] for m in inherited if m.get("tone_classes")), None)
    if chain is None and weight <= 0:
        return None
    classes = chain or tone_classes(train_records())
    if not classes:
        raise ValueError("stage.tone_weight > 0 but no training record carries voice labels (gender, pitch_class, "
                         "speed_class, accent_region in the manifest lines)")
    return ToneObjective(modality.name, tokenizer, modality.pooled_width, classes, lambda: modality.pooled, weight=weight)
