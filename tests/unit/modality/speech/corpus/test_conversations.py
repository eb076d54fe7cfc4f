"""Instruct conversations: placeholders, gold answers from constructed metadata, types, CLI build."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import pytest

from modality.speech.corpus import conversations as C
from modality.speech.corpus.tts import HELD_OUT_VOICES, VOICES, pitch_class, speed_class

TEXTS = ["The cat sat on the warm mat.", "Don't get even, get odd, my friend!", "Round up to the nearest half-year.",
         "A friend is a present you give yourself.", "Harp not on that string.", "Too much is not enough."]


def _pool(n: int = 60, seed: int = 0, voices=("en-us", "en-gb", "en-029")) -> list[dict]:
    """Manifest-like rows with consistent labels (no audio needed)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        text, voice, variant = rng.choice(TEXTS), rng.choice(voices), rng.choice(["default", "m3", "f2"])
        pitch, speed = rng.choice([10, 50, 90]), rng.choice([110, 175, 260])
        f0 = (100 if variant != "f2" else 200) + pitch  # monotone in pitch for one speaker
        rows.append({"audio_filepath": f"wavs/{i}.wav", "text": text, "duration": len(C.words(text)) * 60 / speed,
                     "voice": voice, "variant": variant, "pitch": pitch, "speed": speed,
                     "pitch_class": pitch_class(pitch), "speed_class": speed_class(speed),
                     "accent": VOICES[voice][0], "accent_region": VOICES[voice][1],
                     "gender": "female" if variant == "f2" else "male", "f0_hz": float(f0)})
    return rows


def _arith(n: int = 20) -> list[dict]:
    out = []
    for i in range(n):
        p = C.make_problem(random.Random(i))
        out.append({"audio_filepath": f"wavs/arith{i}.wav", "text": p.text, "answer": p.answer, "duration": 2.0,
                    "voice": "en-us", "variant": "m3", "pitch": 50, "speed": 175, "pitch_class": "medium",
                    "speed_class": "normal", "accent": "American English", "accent_region": "American",
                    "gender": "male", "f0_hz": 150.0})
    return out


def test_number_words_and_word_count() -> None:
    assert [C.number_words(n) for n in (0, 13, 40, 44, 100, 144)] == [
        "zero", "thirteen", "forty", "forty four", "one hundred", "one hundred and forty four"]
    with pytest.raises(ValueError):
        C.number_words(1000)
    assert C.words("Don't get even, get odd, my half-year friend!") == ["Don't", "get", "even", "get", "odd", "my", "half-year", "friend"]


def test_make_problem_answers_are_right() -> None:
    value = {C.number_words(n): n for n in range(201)}
    ops = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b, "divided by": lambda a, b: a / b}
    pattern = re.compile(r"([a-z ]+?) (plus|minus|times|divided by) ([a-z ]+?)(?: is)?[.?]$")
    seen_ops = set()
    for seed in range(300):
        p = C.make_problem(random.Random(seed))
        m = pattern.search(re.sub(r"^(What is|What's|How much is|Can you tell me what|Calculate|Please work out) ", "", p.text))
        assert m, p.text
        a, op, b = value[m.group(1)], m.group(2), value[m.group(3)]
        assert ops[op](a, b) == p.answer and p.answer >= 0, p.text
        seen_ops.add(op)
    assert seen_ops == set(ops)


def test_placeholder_positions() -> None:
    layouts = {C.attach("How fast?", 1, random.Random(s)) for s in range(40)}
    assert any(x.startswith(C.PLACEHOLDER) for x in layouts) and any(x.endswith(C.PLACEHOLDER) for x in layouts)
    assert any(not x.startswith(C.PLACEHOLDER) and not x.endswith(C.PLACEHOLDER) for x in layouts)
    assert all(C.attach("Which?", 2, random.Random(s)).count(C.PLACEHOLDER) == 2 for s in range(20))


def _gpt_turns(rec: dict) -> list[str]:
    return [t["value"] for t in rec["conversations"] if t["from"] == "gpt"]


def test_conversations_answers_match_metadata() -> None:
    pool, arith = _pool(), _arith()
    by_path = {r["audio_filepath"]: r for r in pool + arith}
    recs = C.make_conversations(pool, arith, 400, seed=0, split="train")
    assert len(recs) == 400 and len({r["id"] for r in recs}) == 400
    assert {r["type"] for r in recs} == set(C.TRAIN_WEIGHTS)  # every type shows up
    assert max(len(r["answers"]) for r in recs) > 1  # multi-turn
    for r in recs:
        n_ph = sum(t["value"].count(C.PLACEHOLDER) for t in r["conversations"])
        assert n_ph == len(r["speech"]) and C.PLACEHOLDER in r["conversations"][0]["value"]
        assert [t["from"] for t in r["conversations"]] == ["human", "gpt"] * len(r["answers"])
        assert len(r["turn_types"]) == len(r["answers"]) and r["turn_types"][0] == r["type"]
        clips = [by_path[p] for p in r["speech"]]
        for kind, gold, said in zip(r["turn_types"], r["answers"], _gpt_turns(r)):
            assert gold.lower() in said.lower(), (kind, gold, said)
            c = clips[0] if len(clips) == 1 or kind in C.PAIR_TYPES else None
            if c is None:  # follow-up about one clip of a pair: the question names which
                q = r["conversations"][2 * r["turn_types"].index(kind)]["value"]
                c = clips[0] if "first clip" in q else clips[1]
            if kind == "arithmetic":
                assert gold == str(c["answer"]) and said == gold
            elif kind == "word_count":
                assert gold == str(len(C.words(c["text"])))
            elif kind == "pitch":
                assert gold == c["pitch_class"]
            elif kind == "speed":
                assert gold == c["speed_class"]
            elif kind == "gender":
                assert gold == c["gender"]
            elif kind == "transcribe":
                assert said == c["text"]
            elif kind == "last_word":
                assert gold == C.words(c["text"])[-1].lower()
            elif kind in ("compare_speed", "compare_pitch"):
                key = "speed" if kind == "compare_speed" else "pitch"
                a, b = clips
                q = r["conversations"][0]["value"]
                more = any(w in q for w in ("faster", "quickly", "higher"))
                want = "first" if (a[key] > b[key]) == more else "second"
                assert a[key] != b[key] and gold == want
                if kind == "compare_pitch":
                    assert a["variant"] == b["variant"]  # same speaker: relative pitch is well defined


def test_eval_conversations_single_turn_no_unseen_accent_names() -> None:
    pool = _pool(voices=HELD_OUT_VOICES)
    recs = C.make_conversations(pool, _arith(), 120, seed=1, split="eval", max_followups=0)
    assert all(len(r["answers"]) == 1 for r in recs)
    assert "accent" not in {r["type"] for r in recs} and "accent_region" in {r["type"] for r in recs}
    assert sum(r["type"] == "arithmetic" for r in recs) == C.expected_arithmetic(120, 1, "eval")


def test_plan_types_is_proportional_and_deterministic() -> None:
    kinds = C.plan_types(120, C.EVAL_WEIGHTS, seed=0, split="eval")
    assert kinds == C.plan_types(120, C.EVAL_WEIGHTS, seed=0, split="eval") and len(kinds) == 120
    assert {kinds.count(k) for k in C.EVAL_WEIGHTS} == {10}  # 12 equally weighted eval types
    train = C.plan_types(1000, C.TRAIN_WEIGHTS, seed=0, split="train")
    assert all(abs(train.count(k) - 1000 * w / sum(C.TRAIN_WEIGHTS.values())) < 1 for k, w in C.TRAIN_WEIGHTS.items())


def test_pool_that_cannot_serve_a_type_falls_back() -> None:
    one = _pool(1)
    recs = C.make_conversations(one, [], 30, seed=0, split="train", weights={"compare_speed": 0.5, "arithmetic": 0.5})
    assert {r["type"] for r in recs} == {"transcribe"}
    with pytest.raises(ValueError, match="empty clip pool"):
        C.make_conversations([], [], 3, seed=0, split="train")


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")
def test_cli_tiny_build(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from modality.speech.corpus import build as build_speech
    from modality.speech.corpus.sentences import FORTUNE_DIR

    if not FORTUNE_DIR.is_dir():
        pytest.skip("apt-get install fortunes fortunes-min")
    assert build_speech.main(["--out", str(tmp_path), "--n-align", "8", "--n-instruct", "12", "--n-instruct-eval", "4", "--jobs", "2"]) == 0
    out = capsys.readouterr().out
    assert "align: train" in out and "instruct: train 12, eval 4" in out
    eval_voices = {json.loads(x)["voice"] for x in (tmp_path / "eval.jsonl").read_text().splitlines()}
    assert eval_voices <= set(HELD_OUT_VOICES)
    for split in ("train", "eval"):
        recs = json.loads((tmp_path / f"instruct_{split}.json").read_text())
        for r in recs:
            assert all((tmp_path / p).is_file() for p in r["speech"])
            if split == "eval":
                assert all(json.loads(x)["voice"] in HELD_OUT_VOICES
                           for x in (tmp_path / "eval.jsonl").read_text().splitlines())


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")
def test_cli_align_only_larger_build_extends_a_smaller_one(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--align-only writes no instruct files, and a larger build keeps the smaller one's clips as its
    prefix (same ids, texts, voices): a run continued on a bigger corpus is evaluated on the same clips."""
    from modality.speech.corpus import build as build_speech
    from modality.speech.corpus.sentences import FORTUNE_DIR

    if not FORTUNE_DIR.is_dir():
        pytest.skip("apt-get install fortunes fortunes-min")
    small, big = tmp_path / "small", tmp_path / "big"
    assert build_speech.main(["--out", str(small), "--n-align", "20", "--align-only", "--jobs", "2"]) == 0
    assert build_speech.main(["--out", str(big), "--n-align", "60", "--align-only", "--jobs", "2"]) == 0
    assert "instruct:" not in capsys.readouterr().out
    assert not list(big.glob("instruct_*.json")) and not list(big.glob("arith_*.jsonl"))
    for split in ("train", "val", "eval"):
        a = [json.loads(x) for x in (small / f"{split}.jsonl").read_text().splitlines()]
        b = [json.loads(x) for x in (big / f"{split}.jsonl").read_text().splitlines()]
        assert 0 < len(a) < len(b)
        keys = ("id", "text", "voice", "pitch", "speed")
        assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b[:len(a)]]


def test_tone_build_writes_voice_questions_over_the_existing_clips(tmp_path) -> None:
    """--tone N: N more voice conversations (comparisons most), no new audio, ids apart from instruct_train's."""
    from modality.speech.corpus.build import TONE_WEIGHTS, main

    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _pool(80)))
    assert main(["--out", str(tmp_path), "--tone", "60"]) == 0
    recs = json.loads((tmp_path / "instruct_tone_train.json").read_text())
    types = [r["type"] for r in recs]
    assert len(recs) == 60 and set(types) <= set(TONE_WEIGHTS) and len({r["id"] for r in recs}) == 60
    assert all(r["id"].startswith("tone-") for r in recs)
    assert types.count("compare_pitch") > types.count("gender")
    clips = {r["audio_filepath"] for r in _pool(80)}
    assert all(p in clips for r in recs for p in r["speech"]) and not (tmp_path / "wavs").exists()
    for r in recs:  # gold answers agree with the clips' labels
        if r["type"] in ("pitch", "speed", "gender"):
            row = next(x for x in _pool(80) if x["audio_filepath"] == r["speech"][0])
            assert r["answers"][0] == row[{"pitch": "pitch_class", "speed": "speed_class"}.get(r["type"], "gender")]
