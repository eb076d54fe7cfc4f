"""Captions and Q&A records about price windows: derived from signals, refs that load."""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest

from modality.stock.data.prices import load_packaged, split_bounds
from modality.stock.data.signals import compute_signals
from modality.stock.data.text import (
    RECORD_FILES,
    build_records,
    describe,
    prepare_records,
    question_answers,
    trend_words,
    write_records,
)
from modality.stock.plugin import StockModality


def test_caption_reflects_signals():
    df = load_packaged()["AAPL_2000"]
    sig = compute_signals(df.loc["2008-01-01":"2008-12-31"])  # the 2008 crash
    text = describe(sig, len(df.loc["2008-01-01":"2008-12-31"]) - 1, "AAPL_2000")
    assert text.startswith("AAPL_2000 over the last")
    assert "downtrend" in text and f"{sig.change_pct:+.1f}%" in text and "RSI(14)" in text
    assert trend_words(dataclasses.replace(sig, trend_slope=0.5, trend_r2=0.9, change_pct=40.0)) == "strong uptrend"
    # slope and endpoints disagree -> no trend claimed
    assert trend_words(dataclasses.replace(sig, trend_slope=-0.2, trend_r2=0.3, change_pct=0.3)) == "sideways"
    qa = dict(question_answers(dataclasses.replace(sig, rsi_14=80.0), 250))
    assert "overbought" in qa["Is it overbought or oversold?"]


def test_records_refs_load_and_stay_in_split(tmp_path):
    recs = build_records(context=64, horizon=5, split="test", kind="instruct", n=5, n_turns=2, seed=1)
    assert len(recs) == 5
    m = StockModality(d_llm=None, context=64, horizon=5, patch_len=8, stride=4, d_model=16, n_heads=2, n_layers=1, d_ff=16)
    series = load_packaged()
    for r in recs:
        (ref,) = r["stock"]
        conv = r["conversations"]
        assert [c["from"] for c in conv] == ["human", "gpt"] * 2
        assert sum(c["value"].count("<stock>") for c in conv) == 1
        w = m.load(ref)
        df = series[ref["ticker"]]
        row = df.index.get_loc(pd.Timestamp(ref["end"]))
        lo, hi = split_bounds(len(df), 64, 5)["test"]
        assert lo + 64 <= row and row + 5 < hi  # inputs and the horizon inside the test segment
        assert w.index[-1] == pd.Timestamp(ref["end"])
    path = write_records(recs, tmp_path / "r.jsonl")
    assert [json.loads(line) for line in path.read_text().splitlines()] == recs
    align = build_records(context=64, horizon=5, n=2, kind="align")
    assert align[0]["conversations"][1]["value"] == describe(compute_signals(m.load(align[0]["stock"][0])), 64, None)
    with pytest.raises(ValueError, match="kind must be"):
        build_records(kind="chat")


def test_prepare_records_writes_every_split(tmp_path):
    paths = prepare_records(tmp_path, context=64, horizon=5, n_align=3, n_instruct=2, eval_frac=0.5)
    assert sorted(p.name for p in paths) == sorted(RECORD_FILES)  # no holdout: no heldout file
    counts = {p.name: len(p.read_text().splitlines()) for p in paths}
    assert counts["stock_align_train.jsonl"] == 3 and counts["stock_align_test.jsonl"] == 1
    assert all("-test-" in json.loads(line)["id"] for line in (tmp_path / "stock_instruct_test.jsonl").read_text().splitlines())


def test_every_answer_and_the_plugins_reading_state_the_scored_key():
    """The reading after the embeddings carries each question's key in the answer's words, so the LLM can
    copy it; a reading or an answer that drifts from the key fails here."""
    from modality.stock.data.text import QUESTION_TYPES, question_specs, reading
    from tasks.evaluate import answer_correct

    series = load_packaged()
    seen: dict[str, set[str]] = {t: set() for t in QUESTION_TYPES}
    for key in ("AAPL_2000", "IBM_2000", "NVDA_2013"):
        df = series[key]
        for end in range(300, len(df), 97):
            sig = compute_signals(df.iloc[end - 256 : end + 1])
            text = reading(sig, 256)
            for q in question_specs(sig, 256):
                assert answer_correct(q.key, q.answer), (q.key, q.answer)
                assert answer_correct(q.key, text), (q.key, text)
                seen[q.type].add(q.key)
    # keys of one type differ across windows (a constant key would make the check vacuous)
    assert all(len(v) >= 2 for v in seen.values()), seen
    # ... and a wrong key is not found in the reading
    sig = compute_signals(series["AAPL_2000"].iloc[:257])
    wrong = {"which is overbought", "which is oversold", "which is neutral"} - {question_specs(sig, 256)[2].key}
    assert not any(answer_correct(k, reading(sig, 256)) for k in wrong)


def test_heldout_tickers_stay_out_of_training_and_get_their_own_file(tmp_path):
    paths = prepare_records(tmp_path, context=64, horizon=5, n_align=20, n_instruct=20, eval_frac=0.5, n_qa=18,
                            holdout=["NVDA_2013"])
    assert "stock_qa_heldout.jsonl" in {p.name for p in paths}
    for p in paths:
        tickers = {json.loads(line)["stock"][0]["ticker"] for line in p.read_text().splitlines()}
        assert tickers == {"NVDA_2013"} if p.name == "stock_qa_heldout.jsonl" else "NVDA_2013" not in tickers, p.name
    with pytest.raises(ValueError, match="no series"):
        build_records(tickers=["NOPE_1999"], n=1)


def test_the_record_folder_is_rebuilt_when_damaged_or_built_otherwise_and_reused_when_current(tmp_path, caplog):
    """A derived cache: a file cut at a line boundary reads as fewer records, so only its digest can tell."""
    from modality.stock.data.text import MANIFEST, stale_reason

    kw = dict(context=64, horizon=5, n_align=4, n_instruct=2, eval_frac=0.5, n_qa=12)
    paths = prepare_records(tmp_path, **kw)
    train = tmp_path / "stock_align_train.jsonl"
    stamp = {p.name: p.stat().st_mtime_ns for p in paths}
    assert prepare_records(tmp_path, **kw) == paths  # current: nothing rewritten
    assert {p.name: p.stat().st_mtime_ns for p in paths} == stamp
    lines = train.read_text().splitlines(keepends=True)
    train.write_text("".join(lines[:2]))  # cut at a line boundary: still valid JSONL
    with caplog.at_level("WARNING"):
        prepare_records(tmp_path, **kw)
    assert "stock_align_train.jsonl changed since it was built" in caplog.text
    assert train.read_text().splitlines(keepends=True) == lines  # rebuilt, the same records
    prepare_records(tmp_path, **{**kw, "n_align": 6})  # other settings: rebuilt with them
    assert len(train.read_text().splitlines()) == 6
    (tmp_path / MANIFEST).unlink()  # a folder from an older version (or a build killed half-way)
    assert "no records_manifest.json" in stale_reason(tmp_path, {})
    prepare_records(tmp_path, **kw)
    assert len(train.read_text().splitlines()) == 4 and (tmp_path / MANIFEST).is_file()
