"""Forecast questions: what the frozen forecaster says about the next ``horizon`` days, and what happened.

Three question types ask about the future of a window. Their TRAINING answers are the
forecaster's own call (distillation: the LLM learns to say what the forecaster knows), filled in
when a record is loaded (``StockModality.answer_fields``), so records never go stale when the
forecaster changes. Their SCORING references come only from rows after the window
(:func:`realized`), so nothing the model sees can contain them:

- ``forecast_direction``: "Likely up/down over the next 20 trading days" vs the sign of the realised
  cumulative return (key ``likely up`` / ``likely down``).
- ``forecast_volatility``: "Volatility is likely to rise/fall" vs the realised volatility over the
  horizon against the trailing volatility of the window's last ``horizon`` days (same estimator:
  sqrt of the mean squared daily log return).
- ``forecast_band``: the forecaster's central band ("Expected -2.1% to +5.3% ...") scored as coverage:
  correct when the realised return lies inside the two percentages the answer states
  (``tasks.evaluate.interval_covers``); a calibrated 80 % band covers ~80 %.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

FORECAST_TYPES = ("forecast_direction", "forecast_volatility", "forecast_band")
QUESTIONS = {
    "forecast_direction": "Which way is it likely to go next?",
    "forecast_volatility": "Will volatility rise or fall from here?",
    "forecast_band": "What range do you expect for the coming weeks?",
}


def trailing_vol(close: np.ndarray, n: int) -> float:
    """sqrt(mean r^2) of the last ``n`` daily log returns (the forecaster's target convention)."""
    r = np.diff(np.log(np.asarray(close, dtype=np.float64)))[-n:]
    return float(np.sqrt(np.mean(r**2))) if len(r) else 0.0


@dataclasses.dataclass(frozen=True)
class Forecast:
    """The forecaster's call for one window: cumulative return quantiles at the horizon (percent), the
    band's nominal coverage, and forecast vs trailing daily volatility."""

    lo_pct: float
    median_pct: float
    hi_pct: float
    coverage: int  # percent, e.g. 80 for the 0.1-0.9 quantiles
    vol: float
    trailing_vol: float
    horizon: int

    @property
    def direction(self) -> str:
        return "up" if self.median_pct >= 0 else "down"

    @property
    def vol_move(self) -> str:
        return "rise" if self.vol > self.trailing_vol else "fall"


def forecast_from_output(quantiles: np.ndarray, levels: tuple[float, ...], vol: float, close: np.ndarray,
                         horizon: int) -> Forecast:
    """Forecaster output for one window (``quantiles`` [H, Q] cumulative log returns) -> :class:`Forecast`."""
    last = np.expm1(np.asarray(quantiles, dtype=np.float64)[-1]) * 100.0  # [Q] percent at the horizon
    mid = len(levels) // 2
    return Forecast(float(last[0]), float(last[mid]), float(last[-1]), round((levels[-1] - levels[0]) * 100),
                    float(vol), trailing_vol(close, horizon), horizon)


def answers(fc: Forecast) -> dict[str, str]:
    """Training answers (the forecaster's call in words), keyed by question type."""
    h = fc.horizon
    return {
        "forecast_direction": f"Likely {fc.direction} over the next {h} trading days (median {fc.median_pct:+.1f}%).",
        "forecast_volatility": f"Volatility is likely to {fc.vol_move}: about {fc.vol * math.sqrt(252) * 100:.0f}% "
                               f"annualised over the next {h} trading days, from {fc.trailing_vol * math.sqrt(252) * 100:.0f}%.",
        "forecast_band": f"Expected {fc.lo_pct:+.1f}% to {fc.hi_pct:+.1f}% over the next {h} trading days "
                         f"({fc.coverage}% band, median {fc.median_pct:+.1f}%).",
    }


def reading(fc: Forecast) -> str:
    """The forecast part of the plugin's reading, in the words the answers use."""
    a = answers(fc)
    return (f"forecast: likely {fc.direction}, expected {fc.lo_pct:+.1f}% to {fc.hi_pct:+.1f}% over the next "
            f"{fc.horizon} trading days ({fc.coverage}% band, median {fc.median_pct:+.1f}%); "
            + a["forecast_volatility"][0].lower() + a["forecast_volatility"][1:])


def realized(close: np.ndarray, anchor: int, horizon: int) -> dict[str, str]:
    """Scoring references from the ``horizon`` rows AFTER ``anchor`` (raises if they are missing)."""
    c = np.asarray(close, dtype=np.float64)
    if anchor + horizon >= len(c):
        raise ValueError(f"realized: need {horizon} rows after row {anchor}, have {len(c) - 1 - anchor}")
    ret = (c[anchor + horizon] / c[anchor] - 1.0) * 100.0
    future = trailing_vol(c[anchor : anchor + horizon + 1], horizon)
    past = trailing_vol(c[: anchor + 1], horizon)
    return {
        "forecast_direction": f"likely {'up' if ret >= 0 else 'down'}",
        "forecast_volatility": f"likely to {'rise' if future > past else 'fall'}",
        "forecast_band": f"{ret:+.2f}",
    }
