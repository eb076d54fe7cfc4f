"""Stock scoring records (qa keys), eval records from any CSV, and the window written as text."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pandas as pd
import pytest

from modality.stock.data.prices import load_packaged
from modality.stock.data.datamodule import StockConversationDataModule, as_text_record, csv_records, render_window
from modality.stock.data.signals import compute_signals
from modality.stock.data.text import QUESTION_TYPES, build_records, question_specs
from modality.stock.plugin import StockModality
from tasks.evaluate import answer_correct
from modality.stock.baselines import TextBaselineSpec, majority

CONTEXT = 64


@pytest.fixture(scope="module")
def windows():
    df = load_packaged()["AAPL_2000"]
    return [df.iloc[e - CONTEXT : e + 1] for e in range(CONTEXT, len(df), 97)]


def test_every_key_is_found_in_its_own_answer(windows):
    for w in windows:
        for q in question_specs(compute_signals(w), CONTEXT):
            assert answer_correct(q.key, q.answer), (q.type, q.key, q.answer)


def test_keys_of_other_categories_never_match(windows):
    sig = compute_signals(windows[0])
    strong = dataclasses.replace(sig, trend_slope=0.5, trend_r2=0.9, change_pct=40.0)
    mild = dataclasses.replace(sig, trend_slope=0.2, trend_r2=0.5, change_pct=10.0)
    by = {s: {q.type: q for q in question_specs(s, CONTEXT)} for s in (strong, mild)}
    assert by[strong]["trend"].key == "trend: strong uptrend" and by[mild]["trend"].key == "trend: uptrend"
    assert not answer_correct(by[mild]["trend"].key, by[strong]["trend"].answer)
    assert not answer_correct(by[strong]["trend"].key, by[mild]["trend"].answer)
    down = {q.type: q for q in question_specs(dataclasses.replace(sig, momentum_20_pct=-5.34), CONTEXT)}
    up = {q.type: q for q in question_specs(dataclasses.replace(sig, momentum_20_pct=5.34), CONTEXT)}
    assert down["momentum"].key == "down 5" and up["momentum"].key == "up 5"
    assert not answer_correct(up["momentum"].key, down["momentum"].answer)  # the sign is part of the key
    # a rounding carry: 12.97 prints as 13.0, so the key says 13
    dd = {q.type: q for q in question_specs(dataclasses.replace(sig, max_drawdown_pct=12.97), CONTEXT)}
    assert dd["drawdown"].key.endswith("was 13") and answer_correct(dd["drawdown"].key, dd["drawdown"].answer)


def test_qa_records_cycle_types_with_their_keys():
    recs = build_records(context=CONTEXT, horizon=5, split="test", kind="qa", n=2 * len(QUESTION_TYPES), seed=3,
                         forecast=False)
    assert [r["type"] for r in recs] == list(QUESTION_TYPES) * 2
    m = StockModality(d_llm=None, context=CONTEXT, horizon=5, patch_len=8, stride=4, d_model=16, n_heads=2, n_layers=1, d_ff=16)
    for r in recs[:8]:
        sig = compute_signals(m.load(r["stock"][0]))
        spec = {q.type: q for q in question_specs(sig, CONTEXT)}[r["type"]]
        assert r["reference"] == spec.key and r["conversations"][1]["value"] == spec.answer
        assert r["conversations"][0]["value"] == f"<stock>\n{spec.question}"


def test_render_window_states_the_numbers(windows):
    w = windows[3]
    sig = compute_signals(w)
    text = render_window(w, n_closes=5)
    closes = ", ".join(f"{c:.2f}" for c in w["Close"].iloc[-5:])
    assert f"(oldest first): {closes}." in text and str(w.index[-1].date()) in text
    assert f"RSI(14) {sig.rsi_14:.1f}" in text and f"max drawdown {sig.max_drawdown_pct:.1f}%" in text
    assert f"{sig.support_dist_pct:.1f}% below the last close" in text and f"momentum {sig.momentum_20_pct:+.1f}%" in text
    assert "Signals" not in render_window(w, n_closes=5, signals=False)


def test_as_text_record_replaces_placeholders(windows):
    rec = {"id": "r1", "where": "f.jsonl:3", "stock": ["A", "B"], "type": "rsi", "reference": "which is neutral",
           "conversations": [{"from": "human", "value": "<stock>\nvs\n<stock>\nWhich?"}, {"from": "gpt", "value": "x"}]}
    loaded = []
    out = as_text_record(rec, lambda ref, root: loaded.append(ref) or windows[0 if ref == "A" else 1], n_closes=3)
    assert loaded == ["A", "B"] and "stock" not in out and out["reference"] == rec["reference"]
    first, second = render_window(windows[0], 3), render_window(windows[1], 3)
    assert out["conversations"][0]["value"] == f"{first}\nvs\n{second}\nWhich?"
    with pytest.raises(ValueError, match=r"f.jsonl:3: more <stock> placeholders"):
        as_text_record(dict(rec, stock=["A"]), lambda ref, root: windows[0])
    with pytest.raises(ValueError, match=r"f.jsonl:3: 1 stock ref\(s\) without"):
        as_text_record(dict(rec, stock=["A", "B", "C"]), lambda ref, root: windows[0])


def _write_csv(path, n):
    df = load_packaged()["MSFT_2000"].iloc[-n:].reset_index()
    df.to_csv(path, index=False)
    return df


def test_csv_records_cover_the_file_and_load(tmp_path):
    df = _write_csv(tmp_path / "my.csv", 150)
    recs = csv_records(tmp_path / "my.csv", CONTEXT, n_windows=3)
    assert len(recs) == 3 * len(QUESTION_TYPES) and [r["type"] for r in recs[:len(QUESTION_TYPES)]] == list(QUESTION_TYPES)
    ends = sorted({r["stock"][0]["end"] for r in recs})
    assert ends[0] == str(df["Date"].iloc[CONTEXT].date()) and ends[-1] == str(df["Date"].iloc[-1].date())
    m = StockModality(d_llm=None, context=CONTEXT, patch_len=8, stride=4, d_model=16, n_heads=2, n_layers=1, d_ff=16)
    w = m.load(recs[-1]["stock"][0])
    assert len(w) == CONTEXT + 1 and w.index[-1] == pd.Timestamp(ends[-1])
    _write_csv(tmp_path / "short.csv", 40)
    with pytest.raises(ValueError, match=r"short.csv\[short\]: 40 rows is too short"):
        csv_records(tmp_path / "short.csv", CONTEXT)


def test_datamodule_csv_replaces_eval_records(tmp_path):
    _write_csv(tmp_path / "my.csv", 120)
    out = tmp_path / "run" / "csv_eval.jsonl"
    stock = SimpleNamespace(read_record=lambda line, where, rng: None)  # records name their series under "stock"
    dm = StockConversationDataModule(None, {"stock": stock}, {}, eval_manifest=str(tmp_path / "absent.jsonl"), csv=str(tmp_path / "my.csv"),
                                     csv_records=str(out), csv_windows=2, context=CONTEXT,
                                     text_baseline={"zero_shot": True})
    dm.prepare_data()
    assert dm.files["eval"] == [str(out)] and len(dm.records("eval")) == 2 * len(QUESTION_TYPES)
    assert json.loads(out.read_text().splitlines()[0])["type"] == "trend"
    assert dm.text_baseline == {"zero_shot": True}
    with pytest.raises(ValueError, match="absent.jsonl: data file not found"):
        StockConversationDataModule(None, {}, {}, eval_manifest=str(tmp_path / "absent.jsonl")).prepare_data()


def test_majority_and_spec():
    m = majority(["a", "a", "a", "b"], ["x", "x", "y", "z"])
    assert m["accuracy/a"] == round(2 / 3, 4) and m["accuracy/b"] == 1.0
    with pytest.raises(ValueError, match="n_closes"):
        TextBaselineSpec(n_closes=0)


def test_datamodule_rebuilds_a_damaged_record_folder_of_its_own_but_never_calls_prepare_for_a_users_files(tmp_path):
    from functools import partial

    from modality.stock.data.text import prepare_records

    calls = []
    n_align = {"n": 3}

    def prepare(rebuild_stale: bool = True) -> None:
        calls.append(rebuild_stale)
        partial(prepare_records, tmp_path / "rec", context=CONTEXT, horizon=5, n_align=n_align["n"], n_instruct=2,
                eval_frac=0.5, n_qa=12)(rebuild_stale=rebuild_stale)

    train = tmp_path / "rec" / "stock_align_train.jsonl"
    dm = StockConversationDataModule(None, {}, {}, train_files=str(train), prepare=prepare)
    dm.prepare_data()  # missing: built
    train.write_text(train.read_text().splitlines(keepends=True)[0])  # cut to one record
    StockConversationDataModule(None, {}, {}, train_files=str(train), prepare=prepare).prepare_data()
    assert len(train.read_text().splitlines()) == 3 and len(calls) == 2
    own = tmp_path / "mine.jsonl"
    own.write_text(train.read_text())
    StockConversationDataModule(None, {}, {}, train_files=str(own), prepare=prepare).prepare_data()
    assert len(calls) == 2
    n_align["n"] = 5  # other settings: an evaluation pointed at the folder uses it as it is; a training run rebuilds
    test = tmp_path / "rec" / "stock_qa_test.jsonl"
    before = test.read_text()
    StockConversationDataModule(None, {}, {}, eval_manifest=str(test), prepare=prepare).prepare_data()
    assert calls[-1] is False and test.read_text() == before and len(train.read_text().splitlines()) == 3
    StockConversationDataModule(None, {}, {}, train_files=str(train), prepare=prepare).prepare_data()
    assert calls[-1] is True and len(train.read_text().splitlines()) == 5
