"""Words about a price window: captions and Q&A built from its computed signals.

Every sentence is derived from modality/stock/data/signals.py on the window the model sees, so a
caption is checkable, never invented. :func:`build_records` writes LLaVA-style records
(``{"id", "stock": [ref], "conversations": [...]}``) for stage=align (one caption),
stage=instruct (several Q&A turns) and scoring (kind "qa": one question with its ``type`` and
a short checkable ``reference``), sampling windows from one leak-free split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from data.jsonl import atomic_open, write_json
from modality.stock.data.prices import load_source, make_windows
from modality.stock.data import outlook
from modality.stock.data.outlook import FORECAST_TYPES
from modality.stock.data.patterns import Pattern, pattern_words
from modality.stock.data.signals import Signals, compute_signals

log = logging.getLogger(__name__)
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


QUESTION_TYPES = ("trend", "volatility", "rsi", "macd", "ma_cross", "drawdown", "support_resistance", "momentum",
                  "pattern")


def _int_part(x: float) -> str:
    """Integer part of ``|x|`` as the answer prints it with one decimal (12.97 -> '13.0' -> '13')."""
    return f"{abs(x):.1f}".split(".")[0]


def pattern_key(sig: Signals) -> str:
    """The chart patterns of the window in words ('none' when there are none)."""
    return pattern_words([Pattern(name, i, i) for i, name in enumerate(sig.patterns)])


def question_specs(sig: Signals, days: int) -> list[QA]:
    """One :class:`QA` per signal family (:data:`QUESTION_TYPES`), all answered from ``sig``.

    Answers are one short sentence around the checkable key (no unscored decimals: a short run
    learns the key, not the R^2), the same facts :func:`reading` writes after the embeddings.
    """
    tw, side = trend_words(sig), ("above" if sig.macd_hist > 0 else "below")
    ma_key = "too short" if sig.ma_state == 0 else f"50-day average is {'above' if sig.ma_state > 0 else 'below'} the 200-day"
    up = "up" if sig.momentum_20_pct >= 0 else "down"
    pw = pattern_key(sig)
    specs = [
        QA("trend", "What is the overall trend?", f"Trend: {tw}, {sig.change_pct:+.1f}% over {days} trading days.",
           f"trend: {tw}"),
        QA("volatility", "How volatile is it right now?",
           f"{sig.vol_20_ann * 100:.0f}% annualised, {sig.vol_regime} for this stock.", f"{sig.vol_regime} for this stock"),
        QA("rsi", "Is it overbought or oversold?", f"RSI(14) is {sig.rsi_14:.0f}, which is {rsi_words(sig)}.",
           f"which is {rsi_words(sig)}"),
        QA("macd", "What does MACD say?", f"{_cap(macd_words(sig))}.", f"MACD is {side} its signal line"),
        QA("ma_cross", "Any moving-average crossover?", _cap(ma_words(sig)) + ".", ma_key),
        QA("drawdown", "What was the worst drawdown?",
           f"The largest fall in the window was {sig.max_drawdown_pct:.1f}%.",
           f"fall in the window was {_int_part(sig.max_drawdown_pct)}"),
        QA("support_resistance", "Where are support and resistance?",
           f"Support is {sig.support_dist_pct:.1f}% below the last close, resistance {sig.resistance_dist_pct:.1f}% above.",
           f"support is {_int_part(sig.support_dist_pct)}"),
        QA("momentum", "How has the price moved in the last month?",
           f"{_cap(up)} {abs(sig.momentum_20_pct):.1f}% over the last 20 trading days.", f"{up} {_int_part(sig.momentum_20_pct)}"),
        QA("pattern", "Any chart patterns?", f"Patterns: {pw}.", f"patterns: {pw}"),
    ]
    assert tuple(q.type for q in specs) == QUESTION_TYPES
    return specs


def reading(sig: Signals, days: int) -> str:
    """The window's signals in words, as the stock plugin places them after its embeddings.

    Every fact a descriptive question asks is here, in the words its answer uses, so the LLM
    answers by finding and restating it; the learned positions before it carry the chart.
    """
    up = "up" if sig.momentum_20_pct >= 0 else "down"
    return (
        f"Signals: trend: {trend_words(sig)}, {sig.change_pct:+.1f}% over {days} trading days; "
        f"volatility {sig.vol_20_ann * 100:.0f}% annualised, {sig.vol_regime} for this stock; "
        f"RSI(14) {sig.rsi_14:.0f}, which is {rsi_words(sig)}; {macd_words(sig)}; {ma_words(sig)}; "
        f"largest fall in the window was {sig.max_drawdown_pct:.1f}%; support is {sig.support_dist_pct:.1f}% below, "
        f"resistance {sig.resistance_dist_pct:.1f}% above; 20 days: {up} {abs(sig.momentum_20_pct):.1f}%; "
        f"patterns: {pattern_key(sig)}."
    )


def question_answers(sig: Signals, days: int) -> list[tuple[str, str]]:
    """(question, answer) pairs, one per signal family, all answered from ``sig``."""
    return [(q.question, q.answer) for q in question_specs(sig, days)]


KINDS = ("align", "instruct", "qa")
ALL_TYPES = QUESTION_TYPES + FORECAST_TYPES


def window_record(kind: str, rid: str, df, key: str, anchor: int, context: int, csv: str,
                  rng: np.random.Generator | None = None, n_turns: int = 3, qa_type: str | None = None,
                  horizon: int | None = None) -> dict:
    """One record about the window of ``context + 1`` rows of ``df`` ending at row ``anchor``.

    align: one caption; instruct: ``n_turns`` Q&A turns (questions drawn with ``rng``); qa: one
    question of ``qa_type`` with ``type`` and ``reference`` (its checkable key) for scoring.
    With ``horizon``, forecast questions (modality.stock.data.outlook) join: their answers are
    templates (``{forecast_band}``) the plugin fills from its forecaster when the record loads
    (``"fill": "stock"``); a qa record's reference comes from the ``horizon`` rows after the window.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    sig = compute_signals(df.iloc[anchor - context : anchor + 1])
    ts = df.index[anchor]
    end = str(ts.date()) if ts == ts.normalize() else ts.isoformat()  # intraday bars need their time
    rec: dict = {"id": f"{rid}-{key}-{end}", "stock": [{"csv": csv, "ticker": key, "end": end}]}
    if kind == "align":
        rec["type"] = "caption"  # scored as an exact caption: eyeball predictions.jsonl, watch val/loss
        conv = [
            {"from": "human", "value": f"{PLACEHOLDER}\nDescribe this price chart."},
            {"from": "gpt", "value": describe(sig, context)},
        ]
    elif kind == "instruct":
        qa = question_answers(sig, context)
        if horizon:
            qa += [(outlook.QUESTIONS[t], "{" + t + "}") for t in FORECAST_TYPES]
            rec["fill"] = "stock"
        rng = rng if rng is not None else np.random.default_rng(0)
        chosen = rng.choice(len(qa), size=min(n_turns, len(qa)), replace=False)
        conv = []
        for t, i in enumerate(chosen):
            q = f"{PLACEHOLDER}\n{qa[i][0]}" if t == 0 else qa[i][0]
            conv += [{"from": "human", "value": q}, {"from": "gpt", "value": qa[i][1]}]
    elif qa_type in FORECAST_TYPES:
        if not horizon:
            raise ValueError(f"{rec['id']}: a {qa_type} question needs the horizon")
        ref = outlook.realized(df["Close"].to_numpy(), anchor, horizon)[qa_type]
        rec.update(type=qa_type, reference=ref, fill="stock")
        conv = [{"from": "human", "value": f"{PLACEHOLDER}\n{outlook.QUESTIONS[qa_type]}"},
                {"from": "gpt", "value": "{" + qa_type + "}"}]
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
    exclude: list[str] | None = None,
    forecast: bool = True,
    date_format: str | None = None,
) -> list[dict]:
    """``n`` records over windows of ``split`` (series too short for the splits are skipped).

    Refs are ``{"csv": source, "ticker": key, "end": "YYYY-MM-DD"}`` with ``csv`` made absolute
    for file sources; the window ends at the anchor row of a split window, so its horizon lies
    inside the same split too. kind="qa" cycles through :data:`QUESTION_TYPES` (record ``j``
    asks type ``j % 12``, or ``j % 9`` without ``forecast`` questions), so any prefix of the file is balanced across types. ``tickers`` keeps only
    those series, ``exclude`` drops those (held-out instruments). Windows are drawn without
    replacement while the pool lasts (qa records on distinct windows where possible).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    types = ALL_TYPES if forecast else QUESTION_TYPES
    series = load_source(source, columns, date_format)
    if tickers:
        missing = sorted(set(tickers) - set(series))
        if missing:
            raise ValueError(f"{source}: no series {missing}; have {sorted(series)}")
        series = {k: series[k] for k in tickers}
    series = {k: v for k, v in series.items() if k not in set(exclude or ())}
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
    if kind == "qa" and n > len(pool):  # every window once per type cycle, then repeats
        picks = np.concatenate([rng.permutation(len(pool)) for _ in range(-(-n // len(pool)))])[:n]
    else:
        picks = rng.choice(len(pool), size=n, replace=n > len(pool))
    records = []
    for j, p in enumerate(picks):
        key, anchor = pool[p]
        qa_type = types[j % len(types)]
        records.append(window_record(kind, f"stock-{kind}-{split}-{j:06d}", series[key], key, anchor, context, csv,
                                     rng, n_turns, qa_type, horizon if forecast else None))
    return records


def write_records(records: list[dict], path: str | Path) -> Path:
    """Write records as .json (a list) or .jsonl (one per line), atomically (a kill leaves no partial file)."""
    path = Path(path)
    with atomic_open(path) as f:
        if path.suffix == ".jsonl":
            f.writelines(json.dumps(r) + "\n" for r in records)
        else:
            json.dump(records, f, indent=1)
    return path


MANIFEST = "records_manifest.json"  # what prepare_records wrote: its settings, each file's record count and digest


def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def stale_reason(out: str | Path, settings: Mapping[str, object] | None) -> str | None:
    """Why the record files in ``out`` cannot be used as they are (None: they are what ``settings`` build; with
    ``settings`` None, any intact build). Why: the folder is a derived cache; a file cut short (even at a line
    boundary, which reads as fewer records), edited, or built with other settings would otherwise be used silently."""
    out = Path(out)
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except FileNotFoundError:
        return f"no {MANIFEST} (written by an older version, or an interrupted build)"
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{MANIFEST} is damaged"
    if settings is not None and manifest.get("settings") != json.loads(json.dumps(dict(settings))):
        return f"built with other settings ({manifest.get('settings')})"
    for name, entry in manifest.get("files", {}).items():
        path = out / name
        if not path.is_file():
            return f"{name} is missing"
        if _digest(path) != entry.get("sha256"):
            return f"{name} changed since it was built (a truncated or edited file)"
    return None


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
    n_turns: int = 12,
    holdout: list[str] | None = None,
    rebuild_stale: bool = True,
) -> list[Path]:
    """Write :data:`RECORD_FILES` into ``out``: align/instruct records for each split, and
    ``n_qa`` single-question scoring records (balanced over :data:`QUESTION_TYPES`) for val/test.

    val/test get ``eval_frac`` as many records as train; every file draws from its own split.
    Instruct records ask ``n_turns`` questions about one window (a window's encoding is paid once
    for several answers). ``holdout`` tickers are left out of every file but
    ``stock_qa_heldout.jsonl`` (their test period): instruments the model never saw.

    An existing build is reused when intact and built with these settings; damaged (or older) it is rebuilt; built
    with other settings it is rebuilt only with ``rebuild_stale`` (a run that trains on it), else used as it is,
    with a warning (an evaluation never rewrites the records it was pointed at).
    """
    holdout = [str(t) for t in holdout or ()]
    settings = {"source": source, "context": context, "horizon": horizon, "n_align": n_align, "n_instruct": n_instruct,
                "eval_frac": eval_frac, "seed": seed, "n_qa": n_qa, "n_turns": n_turns, "holdout": holdout}
    reason = stale_reason(out, settings)
    if reason is not None and not rebuild_stale and stale_reason(out, None) is None:
        log.warning("%s: stock records %s; used as they are (this run trains on none of them)", out, reason)
        reason = None
    if reason is None:
        files = json.loads((Path(out) / MANIFEST).read_text())["files"]
        return [Path(out) / name for name in files]
    if (Path(out) / MANIFEST).exists() or any((Path(out) / f).exists() for f in RECORD_FILES):
        log.warning("%s: rebuilding the stock records: %s", out, reason)
    (Path(out) / MANIFEST).unlink(missing_ok=True)  # a build killed half-way leaves no manifest: rebuilt next time
    paths = []
    for kind, n in (("align", n_align), ("instruct", n_instruct)):
        for split in ("train", "val", "test"):
            count = n if split == "train" else max(1, int(n * eval_frac))
            recs = build_records(source, context, horizon, split, kind, count, n_turns=n_turns, seed=seed, exclude=holdout)
            paths.append(write_records(recs, Path(out) / f"stock_{kind}_{split}.jsonl"))
    for split in ("val", "test"):
        recs = build_records(source, context, horizon, split, "qa", n_qa, seed=seed, exclude=holdout)
        paths.append(write_records(recs, Path(out) / f"stock_qa_{split}.jsonl"))
    if holdout:
        recs = build_records(source, context, horizon, "test", "qa", n_qa, seed=seed, tickers=holdout)
        paths.append(write_records(recs, Path(out) / "stock_qa_heldout.jsonl"))
    files = {p.name: {"records": sum(1 for _ in open(p, "rb")), "sha256": _digest(p)} for p in paths}
    write_json(Path(out) / MANIFEST, {"settings": settings, "files": files})
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
    ap.add_argument("--n-turns", type=int, default=12)
    ap.add_argument("--holdout", nargs="*", default=None, help="tickers left out of training (their own qa file)")
    a = ap.parse_args(argv)
    for p in prepare_records(a.out, a.source, a.context, a.horizon, a.n_align, a.n_instruct, seed=a.seed, n_qa=a.n_qa,
                             n_turns=a.n_turns, holdout=a.holdout):
        print(p)


if __name__ == "__main__":
    main()
