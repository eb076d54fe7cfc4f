import json

import pytest

from data.records import read_records


def test_malformed_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"id": "a", "conversations": [{"from": "human", "value": "hi"}]}) + "\n\n{not json}\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:3: malformed JSON"):
        read_records(p)


def test_malformed_json_list_names_file(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('[{"id": 1,\n "conversations": [}]')
    with pytest.raises(ValueError, match=r"bad.json:2: malformed JSON"):
        read_records(p)


def test_missing_fields_name_the_record(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"id": "x", "conversations": [{"from": "robot", "value": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match=r"c.jsonl:1: conversations\[0\]"):
        read_records(p)
    p.write_text(json.dumps({"id": "y", "prompt": "no conversations"}) + "\n")  # no adapter claims it
    with pytest.raises(ValueError, match=r"c.jsonl:1: missing or empty 'conversations'"):
        read_records(p)


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="nope.jsonl: records file not found"):
        read_records(tmp_path / "nope.jsonl")


def test_dev_split_keeps_the_voices_and_none_of_the_reported_sentences(tmp_path):
    import json

    import pytest

    from modality.speech.corpus.dev_split import dev_split, main

    rows = [{"text": f"s{i % 7}", "voice": "v"} for i in range(30)]  # sentences repeat every 7 clips
    dev = dev_split(rows, skip=3, n=4)
    assert [r["text"] for r in dev] == ["s3", "s4", "s5", "s6"]  # s0-s2 are reported; one clip per sentence
    with pytest.raises(ValueError, match="only 4 clips"):
        dev_split(rows, skip=3, n=5)
    src, out = tmp_path / "eval.jsonl", tmp_path / "dev.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    main([str(src), "--skip", "3", "--n", "2", "--out", str(out)])
    assert [json.loads(x)["text"] for x in out.read_text().splitlines()] == ["s3", "s4"]


def test_a_plugin_adapter_reads_its_own_line_format(tmp_path):
    p = tmp_path / "own.jsonl"
    p.write_text(json.dumps({"series": "x.csv"}) + "\n")
    adapt = lambda line, where, rng: {"toy": line["series"], "conversations": [{"from": "human", "value": where}]}
    (r,) = read_records(p, ("toy",), adapters=[lambda line, where, rng: None, adapt])
    assert r["toy"] == ["x.csv"] and r["conversations"][0]["value"] == f"{p}:1"  # listified, first claimant wins


def test_answers_become_the_scored_reference(tmp_path):
    """The gold answer, not the answer turn's phrasing, is what evaluation compares with (a right answer worded
    differently, "The second clip." for "The second one.", used to count as wrong)."""
    from tasks.evaluate import score

    conv = [{"from": "human", "value": "Which is faster? <speech> <speech>"}, {"from": "gpt", "value": "The second one."}]
    p = tmp_path / "c.jsonl"
    rows = [{"id": "a", "type": "compare_speed", "answers": ["second"], "conversations": conv},
            {"id": "b", "type": "compare_speed", "answers": ["second"], "reference": "The second one.", "conversations": conv},
            {"id": "c", "type": "compare_speed", "conversations": conv}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recs = read_records(p)
    assert [r.get("reference") for r in recs] == ["second", "The second one.", None]
    refs = [r.get("reference") or r["conversations"][-1]["value"] for r in recs]
    assert score(["compare_speed"] * 3, refs, ["The second clip."] * 3)["accuracy"] == pytest.approx(1 / 3, abs=1e-3)
    assert score(["compare_speed"], ["second"], ["The first clip."])["accuracy"] == 0.0
    p.write_text(json.dumps({"id": "d", "answers": ["second", "male"], "conversations": conv}) + "\n")
    with pytest.raises(ValueError, match=r"c.jsonl:1: 'answers' must list one string per assistant turn \(1\)"):
        read_records(p)


def test_an_unknown_key_is_refused_naming_it_the_file_and_line(tmp_path):
    """A clip named under another key used to be dropped and the record answered as a text chat."""
    conv = [{"from": "human", "value": "<speech> What is said?"}, {"from": "gpt", "value": "hi"}]
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"id": "a", "speech": ["a.wav"], "conversations": conv}) + "\n"
                 + json.dumps({"id": "b", "audios": ["a.wav"], "conversations": conv}) + "\n")
    with pytest.raises(ValueError, match=r"c.jsonl:2: unknown key 'audios' \(inputs go under this run's modality "
                                         r"keys \['speech'\]"):
        read_records(p, ("speech",))
    p.write_text(json.dumps({"id": "a", "stock": ["x.csv"], "conversations": conv}) + "\n")
    with pytest.raises(ValueError, match=r"c.jsonl:1: unknown key 'stock'"):  # an input of a modality not in the run
        read_records(p, ("speech",))
    p.write_text(json.dumps({"id": "a", "speech": ["a.wav"], "meta": {"any": 1}, "duration": 1.5, "conversations": conv})
                 + "\n" + json.dumps({"audio_filepath": "a.wav", "text": "hi", "speaker": 7}) + "\n")
    adapt = lambda line, where, rng: {"id": where, "speech": [line["audio_filepath"]], "speaker": line["speaker"],
                                      "conversations": conv} if "audio_filepath" in line else None
    recs = read_records(p, ("speech",), adapters=[adapt])  # a plugin's own line format keeps its own keys
    assert [r["id"] for r in recs] == ["a", f"{p}:2"] and recs[1]["speaker"] == 7
