"""Forecast metrics and baselines on hand-made numbers; the forecast DataModule's windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modality.stock.data.prices import load_packaged, split_bounds
from modality.stock.data.windows import (
    StockForecastDataModule,
    StockWindows,
    future_targets,
    ohlcv_features,
)
from modality.stock import metrics as M


def test_baselines_hand_values():
    hist = np.log(np.array([[100.0, 101, 102, 103, 104, 105, 106]]))  # L = 7
    b = M.baselines(hist, horizon=6, season=5)
    np.testing.assert_allclose(b["persistence"], 0.0)
    mean_r = np.diff(hist[0]).mean()
    np.testing.assert_allclose(b["drift"][0], mean_r * np.arange(1, 7))
    # seasonal naive, m=5: h=1..5 repeat rows t-4..t, h=6 repeats t-4 again
    expect = hist[0, [2, 3, 4, 5, 6, 2]] - hist[0, -1]
    np.testing.assert_allclose(b["seasonal_naive"][0], expect)
    with pytest.raises(ValueError, match="seasonal naive needs history"):
        M.baselines(hist[:, :3], horizon=2, season=5)


def test_point_metrics_mase_and_direction():
    hist = np.log(np.array([[100.0, 110, 100, 110]]))  # in-sample naive MAE = log(1.1)
    true = np.array([[0.1, 0.2]])
    perfect = M.point_metrics(true, true, hist)
    assert perfect["mae"] == 0 and perfect["mase"] == 0 and perfect["direction_acc"] == 1
    off = M.point_metrics(true + np.log(1.1), true, hist)
    assert off["mase"] == pytest.approx(1.0)
    assert M.point_metrics(np.zeros_like(true), true, hist)["direction_acc"] == 0.5
    assert M.point_metrics(-true, true, hist)["direction_acc"] == 0.0


def test_coverage_and_report_rows():
    rng = np.random.default_rng(0)
    true = rng.standard_normal((4000, 2))
    q = np.broadcast_to(np.array([-1.2816, 0.0, 1.2816]), (4000, 2, 3))  # N(0,1) 10/50/90 %
    cov = M.quantile_coverage(q, true, [0.1, 0.5, 0.9])
    assert cov["below_q0.1"] == pytest.approx(0.1, abs=0.02) and cov["coverage_80%"] == pytest.approx(0.8, abs=0.03)
    hist = np.cumsum(0.01 * rng.standard_normal((4000, 30)), axis=1)
    rows = M.forecast_report(hist, true, q, [0.1, 0.5, 0.9], np.full(4000, 0.01), np.full(4000, 0.02))
    assert set(rows) >= {"model", "persistence", "drift", "seasonal_naive", "model_vol", "historical_vol_20d"}
    assert rows["persistence"]["rel_mae"] == 1.0
    assert rows["model_vol"]["vol_log_mae"] == pytest.approx(np.log(2))
    assert "model" in M.format_report(rows)


def test_plot_forecast_writes_png(tmp_path):
    p = M.plot_forecast(np.linspace(10, 12, 50), np.zeros((5, 3)) + [[-0.1, 0, 0.1]], tmp_path / "a" / "f.png",
                        future=np.linspace(0, 0.05, 5), title="t")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_windows_inputs_and_targets_line_up():
    df = load_packaged()["MSFT_2000"]
    ds = StockWindows({"MSFT_2000": df}, 64, 5, "test")
    item = ds[3]
    s = int(item["anchor"]) - 64
    lo, hi = split_bounds(len(df), 64, 5)["test"]
    assert lo <= s and int(item["anchor"]) + 5 < hi
    close = df["Close"].to_numpy()
    feats = ohlcv_features(df.iloc[s : s + 65])
    np.testing.assert_allclose(item["x"].numpy(), feats)
    t = int(item["anchor"])
    np.testing.assert_allclose(item["target"].numpy(), np.log(close[t + 1 : t + 6] / close[t]), rtol=1e-5)
    np.testing.assert_allclose(item["history"].numpy(), np.log(close[s : t + 1]), rtol=1e-6)
    # feature row j is the return into price row j + 1
    assert item["x"][-1, 0].item() == pytest.approx(np.log(close[t] / close[t - 1]), rel=1e-5)
    cum, vol = future_targets(np.log(np.array([1.0, 2.0, 4.0])), 0, 2)
    np.testing.assert_allclose(cum, [np.log(2), np.log(4)], rtol=1e-6)
    assert vol == pytest.approx(np.log(2))


def test_datamodule_skips_short_series_and_batches():
    dm = StockForecastDataModule("packaged", context=64, horizon=5, batch_size=16, tickers=["FB_2012", "IBM_2000"])
    with pytest.warns(UserWarning, match="skipped 1 short series"):
        dm.setup()
    assert dm.datasets["train"].names == ["IBM_2000"] and "FB_2012" in dm.skipped[0]
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (16, 64, 4) and batch["target"].shape == (16, 5)
    assert torch.isfinite(batch["x"]).all()
    n_val = len(dm.datasets["val"])
    assert n_val == len(StockWindows({"IBM_2000": load_packaged()["IBM_2000"]}, 64, 5, "val", stride=5))
    with pytest.raises(ValueError, match="unknown ticker"):
        StockForecastDataModule(tickers=["TSLA"]).setup()
