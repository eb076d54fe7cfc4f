"""modality.speech.asr.word_recall: which reference words a transcript got right, by training frequency."""

import json
from collections import Counter

import pytest

from modality.speech.asr.word_recall import main, matched_positions, recall_by_band


def test_matched_positions_follow_a_minimum_edit_alignment():
    assert matched_positions(["a", "b", "c", "d"], ["a", "x", "c", "d"]) == {0, 2, 3}  # substitution
    assert matched_positions(["a", "b", "c"], ["a", "b", "b", "c"]) == {0, 1, 2}  # insertion
    assert matched_positions(["a", "b", "c"], ["a", "c"]) == {0, 2}  # deletion
    assert matched_positions(["a", "b"], []) == set()
    assert matched_positions(["a", "b"], ["b", "a"]) in ({0}, {1})  # two edits either way; one word is right


def test_recall_by_band_counts_only_transcript_rows_with_the_field():
    counts = Counter({"the": 150, "cat": 2, "sat": 7})
    rows = [
        {"type": "asr", "reference": "The cat sat.", "prediction": "the dog sat", "ctc_readout": "the cat"},
        {"type": "pitch", "reference": "high", "prediction": "low"},  # not a transcript: ignored
        {"type": "asr", "reference": "mat", "prediction": "mat"},  # never in training
    ]
    by = recall_by_band(rows, counts)
    assert by["100+"] == {"words": 1, "correct": 1, "recall": 1.0}
    assert by["1-3"] == {"words": 1, "correct": 0, "recall": 0.0}
    assert by["4-19"] == {"words": 1, "correct": 1, "recall": 1.0}
    assert by["0"] == {"words": 1, "correct": 1, "recall": 1.0}
    assert by["20-99"] == {"words": 0, "correct": 0, "recall": None}
    ctc = recall_by_band(rows, counts, field="ctc_readout")  # the third row has no readout
    assert ctc["1-3"]["correct"] == 1 and ctc["4-19"]["correct"] == 0 and ctc["0"]["words"] == 0


def test_main_reads_manifests_and_names_a_malformed_line(tmp_path, capsys):
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps({"audio_filepath": f"{i}.wav", "text": "hello world"})
                               for i in range(5)) + "\n")
    preds = tmp_path / "predictions.jsonl"
    preds.write_text(json.dumps({"type": "asr", "reference": "hello there", "prediction": "hello"}) + "\n")
    out = main([str(preds), "--train", str(train)])
    assert out["4-19"]["recall"] == 1.0 and out["0"]["recall"] == 0.0
    assert "2 reference words" in capsys.readouterr().out
    preds.write_text(preds.read_text() + "{not json\n")
    with pytest.raises(ValueError, match=r"predictions\.jsonl:2: malformed JSON"):
        main([str(preds), "--train", str(train)])
