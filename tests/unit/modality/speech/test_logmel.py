"""Batched log-mel (modality.speech.logmel): each clip of a padded batch gets exactly its single-clip log-mel."""

from __future__ import annotations

import pytest
import torch

from modality.speech.logmel import frame_counts, log_mel, log_mel_batch, mel_filters, pad_waves

# around every edge: silence-extended clips (<= 200), the reflect limit (201), exact hops (16000) and one past
LENGTHS = [1, 50, 200, 201, 399, 400, 401, 560, 16000, 16159, 16160, 16161, 23456]


def _chirp(n: int, seed: int = 0, amp: float = 0.3) -> torch.Tensor:
    t = torch.arange(n) / 16000
    g = torch.Generator().manual_seed(seed)
    return (amp * torch.sin(2 * torch.pi * (200 + 900 * t) * t) + amp / 15 * torch.randn(n, generator=g)).float()


def _assert_rows_match(waves: list[torch.Tensor], feats: torch.Tensor, mask: torch.Tensor, filters: torch.Tensor,
                       atol: float = 1e-5) -> None:
    for i, w in enumerate(waves):
        ref = log_mel(w, filters)
        t = ref.shape[0]
        assert int(mask[i].sum()) == t and bool(mask[i, :t].all())
        torch.testing.assert_close(feats[i, :t].cpu(), ref, atol=atol, rtol=0)
        assert not feats[i, t:].any()  # padded frames are zero, as collate_features pads


@pytest.mark.parametrize("n_mels", [80, 128])
def test_batch_equals_each_clip_alone(n_mels: int) -> None:
    fb = mel_filters(n_mels)
    waves = [_chirp(n, seed=i) for i, n in enumerate(LENGTHS)]
    x, lengths = pad_waves(waves)
    past = torch.arange(x.shape[1])[None, :] >= lengths[:, None]
    x[past] = torch.randn(int(past.sum()), generator=torch.Generator().manual_seed(7))  # never read
    feats, mask = log_mel_batch(x, lengths, fb)
    assert feats.shape == (len(waves), int(frame_counts(lengths).max()), n_mels) and mask.shape == feats.shape[:2]
    _assert_rows_match(waves, feats, mask, fb)


def test_padding_and_loud_neighbours_do_not_leak() -> None:
    """Whisper floors each clip at its own max - 8 dB: a quiet short clip next to a loud long one keeps its floor,
    and whatever sits past a clip's length (here loud noise, not zeros) is never read."""
    fb = mel_filters(80)
    quiet, loud = _chirp(7000, seed=1, amp=1e-3), _chirp(30000, seed=2, amp=0.9)
    x, lengths = pad_waves([quiet, loud])
    x[0, 7000:] = 5 * torch.randn(x.shape[1] - 7000, generator=torch.Generator().manual_seed(3))
    feats, mask = log_mel_batch(x, lengths, fb)
    _assert_rows_match([quiet, loud], feats, mask, fb)
    alone, _ = log_mel_batch(*pad_waves([quiet]), fb)
    torch.testing.assert_close(feats[0, : alone.shape[1]], alone[0], atol=1e-5, rtol=0)


def test_matches_whisper_feature_extractor() -> None:
    from transformers import WhisperFeatureExtractor

    waves = [_chirp(n, seed=i) for i, n in enumerate([21920, 8000, 16161, 4321])]
    for n_mels in (80, 128):
        fe = WhisperFeatureExtractor(feature_size=n_mels)
        feats, mask = log_mel_batch(*pad_waves(waves), mel_filters(n_mels))
        for i, w in enumerate(waves):  # the extractor at the clip's real length (its default pads to 30 s)
            ref = fe(w.numpy(), sampling_rate=16000, padding="longest", return_tensors="pt").input_features[0].T
            assert int(mask[i].sum()) == ref.shape[0] == w.shape[0] // 160
            assert (feats[i, : ref.shape[0]] - ref).abs().max() <= 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_runs_on_the_device_of_the_waves() -> None:
    fb = mel_filters(80)
    waves = [_chirp(n, seed=i) for i, n in enumerate(LENGTHS)]
    feats, mask = log_mel_batch(*pad_waves(waves, "cuda"), fb)
    assert feats.device.type == mask.device.type == "cuda"
    _assert_rows_match(waves, feats, mask, fb, atol=1e-4)


def test_bad_shapes_raise() -> None:
    fb = mel_filters(80)
    with pytest.raises(ValueError, match="waves"):
        log_mel_batch(torch.zeros(400), torch.tensor([400]), fb)
    with pytest.raises(ValueError, match="exceeds"):
        log_mel_batch(torch.zeros(2, 400), torch.tensor([400, 401]), fb)
    with pytest.raises(ValueError, match="mono"):
        pad_waves([torch.zeros(2, 400)])
