"""Transcript scoring: normalisation, WER, and cutting greedy-decoding loops (both scores kept)."""

from tasks.evaluate import trim_repeats


def test_trim_repeats_cuts_decoding_loops_only():
    loop = "Theories are verifiable and are verifiable and are verifiable and are verifiable and are veri"
    assert trim_repeats(loop) == "Theories are verifiable and"        # one copy kept, the cut-off word too
    assert trim_repeats("I'm a n'w'r, I'm a n'w'r, I'm a n'w'r, I'm a n'w'r") == "I'm a n'w'r,"
    assert trim_repeats("ha ha ha ha") == "ha"
    hyphens = "This hully-tony-troubled-troubled-troubled-troubled-troubled-troubled-"  # one "word" to split()
    assert trim_repeats(hyphens) == "This hully-tony-troubled"
    assert trim_repeats("A well-known, well-known fact.") == "A well-known, well-known fact."
    natural = "We learn from history that we do not learn from history."
    assert trim_repeats(natural) == natural                            # a repeat, not a loop: kept
    assert trim_repeats("no no") == "no no" and trim_repeats("") == ""


def test_run_generation_scores_trimmed_predictions_and_keeps_the_raw_ones(tmp_path):
    import json

    import torch

    from tasks.evaluate import run_generation

    class Fake(torch.nn.Module):
        device = torch.device("cpu")

        def generate(self, batch, max_new_tokens):
            return ["all it costs is my soul soul soul soul soul", "they know the world"]

    batch = {"skipped": [], "input_ids": torch.zeros(2, 3, dtype=torch.long), "types": ["asr", "asr"],
             "references": ["All it costs is my soul!", "They know the world."], "ids": ["a", "b"]}
    m = run_generation(Fake(), [batch], 8, tmp_path / "p.jsonl")
    assert m["wer"] == 0.0 and m["wer_raw"] == 0.4 and m["trimmed_loops"] == 1
    rows = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert rows[0]["prediction"] == "all it costs is my soul" and rows[0]["raw_prediction"].endswith("soul soul")
    assert "raw_prediction" not in rows[1]


def test_evaluation_reports_the_adaptors_own_ctc_spelling_beside_the_llms_answer(tiny_lm, toy_modality, tmp_path):
    """With a CTC-trained chain, evaluate also scores the greedy CTC readout (ctc_wer, ctc_readout per row):
    single-clip samples only; a chain without CTC classes reports neither."""
    import json

    import torch

    from tasks.evaluate import run_generation
    from tests.unit.helpers import batch_for, build

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
    model.set_ctc_vocab(vocab, "linear")
    head = model.ctc_heads["toy"][1]
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
