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
        decoder = None

        def generate(self, batch, max_new_tokens, num_beams=1):
            return ["all it costs is my soul soul soul soul soul", "they know the world"]

    batch = {"skipped": [], "input_ids": torch.zeros(2, 3, dtype=torch.long), "types": ["asr", "asr"],
             "references": ["All it costs is my soul!", "They know the world."], "ids": ["a", "b"]}
    m = run_generation(Fake(), [batch], 8, tmp_path / "p.jsonl")
    assert m["wer"] == 0.0 and m["wer_raw"] == 0.4 and m["trimmed_loops"] == 1
    rows = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert rows[0]["prediction"] == "all it costs is my soul" and rows[0]["raw_prediction"].endswith("soul soul")
    assert "raw_prediction" not in rows[1]




def test_rouge_l_is_the_lcs_f1_over_normalised_words():
    from tasks.evaluate import rouge_l

    assert rouge_l("The capital of France is Paris.", "the capital of france is paris") == 1.0
    # LCS "the capital is paris" = 4 of 6 reference words and 4 of 5 predicted: F1 = 2 * (4/5 * 4/6) / (4/5 + 4/6)
    assert abs(rouge_l("the capital of france is paris", "the capital city is paris") - 2 * (0.8 * 4 / 6) / (0.8 + 4 / 6)) < 1e-9
    assert rouge_l("paris", "london") == 0.0
    assert rouge_l("b a", "a b") == 0.5  # order matters: a subsequence, not a bag of words
    assert rouge_l("", "") == 1.0 and rouge_l("a", "") == 0.0


def test_free_form_answers_are_scored_by_agreement_apart_from_accuracy():
    from tasks.evaluate import score

    m = score(["spoken_qa", "spoken_qa", "gender"], ["Paris is the capital.", "Yes it is", "male"],
              ["paris is the capital", "No", "a male voice"])
    assert m["exact/spoken_qa"] == 0.5 and m["exact"] == 0.5
    assert m["rouge_l/spoken_qa"] == 0.5 and m["rouge_l"] == 0.5  # (1.0 + 0.0) / 2
    assert m["accuracy"] == 1.0 and "accuracy/spoken_qa" not in m  # the containment accuracy is the other types' alone
