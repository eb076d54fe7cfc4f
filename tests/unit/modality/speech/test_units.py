"""Discrete speech path: prosody extraction, k-means codebook, token layout, cache, and an align step."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

from modality.speech.prosody import UnitsHParams, frame_prosody, kmeans, layout
from modality.speech.units import SpeechUnitsModality

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


def test_codebook_is_fitted_at_first_use_then_reused_and_checked(corpus):
    a = make(corpus)
    assert not (corpus / "cb.safetensors").is_file()  # nothing fitted until a clip is tokenised
    fitted = a.centroids.clone()
    assert (corpus / "cb.safetensors").is_file() and torch.isfinite(fitted).all()
    b = make(corpus, fit_manifest=None)  # loads the saved one: no manifest needed any more
    assert torch.equal(fitted, b.centroids)
    with pytest.raises(ValueError, match=r"cb.safetensors: codebook of shape \(8, 16\), need \(4, 16\)"):
        make(corpus, n_units=4)
    c = make(corpus, codebook=str(corpus / "nothere.safetensors"), fit_manifest=None)  # may come from a checkpoint
    with pytest.raises(ValueError, match=r"nothere.safetensors: no unit codebook; set modality.fit_manifest"):
        c.featurize(tone(100))


def test_token_layout_register_then_pitch_energy_rate_triples_then_units(corpus):
    m = make(corpus)
    h = m.hp
    ids = m.featurize(tone(150)).tolist()  # 1 s -> 50 encoder frames -> 25 units -> 5 windows of 0.2 s
    assert h.register0 <= ids[0] < h.register0 + h.register_bins  # one register token, first
    pitch_pos = [i for i, t in enumerate(ids) if h.pitch0 <= t < h.energy0]
    assert len(pitch_pos) == 5 and pitch_pos[0] == 1
    assert all(h.energy0 <= ids[i + 1] < h.register0 and h.rate0 <= ids[i + 2] < h.vocab for i in pitch_pos)
    assert all(t < h.n_units or h.dur0 <= t < h.rate0 for i, t in enumerate(ids[1:], 1)
               if not any(p <= i <= p + 2 for p in pitch_pos))  # the rest: units and durations
    assert m.describe(torch.tensor(ids[:4])).startswith("<register_")
    quiet = m.featurize(torch.zeros(SR))
    assert m.describe(quiet[:3]) == "<register_uv> <pitch_uv> <energy_0>"


def test_register_is_absolute_pitch_is_relative_to_the_clip_median(corpus):
    m = make(corpus)
    h = m.hp
    low, high = m.featurize(tone(100)), m.featurize(tone(300))
    assert int(high[0]) > int(low[0])  # a higher voice: a higher register
    mid = h.pitch0 + h.pitch_bins // 2
    for ids in (low, high):  # a steady tone sits at its own median: the middle relative bin
        assert [int(t) for t in ids if h.pitch0 <= t < h.energy0] == [mid] * 5
    rising = m.featurize(torch.cat([tone(150, 0.4), tone(190, 0.4), tone(240, 0.4)]))
    pitch = [int(t) - h.pitch0 for t in rising if h.pitch0 <= t < h.energy0]
    assert pitch[0] < mid - h.pitch0 < pitch[-1]  # intonation: up 8 semitones over the clip


def test_runs_collapse_with_duration_tokens_and_rate_tracks_unit_changes():
    h = UnitsHParams(d_llm=8, n_units=8)
    f0, db = torch.full((100,), 150.0), torch.full((100,), -20.0)
    ids = layout(h, torch.tensor([3] * 5 + [1, 1, 1, 2, 2] + [5, 6, 7, 5, 6]), f0, db).tolist()
    names = [h.token_names()[i] for i in ids]
    assert names[0].startswith("<register_") and names[1:4] == ["<pitch_3>", "<energy_2>", "<rate_0>"]
    assert names[4:6] == ["<unit_3>", "<dur_2>"]  # a run of 5 (5+ frames)
    assert names[6:9] == ["<pitch_3>", "<energy_2>", "<rate_1>"]  # 2 runs in 5 slots
    assert names[9:13] == ["<unit_1>", "<dur_1>", "<unit_2>", "<dur_0>"]  # 3 frames (3-4), then 2
    assert names[-6:] == ["<rate_3>", "<unit_5>", "<unit_6>", "<unit_7>", "<unit_5>", "<unit_6>"]  # 5 runs: fastest
    assert len(names) == 1 + 3 * 3 + 2 + 4 + 5
    h.dedup = False
    plain = layout(h, torch.tensor([3] * 5), f0[:20], db[:20]).tolist()
    assert [t for t in plain if t < h.n_units] == [3] * 5 and not any(h.dur0 <= t < h.rate0 for t in plain)


def test_hparams_are_validated():
    with pytest.raises(ValueError, match="prosody_every"):
        UnitsHParams(d_llm=8, prosody_every=0.05)  # 1.25 units a window
    with pytest.raises(ValueError, match="n_units"):
        UnitsHParams(d_llm=8, n_units=0)
    with pytest.raises(ValueError, match="dur_edges"):
        UnitsHParams(d_llm=8, dur_edges=(3, 5))  # a run of 2 would lose its length
    with pytest.raises(ValueError, match="pitch_semitones"):
        UnitsHParams(d_llm=8, pitch_semitones=0)
    assert UnitsHParams(d_llm=8, dur_edges=[2, 4]).dur_edges == (2, 4)  # Hydra hands lists


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




@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")
def test_espeak_pitch_20_vs_80_same_voice_moves_the_register_not_the_intonation(corpus, tmp_path):
    from modality.speech.corpus.tts import ClipSpec, synthesize

    m = make(corpus)
    h = m.hp
    got = {}
    for p in (20, 80):
        synthesize(ClipSpec("The quick brown fox jumps over the lazy dog.", voice="en-us", pitch=p), tmp_path / f"{p}.wav")
        ids = m.featurize(m.load(tmp_path / f"{p}.wav")).tolist()
        rel = [t - h.pitch0 for t in ids if h.pitch0 <= t < h.pitch0 + h.pitch_bins]
        got[p] = (ids[0] - h.register0, sum(rel) / len(rel))
    assert 0 <= got[20][0] < got[80][0] < h.register_bins  # a higher voice: a higher register token
    assert abs(got[20][1] - got[80][1]) < 1  # the same sentence said the same way: the same relative pitch
    assert all(abs(r - h.pitch_bins // 2) < 1.5 for _, r in got.values())  # around each speaker's own median
