"""Forecast questions: references only from rows after the window; training answers only from the forecaster."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from modality.stock.data.outlook import FORECAST_TYPES, answers, forecast_from_output, realized, trailing_vol
from modality.stock.data.text import window_record
from tasks.evaluate import answer_correct, interval_covers, score

CONTEXT, H = 64, 10


def _frame(close: np.ndarray) -> pd.DataFrame:
    idx = pd.bdate_range("2020-01-01", periods=len(close), name="Date")
    return pd.DataFrame({"Open": close, "High": close * 1.01, "Low": close * 0.99, "Close": close,
                         "Volume": np.full(len(close), 1e6)}, index=idx)


def _series(future_step: float, future_noise: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    past = 100 * np.exp(np.cumsum(rng.normal(0.0, 0.01, CONTEXT + 1)))  # the same window in every series
    fut = past[-1] * np.exp(np.cumsum(future_step + future_noise * np.random.default_rng(99).standard_normal(H)))
    return np.concatenate([past, fut])


def _refs(close: np.ndarray) -> dict[str, str]:
    df = _frame(close)
    return {t: window_record("qa", "r", df, "X", CONTEXT, CONTEXT, "packaged", qa_type=t, horizon=H)["reference"]
            for t in FORECAST_TYPES}


def test_references_change_with_the_future_alone():
    """Same window, different futures -> different gold answers: the window alone cannot hold them."""
    up, down = _refs(_series(+0.01, 0.001)), _refs(_series(-0.01, 0.001))
    assert up["forecast_direction"] == "likely up" and down["forecast_direction"] == "likely down"
    calm, wild = _refs(_series(0.0, 0.001)), _refs(_series(0.0, 0.05))
    assert calm["forecast_volatility"] == "likely to fall" and wild["forecast_volatility"] == "likely to rise"
    assert float(up["forecast_band"]) == pytest.approx((np.exp(0.01 * H + 0.001 * np.random.default_rng(99)
                                                               .standard_normal(H).sum()) - 1) * 100, abs=0.01)
    with pytest.raises(ValueError, match="rows after row"):  # no future, no reference
        realized(_series(0.0, 0.01), CONTEXT + 1, H)


def test_training_answers_are_the_forecasters_call_never_the_future():
    df = _frame(_series(+0.02, 0.0))
    rec = window_record("instruct", "r", df, "X", CONTEXT, CONTEXT, "packaged", np.random.default_rng(0),
                        n_turns=12, horizon=H)
    answers_in_record = [t["value"] for t in rec["conversations"][1::2]]
    assert rec["fill"] == "stock" and {"{" + t + "}" for t in FORECAST_TYPES} <= set(answers_in_record)
    assert not any("likely" in a for a in answers_in_record)  # nothing about the future is written in


def test_forecast_words_round_trip_through_the_scorers():
    q = np.log1p(np.array([[-0.01, 0.0, 0.01]] * (H - 1) + [[-0.04, 0.01, 0.06]]))  # [H, Q]
    close = 100 * np.exp(np.cumsum(np.full(30, 0.001)))
    fc = forecast_from_output(q, (0.1, 0.5, 0.9), vol=0.02, close=close, horizon=H)
    assert (fc.lo_pct, fc.median_pct, fc.hi_pct, fc.coverage) == pytest.approx((-4.0, 1.0, 6.0, 80))
    assert fc.direction == "up" and fc.vol_move == "rise" and fc.trailing_vol == pytest.approx(trailing_vol(close, H))
    a = answers(fc)
    assert answer_correct("likely up", a["forecast_direction"]) and not answer_correct("likely down", a["forecast_direction"])
    assert answer_correct("likely to rise", a["forecast_volatility"])
    assert interval_covers("+5.9", a["forecast_band"]) and not interval_covers("+6.1", a["forecast_band"])
    assert not interval_covers("0", "no numbers here")
    m = score(["forecast_band"] * 2, ["+5.9", "+7.0"], [a["forecast_band"], "from -1% to +1%"])
    assert m["accuracy/forecast_band"] == 0.5 and m["band_width/forecast_band"] == pytest.approx((10.0 + 2.0) / 2)
