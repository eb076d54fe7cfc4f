"""Real speech from a shipped recording (modality/speech/corpus/real.py): utterances cut by their transcript times."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
import soundfile as sf

from modality.speech.corpus.real import MEMBER, build_real, read_stm


def test_read_stm_reads_utterances_and_names_a_bad_line():
    rows = read_stm("s 1 Ann 0.5 1.25 Hello there.\n;; a comment\n\ns 1 Bob 2 3 Hi?\n", "x.stm")
    assert [(r["speaker"], r["start"], r["end"], r["text"]) for r in rows] == [("Ann", 0.5, 1.25, "Hello there."),
                                                                             ("Bob", 2.0, 3.0, "Hi?")]
    with pytest.raises(ValueError, match=r"x.stm:2: not an STM line"):
        read_stm("s 1 Ann 0.5 1.25 ok\ns 1 Bob two 3 Hi\n", "x.stm")
    with pytest.raises(ValueError, match=r"x.stm:1: an utterance needs words and end > start"):
        read_stm("s 1 Ann 2 1 backwards\n", "x.stm")


def test_build_cuts_each_utterance_from_the_wheels_recording(tmp_path):
    sr = 16000
    wave = np.zeros(4 * sr, dtype=np.float32)
    wave[sr:2 * sr] = 0.5  # the first utterance is the only loud second
    buf = io.BytesIO()
    sf.write(buf, wave, sr, format="WAV", subtype="PCM_16")
    sources = tmp_path / "sources"
    sources.mkdir()
    with zipfile.ZipFile(sources / "pyannote_audio-4.0.7-py3-none-any.whl", "w") as z:  # read as a zip, never imported
        z.writestr(f"{MEMBER}.wav", buf.getvalue())
        z.writestr(f"{MEMBER}.stm", "sample 1 Diane 1.0 2.0 Oh, hello.\nsample 1 Sheila 2.5 3.5 Neither did I.\n")
    rows = build_real(tmp_path / "out", sources)
    lines = [json.loads(x) for x in (tmp_path / "out" / "eval.jsonl").read_text().splitlines()]
    assert lines == rows and [r["text"] for r in rows] == ["Oh, hello.", "Neither did I."]
    assert rows[0]["gender"] == "female" and rows[0]["id"] == "real-sample-000"
    clip, got_sr = sf.read(tmp_path / "out" / rows[0]["audio_filepath"])
    assert got_sr == sr and len(clip) == pytest.approx(1.2 * sr, abs=2)  # 1 s and a 0.1 s margin each side
    assert abs(clip[int(0.1 * sr):int(1.1 * sr)]).min() > 0.4 and abs(clip[:int(0.09 * sr)]).max() == 0
