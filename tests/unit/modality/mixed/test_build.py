"""modality.mixed.build: cross-modal conversations whose gold comes from the real window and the spoken claim."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import soundfile as sf

from modality.mixed.build import CLAIMS, QUESTION, main
from modality.speech.corpus.tts import HELD_OUT_VOICES
from modality.stock.data.prices import load_packaged


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("mixed")
    main(["--out", str(out), "--n", "10", "--n-eval", "4", "--context", "64", "--jobs", "1"])
    return out, {s: [json.loads(x) for x in (out / f"agree_{s}.jsonl").read_text().splitlines()] for s in ("train", "eval")}


def test_every_record_holds_a_clip_and_a_window_and_its_gold_is_the_windows_real_move(built):
    out, recs = built
    assert len(recs["train"]) == 10 and len(recs["eval"]) == 4
    series = load_packaged()
    for r in recs["train"] + recs["eval"]:
        assert r["conversations"][0]["value"] == QUESTION and r["type"] == "agree"
        (clip,), (window,) = r["speech"], r["stock"]
        wav, sr = sf.read(out / clip)
        assert sr == 16_000 and len(wav) / sr == pytest.approx(r["duration"], abs=1e-3)
        assert r["meta"]["claim_text"] in CLAIMS[r["meta"]["claim"]]
        close = series[window["ticker"]]["Close"]
        t = close.index.get_loc(window["end"])
        ret = close.iloc[t] / close.iloc[t - 21] - 1  # recomputed here from the packaged series
        assert t >= 64 and abs(ret) >= 0.02 and ret == pytest.approx(r["meta"]["return"], abs=1e-4)
        gold = "yes" if (ret > 0) == (r["meta"]["claim"] == "up") else "no"
        assert r["answers"] == [gold] and r["conversations"][1]["value"].lower().startswith(gold)


def test_splits_are_time_disjoint_use_held_out_voices_and_both_answers_occur(built):
    _, recs = built
    last_train: dict[str, str] = {}
    for r in recs["train"]:
        w = r["stock"][0]
        last_train[w["ticker"]] = max(last_train.get(w["ticker"], ""), w["end"])
    for r in recs["eval"]:  # eval windows come from the test segment: after every train window of that series
        w = r["stock"][0]
        assert w["end"] > last_train.get(w["ticker"], "")
    assert {r["meta"]["voice"] for r in recs["eval"]} <= set(HELD_OUT_VOICES)
    assert not {r["meta"]["voice"] for r in recs["train"]} & set(HELD_OUT_VOICES)
    assert Counter(r["answers"][0] for r in recs["train"]).keys() == {"yes", "no"}
    assert len({r["stock"][0]["ticker"] for r in recs["train"]}) >= 5  # cycles through the tickers
