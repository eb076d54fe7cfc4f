"""Discrete speech path: prosody extraction, k-means codebook, token layout, cache, and an align step."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from modality.speech.units import SpeechUnitsModality, UnitsHParams, frame_prosody, kmeans
from tests.unit.helpers import batch_for, build

SR = 16000


def tone(hz: float, seconds: float = 1.0, amp: float = 0.3) -> torch.Tensor:
    t = torch.arange(int(SR * seconds)) / SR
    # a buzzy (harmonic-rich) voice-like wave: the fundamental plus decaying harmonics
    return sum(amp / k * torch.sin(2 * math.pi * hz * k * t) for k in range(1, 6)).float()


@pytest.fixture()
def corpus(tmp_path):
    rows = []
    for i, hz in enumerate([90, 110, 140, 180, 220, 260]):
        p = tmp_path / f"c{i}.wav"
        sf.write(p, np.concatenate([tone(hz, 0.6).numpy(), np.zeros(1600, np.float32)]), SR)
        rows.append({"audio_filepath": p.name, "text": f"clip {i}", "duration": 0.7})
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def make(corpus, **kw) -> SpeechUnitsModality:
    torch.manual_seed(0)
    args = {"d_llm": 64, "tiny": True, "n_units": 8, "codebook": str(corpus / "cb.safetensors"),
            "fit_manifest": str(corpus / "train.jsonl"), "cache_dir": str(corpus / "cache"), **kw}
    return SpeechUnitsModality(**args)


@pytest.mark.parametrize("hz", [80, 150, 300])
def test_frame_prosody_tracks_f0_and_marks_silence_and_noise_unvoiced(hz):
    f0, db = frame_prosody(tone(hz))
    assert f0.shape == db.shape == (100,)
    assert abs(float(f0.nanmedian()) / hz - 1) < 0.03
    assert float((~f0.isnan()).float().mean()) > 0.9
    silent, db0 = frame_prosody(torch.zeros(SR))
    assert silent.isnan().all() and float(db0.max()) <= -99
    noise, _ = frame_prosody(0.1 * torch.randn(SR, generator=torch.Generator().manual_seed(0)))
    assert float((~noise.isnan()).float().mean()) < 0.1


def test_kmeans_recovers_well_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.3 * torch.randn(200, 2, generator=g) for c in centres])
    got = kmeans(x, 3)
    dist = torch.cdist(centres, got).min(1).values
    assert (dist < 0.2).all()


def test_codebook_is_fitted_once_then_reused_and_checked(corpus):
    a = make(corpus)
    assert (corpus / "cb.safetensors").is_file()
    b = make(corpus, fit_manifest=None)  # loads the saved one: no manifest needed any more
    assert torch.equal(a.encoder.centroids, b.encoder.centroids)
    with pytest.raises(ValueError, match=r"cb.safetensors: codebook of shape \(8, 16\), need \(4, 16\)"):
        make(corpus, n_units=4)
    with pytest.raises(ValueError, match=r"nothere.safetensors: no unit codebook; set modality.fit_manifest"):
        make(corpus, codebook=str(corpus / "nothere.safetensors"), fit_manifest=None)


def test_token_layout_prosody_pairs_then_units_and_pitch_order(corpus):
    m = make(corpus)
    h = m.hp
    p0, e0 = h.n_units, h.n_units + h.pitch_bins + 1
    low, high = m.featurize(tone(100)), m.featurize(tone(300))
    hidden_len = 50  # 1 s of audio -> 50 encoder frames -> 25 units -> 5 windows of 0.2 s
    for ids in (low, high):
        pitch_pos = [i for i, t in enumerate(ids.tolist()) if p0 <= t < e0]
        assert len(pitch_pos) == math.ceil(hidden_len / h.unit_stack / h.units_per_window) == 5
        assert all(e0 <= int(ids[i + 1]) < h.vocab for i in pitch_pos)  # each pitch token is followed by energy
        units = [t for t in ids.tolist() if t < p0]
        assert 1 <= len(units) <= 25
    assert int(high[0]) > int(low[0])  # a higher voice lands in a higher pitch bin
    assert m.describe(high[:2]).startswith("<pitch_") and "<energy_" in m.describe(high[:2])
    quiet = m.featurize(torch.zeros(SR))
    assert m.describe(quiet[:2]) == "<pitch_uv> <energy_0>"


def test_dedup_collapses_repeated_units(corpus):
    m = make(corpus)
    const = m.encoder.centroids[3].repeat(20, 1)  # 20 encoder frames all on unit 3 -> 10 units, 2 windows
    wave = tone(150, 0.4)
    ids = m.tokens(const, wave).tolist()
    assert [t for t in ids if t < m.hp.n_units] == [3]
    m.hp.dedup = False
    assert [t for t in m.tokens(const, wave).tolist() if t < m.hp.n_units] == [3] * 10


def test_hparams_are_validated():
    with pytest.raises(ValueError, match="prosody_every"):
        UnitsHParams(d_llm=8, prosody_every=0.05)  # 1.25 units a window
    with pytest.raises(ValueError, match="n_units"):
        UnitsHParams(d_llm=8, n_units=0)


def test_cached_ids_equal_fresh_ones_and_bad_audio_names_the_file(corpus):
    m = make(corpus)
    counts = m.precompute_cache([corpus / "c0.wav", corpus / "c1.wav"])
    assert counts == {"computed": 2, "cached": 0}
    assert m.precompute_cache([corpus / "c0.wav"]) == {"computed": 0, "cached": 1}
    cached, kind = m.load_features("c0.wav", str(corpus))
    assert kind == "features" and torch.equal(cached, m.featurize(m.load(corpus / "c0.wav")))
    (corpus / "bad.wav").write_bytes(b"RIFF0000WAVEjunk")
    with pytest.raises(ValueError, match=r"bad.wav"):
        m.load_features("bad.wav", str(corpus))


def test_align_step_trains_only_the_new_rows_it_reads(corpus, tiny_lm):
    m = make(corpus, d_llm=tiny_lm.hidden_size, target_rms=0.5)
    assert abs(float(m.adaptor.weight.pow(2).mean().sqrt()) - 0.5) < 0.05  # rows start at the LLM's scale
    model = build(tiny_lm, m)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["modalities.speech.adaptor.weight"]
    recs = [{"id": f"r{i}", "where": f"t.jsonl:{i}", "root": str(corpus), "speech": [f"c{i}.wav"],
             "conversations": [{"from": "human", "value": "<speech>\nHow high is the voice?"},
                               {"from": "gpt", "value": "low" if i < 3 else "high"}]} for i in range(6)]
    batch = batch_for(model, recs)
    n = int((batch["input_ids"] == model.placeholder_ids["speech"]).sum())
    assert n == sum(int(m.load_features(f"c{i}.wav", str(corpus))[0].shape[0]) for i in range(6))
    used = torch.unique(batch["modal"]["speech"]["values"][batch["modal"]["speech"]["mask"]])
    before = m.adaptor.weight.detach().clone()
    loss = model(batch)["loss"]
    loss.backward()
    torch.optim.SGD([m.adaptor.weight], lr=1.0).step()
    changed = (m.adaptor.weight.detach() != before).any(1).nonzero().flatten()
    assert torch.isfinite(loss) and set(changed.tolist()) == set(used.tolist())
