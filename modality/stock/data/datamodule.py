"""Stock evaluation data: scoring records from any OHLCV CSV, and a window's numbers as text.

- :func:`csv_records` turns every series of a CSV file (or folder) into single-question
  scoring records (kind "qa" of modality/stock/data/text.py) over evenly spaced windows; this is what
  ``python train.py stage=evaluate modality=stock data.csv=<file>`` evaluates.
- :func:`render_window` / :func:`as_text_record` write a window as words for the text-only
  baseline (modality/stock/baselines.py): the last closes and every computed signal the adaptor
  also reads (modality.stock.data.signals.Signals.vector), with the ``<stock>`` placeholder replaced.
- :class:`StockConversationDataModule` is the generic ConversationDataModule plus ``csv=``
  and the text-baseline settings.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from data.datamodule import ConversationDataModule
from modality.stock.data.prices import check_length, load_source
from modality.stock.data.signals import compute_signals
from modality.stock.data.outlook import FORECAST_TYPES
from modality.stock.data.text import PLACEHOLDER, QUESTION_TYPES, RECORD_FILES, window_record, write_records


def csv_records(source: str | Path, context: int, n_windows: int = 8, columns: Mapping[str, str] | None = None,
                types: tuple[str, ...] = QUESTION_TYPES, horizon: int | None = None,
                date_format: str | None = None) -> list[dict]:
    """Scoring records for ``n_windows`` evenly spaced windows of every series in ``source``.

    Each window gets one record per question type, in type order, so any prefix of
    ``k * len(types)`` records is balanced. With ``horizon``, the forecast questions are asked
    too of the windows that have ``horizon`` rows after them (scored against those rows).
    Series shorter than one window are skipped with a warning; if none is long enough the error
    names the file and the row count.
    """
    if n_windows < 1:
        raise ValueError(f"{source}: csv_windows must be >= 1, got {n_windows}")
    series = load_source(source, columns, date_format)
    csv = str(Path(source).resolve())
    records: list[dict] = []
    short: list[str] = []
    for key, df in series.items():
        try:
            check_length(len(df), context + 1, f"{source}[{key}]", f"one window of context={context}")
        except ValueError as e:
            short.append(str(e))
            continue
        anchors = np.unique(np.linspace(context, len(df) - 1, n_windows).round().astype(int))
        for a in anchors:
            asked = types + (FORECAST_TYPES if horizon and a + horizon < len(df) else ())
            records += [window_record("qa", f"stock-csv-{t}", df, key, int(a), context, csv, qa_type=t, horizon=horizon)
                        for t in asked]
    if not records:
        raise ValueError(short[0] if short else f"{source}: no series")
    if short:
        warnings.warn(f"{source}: skipped {len(short)} short series: " + " | ".join(short))
    return records


def _signed(x: float, fmt: str) -> str:
    return f"{x:+{fmt}}"


def render_window(df: pd.DataFrame, n_closes: int = 20, signals: bool = True) -> str:
    """A window (oldest first) as text: its last ``n_closes`` closes and, with ``signals``, every
    computed signal in its natural unit (the same facts the adaptor reads as a vector)."""
    close = df["Close"].to_numpy(dtype=np.float64)
    last = close[-n_closes:]
    text = (f"Daily closes of the last {len(last)} trading days up to {df.index[-1].date()} (oldest first): "
            + ", ".join(f"{c:.2f}" for c in last) + ".")
    if not signals:
        return text
    s = compute_signals(df)
    cross = {1: "bullish", -1: "bearish", 0: "none"}
    ma = {1: "above", -1: "below", 0: "window too short"}
    golden = {1: "golden", -1: "death", 0: "none"}
    facts = [
        f"trend slope {_signed(s.trend_slope, '.2f')} log/yr (R^2 {s.trend_r2:.2f})",
        f"change over the window {_signed(s.change_pct, '.1f')}%",
        f"20-day momentum {_signed(s.momentum_20_pct, '.1f')}%",
        f"20-day volatility {s.vol_20_ann * 100:.0f}% annualised ({s.vol_regime} regime, percentile {s.vol_percentile:.0f})",
        f"RSI(14) {s.rsi_14:.1f}",
        f"MACD {_signed(s.macd, '.3f')}, signal {_signed(s.macd_signal, '.3f')}, histogram {_signed(s.macd_hist, '.3f')}",
        f"MACD crossover in the last 5 days: {cross[s.macd_cross]}",
        f"50-day average vs 200-day average: {ma[s.ma_state]}",
        f"moving-average crossover in the last 20 days: {golden[s.ma_cross]}",
        f"max drawdown {s.max_drawdown_pct:.1f}%",
        f"support {s.support:.2f} ({s.support_dist_pct:.1f}% below the last close)",
        f"resistance {s.resistance:.2f} ({s.resistance_dist_pct:.1f}% above)",
        f"volume trend {_signed(s.volume_trend, '.2f')} (log, last 20 days vs window)",
    ]
    return f"{text}\nSignals over the {len(df) - 1}-day window: " + "; ".join(facts) + "."


def as_text_record(rec: dict, load_window: Callable[[Any, str | None], pd.DataFrame], n_closes: int = 20,
                   signals: bool = True) -> dict:
    """``rec`` with each ``<stock>`` placeholder replaced by its window as text (and no stock refs)."""
    refs = list(rec.get("stock") or [])
    where = rec.get("where", rec.get("id"))
    conv = []
    for turn in rec["conversations"]:
        value = turn["value"]
        while PLACEHOLDER in value:
            if not refs:
                raise ValueError(f"{where}: more {PLACEHOLDER} placeholders than stock refs")
            window = load_window(refs.pop(0), rec.get("root"))
            value = value.replace(PLACEHOLDER, render_window(window, n_closes, signals), 1)
        conv.append({**turn, "value": value})
    if refs:
        raise ValueError(f"{where}: {len(refs)} stock ref(s) without a {PLACEHOLDER} placeholder")
    out = {k: v for k, v in rec.items() if k not in ("stock", "root")}
    out["conversations"] = conv
    return out


class StockConversationDataModule(ConversationDataModule):
    """ConversationDataModule plus two stock extras, both plain settings.

    ``csv``: evaluate on windows of this OHLCV CSV (or folder) instead of ``eval_files`` /
    ``eval_manifest``; ``prepare_data`` writes its :func:`csv_records` to ``csv_records``
    (the run directory by default) first. ``text_baseline``: settings of the text-only
    baseline (modality/stock/baselines.py), which the runner runs after evaluating the model.
    """

    def __init__(self, *args: Any, csv: str | None = None, csv_records: str | None = None, csv_windows: int = 8,
                 context: int = 256, horizon: int | None = None, columns: Mapping[str, str] | None = None,
                 text_baseline: Mapping[str, Any] | None = None, date_format: str | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.csv, self.csv_out, self.csv_windows, self.context, self.horizon = csv, csv_records, csv_windows, context, horizon
        self.columns = {str(k): str(v) for k, v in columns.items()} if columns else None
        self.date_format = date_format or None
        self.text_baseline = dict(text_baseline) if text_baseline else None

    def prepare_data(self) -> None:
        if self.csv is not None:
            if not self.csv_out:
                raise ValueError(f"data.csv={self.csv} needs data.csv_records=<where to write its records>")
            write_records(csv_records(self.csv, self.context, self.csv_windows, self.columns, horizon=self.horizon,
                                      date_format=self.date_format),
                          self.csv_out)
            self.files["eval"] = [str(self.csv_out)]
            self._records.pop("eval", None)
        ours = any(Path(f).name in RECORD_FILES for fs in self.files.values() for f in fs)
        if self.prepare is not None and ours:  # the derived record folder: rebuilt when damaged (text.stale_reason),
            # or built with other settings when this run trains on it
            self.prepare(rebuild_stale=any(Path(f).name in RECORD_FILES for f in self.files["train"]))
        super().prepare_data()
