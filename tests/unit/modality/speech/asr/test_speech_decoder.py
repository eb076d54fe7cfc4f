"""Evaluation of a CTC-trained speech chain through its SpeechDecoder."""


def test_evaluation_reports_the_adaptors_own_ctc_spelling_beside_the_llms_answer(tiny_lm, toy_modality, tmp_path):
    """With a CTC-trained chain, evaluate also scores the greedy CTC readout (ctc_wer, ctc_readout per row):
    single-clip samples only; a chain without CTC classes reports neither."""
    import json

    import torch

    from modality.speech.asr.decode import DecodeSpec
    from modality.speech.asr.decoder import SpeechDecoder
    from tasks.evaluate import run_generation
    from tests.unit.helpers import batch_for, build, ctc

    model = build(tiny_lm, toy_modality, "align").eval()

    def asr(i, ref, clips=1):
        return {"id": f"s{i}", "where": f"e.jsonl:{i + 1}", "root": None, "toy": [str(3 + k) for k in range(clips)],
                "type": "asr", "reference": ref, "conversations": [
                    {"from": "human", "value": "<toy>\n" * clips + "Transcribe."}, {"from": "gpt", "value": ref}]}

    recs = [asr(0, "hello"), asr(1, "hello there"), asr(2, "hello hello", clips=2)]
    plain = run_generation(model, [batch_for(model, recs, generate=True)], 2, tmp_path / "plain.jsonl")
    assert "ctc_wer" not in plain and "ctc_readout" not in (tmp_path / "plain.jsonl").read_text()

    hello = tiny_lm.tokenizer.encode(" hello", add_special_tokens=False)
    assert len(hello) == 1
    blank = model.placeholder_ids["toy"]
    vocab = torch.tensor(sorted({blank, hello[0]}))
    model = build(tiny_lm, toy_modality, "align", objectives=ctc(tiny_lm, toy_modality, 0.0, vocab=vocab,
                                                                 classifier="linear")).eval()
    model.decoder = SpeechDecoder(model.objectives["toy_ctc"], DecodeSpec())
    head = model.objectives["toy_ctc"].head[1]
    with torch.no_grad():  # every position says " hello": the readout is "hello" whatever the clip
        head.weight.zero_()
        head.bias.copy_((vocab == hello[0]).float() * 10)
    m = run_generation(model, [batch_for(model, recs, generate=True)], 2, tmp_path / "p.jsonl")
    rows = {r["id"]: r for r in map(json.loads, (tmp_path / "p.jsonl").read_text().splitlines())}
    assert rows["s0"]["ctc_readout"] == rows["s1"]["ctc_readout"] == "hello"
    assert "ctc_readout" not in rows["s2"]  # two clips: no one-clip spelling to compare
    assert m["ctc_wer"] == round(1 / 3, 4)  # "hello" right; "hello there" misses one word
    with torch.no_grad():  # now every position is the blank: nothing spelled, every word missed
        head.bias.copy_((vocab == blank).float() * 10)
    assert run_generation(model, [batch_for(model, recs, generate=True)], 2)["ctc_wer"] == 1.0
