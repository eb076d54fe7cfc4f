"""load_audio: resampling, downmix, overlong policy and one-line errors for every bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from modality.speech.audio import audio_info, chunk_waveform, load_audio


def _sine(freq: float, sr: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_hz(wave: torch.Tensor, sr: int) -> float:
    spec = torch.fft.rfft(wave * torch.hann_window(wave.shape[0], periodic=False)).abs()
    return float(spec.argmax()) * sr / wave.shape[0]


def test_stereo_44k1_becomes_16k_mono_keeping_the_frequency(tmp_path: Path) -> None:
    left = _sine(440, 44100, 1.0)
    stereo = np.stack([left, 0.5 * left], axis=1)  # [S, 2]: right channel is half as loud
    sf.write(tmp_path / "a.wav", stereo, 44100, subtype="FLOAT")
    wave = load_audio(tmp_path / "a.wav")
    assert wave.dtype == torch.float32 and wave.ndim == 1
    assert abs(wave.shape[0] - 16000) <= 1
    assert abs(_peak_hz(wave, 16000) - 440) < 2.0
    # mean of the channels: amplitude (0.5 + 0.25) / 2
    assert wave[1000:-1000].abs().max().item() == pytest.approx(0.375, abs=0.01)


def test_16k_mono_int16_is_read_unchanged(tmp_path: Path) -> None:
    x = _sine(1000, 16000, 0.5)
    sf.write(tmp_path / "b.wav", x, 16000, subtype="PCM_16")
    wave = load_audio(tmp_path / "b.wav")
    torch.testing.assert_close(wave, torch.from_numpy(x), atol=1e-4, rtol=0)


def test_other_rates_resample_to_target(tmp_path: Path) -> None:
    sf.write(tmp_path / "c.wav", _sine(300, 22050, 2.0), 22050)
    wave = load_audio(tmp_path / "c.wav", target_sr=8000)
    assert abs(wave.shape[0] - 16000) <= 1 and abs(_peak_hz(wave, 8000) - 300) < 2.0
    assert audio_info(tmp_path / "c.wav") == (44100, 22050)


def test_overlong_policy(tmp_path: Path) -> None:
    sf.write(tmp_path / "long.wav", _sine(200, 16000, 2.0), 16000)
    with pytest.raises(ValueError, match="longer than max_seconds") as e:
        load_audio(tmp_path / "long.wav", max_seconds=1.5)
    assert "long.wav" in str(e.value)
    assert load_audio(tmp_path / "long.wav", max_seconds=1.5, overlong="truncate").shape[0] == 24000
    assert load_audio(tmp_path / "long.wav", max_seconds=2.0).shape[0] == 32000  # exactly at the limit is fine
    with pytest.raises(ValueError, match="overlong"):
        load_audio(tmp_path / "long.wav", overlong="chunk")  # type: ignore[arg-type]


def test_chunk_waveform() -> None:
    pieces = chunk_waveform(torch.arange(70_000, dtype=torch.float32), 16000, seconds=2.0)
    assert [p.shape[0] for p in pieces] == [32000, 32000, 6000]
    assert torch.equal(torch.cat(pieces), torch.arange(70_000, dtype=torch.float32))


def _write_bad(kind: str, path: Path) -> None:
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "corrupt":
        path.write_bytes(b"RIFF\x00\x01\x00\x00WAVEjunk" + bytes(range(256)) * 4)
    elif kind == "zero_length":
        sf.write(path, np.zeros((0,), dtype=np.float32), 16000)
    elif kind == "nan":
        x = _sine(440, 16000, 0.2)
        x[100] = np.nan
        sf.write(path, x, 16000, subtype="FLOAT")


@pytest.mark.parametrize(
    "kind,match",
    [("missing", "not found"), ("empty", "empty"), ("corrupt", "cannot decode"), ("zero_length", "zero length"), ("nan", "NaN")],
)
def test_bad_inputs_raise_one_line_naming_the_file(tmp_path: Path, kind: str, match: str) -> None:
    path = tmp_path / f"bad_{kind}.wav"
    if kind != "missing":
        _write_bad(kind, path)
    with pytest.raises(ValueError, match=match) as e:
        load_audio(path)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg
