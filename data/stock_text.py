"""Words about a price window: captions and Q&A built from its computed signals.

Every sentence is derived from data/stock_signals.py on the window the model sees, so a
caption is checkable, never invented. :func:`build_records` writes LLaVA-style records
(``{"id", "stock": [ref], "conversations": [...]}``) for stage=align (one caption) and
stage=instruct (several Q&A turns), sampling windows from one leak-free split.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from data.stock_csv import load_source, make_windows
from data.stock_signals import Signals, compute_signals

PLACEHOLDER = "<stock>"


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def trend_words(sig: Signals) -> str:
    """'strong uptrend' / 'uptrend' / 'sideways' / 'downtrend' / 'strong downtrend'."""
    s, r2 = sig.trend_slope, sig.trend_r2
    if abs(s) < 0.1 or r2 < 0.2 or s * sig.change_pct <= 0:  # weak, noisy, or the endpoints disagree
        return "sideways"
    word = "uptrend" if s > 0 else "downtrend"
    return f"strong {word}" if abs(s) > 0.3 and r2 > 0.6 else word


def rsi_words(sig: Signals) -> str:
    return "overbought" if sig.rsi_14 > 70 else "oversold" if sig.rsi_14 < 30 else "neutral"


def macd_words(sig: Signals) -> str:
    side = "above" if sig.macd_hist > 0 else "below"
    cross = {1: ", after a bullish crossover in the last 5 days", -1: ", after a bearish crossover in the last 5 days"}.get(sig.macd_cross, "")
    return f"MACD is {side} its signal line{cross}"


def ma_words(sig: Signals) -> str:
    if sig.ma_state == 0:
        return "the window is too short for the 50/200-day averages"
    cross = {1: "a golden cross in the last 20 days; ", -1: "a death cross in the last 20 days; "}.get(sig.ma_cross, "")
    side = "above" if sig.ma_state > 0 else "below"
    return f"{cross}the 50-day average is {side} the 200-day average"


def describe(sig: Signals, days: int, ticker: str | None = None) -> str:
    """A factual caption of one window of ``days`` trading days."""
    name = f"{ticker} " if ticker else ""
    text = (
        f"{name}over the last {days} trading days: {trend_words(sig)} "
        f"({sig.change_pct:+.1f}%, trend R^2 {sig.trend_r2:.2f}), "
        f"20-day momentum {sig.momentum_20_pct:+.1f}%. "
        f"Volatility {sig.vol_20_ann * 100:.0f}% annualised ({sig.vol_regime} for this stock). "
        f"RSI(14) {sig.rsi_14:.0f} ({rsi_words(sig)}); {macd_words(sig)}; {ma_words(sig)}. "
        f"Largest drawdown {sig.max_drawdown_pct:.1f}%. Support near {sig.support:.2f} "
        f"({sig.support_dist_pct:.1f}% below), resistance near {sig.resistance:.2f} "
        f"({sig.resistance_dist_pct:.1f}% above); last close {sig.close:.2f}."
    )
    return _cap(text)


def question_answers(sig: Signals, days: int) -> list[tuple[str, str]]:
    """(question, answer) pairs, one per signal family, all answered from ``sig``."""
    return [
        ("What is the overall trend?", f"A {trend_words(sig)}: {sig.change_pct:+.1f}% over {days} trading days, trend R^2 {sig.trend_r2:.2f}."),
        ("How volatile is it right now?", f"20-day volatility is {sig.vol_20_ann * 100:.0f}% annualised, {sig.vol_regime} compared with its own recent history ({sig.vol_percentile:.0f}th percentile)."),
        ("Is it overbought or oversold?", f"RSI(14) is {sig.rsi_14:.0f}, which is {rsi_words(sig)}."),
        ("What does MACD say?", f"{_cap(macd_words(sig))} (histogram {sig.macd_hist:+.2f})."),
        ("Any moving-average crossover?", _cap(ma_words(sig)) + "."),
        ("What was the worst drawdown?", f"The largest peak-to-trough fall in the window was {sig.max_drawdown_pct:.1f}%."),
        ("Where are support and resistance?", f"Support near {sig.support:.2f} ({sig.support_dist_pct:.1f}% below the last close), resistance near {sig.resistance:.2f} ({sig.resistance_dist_pct:.1f}% above)."),
        ("How has the price moved in the last month?", f"{sig.momentum_20_pct:+.1f}% over the last 20 trading days."),
    ]


def build_records(
    source: str = "packaged",
    context: int = 256,
    horizon: int = 20,
    split: str = "train",
    kind: str = "align",
    n: int = 1000,
    n_turns: int = 3,
    seed: int = 0,
    val_frac: float = 0.15,
    test_frac: float = 0.15,
    columns: Mapping[str, str] | None = None,
    tickers: list[str] | None = None,
) -> list[dict]:
    """``n`` records over windows of ``split`` (series too short for the splits are skipped).

    Refs are ``{"csv": source, "ticker": key, "end": "YYYY-MM-DD"}`` with ``csv`` made absolute
    for file sources; the window ends at the anchor row of a split window, so its horizon lies
    inside the same split too.
    """
    if kind not in ("align", "instruct"):
        raise ValueError(f"kind must be 'align' or 'instruct', got {kind!r}")
    series = load_source(source, columns)
    if tickers:
        series = {k: series[k] for k in tickers}
    csv = "packaged" if source == "packaged" else str(Path(source).resolve())
    pool = []
    for key, df in series.items():
        try:
            starts = make_windows(len(df), context, horizon, split, val_frac, test_frac, source=key)
        except ValueError:
            continue
        pool += [(key, int(s) + context) for s in starts]
    if not pool:
        raise ValueError(f"{source}: no {split} windows for context={context} horizon={horizon}")
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(pool), size=n, replace=n > len(pool))
    records = []
    for j, p in enumerate(picks):
        key, anchor = pool[p]
        df = series[key]
        window = df.iloc[anchor - context : anchor + 1]
        sig = compute_signals(window)
        end = str(df.index[anchor].date())
        ref = {"csv": csv, "ticker": key, "end": end}
        if kind == "align":
            conv = [
                {"from": "human", "value": f"{PLACEHOLDER}\nDescribe this price chart."},
                {"from": "gpt", "value": describe(sig, context)},
            ]
        else:
            qa = question_answers(sig, context)
            chosen = rng.choice(len(qa), size=min(n_turns, len(qa)), replace=False)
            conv = []
            for t, i in enumerate(chosen):
                q = f"{PLACEHOLDER}\n{qa[i][0]}" if t == 0 else qa[i][0]
                conv += [{"from": "human", "value": q}, {"from": "gpt", "value": qa[i][1]}]
        records.append({"id": f"stock-{kind}-{split}-{j:06d}-{key}-{end}", "stock": [ref], "conversations": conv})
    return records


def write_records(records: list[dict], path: str | Path) -> Path:
    """Write records as .json (a list) or .jsonl (one per line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        if path.suffix == ".jsonl":
            f.writelines(json.dumps(r) + "\n" for r in records)
        else:
            json.dump(records, f, indent=1)
    return path


RECORD_FILES = tuple(f"stock_{k}_{s}.jsonl" for k in ("align", "instruct") for s in ("train", "val", "test"))


def prepare_records(
    out: str | Path,
    source: str = "packaged",
    context: int = 256,
    horizon: int = 20,
    n_align: int = 2000,
    n_instruct: int = 1000,
    eval_frac: float = 0.1,
    seed: int = 0,
) -> list[Path]:
    """Write :data:`RECORD_FILES` into ``out``: align/instruct records for each split.

    val/test get ``eval_frac`` as many records as train; every file draws from its own split.
    """
    paths = []
    for kind, n in (("align", n_align), ("instruct", n_instruct)):
        for split in ("train", "val", "test"):
            count = n if split == "train" else max(1, int(n * eval_frac))
            recs = build_records(source, context, horizon, split, kind, count, seed=seed)
            paths.append(write_records(recs, Path(out) / f"stock_{kind}_{split}.jsonl"))
    return paths


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m data.stock_text --out DIR`` writes align/instruct train/val/test records."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--source", default="packaged")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--horizon", type=int, default=20)
    ap.add_argument("--n-align", type=int, default=2000)
    ap.add_argument("--n-instruct", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    for p in prepare_records(a.out, a.source, a.context, a.horizon, a.n_align, a.n_instruct, seed=a.seed):
        print(p)


if __name__ == "__main__":
    main()
