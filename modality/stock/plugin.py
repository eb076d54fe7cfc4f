"""The stock modality: a price window becomes ``n_tokens`` LLM embeddings.

Data side: a ref names a window (ticker + end date in the packaged data, a CSV or a folder)
-> ``context + 1`` OHLCV rows -> features ``[context, 4 + N_SIGNALS]``: four scale-free
daily channels (modality.stock.data.windows.ohlcv_features) followed by the window's signal vector
(modality.stock.data.signals) repeated on every row, so one tensor carries both through the generic
collator. Model side: the frozen PatchTST forecaster gives patch tokens and a forecast;
``encode_frozen`` packs them (plus the signals) into ``hidden [B, P + R, d_model]``; the
adaptor pools the patch tokens into ``n_tokens - 1`` embeddings and maps the forecast
summary + signals to one more.

Standalone pretraining (stage=forecast) uses this module's own Lightning hooks with
batches from modality.stock.data.windows.StockForecastDataModule.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modality.stock.data.prices import load_source, resolve_series, window_at
from modality.stock.data.windows import N_FEATURES, ohlcv_features
from modality.stock.data.signals import N_SIGNALS, compute_signals
from modality.base import Modality
from modality.stock.forecaster import Forecaster, ForecasterConfig


def parse_ref(ref: Any) -> dict[str, Any]:
    """A record's ref -> {"csv", "ticker", "end"}.

    Dict form: ``{"csv": "packaged" | path, "ticker": "AAPL_2013" | "AAPL", "end": "2019-05-31"}``
    (csv defaults to "packaged"; ticker may be omitted for a single-file CSV; end defaults to
    the last row). String form: ``"AAPL_2013@2019-05-31"`` or ``"AAPL"`` (packaged data).
    """
    if isinstance(ref, str):
        ticker, _, end = ref.partition("@")
        return {"csv": "packaged", "ticker": ticker or None, "end": end or None}
    if isinstance(ref, Mapping):
        unknown = set(ref) - {"csv", "ticker", "end"}
        if unknown:
            raise ValueError(f"stock ref {dict(ref)}: unknown key(s) {sorted(unknown)}; use csv, ticker, end")
        return {"csv": ref.get("csv", "packaged"), "ticker": ref.get("ticker"), "end": ref.get("end")}
    raise ValueError(f"stock ref must be a dict or 'TICKER@YYYY-MM-DD' string, got {type(ref).__name__}: {ref!r}")


class StockAdaptor(nn.Module):
    """Patch tokens + forecast summary -> ``n_tokens`` embeddings of width ``d_llm``.

    ``n_tokens - 1`` tokens average-pool groups of consecutive patches (a coarse timeline);
    the last token encodes the forecast quantiles, vol and the signal vector. A learned
    position embedding tells the LLM which token is which. With ``target_rms`` the outputs
    are RMS-normalised to that value (match the LLM's own embedding scale).
    """

    def __init__(self, d_model: int, summary_dim: int, d_llm: int, n_tokens: int, hidden: int | None, target_rms: float | None) -> None:
        super().__init__()
        hidden = hidden or 2 * d_llm
        self.n_pool = n_tokens - 1
        self.patch_mlp = nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, d_llm))
        self.summary_mlp = nn.Sequential(nn.Linear(summary_dim, hidden), nn.GELU(), nn.Linear(hidden, d_llm))
        self.pos = nn.Parameter(torch.randn(n_tokens, d_llm) * 0.02)
        self.target_rms = target_rms
        self.gain = nn.Parameter(torch.ones(d_llm)) if target_rms is not None else None

    def forward(self, patches: Tensor, summary: Tensor) -> Tensor:
        """patches [B, P, d_model], summary [B, S] -> [B, n_tokens, d_llm]."""
        pooled = F.adaptive_avg_pool1d(patches.transpose(1, 2), self.n_pool).transpose(1, 2)  # [B, n_pool, d_model]
        out = torch.cat([self.patch_mlp(pooled), self.summary_mlp(summary).unsqueeze(1)], 1) + self.pos
        if self.gain is not None:
            out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + 1e-6) * self.target_rms * self.gain
        return out


class StockModality(Modality):
    """Stock price windows as LLM tokens (see module docstring)."""

    name = "stock"
    placeholder = "<stock>"
    input_key = "series"

    def __init__(
        self,
        d_llm: int | None = None,
        checkpoint: str | None = None,
        context: int = 256,
        horizon: int = 20,
        patch_len: int = 16,
        stride: int = 8,
        d_model: int = 128,
        n_heads: int = 4,
        n_layers: int = 3,
        d_ff: int = 256,
        dropout: float = 0.1,
        quantiles: tuple[float, ...] | list[float] = (0.1, 0.5, 0.9),
        channel_mode: str = "mixed",
        n_tokens: int = 9,
        adaptor_hidden: int | None = None,
        target_rms: float | None = None,
        train_encoder: bool = False,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        vol_weight: float = 0.5,
        columns: Mapping[str, str] | None = None,
        reading: bool = True,
        date_format: str | None = None,
    ) -> None:
        super().__init__()
        # plain Python types (Hydra passes ListConfig/DictConfig) so checkpoints load with weights_only=True
        quantiles = [float(q) for q in quantiles]
        columns = {str(k): str(v) for k, v in columns.items()} if columns else None
        self.save_hyperparameters()
        self.cfg = ForecasterConfig(
            n_channels=N_FEATURES, context=context, horizon=horizon, patch_len=patch_len, stride=stride,
            d_model=d_model, n_heads=n_heads, n_layers=n_layers, d_ff=d_ff, dropout=dropout,
            quantiles=tuple(quantiles), channel_mode=channel_mode,
        )
        if not 2 <= n_tokens <= self.cfg.n_patches + 1:
            raise ValueError(f"StockModality: n_tokens must be in [2, {self.cfg.n_patches + 1}] (n_patches + 1), got {n_tokens}")
        if target_rms is not None and not target_rms > 0:
            raise ValueError(f"StockModality: target_rms must be > 0 or None, got {target_rms}")
        if d_llm is not None and int(d_llm) < 1:
            raise ValueError(f"StockModality: d_llm must be a positive int or None, got {d_llm!r}")
        self.n_tokens, self.d_llm, self.checkpoint = n_tokens, d_llm, checkpoint
        self.lr, self.weight_decay, self.vol_weight = lr, weight_decay, vol_weight
        self.columns = dict(columns) if columns else None
        self.date_format = date_format or None  # strftime of user CSV dates; None = detected per file
        self.read_signals = reading
        self._facts: tuple[Any, Any] | None = None  # (ref key, (signals, forecast)) of the last window read
        # summary: z-quantiles [H*Q], log vol ratio, log return scale, signals
        self.summary_dim = horizon * self.cfg.n_quantiles + 2 + N_SIGNALS
        self.summary_rows = math.ceil(self.summary_dim / d_model)
        self.encoder = Forecaster(self.cfg)
        if checkpoint:
            self.load_forecaster(checkpoint)
        self.adaptor = (
            StockAdaptor(d_model, self.summary_dim, d_llm, n_tokens, adaptor_hidden, target_rms) if d_llm else nn.Module()
        )
        self.set_trainable(encoder=train_encoder, adaptor=True)

    @property
    def align_requires(self) -> str | None:
        """align needs a forecast run (init_from) unless ``checkpoint=`` already loaded one."""
        return None if self.checkpoint else "forecast"

    def pretrain_report(self, datamodule: Any, out: Any) -> dict[str, Any]:
        """stage=forecast's held-out table and plots (modality.stock.forecast_stage)."""
        from modality.stock.forecast_stage import pretrain_report

        return pretrain_report(self, datamodule, out)

    def baselines(self, model: Any, datamodule: Any, out: Any, parts: Any, write: bool) -> dict[str, Any]:
        """The same questions with the window written as text (modality.stock.baselines), when
        ``data.text_baseline`` is set."""
        from modality.stock.baselines import run_text_baseline

        return run_text_baseline(model, datamodule, out, parts, write)

    # ------------------------------------------------------------------ checkpoints
    def load_forecaster(self, path: str | Path) -> None:
        """Load forecaster weights from a stage=forecast Lightning checkpoint (``encoder.*`` keys),
        a :meth:`save_forecaster` file, or a bare state dict (weights_only=True)."""
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError) as e:
            raise ValueError(f"{path}: cannot load forecaster checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from None
        if isinstance(obj, dict) and isinstance(obj.get("config"), dict):
            mine = dataclasses.asdict(self.cfg)
            diff = {k: (v, mine.get(k)) for k, v in obj["config"].items() if mine.get(k) != (tuple(v) if isinstance(v, list) else v)}
            if diff:
                raise ValueError(f"{path}: forecaster config differs (file, this model): {diff}")
        state = obj.get("state_dict", obj.get("forecaster", obj)) if isinstance(obj, dict) else None
        if not isinstance(state, dict):
            raise ValueError(f"{path}: not a state dict or checkpoint")
        if any(k.startswith("encoder.") for k in state):
            state = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
        try:
            self.encoder.load_state_dict(state)
        except RuntimeError as e:
            first = str(e).replace("\n", " ")[:300]
            raise ValueError(f"{path}: forecaster weights do not match this config ({first})") from None

    def save_forecaster(self, path: str | Path) -> None:
        """Write {"config": ..., "forecaster": state_dict} loadable by ``checkpoint=``."""
        torch.save({"config": dataclasses.asdict(self.cfg), "forecaster": self.encoder.state_dict()}, path)

    # ------------------------------------------------------------------ data side
    def load(self, ref: Any, root: str | None = None) -> pd.DataFrame:
        """ref -> the ``context + 1`` OHLCV rows ending at ``end`` (a relative csv path resolves
        against ``root``)."""
        r = parse_ref(ref)
        src = r["csv"]
        if src != "packaged" and root is not None and not Path(src).is_absolute():
            src = str(Path(root) / src)
        series = load_source(src, self.columns, self.date_format)
        key, df = resolve_series(series, r["ticker"], r["end"], source=str(src))
        return window_at(df, r["end"], self.cfg.context + 1, source=f"{src}[{key}]")

    def ref_for(self, path: str) -> Any:
        """A CSV file on a command line -> its ref (last window of its only series); else a ``TICKER@date`` string."""
        return {"csv": str(Path(path).resolve())} if Path(path).exists() else path

    def reading(self, ref: Any, root: str | None = None) -> str | None:
        """The window's signals, chart patterns and the forecaster's call in words (text.reading,
        outlook.reading), placed after the learned positions when ``reading=True``: what the rules and the
        forecaster compute exactly, the LLM copies."""
        if not self.read_signals:
            return None
        from modality.stock.data import outlook
        from modality.stock.data.text import reading

        sig, fc = self._window_facts(ref, root)
        return reading(sig, self.cfg.context)[:-1] + "; " + outlook.reading(fc)

    def answer_fields(self, ref: Any, root: str | None = None) -> dict[str, str]:
        """The forecaster's call in words for the forecast questions' answer templates (outlook.answers)."""
        from modality.stock.data import outlook

        return outlook.answers(self._window_facts(ref, root)[1])

    def _window_facts(self, ref: Any, root: str | None) -> tuple[Any, Any]:
        """(signals, forecast) of one window; the last one is kept (reading and answers ask back to back)."""
        from modality.stock.data.outlook import forecast_from_output

        key = (repr(parse_ref(ref)), root)
        if self._facts is not None and self._facts[0] == key:
            return self._facts[1]
        raw = self.load(ref, root)
        feats = self.featurize(raw)
        p = next(self.encoder.parameters())
        if p.device.type != "cpu" and torch.utils.data.get_worker_info() is not None:
            raise RuntimeError(f"stock ref {ref}: the forecaster is on {p.device}; set data.num_workers=0 to read windows")
        was = self.encoder.training
        self.encoder.eval()
        with torch.no_grad():
            x, valid, _ = self.right_align(feats[None].to(p.device), torch.ones(1, feats.shape[0], dtype=torch.bool, device=p.device))
            out = self.encoder(x.to(p.dtype), None if bool(valid.all()) else valid)
        self.encoder.train(was)
        fc = forecast_from_output(out.quantiles[0].float().cpu().numpy(), self.cfg.quantiles, float(out.vol[0]),
                                  raw["Close"].to_numpy(), self.cfg.horizon)
        facts = (compute_signals(raw), fc)
        self._facts = (key, facts)
        return facts

    def featurize(self, raw: pd.DataFrame) -> Tensor:
        """OHLCV window (>= 2 rows; the last ``context + 1`` are used) -> [T, 4 + N_SIGNALS] float32."""
        raw = raw.iloc[-(self.cfg.context + 1) :]
        if len(raw) < 2:
            raise ValueError(f"stock window needs >= 2 rows, got {len(raw)}")
        feats = torch.from_numpy(ohlcv_features(raw))  # [T, 4]
        sig = torch.from_numpy(compute_signals(raw).vector())  # [S]
        return torch.cat([feats, sig.expand(len(feats), -1)], 1)

    def output_length(self, feature_length: int) -> int:
        return self.n_tokens

    def adapted_length(self, hidden_length: int) -> int:
        return self.n_tokens

    # ------------------------------------------------------------------ model side
    def right_align(self, features: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Collated features (valid rows first) -> (x [B, context, 4] right-aligned, mask, signals [B, S]).

        Longer samples keep their last ``context`` rows; shorter ones are left-padded.
        """
        b, t, _ = features.shape
        lengths = mask.long().sum(1)  # [B]
        ctx = self.cfg.context
        pos = torch.arange(ctx, device=features.device)[None, :] - ctx + lengths[:, None]  # source row per slot
        valid = pos >= 0  # [B, context]
        idx = pos.clamp(0, max(t - 1, 0))
        gathered = torch.gather(features, 1, idx.unsqueeze(-1).expand(-1, -1, features.shape[-1]))
        gathered = gathered * valid.unsqueeze(-1).to(gathered.dtype)
        last = (lengths - 1).clamp_min(0)
        signals = features[torch.arange(b, device=features.device), last, N_FEATURES:]  # [B, S]
        return gathered[..., :N_FEATURES], valid, signals

    def encode_frozen(self, features: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """features [B, T, 4 + S], mask [B, T] -> hidden [B, P + R, d_model]: P patch tokens then
        R rows holding the flattened summary (z-quantiles, log vol ratio, log scale, signals)."""
        x, valid, signals = self.right_align(features, mask)
        full = bool(valid.all())
        out = self.encoder(x, None if full else valid)
        b, d = x.shape[0], self.cfg.d_model
        summary = torch.cat(
            [out.z_quantiles.flatten(1), out.log_vol_ratio[:, None], torch.log(out.scale)[:, None], signals], 1
        )  # [B, summary_dim]
        summary = F.pad(summary, (0, self.summary_rows * d - self.summary_dim)).reshape(b, self.summary_rows, d)
        hidden = torch.cat([out.embeddings, summary], 1)  # [B, P + R, d_model]
        lengths = torch.full((b,), hidden.shape[1], dtype=torch.long, device=hidden.device)
        return hidden, lengths

    def adapt(self, hidden: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        if not isinstance(self.adaptor, StockAdaptor):
            raise ValueError("StockModality: d_llm is None, so there is no adaptor (only stage=forecast can run)")
        p = self.cfg.n_patches
        summary = hidden[:, p:].flatten(1)[:, : self.summary_dim]  # [B, summary_dim]
        emb = self.adaptor(hidden[:, :p], summary)  # [B, n_tokens, d_llm]
        return emb, torch.full((emb.shape[0],), self.n_tokens, dtype=torch.long, device=emb.device)

    # ------------------------------------------------------------------ stage=forecast hooks
    def _step(self, batch: dict[str, Tensor], split: str) -> Tensor:
        out = self.encoder(batch["x"])
        loss, parts = self.encoder.loss(out, batch["target"], batch["vol_target"], self.vol_weight)
        bs = batch["x"].shape[0]
        self.log(f"{split}/loss", loss, prog_bar=True, batch_size=bs)
        for k, v in parts.items():
            self.log(f"{split}/{k}", v, batch_size=bs)
        if split != "train":  # MAE of the median vs persistence (0) on the same windows
            mid = out.quantiles[..., self.cfg.n_quantiles // 2]
            rel = (mid - batch["target"]).abs().mean() / batch["target"].abs().mean().clamp_min(1e-12)
            self.log(f"{split}/rel_mae", rel, batch_size=bs)
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def configure_optimizers(self) -> Any:
        params = [p for p in self.encoder.parameters() if p.requires_grad]
        if not params:
            raise ValueError("StockModality: encoder is frozen; stage=forecast needs train_encoder=True")
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 0
        if not total or not math.isfinite(total):
            return opt
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.lr, total_steps=int(total), pct_start=0.1)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
