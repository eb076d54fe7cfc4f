"""The speech adaptor: encoder frames -> LLM positions (frame stacking + MLP, strided conv, or a small
transformer), and which encoder states it reads."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SpeechAdaptor(nn.Module):
    """Frame stacking + 2-layer MLP (or strided Conv1d, or a small transformer) -> d_llm, then an
    optional fixed-RMS LayerNorm.

    ``target_rms`` rescales each output vector to the RMS of the LLM's token embeddings, so the
    frozen LLM sees inputs on the scale it was trained on from the first step. ``transformer`` adds
    self-attention over the stacked positions: an MLP position sees only its own 80 ms, while a
    word's sub-word tokens span several positions (see bench/probes/ctc_probe.py for the measured effect).
    """

    def __init__(self, d_in: int, d_llm: int, stack: int, hidden: int, kind: str, target_rms: float | None,
                 layers: int = 2, heads: int = 8, n_states: int = 1):
        super().__init__()
        self.stack, self.kind, self.target_rms, self.n_states = stack, kind, target_rms, n_states
        # several encoder states come in side by side, each layer-normed (their scales differ), and the input
        # projection reads them all. Measured: a softmax-weighted sum of them (SUPERB-style, mean at start) learned
        # far slower (held-out CTC WER 96.6 % vs 65.9 % at step 200): its weights move ~lr per step
        d_in = d_in * n_states
        if kind in ("mlp", "transformer"):
            self.fc1 = nn.Linear(d_in * stack, hidden)
        else:  # kernel 2*stack, stride stack: each output sees its own block plus half a block either side
            self.conv = nn.Conv1d(d_in, hidden, kernel_size=2 * stack, stride=stack)
        if kind == "transformer":
            layer = nn.TransformerEncoderLayer(hidden, heads, 2 * hidden, dropout=0.1, activation="gelu",
                                               batch_first=True, norm_first=True)
            self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.fc2 = nn.Linear(hidden, d_llm)
        self.norm = nn.LayerNorm(d_llm, elementwise_affine=False) if target_rms is not None else None

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        """x [B, T, H] with T a multiple of ``stack`` and zeros past each length -> [B, T / stack, d_llm].

        ``lengths`` (output positions per row) masks padded positions out of the transformer's attention.
        """
        if self.n_states > 1:
            x = self.norm_states(x)
        b, t, h = x.shape
        s = self.stack
        if self.kind == "conv":
            y = self.conv(F.pad(x.transpose(1, 2), (s // 2, s - s // 2))).transpose(1, 2)  # [B, T/s, hidden]
        else:
            y = self.fc1(x.reshape(b, t // s, s * h))  # [B, T, H] -> [B, T/s, s*H] -> [B, T/s, hidden]
        if self.kind == "transformer":
            pad = None if lengths is None else torch.arange(t // s, device=y.device)[None, :] >= lengths[:, None].to(y.device)
            y = self.blocks(y, src_key_padding_mask=pad)  # [B, T/s, hidden]
        y = self.fc2(F.gelu(y))
        if self.norm is not None:
            y = self.norm(y) * self.target_rms
        return y

    def norm_states(self, x: Tensor) -> Tensor:
        """[B, T, K*H] (K encoder states side by side) -> the same with each state layer-normed; zero rows stay zero."""
        b, t, kh = x.shape
        return F.layer_norm(x.view(b, t, self.n_states, kh // self.n_states), (kh // self.n_states,)).view(b, t, kh)


def encoder_states(spec: str | Iterable[int], n_layers: int) -> tuple[int, ...]:
    """modality.encoder_layers -> hidden-state indices (0 = conv + positions, i = after layer i).

    "last" (the final layer, layer-normed, as Whisper's decoder reads it), "all", or a list of indices.
    Why earlier states: Whisper's last layer is shaped for its own decoder; the layers below keep more of the
    sound (SUPERB: ASR probes read middle layers best), which voices unlike Whisper's training data may need.
    """
    if spec == "last":
        return (n_layers,)
    if spec == "all":
        return tuple(range(n_layers + 1))
    ids = tuple(int(i) for i in (spec.split(",") if isinstance(spec, str) else spec))  # a list or Hydra ListConfig
    if not ids or sorted(set(ids)) != list(ids) or ids[0] < 0 or ids[-1] > n_layers:
        raise ValueError(f"encoder_layers must be 'last', 'all' or increasing indices in 0..{n_layers}, got {spec!r}")
    return ids
