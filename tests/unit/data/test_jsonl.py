"""The one JSONL reader names the file and line of whatever is wrong."""

import pytest

from data.jsonl import iter_jsonl, read_jsonl


def test_blank_lines_are_skipped_and_line_numbers_kept(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"a": 1}\n\n  \n{"a": 2}\n')
    assert read_jsonl(p) == [{"a": 1}, {"a": 2}]
    assert [n for n, _ in iter_jsonl(p)] == [1, 4]


def test_malformed_and_non_utf8_lines_name_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"a": 1}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: malformed JSON line"):
        read_jsonl(p)
    q = tmp_path / "latin1.jsonl"
    q.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin1\.jsonl:2: not UTF-8 text \(byte 0xe9"):
        read_jsonl(q)
