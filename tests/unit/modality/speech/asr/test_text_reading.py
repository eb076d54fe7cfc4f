"""Text-only reading practice: noised phoneme distributions, manifest lines, and the errors a user meets."""

from __future__ import annotations

import random

import pytest
import torch

from modality.speech.asr.text_reading import PhonemeNoise, TextPhonemes, noisy_distribution
from modality.speech.records import manifest_record


def test_without_noise_each_phoneme_is_one_position_of_all_its_mass():
    quiet = PhonemeNoise(substitute=0, delete=0, insert=0, soft=0)
    dist = noisy_distribution([3, 1, 4, 1], 6, quiet, random.Random(0))
    assert dist.shape == (4, 6) and dist.argmax(-1).tolist() == [3, 1, 4, 1]
    assert torch.equal(dist.sum(-1), torch.ones(4)) and dist.max(-1).values.eq(1).all()


def test_noise_edits_at_about_its_rates_and_never_puts_mass_on_the_blank():
    noise = PhonemeNoise(substitute=0.1, delete=0.1, insert=0.1, soft=0.4)
    rng = random.Random(1)
    ids = [rng.randrange(1, 40) for _ in range(4000)]
    dist = noisy_distribution(ids, 40, noise, rng)
    assert dist[:, 0].eq(0).all() and torch.allclose(dist.sum(-1), torch.ones(len(dist)))
    assert abs(len(dist) - len(ids)) < 0.05 * len(ids)  # 10 % deleted, ~9 % inserted
    top = dist.max(-1).values
    assert top.min() >= 0.6 - 1e-6 and 0.75 < top.mean() < 0.9  # 1 - U(0, 0.4) (or more when both land on one class)


def test_bad_noise_and_bad_classes_are_refused():
    with pytest.raises(ValueError, match="noise rates"):
        PhonemeNoise(substitute=0.6, delete=0.5)
    with pytest.raises(ValueError, match="classes must be in"):
        noisy_distribution([0, 2], 5, PhonemeNoise(), random.Random(0))  # the blank is no phoneme
    with pytest.raises(ValueError, match="no phonemes"):
        noisy_distribution([], 5, PhonemeNoise(), random.Random(0))


def test_a_phoneme_the_chain_never_learned_is_dropped_counted_and_logged(caplog):
    reader = TextPhonemes(lambda texts: [["h", "ə", "|"] for _ in texts], ["<b>", "h", "|"],
                          PhonemeNoise(substitute=0, delete=0, insert=0, soft=0), seed=0)
    with caplog.at_level("WARNING"):
        dist = reader("ha", where="line 7")
        reader("ha", where="line 8")
    assert dist.argmax(-1).tolist() == [1, 2] and reader.dropped == {"ə": 2}
    assert [r.getMessage()[:6] for r in caplog.records] == ["line 7"]  # once per phoneme, naming the sentence
    only_new = TextPhonemes(lambda texts: [["ə"] for _ in texts], ["<b>", "h", "|"], seed=0)
    with pytest.raises(ValueError, match=r"line 9.*none of its phonemes \['ə'\]"):
        only_new("a", where="line 9")


def test_a_from_text_manifest_line_is_a_transcription_record_without_audio():
    rec = manifest_record({"text": "Hello there.", "from_text": True}, "t.jsonl:3", random.Random(0), "speech", "<speech>")
    assert rec["speech"] == [{"text": "Hello there."}] and rec["type"] == "asr" and rec["reference"] == "Hello there."
    assert rec["conversations"][1]["value"] == "Hello there." and "from_text" not in rec
    with pytest.raises(ValueError, match="t.jsonl:4.*'text'"):
        manifest_record({"from_text": True}, "t.jsonl:4", random.Random(0), "speech", "<speech>")


def test_a_text_input_without_a_soft_phoneme_chain_is_one_clear_error():
    from modality.speech import SpeechModality

    m = SpeechModality(d_llm=8, hidden=8, tiny=True)
    with pytest.raises(ValueError, match="need a phoneme chain"):
        m.load_features({"text": "Hello there."})
    with pytest.raises(ValueError, match="audio path or"):
        m.load_features({"txt": "Hello there."})
