"""Technical signals on tiny hand-computed series."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from modality.stock.data import signals as S
from modality.stock.data.prices import load_packaged


def test_rsi_hand_values():
    assert S.rsi(np.arange(1, 40.0)) == 100.0
    assert S.rsi(np.arange(40, 1.0, -1)) == 0.0
    assert S.rsi(np.full(30, 5.0)) == 50.0
    # n=2 on [1,2,1,2]: first avgs gain 0.5 loss 0.5; then gain (0.5+1)/2=0.75, loss 0.25 -> RS 3 -> 75
    assert S.rsi(np.array([1, 2, 1, 2.0]), n=2) == pytest.approx(75.0)


def test_ema_and_macd_hand_values():
    np.testing.assert_allclose(S.ema(np.array([0.0, 1.0]), 3), [0.0, 0.5])
    line, sig, hist = S.macd(np.full(60, 7.0))
    assert np.abs(line).max() < 1e-12 and np.abs(sig).max() < 1e-12 and np.abs(hist).max() < 1e-12
    line, sig, hist = S.macd(np.array([1.0, 2.0]), fast=1, slow=3, signal=3)
    np.testing.assert_allclose(line, [0.0, 0.5])  # EMA1 = x, EMA3 = [1, 1.5]
    np.testing.assert_allclose(sig, [0.0, 0.25])
    np.testing.assert_allclose(hist, [0.0, 0.25])
    rising = np.exp(np.linspace(0, 1, 80))
    assert S.macd(rising)[0][-1] > 0


def test_drawdown_trend_change():
    assert S.max_drawdown_pct(np.array([1, 2, 1, 3.0])) == pytest.approx(50.0)
    assert S.max_drawdown_pct(np.arange(1, 10.0)) == 0.0
    slope, r2 = S.trend(np.exp(0.01 * np.arange(50)))
    assert slope == pytest.approx(0.01 * 252) and r2 == pytest.approx(1.0)
    assert S.trend(np.full(10, 3.0)) == (0.0, 0.0)
    assert S.change_pct(np.array([100.0, 120, 110])) == pytest.approx(10.0)
    assert S.change_pct(np.array([100.0, 120, 110]), n=1) == pytest.approx(-100 / 12)


def test_realised_vol_and_regime():
    logp = np.tile([0.0, 0.01], 10)  # returns alternate +-0.01
    r = np.diff(logp)[-4:]
    assert S.realised_vol(np.exp(logp), n=4) == pytest.approx(r.std(ddof=1) * math.sqrt(252))
    rng = np.random.default_rng(0)
    calm_then_wild = np.exp(np.cumsum(np.r_[0.002 * rng.standard_normal(200), 0.05 * rng.standard_normal(30)]))
    wild_then_calm = np.exp(np.cumsum(np.r_[0.05 * rng.standard_normal(200), 0.002 * rng.standard_normal(30)]))
    assert S.vol_regime(calm_then_wild)[0] == "high" and S.vol_regime(calm_then_wild)[1] > 90
    assert S.vol_regime(wild_then_calm)[0] == "low"


def test_crossovers_support_volume():
    assert S.last_cross(np.array([0.0, 0, 2]), np.ones(3), lookback=1) == 1
    assert S.last_cross(np.array([2.0, 2, 0]), np.ones(3), lookback=1) == -1
    assert S.last_cross(np.array([0.0, 2, 2]), np.ones(3), lookback=1) == 0  # crossed 2 steps ago
    v_shape = np.r_[np.linspace(10, 5, 20), np.linspace(5, 12, 8)]
    state, cross = S.ma_cross(v_shape, fast=2, slow=4, lookback=8)
    assert state == 1 and cross == 1
    assert S.ma_cross(np.ones(10), fast=2, slow=50) == (0, 0)
    assert S.support_resistance(np.array([1, 2, 3.0]), np.array([4, 5, 6.0]), np.array([3, 3, 5.0]), n=2) == pytest.approx(
        (2.0, 6.0, 150.0, 20.0)
    )
    assert S.volume_trend(np.full(30, 7.0)) == pytest.approx(0.0)
    assert S.volume_trend(np.r_[np.full(20, 10.0), np.full(20, 1000.0)]) > 0.5


def test_compute_signals_on_real_window():
    df = load_packaged()["AAPL_2013"].iloc[:257]
    sig = S.compute_signals(df)
    close = df["Close"].to_numpy()
    assert sig.close == close[-1]
    assert sig.change_pct == pytest.approx((close[-1] / close[0] - 1) * 100)
    assert sig.ma_state in (-1, 1)  # 257 rows cover SMA200
    v = sig.vector()
    assert v.shape == (S.N_SIGNALS,) == (len(S.SIGNAL_NAMES),) and np.isfinite(v).all()
    assert S.compute_signals(df.iloc[-60:]).ma_state == 0


def test_signals_use_only_the_window():
    df = load_packaged()["IBM_2000"]
    a = S.compute_signals(df.iloc[100:357])
    b = df.copy()
    b.iloc[357:, :4] *= 3.0  # the future changes, the window does not
    assert S.compute_signals(b.iloc[100:357]) == a
    assert isinstance(df.index, pd.DatetimeIndex)
