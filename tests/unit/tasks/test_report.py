"""tasks.report: what a person reads after a run."""

from __future__ import annotations

import json

from tasks.report import examples_by_type, summarise


def test_examples_show_each_question_type_before_a_second_of_any(tmp_path):
    rows = [{"id": str(i), "type": t, "reference": "r", "prediction": "p"}
            for i, t in enumerate(["asr", "asr", "asr", "gender", "asr", "pitch", "gender"])]
    assert [r["id"] for r in examples_by_type(rows, 4)] == ["0", "3", "5", "1"]
    (tmp_path / "metrics.json").write_text(json.dumps({"stage": "evaluate", "accuracy": 0.5, "steps": 3}))
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = summarise(tmp_path, examples=3)
    assert text.count("ref:") == 3 and "[pitch]" in text and "accuracy: 0.5" in text
