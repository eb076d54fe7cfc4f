"""The modality plugin contract (see DESIGN.md).

A modality is a LightningModule (so it can pretrain alone, as the stock forecaster does)
with a FROZEN ``encoder`` and a TRAINABLE ``adaptor``. ``MultimodalLM`` calls only the
methods below; a plugin's own Lightning hooks serve its standalone pretraining.
"""

from __future__ import annotations

import abc
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn


class Modality(L.LightningModule, abc.ABC):
    """Base class for a modality plugin.

    Subclasses set ``name``, ``placeholder``, ``encoder``, ``adaptor`` and ``d_llm`` and
    implement :meth:`featurize`, :meth:`encode_frozen`, :meth:`adapt`, :meth:`output_length`.
    """

    name: str = "modality"
    placeholder: str = "<modality>"
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

    def aux_loss(self, embeddings: Tensor, lengths: Tensor, batch: dict) -> Tensor | None:
        """Optional auxiliary alignment loss (e.g. CTC); None when the plugin has none."""
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
