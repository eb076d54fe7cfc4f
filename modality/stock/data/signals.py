"""Technical signals of one price window, computed from the data alone.

Every function takes plain numpy arrays (oldest first) so it can be checked by hand on
tiny series. :func:`compute_signals` bundles them for a window ``DataFrame`` into a
:class:`Signals` record; :meth:`Signals.vector` is the fixed-order, O(1)-scaled numeric
form the stock adaptor reads, and modality/stock/data/text.py turns the same record into words.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd

from modality.stock.data.patterns import detect_patterns

TRADING_DAYS = 252


def _log_returns(close: np.ndarray) -> np.ndarray:
    return np.diff(np.log(np.asarray(close, dtype=np.float64)))


def trend(close: np.ndarray) -> tuple[float, float]:
    """(annualised slope, R^2) of an OLS line through log price vs trading day.

    The slope is in log units per year (``0.1`` ~ +10 %/yr); R^2 says how straight the move
    is, so a strong trend is a large |slope| with a large R^2. A constant series has R^2 0.
    """
    y = np.log(np.asarray(close, dtype=np.float64))
    if len(y) < 2:
        return 0.0, 0.0
    t = np.arange(len(y), dtype=np.float64)
    tc, yc = t - t.mean(), y - y.mean()
    slope = float((tc @ yc) / (tc @ tc))
    ss_tot = float(yc @ yc)
    ss_res = float(((yc - slope * tc) ** 2).sum())
    r2 = 0.0 if ss_tot <= 1e-18 else max(0.0, 1.0 - ss_res / ss_tot)
    return slope * TRADING_DAYS, r2


def change_pct(close: np.ndarray, n: int | None = None) -> float:
    """Percent change of the last close vs ``n`` days earlier (the window's first close if None).

    With ``n=20`` this is the 20-day momentum.
    """
    c = np.asarray(close, dtype=np.float64)
    if n is not None and len(c) <= n:
        return 0.0
    first = c[0] if n is None else c[-1 - n]
    return float((c[-1] / first - 1.0) * 100.0)


def realised_vol(close: np.ndarray, n: int = 20) -> float:
    """Annualised realised volatility: std (ddof=1) of the last ``n`` daily log returns * sqrt(252)."""
    r = _log_returns(close)[-n:]
    return float(r.std(ddof=1) * math.sqrt(TRADING_DAYS)) if len(r) > 1 else 0.0


def vol_regime(close: np.ndarray, n: int = 20, low: float = 25.0, high: float = 75.0) -> tuple[str, float]:
    """("low" | "normal" | "high", percentile) of the latest ``n``-day vol vs its own window history.

    The percentile is where the current rolling vol falls among all rolling ``n``-day vols
    inside the window (a trailing reference, so it never looks ahead).
    """
    r = _log_returns(close)
    if len(r) < n + 1:
        return "normal", 50.0
    vols = pd.Series(r).rolling(n).std(ddof=1).to_numpy()[n - 1 :]
    pct = float((vols < vols[-1]).mean() * 100.0 + (vols == vols[-1]).mean() * 50.0)
    return ("low" if pct < low else "high" if pct > high else "normal"), pct


def rsi(close: np.ndarray, n: int = 14) -> float:
    """Wilder's RSI(n): 100 - 100 / (1 + avg gain / avg loss), Wilder-smoothed.

    The first averages are plain means of the first ``n`` changes, then
    ``avg = (avg * (n - 1) + x) / n``. All gains -> 100, all losses -> 0, flat -> 50.
    """
    d = np.diff(np.asarray(close, dtype=np.float64))
    if len(d) < n:
        return 50.0
    gain, loss = np.clip(d, 0, None), np.clip(-d, 0, None)
    g, l = gain[:n].mean(), loss[:n].mean()
    for x_g, x_l in zip(gain[n:], loss[n:]):
        g = (g * (n - 1) + x_g) / n
        l = (l * (n - 1) + x_l) / n
    if l <= 0:
        return 100.0 if g > 0 else 50.0
    return float(100.0 - 100.0 / (1.0 + g / l))


def ema(x: np.ndarray, span: int) -> np.ndarray:
    """Exponential moving average, alpha = 2 / (span + 1), seeded with the first value."""
    x = np.asarray(x, dtype=np.float64)
    return pd.Series(x).ewm(span=span, adjust=False).mean().to_numpy()


def macd(close: np.ndarray, fast: int = 12, slow: int = 26, signal: int = 9) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(MACD line, signal line, histogram): EMA_fast - EMA_slow, its EMA_signal, and their gap."""
    line = ema(close, fast) - ema(close, slow)
    sig = ema(line, signal)
    return line, sig, line - sig


def last_cross(fast: np.ndarray, slow: np.ndarray, lookback: int) -> int:
    """+1 if ``fast`` crossed above ``slow`` within the last ``lookback`` steps, -1 if below, else 0.

    The most recent crossing wins; NaN values (warm-up of a moving average) never cross.
    """
    diff = np.asarray(fast, dtype=np.float64) - np.asarray(slow, dtype=np.float64)
    side = np.sign(diff)
    for i in range(len(side) - 1, max(0, len(side) - 1 - lookback), -1):
        a, b = side[i - 1], side[i]
        if np.isfinite(a) and np.isfinite(b) and a != b and b != 0:
            return int(b)
    return 0


def ma_cross(close: np.ndarray, fast: int = 50, slow: int = 200, lookback: int = 20) -> tuple[int, int]:
    """(state, recent cross) of simple moving averages ``fast`` vs ``slow``.

    state: +1 fast above slow, -1 below, 0 if the window is shorter than ``slow``;
    recent cross: +1 golden cross, -1 death cross within ``lookback`` days, else 0.
    """
    c = pd.Series(np.asarray(close, dtype=np.float64))
    if len(c) < slow:
        return 0, 0
    f, s = c.rolling(fast).mean().to_numpy(), c.rolling(slow).mean().to_numpy()
    return int(np.sign(f[-1] - s[-1])), last_cross(f, s, lookback)


def max_drawdown_pct(close: np.ndarray) -> float:
    """Largest peak-to-trough fall inside the window, in percent of the peak ([1,2,1,3] -> 50)."""
    c = np.asarray(close, dtype=np.float64)
    peak = np.maximum.accumulate(c)
    return float(((peak - c) / peak).max() * 100.0)


def support_resistance(low: np.ndarray, high: np.ndarray, close: np.ndarray, n: int = 20) -> tuple[float, float, float, float]:
    """(support, resistance, % below last close, % above last close) over the last ``n`` days.

    Support is the lowest low and resistance the highest high of the recent range.
    """
    s, r, c = float(np.min(low[-n:])), float(np.max(high[-n:])), float(close[-1])
    return s, r, (c / s - 1.0) * 100.0, (r / c - 1.0) * 100.0


def volume_trend(volume: np.ndarray, n: int = 20) -> float:
    """log(mean volume of the last ``n`` days / mean volume of the whole window); > 0 = rising."""
    v = np.asarray(volume, dtype=np.float64) + 1.0
    return float(math.log(v[-n:].mean() / v.mean()))


@dataclasses.dataclass(frozen=True)
class Signals:
    """Signals of one window (units in the field names; see the functions above)."""

    close: float
    trend_slope: float  # annualised log slope
    trend_r2: float
    change_pct: float
    momentum_20_pct: float
    vol_20_ann: float
    vol_regime: str  # low / normal / high
    vol_percentile: float
    rsi_14: float
    macd: float
    macd_signal: float
    macd_hist: float
    macd_cross: int  # +1 bullish / -1 bearish crossing in the last 5 days
    ma_state: int  # SMA50 vs SMA200: +1 above / -1 below / 0 window too short
    ma_cross: int  # +1 golden / -1 death cross in the last 20 days
    max_drawdown_pct: float
    support: float
    resistance: float
    support_dist_pct: float
    resistance_dist_pct: float
    volume_trend: float
    patterns: tuple[str, ...] = ()  # chart patterns completed in the last 60 days (modality.stock.data.patterns), oldest first

    def vector(self) -> np.ndarray:
        """Fixed-order float32 features, each roughly in [-3, 3] (names: :data:`SIGNAL_NAMES`)."""
        c = self.close
        regime = {"low": -1.0, "normal": 0.0, "high": 1.0}[self.vol_regime]
        v = [
            self.trend_slope,
            self.trend_r2,
            self.change_pct / 100.0,
            self.momentum_20_pct / 20.0,
            self.vol_20_ann,
            regime,
            self.vol_percentile / 100.0,
            (self.rsi_14 - 50.0) / 50.0,
            100.0 * self.macd / c,
            100.0 * self.macd_signal / c,
            100.0 * self.macd_hist / c,
            float(self.macd_cross),
            float(self.ma_state),
            float(self.ma_cross),
            self.max_drawdown_pct / 100.0,
            self.support_dist_pct / 10.0,
            self.resistance_dist_pct / 10.0,
            self.volume_trend,
        ]
        return np.clip(np.nan_to_num(np.asarray(v, dtype=np.float32)), -10.0, 10.0)


SIGNAL_NAMES = (
    "trend_slope", "trend_r2", "change", "momentum_20", "vol_20_ann", "vol_regime", "vol_percentile",
    "rsi_14", "macd", "macd_signal", "macd_hist", "macd_cross", "ma_state", "ma_cross",
    "max_drawdown", "support_dist", "resistance_dist", "volume_trend",
)
N_SIGNALS = len(SIGNAL_NAMES)


def compute_signals(df: pd.DataFrame) -> Signals:
    """All signals of an OHLCV window (oldest first); uses only rows inside the window."""
    close = df["Close"].to_numpy(dtype=np.float64)
    slope, r2 = trend(close)
    regime, pct = vol_regime(close)
    line, sig, hist = macd(close)
    state, cross = ma_cross(close)
    sup, res, sup_d, res_d = support_resistance(df["Low"].to_numpy(), df["High"].to_numpy(), close)
    return Signals(
        close=float(close[-1]),
        trend_slope=slope,
        trend_r2=r2,
        change_pct=change_pct(close),
        momentum_20_pct=change_pct(close, 20),
        vol_20_ann=realised_vol(close),
        vol_regime=regime,
        vol_percentile=pct,
        rsi_14=rsi(close),
        macd=float(line[-1]),
        macd_signal=float(sig[-1]),
        macd_hist=float(hist[-1]),
        macd_cross=last_cross(line, sig, 5),
        ma_state=state,
        ma_cross=cross,
        max_drawdown_pct=max_drawdown_pct(close),
        support=sup,
        resistance=res,
        support_dist_pct=sup_d,
        resistance_dist_pct=res_d,
        volume_trend=volume_trend(df["Volume"].to_numpy()),
        patterns=tuple(p.name for p in detect_patterns(df["Open"].to_numpy(dtype=np.float64), df["High"].to_numpy(dtype=np.float64),
                                                       df["Low"].to_numpy(dtype=np.float64), close)),
    )
