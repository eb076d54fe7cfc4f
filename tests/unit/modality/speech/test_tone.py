"""Tone heads (modality.speech.tone): labels from manifest lines, heads that learn them, and their answers
handed to the LLM as the class names' rows after the clip's positions."""

from __future__ import annotations

import random

import pytest
import torch

from modality.speech.records import manifest_record
from modality.speech.tone import ToneObjective, pooled, tone_classes


def _line(i: int, gender: str, pitch: str) -> dict:
    return {"audio_filepath": f"c{i}.wav", "text": "hello there", "id": f"c{i}", "gender": gender,
            "pitch_class": pitch, "speed_class": None}


def test_manifest_labels_become_clip_labels_and_classes():
    recs = [manifest_record(_line(i, g, p), f"m.jsonl:{i + 1}", random.Random(0), "speech", "<speech>")
            for i, (g, p) in enumerate([("male", "low"), ("female", "high"), ("male", "medium")])]
    assert recs[0]["clip_labels"] == [{"gender": "male", "pitch_class": "low"}]  # a None label is left out
    assert tone_classes(recs) == {"gender": ["female", "male"], "pitch_class": ["high", "low", "medium"]}
    bare = manifest_record({"audio_filepath": "x.wav", "text": "hi"}, "m.jsonl:9", random.Random(0), "speech", "<speech>")
    assert "clip_labels" not in bare


def test_pooled_ignores_padding():
    x = torch.randn(2, 6, 3)
    x2 = x.clone()
    x2[0, 4:] = 99.0  # past clip 0's length
    a, b = pooled(x, torch.tensor([4, 6])), pooled(x2, torch.tensor([4, 6]))
    assert torch.allclose(a, b) and torch.allclose(a[0, :3], x[0, :4].mean(0))
    assert torch.allclose(a[0, 3:], x[0, :4].std(0, unbiased=False), atol=1e-5)


def _batch(labels: list[dict | None]) -> dict:
    n = len(labels)
    return {"ids": [f"s{i}" for i in range(n)], "clip_labels": [[lab] if lab else None for lab in labels],
            "modal": {"speech": {"sample_index": torch.arange(n)}}}


def test_heads_learn_the_labels_and_the_llm_reads_their_answers(tiny_lm):
    torch.manual_seed(0)
    classes = {"gender": ["female", "male"], "speed_class": ["fast", "normal", "slow"]}
    n, d_in = 24, 8
    genders = [i % 2 for i in range(n)]
    speeds = [i % 3 for i in range(n)]
    feats = torch.randn(n, d_in) * 0.1
    feats[:, 0] += torch.tensor(genders, dtype=torch.float) * 3  # separable: gender on dim 0, speed on dim 1
    feats[:, 1] += torch.tensor(speeds, dtype=torch.float) * 3
    emb = tiny_lm.model.get_input_embeddings().weight
    tone = ToneObjective("speech", tiny_lm.tokenizer, d_in, classes, lambda: feats, weight=1.0)
    assert all(p.requires_grad for p in tone.parameters())
    labels = [{"gender": classes["gender"][g], "speed_class": classes["speed_class"][s]} for g, s in zip(genders, speeds)]
    labels[3] = None  # a clip without labels is not scored
    batch = _batch(labels)
    outs = {"speech": (torch.zeros(n, 10, emb.shape[1]), torch.full((n,), 10))}
    opt = torch.optim.Adam(tone.parameters(), lr=1e-2)
    first = None
    for _ in range(150):
        loss = tone.loss(outs, batch, emb)["tone_speech"]
        first = first if first is not None else float(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 0.1 * first
    tone.eval()
    tone.validation_batch(outs, batch, emb)
    acc = tone.validation_metrics()
    assert acc == {"val/tone_gender": 1.0, "val/tone_speed_class": 1.0}
    assert tone.predictions(outs, batch)[1] == {"gender": "male", "speed_class": "normal"}
    # the LLM's input: after each clip's kept positions, one position per label = the predicted class name's rows
    out = torch.randn(n, 10, emb.shape[1])
    kept = torch.tensor([5] * (n - 1) + [9])
    new, k = tone.transform("speech", out, kept, emb)
    assert k.tolist() == [7] * (n - 1) + [10]  # the last clip had room for one more position only: cut to 8 + 2
    assert torch.equal(new[0, :5], out[0, :5]) and float(new[0, 7:].abs().sum()) == 0.0
    male = emb[torch.tensor(tiny_lm.tokenizer.encode(" male", add_special_tokens=False))].mean(0)
    assert torch.nn.functional.cosine_similarity(new[1, 5], male, dim=0) > 0.99
    assert tone.transform("stock", out, kept, emb) is None
    frozen = ToneObjective("speech", tiny_lm.tokenizer, d_in, classes, lambda: feats, weight=0.0)
    assert not any(p.requires_grad for p in frozen.parameters())  # later stages read the heads, never train them
    with pytest.raises(ValueError, match=">= 2 classes"):
        ToneObjective("speech", tiny_lm.tokenizer, d_in, {"gender": ["male"]}, lambda: feats)
