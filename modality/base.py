"""The modality plugin contract (see DESIGN.md).

A modality is a LightningModule (so it can pretrain alone, as the stock forecaster does)
with a FROZEN ``encoder`` and a TRAINABLE ``adaptor``. ``MultimodalLM`` calls only the
methods below; a plugin's own Lightning hooks serve its standalone pretraining.
"""

from __future__ import annotations

import abc
from pathlib import Path
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn


def text_rows(tokenizer: Any, embeddings: Tensor, texts: Sequence[str]) -> Tensor:
    """[len(texts), D]: each text's token rows of the LLM's input table, averaged (detached). Why: an objective that
    hands the LLM a class (a phoneme, a label) as text it knows places that class's rows."""
    table = embeddings.detach()
    return torch.stack([table[torch.tensor(tokenizer.encode(t, add_special_tokens=False), device=table.device)]
                        .float().mean(0) for t in texts]).to(embeddings)


class Objective(nn.Module):
    name: str = "objective"  # its key in MultimodalLM.objectives is "<modality>_<name>"

    """An auxiliary training objective a plugin adds to MultimodalLM (e.g. speech's CTC).

    Its parameters are checkpointed with what trains (``objectives.<key>.*``); ``meta`` is what a checkpoint
    chain carries to rebuild it; the core adds ``weight`` x each loss it returns, logs them by name, and logs
    its validation metrics. ``embeddings`` is the LLM's input-embedding table [V, D].
    """

    def __init__(self, weight: float = 0.0):
        super().__init__()
        if weight < 0:
            raise ValueError(f"objective weight must be >= 0, got {weight}")
        self.weight = weight

    def loss(self, outs: dict[str, tuple[Tensor, Tensor]], batch: dict, embeddings: Tensor) -> dict[str, Tensor]:
        """Named losses from each modality's adaptor output (out [n, N, D], lengths [n])."""
        return {}

    def transform(self, name: str, out: Tensor, lengths: Tensor, embeddings: Tensor,
                  source: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor] | None:
        """Optionally rewrite a modality's adaptor output before the LLM reads it: (out [n, N, D] with each clip's
        k kept positions first, k [n]); the core hides the N - k slots left over. None: unchanged. Objectives
        transform in turn: ``out``/``lengths`` are what the previous one left, ``source`` the adaptor's own output."""
        return None

    def symbol_rows(self, name: str, symbols: Tensor, embeddings: Tensor) -> Tensor | None:
        """Rows [n, N, D] for inputs given as distributions over this objective's classes [n, N, V] (a modality input
        of kind ``symbols``: e.g. a transcript's phonemes, modality.speech.asr.text_reading); None: not its classes."""
        return None

    def validation_batch(self, outs: dict[str, tuple[Tensor, Tensor]], batch: dict, embeddings: Tensor) -> None:
        """Accumulate validation counts for one batch."""

    def validation_metrics(self) -> dict[str, float]:
        """The epoch's validation metrics (and reset the counts)."""
        return {}

    def meta(self) -> dict[str, Any]:
        """Settings a checkpoint must carry so that a later stage rebuilds this objective."""
        return {}


class Decoder(abc.ABC):
    """How a plugin's answers are written at evaluation, instead of the LLM's plain greedy generation."""

    @abc.abstractmethod
    def decode(self, model: Any, batch: dict, max_new_tokens: int) -> tuple[list[str], list[dict[str, Any]]]:
        """A generate-mode batch -> (answer per sample, extra prediction-row fields per sample)."""

    def metrics(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        """Metrics of its own over the prediction rows (with their extra fields)."""
        return {}


class Modality(L.LightningModule, abc.ABC):
    """Base class for a modality plugin.

    Subclasses set ``name``, ``placeholder``, ``encoder``, ``adaptor`` and ``d_llm`` and
    implement :meth:`featurize`, :meth:`encode_frozen`, :meth:`adapt`, :meth:`output_length`.
    """

    name: str = "modality"
    placeholder: str = "<modality>"
    input_key: str = "input"  # chat.py's command-line name for this plugin's inputs (audio=..., series=...)
    encoder: nn.Module
    adaptor: nn.Module

    # ------------------------------------------------------------------ data side
    @abc.abstractmethod
    def load(self, ref: Any, root: str | None = None) -> Any:
        """Read one raw input named by a record's reference (a path, a ticker window, ...).

        Relative paths resolve against ``root`` (the record file's folder). Bad input raises
        ``ValueError`` with a one-line message naming the file.
        """

    def load_features(self, ref: Any, root: str | None = None) -> tuple[Tensor, str]:
        """Reference -> (tensor, kind). kind is "features" (encode) or "hidden" (cached encoder output, adapt only)."""
        return self.featurize(self.load(ref, root)), "features"

    def ref_for(self, path: str) -> Any:
        """A record reference for a user's input named on a command line (an existing file: its absolute path)."""
        return str(Path(path).resolve()) if Path(path).exists() else path

    def reading(self, ref: Any, root: str | None = None) -> str | None:
        """Words the plugin reads off an input by fixed rules (e.g. a price window's indicators), placed as
        ordinary text tokens right after its embeddings; None: embeddings only. Why: what a rule computes
        exactly (a drawdown to the percent) the LLM can copy, and the learned positions carry the rest."""
        return None

    def answer_fields(self, ref: Any, root: str | None = None) -> dict[str, str]:
        """Answers a record names as ``{field}`` templates (a record with ``"fill": <this plugin>``), written from what
        the frozen encoder computes for this input when the record loads: teacher answers that never go stale when
        the encoder changes (e.g. the forecaster's call, which the LLM learns to state)."""
        return {}

    @abc.abstractmethod
    def featurize(self, raw: Any) -> Tensor:
        """Turn one raw input (waveform, price window, ...) into features [T, F]. CPU, no grad."""

    @abc.abstractmethod
    def output_length(self, feature_length: int) -> int:
        """Number of LLM positions N that one sample of ``feature_length`` frames becomes."""

    def adapted_length(self, hidden_length: int) -> int:
        """N for a sample whose encoder output (cached ``encode_frozen`` result) has ``hidden_length`` rows."""
        raise NotImplementedError(f"{type(self).__name__} does not support cached encoder outputs")

    def collate_features(self, features: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Pad a list of [T_i, ...] features along dim 0 -> ([B, T_max, ...], mask [B, T_max])."""
        lengths = torch.tensor([f.shape[0] for f in features], dtype=torch.long)
        t_max = int(lengths.max())
        out = features[0].new_zeros((len(features), t_max, *features[0].shape[1:]))
        for i, f in enumerate(features):
            out[i, : f.shape[0]] = f
        mask = torch.arange(t_max)[None, :] < lengths[:, None]
        return out, mask

    # ------------------------------------------------------------------ model side
    @abc.abstractmethod
    def encode_frozen(self, features: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Encoder only: features [B, T, F], mask [B, T] -> (hidden [B, T', H], lengths [B]).

        Deterministic given frozen weights, so its output may be cached by the data side.
        """

    @abc.abstractmethod
    def adapt(self, hidden: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Adaptor only: hidden [B, T', H] -> (embeddings [B, N, d_llm], lengths N [B])."""

    def encode(self, features: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Encoder (no grad while frozen) then adaptor -> (embeddings [B, N, d_llm], lengths [B])."""
        if self.encoder_frozen:
            with torch.no_grad():
                hidden, lengths = self.encode_frozen(features, mask)
        else:
            hidden, lengths = self.encode_frozen(features, mask)
        return self.adapt(hidden, lengths)

    # ------------------------------------------------------------------ extension points (defaults: none)
    lr: float = 1e-3                   # a standalone stage (the plugin trains alone with its own Lightning hooks):
    weight_decay: float = 0.0          # its optimiser settings, set from stage.optim
    align_requires: str | None = None  # a stage whose checkpoint stage=align needs (a pretrained encoder), if any
    cache_dir: str | None = None       # set by a plugin that caches its frozen encoder's outputs

    def bind_llm(self, tokenizer: Any, llm: nn.Module) -> None:
        """Called once the run's LLM is loaded and its placeholders added, before stages and LoRA apply: a plugin
        whose inputs are tokens of the LLM's own vocabulary adds them (and their rows) here. Default: nothing."""

    def resolve(self, ref: Any, root: str | None = None) -> Any:
        """The identity of an input (e.g. its absolute path): the key of the encoder cache."""
        return ref

    def precompute_cache(self, refs: list[Any], device: Any = None) -> dict[str, int]:
        """Encode every input once, batched, before training (a plugin with ``cache_dir``); counts by outcome.
        ``device``: the run's accelerator, to encode on. Under torch.distributed every rank calls it with the
        same refs (tasks.caches), so a plugin may split the work between ranks."""
        return {}

    def read_record(self, line: dict, where: str, rng: random.Random) -> dict | None:
        """A record file line in this plugin's own format (e.g. a NeMo ASR manifest line) -> a conversation
        record; None when the line is not in it."""
        return None

    def objectives(self, settings: Mapping[str, Any], inherited: Sequence[Mapping[str, Any]],
                   train_records: Callable[[], list[dict]], tokenizer: Any, placeholder_id: int,
                   trainable: bool) -> list["Objective"]:
        """Auxiliary objectives this plugin adds to MultimodalLM. ``settings``: the stage config;
        ``inherited``: the checkpoint chain's metadata, newest first (an objective a chain trained is rebuilt
        from it); ``train_records``: the run's training records (read on demand); ``trainable``: whether the
        adaptor trains in this stage."""
        return []

    def decoder(self, settings: Mapping[str, Any], objectives: Sequence["Objective"],
                inherited: Sequence[Mapping[str, Any]], train_files: Sequence[str]) -> "Decoder | None":
        """How this plugin's answers are written at evaluation (``settings``: the eval config); None: the LLM's
        greedy generation."""
        return None

    def baselines(self, model: Any, datamodule: Any, out: Any, parts: Any, write: bool) -> dict[str, Any]:
        """Reference scores beside the model's on the same evaluation records (e.g. the same LLM reading the input
        written as text); ``parts`` (tasks.runner.RunParts) builds LLMs and trainers as the run does."""
        return {}

    def pretrain_report(self, datamodule: Any, out: Any) -> dict[str, Any]:
        """After a standalone stage (e.g. stage=forecast): held-out metrics of what it trained (files into ``out``)."""
        return {}

    @classmethod
    def planned_shapes(cls, cfg: Mapping[str, Any], d_llm: int) -> tuple[Any, int] | None:
        """(llm.shapes.EncoderShape, trainable adaptor parameters) without loading weights, for the memory
        planner; None: the planner instantiates the plugin and counts."""
        return None

    def configure_model(self) -> None:
        """Standalone pretraining under trainer=fsdp: the encoder is one FSDP2 unit (llm.sharding); inside a
        MultimodalLM this hook never runs (the MultimodalLM shards itself)."""
        from llm.sharding import configure_unit_sharding

        configure_unit_sharding(self, self.encoder)

    # ------------------------------------------------------------------ freezing
    @property
    def encoder_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.encoder.parameters())

    def set_trainable(self, encoder: bool, adaptor: bool) -> None:
        """Fix which halves train; a frozen encoder is also put in eval mode (no dropout)."""
        self.encoder.requires_grad_(encoder)
        self.adaptor.requires_grad_(adaptor)
        self.encoder.train(encoder and self.training)

    def train(self, mode: bool = True) -> "Modality":
        super().train(mode)
        if self.encoder_frozen:
            self.encoder.eval()  # frozen encoders never run dropout / batch-stat updates
        return self
