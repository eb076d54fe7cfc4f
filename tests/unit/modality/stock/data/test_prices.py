"""OHLCV readers, validation errors (naming file and line) and leak-free time splits."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from modality.stock.data.prices import (
    OHLCV,
    load_packaged,
    load_source,
    make_windows,
    read_csv,
    read_folder,
    resolve_series,
    split_bounds,
    window_at,
    window_span,
)

YAHOO = """Date,Open,High,Low,Close,Adj Close,Volume
2020-01-02,10,11,9,10,5,100
2020-01-03,10,12,10,11,5.5,200
2020-01-06,11,12,10,12,12,300
"""


def _bokeh_file():
    import importlib.util
    from pathlib import Path

    return Path(next(iter(importlib.util.find_spec("bokeh_sampledata").submodule_search_locations))) / "_data" / "stocks.csv.gz"


def write(tmp_path, text, name="TEST.csv"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_packaged_series_are_real_and_split_adjusted():
    s = load_packaged()
    assert {"AAPL_2000", "AAPL_2013", "GOOG_2004", "GOOG_2013", "IBM_2000", "MSFT_2000", "NVDA_2013"} <= set(s)
    for key, df in s.items():
        assert list(df.columns) == list(OHLCV) and df.index.is_monotonic_increasing and df.index.is_unique, key
    aapl = s["AAPL_2000"]
    assert aapl.index[0] == pd.Timestamp("2000-03-01") and aapl.index[-1] == pd.Timestamp("2013-03-01")
    assert len(s["AAPL_2013"]) == 2699
    # bokeh's raw closes halve on the 2:1 split of 2005-02-28; adjusted they do not
    r = np.log(aapl["Close"]).diff()
    assert abs(r.loc["2005-02-28"]) < 0.05
    raw = pd.read_csv(_bokeh_file()).query("Ticker == 'AAPL'").set_index("Date")["Close"]
    assert np.log(raw).diff().loc["2005-02-28"] < -0.6


def test_yahoo_csv_adjusts_prices_and_keeps_latest_quote(tmp_path):
    df = read_csv(write(tmp_path, YAHOO))
    assert list(df.columns) == list(OHLCV)
    assert df.index.name == "Date" and df.index[1] == pd.Timestamp("2020-01-03")
    # factor = (adj/close) / last(adj/close) = 0.5 for the first two rows
    np.testing.assert_allclose(df["Close"], [5, 5.5, 12])
    np.testing.assert_allclose(df["Volume"], [200, 400, 300])
    raw = read_csv(write(tmp_path, YAHOO), adjust=False)
    np.testing.assert_allclose(raw["Close"], [10, 11, 12])


def test_columns_map_and_folder(tmp_path):
    text = "ts,o,h,l,c,vol\n2020-01-02,1,2,1,1.5,10\n2020-01-03,1.5,2,1,2,20\n"
    df = read_csv(write(tmp_path, text), columns={"Date": "ts", "Open": "o", "High": "h", "Low": "l", "Close": "c", "Volume": "vol"})
    np.testing.assert_allclose(df["Close"], [1.5, 2.0])
    lower = "date,open,high,low,close,volume\n2020-01-02,1,2,1,1.5,10\n"
    write(tmp_path, lower, "XYZ.csv")
    write(tmp_path, YAHOO, "ABC.csv")
    tmp_path.joinpath("TEST.csv").unlink()
    folder = read_folder(tmp_path)
    assert set(folder) == {"XYZ", "ABC"}
    assert set(load_source(tmp_path)) == {"XYZ", "ABC"}


@pytest.mark.parametrize(
    "text,needle",
    [
        ("Date,Open,High,Low,Volume\n2020-01-02,1,2,1,5\n", "missing column(s) ['Close']"),
        ("Date,Open,High,Low,Close,Volume\n2020-01-02,1,2,1,1,5\nnot-a-date,1,2,1,1,5\n", "line 3: unparsable date"),
        ("Date,Open,High,Low,Close,Volume\n2020-01-03,1,2,1,1,5\n2020-01-02,1,2,1,1,5\n", "line 3: dates not sorted"),
        ("Date,Open,High,Low,Close,Volume\n2020-01-02,1,2,1,1,5\n2020-01-02,1,2,1,1,5\n", "line 3: duplicate date 2020-01-02"),
        ("Date,Open,High,Low,Close,Volume\n2020-01-02,1,2,1,1,5\n2020-01-03,1,2,1,null,5\n", "line 3: Close is NaN"),
        ("Date,Open,High,Low,Close,Volume\n2020-01-02,1,2,1,inf,5\n", "line 2: Close is NaN or infinite"),
        ("Date,Open,High,Low,Close,Volume\n2020-01-02,1,2,1,1,5\n2020-01-03,1,2,1,-4,5\n", "line 3: Close must be positive"),
        ("Date,Open,High,Low,Close,Volume\n2020-01-02,1,2,1,abc,5\n", "line 2: Close is not a number"),
        ("Date,Open,High,Low,Close,Volume\n2020-01-02,1,1,2,1,5\n", "line 2: High 1.0 < Low 2.0"),
    ],
)
def test_bad_csv_errors_name_file_and_line(tmp_path, text, needle):
    p = write(tmp_path, text)
    with pytest.raises(ValueError) as e:
        read_csv(p)
    msg = str(e.value)
    assert str(p) in msg and needle in msg and "\n" not in msg


def test_missing_file_and_short_series(tmp_path):
    with pytest.raises(ValueError, match="nope.csv"):
        load_source(tmp_path / "nope.csv")
    with pytest.raises(ValueError, match=r"AAA: 100 rows is too short for context=64 horizon=8"):
        make_windows(100, 64, 8, "train", source="AAA")
    df = read_csv(write(tmp_path, YAHOO))
    with pytest.raises(ValueError, match="only 2 rows up to 2020-01-03; a window needs 3"):
        window_at(df, "2020-01-03", 3, source="TEST.csv")


def test_resolve_series_by_bare_ticker_and_end():
    s = load_packaged()
    assert resolve_series(s, "AAPL", "2019-05-31")[0] == "AAPL_2013"
    assert resolve_series(s, "AAPL", "2005-06-01")[0] == "AAPL_2000"
    assert resolve_series(s, "IBM")[0] == "IBM_2000"
    with pytest.raises(ValueError, match="ambiguous"):
        resolve_series(s, "AAPL")
    with pytest.raises(ValueError, match="unknown ticker 'TSLA'"):
        resolve_series(s, "TSLA")


@pytest.mark.parametrize("n,context,horizon", [(3270, 256, 20), (1000, 64, 8), (500, 32, 5)])
def test_splits_never_leak(n, context, horizon):
    dates = pd.bdate_range("2001-01-01", periods=n)
    span = window_span(context, horizon)
    w = {s: make_windows(n, context, horizon, s) for s in ("train", "val", "test")}
    assert all(len(v) > 0 for v in w.values())

    def inputs(starts):  # rows read as inputs
        return starts[:, None] + np.arange(context + 1)

    def targets(starts):  # rows predicted
        return starts[:, None] + context + 1 + np.arange(horizon)

    for early, late in (("train", "val"), ("train", "test"), ("val", "test")):
        last_target = targets(w[early]).max()
        first_input = inputs(w[late]).min()
        assert dates[last_target] < dates[first_input]
        assert first_input - last_target > horizon  # a gap of `horizon` unused rows
        # and no target of an earlier split is ever an input or target of a later one
        assert not set(targets(w[early]).ravel()) & (set(inputs(w[late]).ravel()) | set(targets(w[late]).ravel()))
    for split, starts in w.items():
        lo, hi = split_bounds(n, context, horizon)[split]
        assert starts.min() >= lo and starts.max() + span <= hi
        assert np.all(np.diff(starts) == 1)
    assert len(make_windows(n, context, horizon, "test", stride=horizon)) == -(-len(w["test"]) // horizon)


def test_split_arguments_validated():
    with pytest.raises(ValueError, match="split must be one of"):
        make_windows(1000, 10, 5, "holdout")
    with pytest.raises(ValueError, match="val_frac"):
        split_bounds(1000, 10, 5, val_frac=0.6, test_frac=0.5)
    b = split_bounds(1000, 10, 5, val_frac=0.0, test_frac=0.2)
    assert b["val"] == (b["val"][0], b["val"][0]) and b["train"][1] + 5 == b["test"][0]


def test_a_csv_written_by_pandas_with_an_unnamed_date_index_reads(tmp_path):
    """``df.to_csv()`` of a DatetimeIndex leaves the date header empty (backtesting.py's GOOG.csv is one)."""
    from modality.stock.data.prices import load_packaged, read_csv

    df = load_packaged()["IBM_2000"].iloc[:40]
    plain = df.copy()
    plain.index.name = None
    plain.to_csv(tmp_path / "x.csv")
    assert (tmp_path / "x.csv").read_text().startswith(",Open")
    got = read_csv(tmp_path / "x.csv")
    assert list(got.index) == list(df.index) and got["Close"].to_numpy() == pytest.approx(df["Close"].to_numpy())


def test_intraday_bars_get_refs_with_their_time(tmp_path):
    """An hourly CSV (backtesting.py's EURUSD.csv is one): a window ends at its bar, not at the day's first."""
    from modality.stock.data.datamodule import csv_records
    from modality.stock.plugin import StockModality

    df = load_packaged()["IBM_2000"].iloc[:120].copy()
    df.index = pd.date_range("2017-04-19 09:00", periods=len(df), freq="h", name="Date")
    df.to_csv(tmp_path / "hourly.csv")
    recs = csv_records(tmp_path / "hourly.csv", 64, n_windows=2)
    m = StockModality(d_llm=None, context=64, horizon=5, patch_len=8, stride=4, d_model=16, n_heads=2, n_layers=1, d_ff=16)
    for r in recs[:: len(recs) - 1]:
        ref = r["stock"][0]
        assert "T" in ref["end"] and m.load(ref).index[-1] == pd.Timestamp(ref["end"])
