"""Sentence extraction rules and a tiny espeak-ng corpus build (real TTS, a few clips)."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from modality.speech.corpus import sentences as S
from data.jsonl import read_jsonl
from modality.speech.corpus import tts as T

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed (apt-get install espeak-ng)")
needs_fortunes = pytest.mark.skipif(not S.FORTUNE_DIR.is_dir(), reason="apt-get install fortunes fortunes-min")

FORTUNE_TEXT = """\
The early bird gets the worm, but the second mouse gets the cheese.
	-- Steven Wright
%
A fool and his money are soon parted. Then there were 3 of them left.
%
Never put off until tomorrow what you can do the day after tomorrow.
   ~ Mark Twain
%
Use the NASA procedure for everything you do at work.
%
Too short here.
%
And the want Of thought is death, Am not I A fly like thee?
%
Ask Mr. Jones about it. He said "hello" to everyone he met in the town.
%
Wrapped lines are
joined into one sentence before splitting.
%
A fool and his money are soon parted.
"""


def test_clean_sentence_rules() -> None:
    ok = S.clean_sentence("Courage is your greatest present need.")
    assert ok == "Courage is your greatest present need."
    assert S.clean_sentence("Don't get even  --  get odd, my friend!") == "Don't get even, get odd, my friend!"
    rejected = [
        "There were 3 of them in the room.",  # digit
        "Use the NASA procedure for everything you do.",  # acronym
        'He said "hello" to everyone he met.',  # quotes
        "Too short here.",  # < 5 words
        "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen.",  # lowercase start, > 14
        "This sentence has no final punctuation mark",
        "And the want Of thought is death, Am not I A fly like thee?",  # verse casing
        "Caf\u00e9 society is full of very odd people.",  # non-ASCII
        "I went to see the famous Mr.",  # abbreviation split
    ]
    for s in rejected:
        assert S.clean_sentence(s) is None, s


def test_extract_sentences_drops_attributions_and_splits() -> None:
    got = S.extract_sentences(FORTUNE_TEXT)
    assert "The early bird gets the worm, but the second mouse gets the cheese." in got
    assert "Never put off until tomorrow what you can do the day after tomorrow." in got
    assert "Wrapped lines are joined into one sentence before splitting." in got
    assert "A fool and his money are soon parted." in got  # first sentence kept, "3" one dropped
    assert not any("Twain" in s or "Wright" in s or re.search(r"\d", s) for s in got)
    for s in got:
        assert S.MIN_WORDS <= len(s.split()) <= S.MAX_WORDS and s.isascii()


def test_load_sentences_dedup_deterministic_and_missing_source(tmp_path: Path) -> None:
    (tmp_path / "wisdom").write_text(FORTUNE_TEXT)
    (tmp_path / "wisdom.dat").write_bytes(b"\x00\x01")  # index files are ignored
    (tmp_path / "ascii-art").write_text("Pictures are excluded from the sentence list entirely.\n")
    a = S.load_sentences(tmp_path, seed=1, min_count=1)
    assert a == S.load_sentences(tmp_path, seed=1, min_count=1)
    assert sorted(a) == sorted(set(a)) and len(a) == 4  # "A fool..." appears twice in the file
    assert "Pictures are excluded from the sentence list entirely." not in a
    assert sorted(S.load_sentences(tmp_path, seed=2, min_count=1)) == sorted(a)
    with pytest.raises(FileNotFoundError, match=r"apt-get install fortunes"):
        S.load_sentences(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"only 4 sentences.*apt-get install fortunes"):
        S.load_sentences(tmp_path, min_count=100)


def test_split_sentences_disjoint() -> None:
    pools = S.split_sentences([f"s{i}" for i in range(100)], eval_fraction=0.1, val_fraction=0.05)
    assert [len(pools[k]) for k in ("train", "val", "eval")] == [85, 5, 10]
    assert not set(pools["train"]) & (set(pools["val"]) | set(pools["eval"]))


@needs_fortunes
def test_real_fortune_source_is_large_and_clean() -> None:
    got = S.load_sentences()
    assert len(got) >= 5000
    for s in got:
        assert s.isascii() and not re.search(r"[0-9\"();:&/*]", s), s
        assert S.MIN_WORDS <= len(s.split()) <= S.MAX_WORDS


def test_wordnet_examples_cleaned_deduplicated_and_excluding(tmp_path: Path) -> None:
    gloss = ('00001740 03 n 01 entity 0 000 | that which is perceived; "the draft gave me a cold"; '
             '"The draft gave me a cold."; "a 10% rise"; "tax the rich"\n')
    (tmp_path / "data.noun").write_text("  1 This software and database is being provided\n" + gloss)
    (tmp_path / "data.verb").write_text('00002000 29 v 01 run 0 000 | move fast; "she ran to the store in the rain"\n')
    for pos in ("adj", "adv"):
        (tmp_path / f"data.{pos}").write_text("")
    got = S.wordnet_examples(tmp_path)
    # capitalised + full stop added, deduplicated across case, digits and two-word quotes dropped, license skipped
    assert sorted(got) == ["She ran to the store in the rain.", "The draft gave me a cold."]
    assert S.wordnet_examples(tmp_path, exclude=["THE DRAFT GAVE ME A COLD."]) == ["She ran to the store in the rain."]
    with pytest.raises(FileNotFoundError, match="apt-get install wordnet-base"):
        S.wordnet_examples(tmp_path / "missing")


def test_wordnet_definitions_are_the_gloss_heads_without_quotes(tmp_path: Path) -> None:
    (tmp_path / "data.noun").write_text(
        "  1 This software and database is being provided\n"
        '00001740 03 n 01 entity 0 000 | a tangible and visible entity of the world; "the draft gave me a cold"\n'
        '00001741 03 n 01 cat 0 000 | a small domesticated carnivorous mammal; a pet\n'
        '00001742 03 n 01 x 0 000 | "quoted" head of a gloss with a quote\n'
        '00001743 03 n 01 y 0 000 | too short here\n')
    for pos in ("verb", "adj", "adv"):
        (tmp_path / f"data.{pos}").write_text("")
    got = S.wordnet_examples(tmp_path, part="definitions")
    # only the part before the first ';', capitalised + full stop; quoted heads and short heads dropped
    assert sorted(got) == ["A small domesticated carnivorous mammal.", "A tangible and visible entity of the world."]
    assert S.wordnet_examples(tmp_path) == ["The draft gave me a cold."]  # the examples part: quotes only
    with pytest.raises(ValueError, match="part must be"):
        S.wordnet_examples(tmp_path, part="glosses")


@pytest.mark.skipif(not Path("/usr/share/wordnet/data.noun").is_file(), reason="wordnet-base (make install) missing")
def test_real_wordnet_source_is_large_and_disjoint_from_held_out_text() -> None:
    pools = S.split_sentences(S.load_sentences())
    held_out = {s.lower() for s in pools["eval"] + pools["val"]}
    got = S.wordnet_examples(exclude=held_out)
    assert len(got) > 20000 and not held_out & {s.lower() for s in got}
    assert all(S.clean_sentence(s) == s for s in got[:500])
    defs = S.wordnet_examples(exclude=held_out, part="definitions")
    assert len(defs) > 50000 and not {s.lower() for s in defs} & held_out
    assert all(S.clean_sentence(s) == s for s in defs[:500])


def test_classes_and_spec_validation() -> None:
    assert [T.pitch_class(p) for p in (0, 25, 26, 74, 75, 99)] == ["low", "low", "medium", "medium", "high", "high"]
    assert [T.speed_class(s) for s in (100, 130, 131, 219, 220)] == ["slow", "slow", "normal", "normal", "fast"]
    spec = T.ClipSpec("Hello there my old friend.", "en-gb-scotland", "f2", 80, 120)
    assert spec.labels() == {"pitch_class": "high", "speed_class": "slow", "accent": "Scottish English",
                             "accent_region": "British", "gender": "female"}
    assert spec.key != T.ClipSpec("Hello there my old friend.", "en-gb-scotland", "f2", 81, 120).key
    for bad in ({"voice": "xx"}, {"variant": "zz"}, {"pitch": 100}, {"speed": 50}, {"text": " "}):
        kw = {"text": "Hello there my old friend."} | bad
        with pytest.raises(ValueError):
            T.ClipSpec(**kw)


def test_median_f0_of_a_harmonic_tone() -> None:
    sr, f0 = 16000, 150.0
    t = np.arange(sr) / sr
    wav = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in (1, 2, 3)).astype(np.float32)
    assert abs(T.median_f0(wav, sr) - f0) < 3
    assert np.isnan(T.median_f0(np.zeros(sr, np.float32), sr))


def test_read_manifest_bad_line_names_file(tmp_path: Path) -> None:
    p = tmp_path / "m.jsonl"
    p.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(ValueError, match=r"m\.jsonl:2"):
        read_jsonl(p)


SENTS = {
    "train": ["The cat sat on the warm mat.", "A friend is a present you give yourself.", "Too much is not enough for anyone."],
    "val": ["Courage is your greatest present need."],
    "eval": ["The only winning move is not to play.", "Harp not on that string again."],
}


@needs_espeak
def test_tiny_corpus_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stats = T.build_corpus(tmp_path, 6, SENTS, jobs=1, seed=3, eval_fraction=0.34, val_fraction=0.17)
    assert (stats["train"], stats["val"], stats["eval"], stats["failed"]) == (3, 1, 2, 0)
    rows = {s: read_jsonl(tmp_path / f"{s}.jsonl") for s in ("train", "val", "eval")}
    for split, rs in rows.items():
        for r in rs:
            assert r["split"] == split and r["text"] in SENTS[split]
            wav, sr = sf.read(tmp_path / r["audio_filepath"], dtype="float32")
            info = sf.info(tmp_path / r["audio_filepath"])
            assert sr == 16000 and info.channels == 1 and info.subtype == "PCM_16"
            assert abs(len(wav) / sr - r["duration"]) < 1e-3 and r["duration"] > 0.5
            assert r["pitch_class"] == T.pitch_class(r["pitch"]) and r["speed_class"] == T.speed_class(r["speed"])
            assert r["accent"] == T.VOICES[r["voice"]][0]
            assert r["gender"] == T.VARIANTS["" if r["variant"] == "default" else r["variant"]]
    train_voices = {r["voice"] for r in rows["train"] + rows["val"]}
    assert {r["voice"] for r in rows["eval"]} <= set(T.HELD_OUT_VOICES)
    assert not train_voices & set(T.HELD_OUT_VOICES)
    assert not {r["variant"] for r in rows["train"]} & set(T.HELD_OUT_VARIANTS)
    plan = T.split_voices()  # the plan itself, not just this small sample
    assert not set(plan["train"][0] + plan["val"][0]) & set(plan["eval"][0])
    assert set(plan["eval"][0]) == set(T.HELD_OUT_VOICES)

    # Idempotent: a re-run synthesises nothing (files untouched); a failing clip is skipped and counted.
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.wav")}
    calls = []
    monkeypatch.setattr(T, "synthesize", lambda spec, path: calls.append(spec))
    assert T.build_corpus(tmp_path, 6, SENTS, jobs=1, seed=3, eval_fraction=0.34, val_fraction=0.17)["train"] == 3
    assert not calls and mtimes == {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.wav")}

    def fail(spec: T.ClipSpec, path: Path) -> None:
        raise T.TTSError(f"boom {spec.text}")

    monkeypatch.setattr(T, "synthesize", fail)
    stats = T.build_corpus(tmp_path, 6, SENTS, jobs=1, seed=4, eval_fraction=0.34, val_fraction=0.17)
    assert stats["failed"] == 6 and stats["train"] == 0 and "boom" in stats["errors"][0]
    assert stats["pruned"] == 6  # the seed-3 clips are no longer referenced


@needs_espeak
def test_synthesize_many_parallel_matches_params(tmp_path: Path) -> None:
    rng = random.Random(0)
    specs = [T.sample_spec("Pack my box with five dozen liquor jugs.", rng, ["en-us"], ["", "f2"]) for _ in range(8)]
    specs[0] = T.ClipSpec("Pack my box with five dozen liquor jugs.", "en-us", "", 50, 100)
    specs[1] = T.ClipSpec("Pack my box with five dozen liquor jugs.", "en-us", "", 50, 300)
    metas, errors = T.synthesize_many(specs, [tmp_path / f"{i}.wav" for i in range(8)], jobs=2)
    assert not errors and all(m is not None for m in metas)
    assert metas[0]["duration"] > 1.8 * metas[1]["duration"]  # slow speech is longer
    json.dumps(metas)  # plain, serialisable values
