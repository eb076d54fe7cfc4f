"""A PatchTST-style long-context quantile forecaster for daily OHLCV features.

Instance normalisation (RevIN) removes each window's level and scale, patches of
``patch_len`` days (stride ``stride``) become tokens of a pre-norm Transformer, and heads
read the patch tokens to predict quantiles of the cumulative future log return and the
realised volatility over the horizon. Outputs are de-normalised with the window's own
return scale, so the same weights serve calm and volatile stocks. The patch tokens are
also what the stock adaptor turns into LLM embeddings.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclasses.dataclass
class ForecasterConfig:
    """Shape-setting hyperparameters; validated so a bad combination fails at construction."""

    n_channels: int = 4
    context: int = 256
    horizon: int = 20
    patch_len: int = 16
    stride: int = 8
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 3
    d_ff: int = 256
    dropout: float = 0.1
    quantiles: tuple[float, ...] = (0.1, 0.5, 0.9)
    channel_mode: str = "mixed"  # "mixed": one token per patch; "independent": per channel, averaged
    target_channel: int = 0  # the log-return channel whose scale de-normalises the outputs

    def __post_init__(self) -> None:
        self.quantiles = tuple(float(q) for q in self.quantiles)
        checks = [
            (self.n_channels >= 1, "n_channels must be >= 1"),
            (0 <= self.target_channel < self.n_channels, "target_channel must index a channel"),
            (self.horizon >= 1, "horizon must be >= 1"),
            (1 <= self.stride <= self.patch_len, "need 1 <= stride <= patch_len"),
            (self.context >= self.patch_len, "context must be >= patch_len"),
            ((self.context - self.patch_len) % self.stride == 0, "(context - patch_len) must be divisible by stride"),
            (self.d_model % self.n_heads == 0, "d_model must be divisible by n_heads"),
            (self.n_layers >= 1 and self.d_ff >= 1, "n_layers and d_ff must be >= 1"),
            (0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)"),
            (len(self.quantiles) >= 1 and all(0.0 < q < 1.0 for q in self.quantiles), "quantiles must lie in (0, 1)"),
            (all(a < b for a, b in zip(self.quantiles, self.quantiles[1:])), "quantiles must be strictly increasing"),
            (self.channel_mode in ("mixed", "independent"), "channel_mode must be 'mixed' or 'independent'"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"ForecasterConfig: {msg} (got {dataclasses.asdict(self)})")

    @property
    def n_patches(self) -> int:
        """Patches per window; the series is end-padded by ``stride`` as in PatchTST (+1 patch)."""
        return (self.context - self.patch_len) // self.stride + 2

    @property
    def n_quantiles(self) -> int:
        return len(self.quantiles)


class ForecastOutput(NamedTuple):
    embeddings: Tensor  # [B, P, d_model] patch tokens (for the adaptor)
    quantiles: Tensor  # [B, H, Q] cumulative future log return of close, de-normalised
    vol: Tensor  # [B] forecast realised daily vol over the horizon
    z_quantiles: Tensor  # [B, H, Q] the same quantiles in units of the window's return scale
    log_vol_ratio: Tensor  # [B] log(vol / scale)
    scale: Tensor  # [B] std of the window's daily log returns (RevIN scale of the target channel)


def masked_stats(x: Tensor, mask: Tensor | None, eps: float = 1e-10) -> tuple[Tensor, Tensor]:
    """Per-sample, per-channel mean and std over valid time steps: x [B, L, C] -> ([B, 1, C], [B, 1, C])."""
    if mask is None:
        return x.mean(1, keepdim=True), torch.sqrt(x.var(1, keepdim=True, unbiased=False) + eps)
    w = mask.to(x.dtype).unsqueeze(-1)  # [B, L, 1]
    n = w.sum(1, keepdim=True).clamp_min(1.0)
    mean = (x * w).sum(1, keepdim=True) / n
    var = (((x - mean) * w) ** 2).sum(1, keepdim=True) / n
    return mean, torch.sqrt(var + eps)


def pinball_loss(pred: Tensor, target: Tensor, quantiles: Tensor) -> Tensor:
    """Mean quantile (pinball) loss: pred [B, H, Q], target [B, H], quantiles [Q]."""
    diff = target.unsqueeze(-1) - pred  # [B, H, Q]
    return torch.maximum(quantiles * diff, (quantiles - 1.0) * diff).mean()


class Forecaster(nn.Module):
    """RevIN -> patching -> Transformer -> (patch tokens, return quantiles, volatility)."""

    def __init__(self, cfg: ForecasterConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c, d, p = cfg.n_channels, cfg.d_model, cfg.n_patches
        self.revin_weight = nn.Parameter(torch.ones(c))
        self.revin_bias = nn.Parameter(torch.zeros(c))
        in_width = cfg.patch_len * (c if cfg.channel_mode == "mixed" else 1)
        self.patch_embed = nn.Linear(in_width, d)
        self.pos = nn.Parameter(torch.randn(p, d) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d, cfg.n_heads, cfg.d_ff, cfg.dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.transformer = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head_drop = nn.Dropout(cfg.dropout)
        self.quantile_head = nn.Linear(p * d, cfg.horizon * cfg.n_quantiles)
        self.vol_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, 1))
        # learnable weight of the window's mean return carried forward (RevIN de-normalisation of
        # the level); starts at 0 = no drift, which is the right prior for prices.
        self.drift_gate = nn.Parameter(torch.zeros(cfg.horizon))
        self.register_buffer("quantile_levels", torch.tensor(cfg.quantiles), persistent=False)

    def _patches(self, x: Tensor) -> Tensor:
        """x [B, L, C] -> [B, C, P, patch_len] with the last value repeated ``stride`` times."""
        cfg = self.cfg
        x = x.transpose(1, 2)  # [B, C, L]
        x = torch.cat([x, x[..., -1:].expand(-1, -1, cfg.stride)], dim=-1)  # [B, C, L + stride]
        return x.unfold(-1, cfg.patch_len, cfg.stride)  # [B, C, P, patch_len]

    def forward(self, x: Tensor, mask: Tensor | None = None) -> ForecastOutput:
        """x [B, context, C] features (valid rows right-aligned), mask [B, context] True = valid."""
        cfg = self.cfg
        b, length, c = x.shape
        if length != cfg.context or c != cfg.n_channels:
            raise ValueError(f"Forecaster expects [B, {cfg.context}, {cfg.n_channels}], got {list(x.shape)}")
        mean, std = masked_stats(x, mask)  # [B, 1, C]
        z = (x - mean) / std * self.revin_weight + self.revin_bias
        if mask is not None:
            z = z * mask.unsqueeze(-1).to(z.dtype)
        patches = self._patches(z)  # [B, C, P, patch_len]
        p = patches.shape[2]
        if cfg.channel_mode == "mixed":
            tokens = self.patch_embed(patches.permute(0, 2, 1, 3).reshape(b, p, -1))  # [B, P, d]
        else:
            tokens = self.patch_embed(patches.reshape(b * c, p, cfg.patch_len))  # [B*C, P, d]
        pad = attn_pad = None
        if mask is not None:  # a patch is padding when none of its days is valid
            m = torch.cat([mask, mask[:, -1:].expand(-1, cfg.stride)], 1).unfold(1, cfg.patch_len, cfg.stride)
            pad = ~m.any(-1)  # [B, P]
            attn_pad = pad.repeat_interleave(c, 0) if cfg.channel_mode == "independent" else pad
        h = self.transformer(tokens + self.pos, src_key_padding_mask=attn_pad)
        h = self.norm(h)
        if cfg.channel_mode == "independent":
            h = h.reshape(b, c, p, -1).mean(1)  # [B, P, d]
        raw = self.quantile_head(self.head_drop(h.flatten(1))).reshape(b, cfg.horizon, cfg.n_quantiles)
        # monotone quantiles: first level, then positive increments (no crossing)
        zq = torch.cumsum(torch.cat([raw[..., :1], F.softplus(raw[..., 1:])], -1), -1)  # [B, H, Q]
        k = cfg.target_channel
        scale, loc = std[:, 0, k], mean[:, 0, k]  # [B]
        steps = torch.arange(1, cfg.horizon + 1, device=x.device, dtype=x.dtype)
        drift = self.drift_gate * steps * loc[:, None] / scale[:, None]  # [B, H] in scale units
        zq = zq + drift.unsqueeze(-1)
        if pad is None:
            pooled = h.mean(1)  # [B, d]
        else:
            keep = (~pad).unsqueeze(-1).to(h.dtype)  # [B, P, 1]
            pooled = (h * keep).sum(1) / keep.sum(1).clamp_min(1.0)
        log_ratio = self.vol_head(pooled).squeeze(-1)  # [B]
        return ForecastOutput(
            embeddings=h,
            quantiles=zq * scale[:, None, None],
            vol=scale * torch.exp(log_ratio),
            z_quantiles=zq,
            log_vol_ratio=log_ratio,
            scale=scale,
        )

    def loss(self, out: ForecastOutput, target: Tensor, vol_target: Tensor | None = None, vol_weight: float = 0.5) -> tuple[Tensor, dict[str, Tensor]]:
        """Pinball loss on scale-normalised cumulative returns (+ ``vol_weight`` * L1 on log vol).

        target [B, H] cumulative log returns, vol_target [B] realised daily vol.
        """
        scale = out.scale[:, None]
        q = pinball_loss(out.z_quantiles, target / scale, self.quantile_levels)
        parts = {"pinball": q}
        total = q
        if vol_target is not None and vol_weight > 0:
            v = (torch.log(out.vol + 1e-8) - torch.log(vol_target + 1e-8)).abs().mean()
            parts["vol_l1_log"] = v
            total = total + vol_weight * v
        return total, parts
