"""Degenerate evaluation inputs are refused naming the sample (tasks.evaluate.unscorable): a transcript with no
reference words (scored WER 15.0 before), a conversation with no answer turn; predictions.jsonl is strict and atomic."""

from __future__ import annotations

import json

import pytest
import torch

from tasks.evaluate import check_scorable, run_generation, score


def _rec(i: int, last: str = "gpt", answer: str = "hello there", **kw) -> dict:
    turns = [{"from": "human", "value": "<speech>\nTranscribe."}, {"from": last, "value": answer}]
    return {"id": f"r{i}", "where": f"eval.jsonl:{i + 1}", "conversations": turns, **kw}


class Fake(torch.nn.Module):
    device = torch.device("cpu")
    decoder = None

    def __init__(self, outs: list[str]):
        super().__init__()
        self.outs, self.calls = outs, 0

    def generate(self, batch, max_new_tokens, num_beams=1):
        self.calls += 1
        return self.outs[: len(batch["ids"])]


def _batch(types, refs, ids):
    return {"skipped": [], "input_ids": torch.zeros(len(ids), 3, dtype=torch.long), "types": types,
            "references": refs, "ids": ids}


def test_an_empty_transcript_reference_is_refused_not_scored_wer_15():
    with pytest.raises(ValueError, match=r"^clip-7: empty reference transcript \(type asr\)"):
        score(["asr", "asr"], ["one two", " . "], ["one two", "a b c d e f g h i j k l m n o"], ["clip-1", "clip-7"])
    # a question whose reference is empty is still an accuracy question (an empty answer is right)
    assert score(["chat"], [""], [""])["accuracy"] == 1.0


def test_records_are_checked_before_any_generation():
    check_scorable([_rec(0), _rec(1, type="asr", reference="words here")])
    with pytest.raises(ValueError, match=r"^eval.jsonl:2 \(id r1\): empty reference transcript"):
        check_scorable([_rec(0), _rec(1, type="asr", reference="")])
    with pytest.raises(ValueError, match=r"^eval.jsonl:3 \(id r2\): no answer turn to score"):
        check_scorable([_rec(0), _rec(1), _rec(2, last="human")])
    check_scorable([_rec(0, last="human", reference="a reference instead")])  # a reference is an answer
    check_scorable([_rec(0, answer="{caption}", fill="stock")])  # a template: checked once filled


def test_run_generation_refuses_before_generating_and_keeps_an_earlier_predictions_file(tmp_path):
    out = tmp_path / "predictions.jsonl"
    out.write_text('{"id": "earlier"}\n')
    model = Fake(["x", "y"])
    with pytest.raises(ValueError, match=r"^b: no answer turn to score"):
        run_generation(model, [_batch(["chat", "chat"], ["fine", None], ["a", "b"])], 4, out)
    assert model.calls == 0 and out.read_text() == '{"id": "earlier"}\n'
    with pytest.raises(ValueError, match=r"^a: empty reference transcript"):
        run_generation(model, [_batch(["asr"], [""], ["a"])], 4, out)


def test_chat_answering_a_file_of_questions_answers_the_unanswered_unscored(tmp_path):
    out = tmp_path / "answers.jsonl"
    m = run_generation(Fake(["fine", "y"]), [_batch(["chat", "chat"], ["fine", None], ["a", "b"])], 4, out,
                       unanswered_ok=True)
    assert m["unscored"] == 1 and m["eval_samples"] == 1 and m["accuracy"] == 1.0
    assert [json.loads(x)["prediction"] for x in out.read_text().splitlines()] == ["fine", "y"]


def test_predictions_are_strict_json_written_atomically(tmp_path):
    class Scored:
        def decode(self, model, batch, max_new_tokens):
            return ["hello"], [{"score": float("-inf")}]

        def metrics(self, rows):
            return {}

    model = Fake([])
    model.decoder = Scored()
    out = tmp_path / "predictions.jsonl"
    run_generation(model, [_batch(["asr"], ["hello"], ["a"])], 4, out)
    line = out.read_text()
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in {line}"))["score"] is None
    assert [p.name for p in tmp_path.iterdir()] == ["predictions.jsonl"]  # no temporary file left behind
