import json

import pytest

from data.records import to_messages
from modality.speech.records import read_speech_records


def test_nemo_manifest_becomes_asr_conversation(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text(json.dumps({"audio_filepath": "a.wav", "text": "hello world", "duration": 1.0}) + "\n")
    (r,) = read_speech_records(p)
    assert r["speech"] == ["a.wav"] and r["type"] == "asr" and r["reference"] == "hello world"
    assert to_messages(r)[-1] == {"role": "assistant", "content": "hello world"}
    assert "<speech>" in to_messages(r)[0]["content"]
    assert r["root"] == str(tmp_path)



def test_a_nemo_line_without_text_names_the_line(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"audio_filepath": "a.wav"}) + "\n")
    with pytest.raises(ValueError, match=r"c.jsonl:1: NeMo manifest line lacks 'text'"):
        read_speech_records(p)
