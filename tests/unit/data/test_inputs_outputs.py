"""Run inputs refused in one line naming the file (and line): non-UTF-8 JSON / CSV, empty train or eval files;
run outputs strict (no bare NaN) and atomic (data.jsonl writers)."""

from __future__ import annotations

import json
import os

import pytest

from data.datamodule import ConversationDataModule
from data.jsonl import atomic_open, check_utf8, dumps, write_json, write_jsonl
from data.records import read_records

REC = {"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ok"}]}


def test_a_non_utf8_json_list_names_the_file_and_line(tmp_path):
    p = tmp_path / "latin1.json"
    p.write_bytes(b'[{"id": "a", "conversations": []},\n {"id": "caf\xe9"}]\n')
    with pytest.raises(ValueError, match=r"latin1\.json:2: not UTF-8 text \(byte 0xe9 at column 13\)"):
        read_records(p)
    ok = tmp_path / "ok.txt"
    ok.write_text("caf\u00e9\n", encoding="utf-8")
    check_utf8(ok)  # UTF-8: no error


def test_a_non_utf8_csv_names_the_file_and_line(tmp_path):
    from modality.stock.data.prices import read_csv

    p = tmp_path / "prices.csv"
    p.write_bytes(b"Date,Open,High,Low,Close,Volume\n2020-01-01,1,2,0.5,1.5,100\n2020-01-02,1,2,0.5,1.5,1 caf\xe9\n")
    with pytest.raises(ValueError, match=r"prices\.csv:3: not UTF-8 text \(byte 0xe9"):
        read_csv(p)


@pytest.mark.parametrize("split", ["eval", "train"])
def test_an_empty_eval_or_train_file_is_an_error_naming_it(tmp_path, split):
    good, empty = tmp_path / "good.jsonl", tmp_path / "empty.jsonl"
    good.write_text(json.dumps(REC) + "\n")
    empty.write_text("\n")
    key = "eval_manifest" if split == "eval" else "train_files"
    dm = ConversationDataModule(None, {}, {}, **{key: [str(good), str(empty)]})
    with pytest.raises(ValueError, match=rf"empty\.jsonl: no records \(an empty {split} file\)"):
        dm.records(split)
    assert len(ConversationDataModule(None, {}, {}, **{key: [str(good)]}).records(split)) == 1


def test_metrics_are_strict_json_nan_as_null(tmp_path):
    write_json(tmp_path / "m.json", {"loss": float("nan"), "curve": [{"wer": float("inf")}], "ok": 1.5})
    text = (tmp_path / "m.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"loss": None, "curve": [{"wer": None}], "ok": 1.5}
    assert dumps({"x": float("-inf")}) == '{"x": null}'


def test_writes_are_atomic_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "predictions.jsonl"
    write_jsonl(target, [{"id": 1}, {"id": 2}])
    assert target.read_text() == '{"id": 1}\n{"id": 2}\n'

    def rows():
        yield {"id": 3}
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        write_jsonl(target, rows())
    assert target.read_text() == '{"id": 1}\n{"id": 2}\n' and os.listdir(tmp_path) == ["predictions.jsonl"]
    with atomic_open(target) as f:  # nothing appears under the name until the block ends
        f.write("new\n")
        assert target.read_text() == '{"id": 1}\n{"id": 2}\n'
    assert target.read_text() == "new\n" and oct(target.stat().st_mode & 0o777) != "0o600"
