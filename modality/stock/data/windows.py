"""Forecast windows for the stock forecaster's own pretraining (stage=forecast).

Inputs are scale-free OHLCV transforms (:func:`ohlcv_features`), targets are cumulative
future log returns of the close and the realised volatility over the horizon. Windows come
from :func:`modality.stock.data.prices.make_windows`, so train/val/test never share a target row.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from data.samplers import ResumableLoader
from modality.stock.data.prices import load_source, make_windows

FEATURE_NAMES = ("log_return", "log_volume_change", "log_high_low", "log_close_open")
N_FEATURES = len(FEATURE_NAMES)


def ohlcv_features(df: pd.DataFrame) -> np.ndarray:
    """[n, 5] OHLCV rows -> [n - 1, 4] float32: per day log return, log volume change (clipped
    to +-5, volume + 1 so zero-volume days stay finite), log(High/Low) range, log(Close/Open).

    All four are unitless, so one model serves $3 and $800 stocks alike.
    """
    o, h, l, c, v = (df[k].to_numpy(dtype=np.float64) for k in ("Open", "High", "Low", "Close", "Volume"))
    feats = np.stack(
        [
            np.diff(np.log(c)),
            np.clip(np.diff(np.log(v + 1.0)), -5.0, 5.0),
            np.log(h / l)[1:],
            np.log(c / o)[1:],
        ],
        axis=1,
    )
    return feats.astype(np.float32)


def future_targets(log_close: np.ndarray, anchor: int, horizon: int) -> tuple[np.ndarray, float]:
    """(cumulative log returns [horizon] after row ``anchor``, realised daily vol over them).

    Realised vol = sqrt(mean r^2) of the ``horizon`` future daily log returns (zero mean,
    the usual convention for short horizons).
    """
    fut = log_close[anchor : anchor + horizon + 1]
    cum = fut[1:] - fut[0]
    vol = float(np.sqrt(np.mean(np.diff(fut) ** 2)))
    return cum.astype(np.float32), vol


class StockWindows(Dataset):
    """All windows of one split over several series; items are dicts of tensors.

    ``x`` [context, 4] features, ``target`` [horizon] cumulative log returns, ``vol_target``
    [] realised daily vol, ``history`` [context + 1] log closes of the inputs (for baselines
    and MASE scaling), ``series`` [] index into ``names``, ``anchor`` [] row of the last input.
    """

    def __init__(
        self,
        series: Mapping[str, pd.DataFrame],
        context: int,
        horizon: int,
        split: str,
        val_frac: float = 0.15,
        test_frac: float = 0.15,
        stride: int = 1,
    ) -> None:
        self.context, self.horizon = context, horizon
        self.names: list[str] = list(series)
        self.frames = [series[k] for k in self.names]
        self.feats = [ohlcv_features(df) for df in self.frames]
        self.log_close = [np.log(df["Close"].to_numpy(dtype=np.float64)) for df in self.frames]
        index = []
        for i, name in enumerate(self.names):
            starts = make_windows(len(self.frames[i]), context, horizon, split, val_frac, test_frac, stride, source=name)
            index.append(np.stack([np.full_like(starts, i), starts], axis=1))
        self.index = np.concatenate(index) if index else np.zeros((0, 2), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        i, s = (int(v) for v in self.index[k])
        anchor = s + self.context
        cum, vol = future_targets(self.log_close[i], anchor, self.horizon)
        return {
            "x": torch.from_numpy(self.feats[i][s:anchor]),  # feature row j = return into row j+1
            "target": torch.from_numpy(cum),
            "vol_target": torch.tensor(vol, dtype=torch.float32),
            "history": torch.from_numpy(self.log_close[i][s : anchor + 1].astype(np.float32)),
            "series": torch.tensor(i),
            "anchor": torch.tensor(anchor),
        }


class StockForecastDataModule(L.LightningDataModule):
    """Leak-free forecast windows from ``source`` ("packaged", a CSV file or a folder of CSVs).

    Series too short for ``context + horizon`` plus the val/test segments are skipped and
    reported (``self.skipped`` and a warning); ``tickers`` selects series by key.
    """

    def __init__(
        self,
        source: str = "packaged",
        context: int = 256,
        horizon: int = 20,
        batch_size: int = 64,
        num_workers: int = 0,
        val_frac: float = 0.15,
        test_frac: float = 0.15,
        stride: int = 1,
        eval_stride: int | None = None,
        tickers: Sequence[str] | None = None,
        columns: Mapping[str, str] | None = None,
        date_format: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.seed = seed  # the training order of each epoch: (seed, epoch)
        self.source, self.context, self.horizon = str(source), context, horizon
        self.batch_size, self.num_workers = batch_size, num_workers
        self.val_frac, self.test_frac = val_frac, test_frac
        self.stride, self.eval_stride = stride, eval_stride or horizon
        self.tickers = list(tickers) if tickers else None
        self.columns = dict(columns) if columns else None
        self.date_format = date_format or None
        self.skipped: list[str] = []
        self.datasets: dict[str, StockWindows] = {}

    def series(self) -> dict[str, pd.DataFrame]:
        """The usable series (after ticker selection and length filtering)."""
        all_series = load_source(self.source, self.columns, self.date_format)
        if self.tickers:
            unknown = [t for t in self.tickers if t not in all_series]
            if unknown:
                raise ValueError(f"{self.source}: unknown ticker(s) {unknown}; have {sorted(all_series)}")
            all_series = {k: all_series[k] for k in self.tickers}
        keep, self.skipped = {}, []
        for k, df in all_series.items():
            try:
                make_windows(len(df), self.context, self.horizon, "train", self.val_frac, self.test_frac, source=k)
                keep[k] = df
            except ValueError as e:
                self.skipped.append(str(e))
        if self.skipped:
            warnings.warn(f"{self.source}: skipped {len(self.skipped)} short series: " + " | ".join(self.skipped))
        if not keep:
            raise ValueError(f"{self.source}: no series long enough for context={self.context} horizon={self.horizon}")
        return keep

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        series = self.series()
        args = (self.context, self.horizon)
        fr = dict(val_frac=self.val_frac, test_frac=self.test_frac)
        self.datasets = {
            "train": StockWindows(series, *args, "train", stride=self.stride, **fr),
            "val": StockWindows(series, *args, "val", stride=self.eval_stride, **fr),
            "test": StockWindows(series, *args, "test", stride=self.eval_stride, **fr),
        }

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        kwargs = {"batch_size": self.batch_size, "num_workers": self.num_workers,
                  "drop_last": shuffle and len(self.datasets[split]) > self.batch_size,
                  "persistent_workers": self.num_workers > 0}
        if not shuffle:
            return DataLoader(self.datasets[split], **kwargs)
        # an order seeded per epoch, and the loader's place in it checkpointed: resume= is exact mid-epoch too
        return ResumableLoader(self.datasets[split], shuffle=True, seed=self.seed, **kwargs)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)

