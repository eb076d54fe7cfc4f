"""SpeechModality with a tiny random Whisper encoder: lengths, padding invariance, freezing, features, cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import soundfile as sf
import torch

from modality.speech.plugin import SpeechModality, log_mel, mel_filters

D_LLM = 24


def _make(**kw) -> SpeechModality:
    torch.manual_seed(0)
    args = {"d_llm": D_LLM, "tiny": True, "stack": 3, "hidden": 20, "heads": 4, **kw}
    return SpeechModality(**args).eval()


@pytest.fixture(scope="module")
def mod() -> SpeechModality:
    return _make()


def _chirp(seconds: float, seed: int = 0) -> torch.Tensor:
    t = torch.arange(int(16000 * seconds)) / 16000
    g = torch.Generator().manual_seed(seed)
    return (0.3 * torch.sin(2 * torch.pi * (200 + 900 * t) * t) + 0.02 * torch.randn(t.shape, generator=g)).float()


@pytest.mark.parametrize("adaptor,stack", [("mlp", 1), ("mlp", 3), ("mlp", 4), ("conv", 2), ("conv", 5),
                                           ("transformer", 1), ("transformer", 4)])
def test_encode_lengths_match_output_length(adaptor: str, stack: int) -> None:
    m = _make(adaptor=adaptor, stack=stack)
    t_mels = [1, 2, 3, 7, 8, 9, 16, 31, 57]
    feats, mask = m.collate_features([torch.randn(t, 80) for t in t_mels])
    with torch.no_grad():
        hidden, h_len = m.encode_frozen(feats, mask)
        emb, n = m.adapt(hidden, h_len)
    assert h_len.tolist() == [m.hidden_length(t) for t in t_mels] == [-(-t // 2) for t in t_mels]
    assert hidden.shape[:2] == (len(t_mels), max(h_len))
    assert n.tolist() == [m.output_length(t) for t in t_mels] == [m.adapted_length(h) for h in h_len.tolist()]
    assert emb.shape == (len(t_mels), max(n), D_LLM)


@pytest.mark.parametrize("adaptor", ["mlp", "conv", "transformer"])
def test_padding_invariance(adaptor: str) -> None:
    """A clip encoded alone equals its valid frames when padded in a batch with a longer clip."""
    m = _make(adaptor=adaptor, stack=4)
    short, long = torch.randn(45, 80), torch.randn(130, 80)
    with torch.no_grad():
        alone, n_alone = m.encode(short[None], torch.ones(1, 45, dtype=torch.bool))
        batch, n_batch = m.encode(*m.collate_features([short, long]))
        h_alone, _ = m.encode_frozen(short[None], torch.ones(1, 45, dtype=torch.bool))
        h_batch, h_len = m.encode_frozen(*m.collate_features([short, long]))
    k = int(h_len[0])
    torch.testing.assert_close(h_batch[0, :k], h_alone[0], atol=1e-4, rtol=1e-4)
    assert (h_batch[0, k:] == 0).all()  # padded encoder rows are zeroed
    assert n_alone.item() == n_batch[0].item()
    torch.testing.assert_close(batch[0, : n_alone.item()], alone[0], atol=1e-4, rtol=1e-4)


def test_frozen_encoder_gets_no_grads_adaptor_does(mod: SpeechModality) -> None:
    m = _make()
    m.train()
    assert m.encoder_frozen and not m.encoder.training  # frozen encoders stay in eval mode
    emb, _ = m.encode(*m.collate_features([torch.randn(40, 80), torch.randn(23, 80)]))
    emb.pow(2).sum().backward()
    assert all(p.grad is None for p in m.encoder.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.adaptor.parameters())


def test_target_rms_sets_output_scale() -> None:
    m = _make(target_rms=0.05)
    with torch.no_grad():
        emb, _ = m.encode(torch.randn(1, 60, 80), torch.ones(1, 60, dtype=torch.bool))
    rms = emb[0].pow(2).mean(dim=-1).sqrt()
    torch.testing.assert_close(rms, torch.full_like(rms, 0.05), atol=1e-3, rtol=0)


BAD = [{"stack": 0}, {"adaptor": "lstm"}, {"max_seconds": 31}, {"d_llm": 0}, {"target_rms": -1.0}, {"overlong": "skip"},
       {"adaptor": "transformer", "heads": 3}, {"adaptor": "transformer", "layers": 0},
       {"encoder_layers": [0, 3]}, {"encoder_layers": [2, 1]}, {"encoder_layers": "first"}]


@pytest.mark.parametrize("bad", BAD)
def test_bad_hyperparameters_fail_at_construction(bad: dict) -> None:
    with pytest.raises(ValueError):
        _make(**bad)


def test_featurize_matches_whisper_feature_extractor(mod: SpeechModality) -> None:
    from transformers import WhisperFeatureExtractor

    wave = _chirp(1.37)
    ours = mod.featurize(wave)
    ref = WhisperFeatureExtractor()(wave.numpy(), sampling_rate=16000, padding="longest", return_tensors="pt")
    ref = ref.input_features[0].T  # [T, 80]
    assert ours.shape == ref.shape == (wave.shape[0] // 160, 80)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    ref128 = WhisperFeatureExtractor(feature_size=128)(wave.numpy(), sampling_rate=16000, padding="longest", return_tensors="pt")
    torch.testing.assert_close(log_mel(wave, mel_filters(128)), ref128.input_features[0].T, atol=1e-4, rtol=0)  # large-v3
    assert mod.featurize(torch.zeros(50)).shape == (2, 80)  # clips shorter than a window still give frames


def test_load_names_bad_files(mod: SpeechModality, tmp_path: Path) -> None:
    (tmp_path / "x.wav").write_bytes(b"not audio at all" * 10)
    with pytest.raises(ValueError, match="x.wav"):
        mod.load("x.wav", root=str(tmp_path))
    with pytest.raises(ValueError, match="missing.wav"):
        mod.load_features("missing.wav", root=str(tmp_path))


def test_encoder_output_cache(tmp_path: Path) -> None:
    m = _make(cache_dir=str(tmp_path / "cache"))
    clips = []
    for i, sec in enumerate([0.7, 1.9, 1.2]):
        sf.write(tmp_path / f"c{i}.wav", _chirp(sec, seed=i).numpy(), 16000)
        clips.append(f"c{i}.wav")
    stats = m.precompute_cache(clips, batch_size=2, root=str(tmp_path), progress=False)
    assert stats == {"computed": 3, "cached": 0, "damaged": 0, "encoded_here": 3}
    assert m.precompute_cache(clips, root=str(tmp_path), progress=False)["cached"] == 3
    for ref in clips:
        hidden, kind = m.load_features(ref, root=str(tmp_path))
        assert kind == "hidden" and hidden.dtype == torch.float32
        feats = m.featurize(m.load(ref, root=str(tmp_path)))
        with torch.no_grad():
            direct, _ = m.encode_frozen(feats[None], torch.ones(1, feats.shape[0], dtype=torch.bool))
        assert hidden.shape == direct[0].shape
        torch.testing.assert_close(hidden, direct[0], atol=2e-3, rtol=2e-3)  # stored as fp16
        assert m.adapted_length(hidden.shape[0]) == m.output_length(feats.shape[0])
    # a fresh file not yet cached is computed on first use and then read back
    sf.write(tmp_path / "new.wav", _chirp(0.5, seed=9).numpy(), 16000)
    h1, _ = m.load_features("new.wav", root=str(tmp_path))
    assert m.cached("new.wav", root=str(tmp_path))
    h2, _ = m.load_features(str(tmp_path / "new.wav"))
    torch.testing.assert_close(h1, h2, atol=2e-3, rtol=2e-3)
    # a different encoder never reads this cache
    other = _make(cache_dir=str(tmp_path / "cache"), tiny={"d_model": 16, "encoder_layers": 1})
    assert other.cache_folder() != m.cache_folder() and not other.cached(tmp_path / "new.wav")
    no_cache = _make()
    assert no_cache.load_features("new.wav", root=str(tmp_path))[1] == "features"


def test_several_encoder_states_side_by_side(tmp_path: Path) -> None:
    """encoder_layers='all': the states side by side, the final one identical to the default's; the adaptor
    reads them all; a cache of several states never answers for one state."""
    last, every = _make(cache_dir=str(tmp_path)), _make(encoder_layers="all", cache_dir=str(tmp_path))
    every.encoder.load_state_dict(last.encoder.state_dict())
    feats = last.featurize(_chirp(1.3))[None]
    mask = torch.ones(1, feats.shape[1], dtype=torch.bool)
    with torch.no_grad():
        h1, n1 = last.encode_frozen(feats, mask)
        hk, nk = every.encode_frozen(feats, mask)
    assert every.states == (0, 1, 2) and hk.shape[-1] == 3 * h1.shape[-1] and torch.equal(n1, nk)
    torch.testing.assert_close(hk[..., -h1.shape[-1]:], h1)  # the final state is the default's output
    assert not torch.allclose(hk[..., :h1.shape[-1]], h1)    # the others are earlier states, not copies
    assert _make(encoder_layers=[1, 2]).states == (1, 2)
    # the adaptor reads every state: its input projection spans them, and an earlier state moves the output
    assert every.adaptor.fc1.in_features == 3 * last.adaptor.fc1.in_features
    with torch.no_grad():
        out, _ = every.adapt(hk, nk)
        poked = hk.clone()
        poked[..., : h1.shape[-1]] += torch.randn_like(poked[..., : h1.shape[-1]])
        assert not torch.allclose(every.adapt(poked, nk)[0], out)
        # each state is layer-normed on its own; padded (zero) rows stay zero
        normed = every.adaptor.norm_states(hk).view(*hk.shape[:2], 3, -1)
        torch.testing.assert_close(normed.mean(-1), torch.zeros(normed.shape[:-1]), atol=1e-5, rtol=0)
        assert every.adaptor.norm_states(torch.zeros(1, 2, hk.shape[-1])).abs().sum() == 0
    sf.write(tmp_path / "c.wav", _chirp(0.5).numpy(), 16000)
    assert every.cache_folder() != last.cache_folder()


def test_encoder_from_a_local_hf_folder(tmp_path: Path) -> None:
    """encoder_name may be any HF Whisper id or folder; here a tiny one saved locally (no hub)."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(3)
    cfg = WhisperConfig(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                        encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=64, num_mel_bins=128, max_source_positions=100,
                        pad_token_id=0, bos_token_id=1, eos_token_id=1, decoder_start_token_id=2, begin_suppress_tokens=None)
    full = WhisperForConditionalGeneration(cfg)
    full.save_pretrained(tmp_path / "w")
    m = SpeechModality(d_llm=D_LLM, encoder_name=str(tmp_path / "w"), stack=2, hidden=8)
    assert m.n_mels == 128 and m.encoder_frozen
    torch.testing.assert_close(m.encoder.conv1.weight, full.model.encoder.conv1.weight)
    emb, n = m.encode(m.featurize(_chirp(0.5))[None], torch.ones(1, 50, dtype=torch.bool))
    assert emb.shape == (1, m.output_length(50), D_LLM) and n.item() == 13


def test_time_mask_zeroes_spans_in_training_only() -> None:
    m = _make(time_mask=0.3, adaptor="mlp")
    lengths = torch.tensor([200, 120])
    spans = m._time_spans(lengths, 200)
    frac = spans[0].float().mean().item()
    assert 0.1 < frac <= 0.31 and not spans[1, 120:].any()           # ~30 % of each clip, never past its end
    hidden = torch.randn(2, 200, m.hidden_size)
    m.eval()
    a, _ = m.adapt(hidden, lengths)
    b, _ = m.adapt(hidden, lengths)
    assert torch.equal(a, b)                                           # eval: no masking
    m.adaptor.train()
    c, _ = m.adapt(hidden, lengths)
    assert not torch.allclose(a, c)                                    # training: frames were masked
    with pytest.raises(ValueError, match="time_mask"):
        _make(time_mask=1.0)
