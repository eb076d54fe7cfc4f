"""Words about a price window: captions and Q&A built from its computed signals.

Every sentence is derived from modality/stock/data/signals.py on the window the model sees, so a
caption is checkable, never invented. :func:`build_records` writes LLaVA-style records
(``{"id", "stock": [ref], "conversations": [...]}``) for stage=align (one caption),
stage=instruct (several Q&A turns) and scoring (kind "qa": one question with its ``type`` and
a short checkable ``reference``), sampling windows from one leak-free split.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from modality.stock.data.prices import load_source, make_windows
from modality.stock.data.signals import Signals, compute_signals

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


@dataclasses.dataclass(frozen=True)
class QA:
    """One question about a window: its family, the full answer and the checkable ``key``.

    ``key`` is the fact the answer states (a category, or a number's integer part with its
    direction) in the answer's own words, so ``tasks.evaluate.answer_correct(key, prediction)``
    scores it: the key's words must appear, in order, in the prediction. Keys of different
    categories never contain each other ("trend: uptrend" vs "trend: strong uptrend").
    """

    type: str
    question: str
    answer: str
    key: str


QUESTION_TYPES = ("trend", "volatility", "rsi", "macd", "ma_cross", "drawdown", "support_resistance", "momentum")


def _int_part(x: float) -> str:
    """Integer part of ``|x|`` as the answer prints it with one decimal (12.97 -> '13.0' -> '13')."""
    return f"{abs(x):.1f}".split(".")[0]


def question_specs(sig: Signals, days: int) -> list[QA]:
    """One :class:`QA` per signal family (:data:`QUESTION_TYPES`), all answered from ``sig``."""
    tw, side = trend_words(sig), ("above" if sig.macd_hist > 0 else "below")
    ma_key = "too short" if sig.ma_state == 0 else f"50-day average is {'above' if sig.ma_state > 0 else 'below'} the 200-day"
    up = "up" if sig.momentum_20_pct >= 0 else "down"
    specs = [
        QA("trend", "What is the overall trend?",
           f"Trend: {tw}, {sig.change_pct:+.1f}% over {days} trading days (trend R^2 {sig.trend_r2:.2f}).", f"trend: {tw}"),
        QA("volatility", "How volatile is it right now?",
           f"20-day volatility is {sig.vol_20_ann * 100:.0f}% annualised, {sig.vol_regime} for this stock "
           f"(percentile {sig.vol_percentile:.0f} of its recent history).", f"{sig.vol_regime} for this stock"),
        QA("rsi", "Is it overbought or oversold?", f"RSI(14) is {sig.rsi_14:.0f}, which is {rsi_words(sig)}.",
           f"which is {rsi_words(sig)}"),
        QA("macd", "What does MACD say?", f"{_cap(macd_words(sig))} (histogram {sig.macd_hist:+.2f}).",
           f"MACD is {side} its signal line"),
        QA("ma_cross", "Any moving-average crossover?", _cap(ma_words(sig)) + ".", ma_key),
        QA("drawdown", "What was the worst drawdown?",
           f"The largest peak-to-trough fall in the window was {sig.max_drawdown_pct:.1f}%.",
           f"fall in the window was {_int_part(sig.max_drawdown_pct)}"),
        QA("support_resistance", "Where are support and resistance?",
           f"Support is {sig.support_dist_pct:.1f}% below the last close (near {sig.support:.2f}), "
           f"resistance {sig.resistance_dist_pct:.1f}% above (near {sig.resistance:.2f}).",
           f"support is {_int_part(sig.support_dist_pct)}"),
        QA("momentum", "How has the price moved in the last month?",
           f"{_cap(up)} {abs(sig.momentum_20_pct):.1f}% over the last 20 trading days.", f"{up} {_int_part(sig.momentum_20_pct)}"),
    ]
    assert tuple(q.type for q in specs) == QUESTION_TYPES
    return specs


def question_answers(sig: Signals, days: int) -> list[tuple[str, str]]:
    """(question, answer) pairs, one per signal family, all answered from ``sig``."""
    return [(q.question, q.answer) for q in question_specs(sig, days)]


KINDS = ("align", "instruct", "qa")


def window_record(kind: str, rid: str, df, key: str, anchor: int, context: int, csv: str,
                  rng: np.random.Generator | None = None, n_turns: int = 3, qa_type: str | None = None) -> dict:
    """One record about the window of ``context + 1`` rows of ``df`` ending at row ``anchor``.

    align: one caption; instruct: ``n_turns`` Q&A turns (questions drawn with ``rng``); qa: one
    question of ``qa_type`` with ``type`` and ``reference`` (its checkable key) for scoring.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    sig = compute_signals(df.iloc[anchor - context : anchor + 1])
    end = str(df.index[anchor].date())
    rec: dict = {"id": f"{rid}-{key}-{end}", "stock": [{"csv": csv, "ticker": key, "end": end}]}
    if kind == "align":
        rec["type"] = "caption"  # scored as an exact caption: eyeball predictions.jsonl, watch val/loss
        conv = [
            {"from": "human", "value": f"{PLACEHOLDER}\nDescribe this price chart."},
            {"from": "gpt", "value": describe(sig, context)},
        ]
    elif kind == "instruct":
        qa = question_answers(sig, context)
        rng = rng if rng is not None else np.random.default_rng(0)
        chosen = rng.choice(len(qa), size=min(n_turns, len(qa)), replace=False)
        conv = []
        for t, i in enumerate(chosen):
            q = f"{PLACEHOLDER}\n{qa[i][0]}" if t == 0 else qa[i][0]
            conv += [{"from": "human", "value": q}, {"from": "gpt", "value": qa[i][1]}]
    else:
        spec = {q.type: q for q in question_specs(sig, context)}[qa_type or QUESTION_TYPES[0]]
        rec.update(type=spec.type, reference=spec.key)
        conv = [{"from": "human", "value": f"{PLACEHOLDER}\n{spec.question}"}, {"from": "gpt", "value": spec.answer}]
    rec["conversations"] = conv
    return rec


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
    inside the same split too. kind="qa" cycles through :data:`QUESTION_TYPES` (record ``j``
    asks type ``j % 8``), so any prefix of the file is balanced across types.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
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
        qa_type = QUESTION_TYPES[j % len(QUESTION_TYPES)]
        records.append(window_record(kind, f"stock-{kind}-{split}-{j:06d}", series[key], key, anchor, context, csv,
                                     rng, n_turns, qa_type))
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


RECORD_FILES = tuple(f"stock_{k}_{s}.jsonl" for k in ("align", "instruct") for s in ("train", "val", "test")) + (
    "stock_qa_val.jsonl", "stock_qa_test.jsonl")


def prepare_records(
    out: str | Path,
    source: str = "packaged",
    context: int = 256,
    horizon: int = 20,
    n_align: int = 2000,
    n_instruct: int = 1000,
    eval_frac: float = 0.1,
    seed: int = 0,
    n_qa: int = 160,
) -> list[Path]:
    """Write :data:`RECORD_FILES` into ``out``: align/instruct records for each split, and
    ``n_qa`` single-question scoring records (balanced over :data:`QUESTION_TYPES`) for val/test.

    val/test get ``eval_frac`` as many records as train; every file draws from its own split.
    """
    paths = []
    for kind, n in (("align", n_align), ("instruct", n_instruct)):
        for split in ("train", "val", "test"):
            count = n if split == "train" else max(1, int(n * eval_frac))
            recs = build_records(source, context, horizon, split, kind, count, seed=seed)
            paths.append(write_records(recs, Path(out) / f"stock_{kind}_{split}.jsonl"))
    for split in ("val", "test"):
        recs = build_records(source, context, horizon, split, "qa", n_qa, seed=seed)
        paths.append(write_records(recs, Path(out) / f"stock_qa_{split}.jsonl"))
    return paths


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m modality.stock.data.text --out DIR`` writes align/instruct train/val/test and qa val/test records."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--source", default="packaged")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--horizon", type=int, default=20)
    ap.add_argument("--n-align", type=int, default=2000)
    ap.add_argument("--n-instruct", type=int, default=1000)
    ap.add_argument("--n-qa", type=int, default=160)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    for p in prepare_records(a.out, a.source, a.context, a.horizon, a.n_align, a.n_instruct, seed=a.seed, n_qa=a.n_qa):
        print(p)


if __name__ == "__main__":
    main()
