"""The sharded encoder-output cache (modality.speech.cache): hits, misses, invalidation by weights, settings and
content, and damaged or partial shards detected, deleted and rebuilt, never used."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import soundfile as sf
import torch

from modality.speech.plugin import SpeechModality
from modality.speech.shards import ShardError, read_shard_header

SECONDS = [0.6, 1.4, 0.9, 1.1, 0.7]


def _make(**kw) -> SpeechModality:
    torch.manual_seed(0)
    return SpeechModality(**{"d_llm": 8, "tiny": True, "stack": 2, "hidden": 8, **kw}).eval()


def _wave(seconds: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(16000 * seconds)) / 16000
    return (0.3 * torch.sin(2 * torch.pi * (150 + 100 * seed) * t) + 0.05 * torch.randn(t.shape, generator=g)).float()


@pytest.fixture
def clips(tmp_path: Path) -> list[Path]:
    out = []
    for i, sec in enumerate(SECONDS):
        sf.write(tmp_path / f"c{i}.wav", _wave(sec, i).numpy(), 16000)
        out.append(tmp_path / f"c{i}.wav")
    return out


def _direct(m: SpeechModality, path: Path) -> torch.Tensor:
    feats = m.featurize(m.load(path))
    with torch.no_grad():
        return m.encode_frozen(feats[None], torch.ones(1, feats.shape[0], dtype=torch.bool))[0][0]


def _no_encoding(m: SpeechModality, monkeypatch) -> None:
    def refuse(paths):
        raise AssertionError(f"encoded {paths}: expected a cache hit")
    monkeypatch.setattr(m, "_encode_paths", refuse)


def _shards(m: SpeechModality) -> list[Path]:
    return sorted(m.cache_folder().glob("shard-*.safetensors"))


def _clip_keys(m: SpeechModality) -> list[str]:
    return [k for s in _shards(m) for k in read_shard_header(s)[0]]


def test_sharded_build_then_hits_without_encoding(clips, tmp_path, monkeypatch):
    m = _make(cache_dir=str(tmp_path / "cache"))
    counts = m.precompute_cache(clips, batch_size=2, progress=False, shard_bytes=1)
    assert counts == {"computed": 5, "cached": 0, "damaged": 0, "encoded_here": 5}
    assert len(_shards(m)) == 3 and len(_clip_keys(m)) == len(set(_clip_keys(m))) == 5  # a shard per batch of 2
    assert m.precompute_cache(clips, progress=False)["cached"] == 5
    _no_encoding(m, monkeypatch)
    fresh = _make(cache_dir=str(tmp_path / "cache"))  # another process: finds it all by stat, reads verified
    _no_encoding(fresh, monkeypatch)
    for p in clips:
        hidden, kind = fresh.load_features(p)
        assert kind == "hidden"
        torch.testing.assert_close(hidden, _direct(m, p), atol=2e-3, rtol=2e-3)  # stored as fp16
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.name.endswith(".tmp")]


def test_miss_encodes_once_then_hits(clips, tmp_path, monkeypatch):
    m = _make(cache_dir=str(tmp_path / "cache"))
    assert not m.cached(clips[0])
    h1, _ = m.load_features(clips[0])
    assert m.cached(clips[0]) and len(_shards(m)) == 1
    _no_encoding(m, monkeypatch)
    torch.testing.assert_close(m.load_features(str(clips[0]))[0], h1)


def test_weight_change_invalidates(clips, tmp_path, monkeypatch):
    """Any weight (not only conv1) and any featurizer setting names another cache; the same weights share one."""
    m = _make(cache_dir=str(tmp_path / "cache"))
    m.precompute_cache(clips[:2], progress=False)
    folder, before = m.cache_folder(), m.load_features(clips[0])[0]
    assert _make(cache_dir=str(tmp_path / "cache")).cache_folder() == folder  # same weights, same settings
    for other in (_make(cache_dir=str(tmp_path / "cache"), max_seconds=20.0),
                  _make(cache_dir=str(tmp_path / "cache"), encoder_layers="all")):
        assert other.cache_folder() != folder and not other.cached(clips[0])
    state = {k: v.clone() for k, v in m.encoder.state_dict().items()}
    state["layers.1.fc2.weight"] += 0.2 * torch.randn_like(state["layers.1.fc2.weight"])  # the old key (conv1) missed this
    m.encoder.load_state_dict(state)
    assert m.cache_folder() != folder and not m.cached(clips[0])
    after, _ = m.load_features(clips[0])
    assert not torch.allclose(after, before, atol=1e-2)
    torch.testing.assert_close(after, _direct(m, clips[0]), atol=2e-3, rtol=2e-3)
    assert m.precompute_cache(clips[:2], progress=False)["computed"] == 1  # clip 0 was encoded on its miss


def test_content_decides_not_path_or_mtime(clips, tmp_path, monkeypatch):
    m = _make(cache_dir=str(tmp_path / "cache"))
    m.precompute_cache(clips, progress=False)
    copy = tmp_path / "copy.wav"
    shutil.copy(clips[1], copy)
    os.utime(clips[2], ns=(1, 1))  # touched: the same bytes
    with monkeypatch.context() as mp:
        _no_encoding(m, mp)
        m.load_features(copy), m.load_features(clips[2])
        assert m.precompute_cache([copy, *clips], progress=False)["computed"] == 0
    sf.write(clips[3], _wave(0.8, seed=42).numpy(), 16000)  # new audio under the old path
    assert not m.cached(clips[3])
    torch.testing.assert_close(m.load_features(clips[3])[0], _direct(m, clips[3]), atol=2e-3, rtol=2e-3)
    # the renamed and touched files are now found by their stat alone (remembered in a shard), not re-hashed
    rows = [r for s in _shards(m) for r in json.loads(_header(s)["__metadata__"]["paths"])]
    assert {str(copy.resolve()), str(clips[2].resolve())} <= {r[0] for r in rows}


def _header(shard: Path) -> dict:
    raw = shard.read_bytes()
    return json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])


def _flip_a_data_byte(shard: Path) -> None:
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0xFF
    shard.write_bytes(bytes(raw))


def test_corrupt_shard_detected_deleted_rebuilt(clips, tmp_path):
    m = _make(cache_dir=str(tmp_path / "cache"))
    m.precompute_cache(clips, batch_size=2, progress=False, shard_bytes=1)
    victim = _shards(m)[0]
    lost = set(read_shard_header(victim)[0])
    _flip_a_data_byte(victim)
    counts = m.precompute_cache(clips, progress=False)  # verifies every shard it relies on
    assert counts["damaged"] == 1 and counts["computed"] == len(lost) and not victim.exists()
    assert sorted(_clip_keys(m)) == sorted(set(_clip_keys(m))) and len(_clip_keys(m)) == 5
    # damage found on reading (no precompute): that read re-encodes, the damaged bytes are never returned
    victim = _shards(m)[-1]
    key = next(iter(read_shard_header(victim)[0]))
    path = next(p for p in clips if m.cache.store(m.fingerprint).key_of(p) == key)
    _flip_a_data_byte(victim)
    other = _make(cache_dir=str(tmp_path / "cache"))  # indexes it (the header is whole), reads the bad clip
    for p in clips:  # any clip of the damaged shard may be the one whose bytes were hit
        torch.testing.assert_close(other.load_features(p)[0], _direct(m, p), atol=2e-3, rtol=2e-3)
    assert not victim.exists() and other.cached(path)


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage header", "wrong dtype in header"])
def test_partial_or_unreadable_shard_is_refused(clips, tmp_path, damage):
    m = _make(cache_dir=str(tmp_path / "cache"))
    m.precompute_cache(clips[:2], progress=False)
    (shard,) = _shards(m)
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    bad = {"truncated": raw[:-10], "empty": b"", "garbage header": raw[:8] + b"x" * n + raw[8 + n:],
           "wrong dtype in header": raw[:8] + raw[8:8 + n].replace(b'"F16"', b'"F32"', 1) + raw[8 + n:]}[damage]
    shard.write_bytes(bad)
    with pytest.raises(ShardError):
        read_shard_header(shard)
    fresh = _make(cache_dir=str(tmp_path / "cache"))
    assert not fresh.cached(clips[0]) and not shard.exists()  # refused when indexed, deleted
    assert fresh.precompute_cache(clips[:2], progress=False)["computed"] == 2
    torch.testing.assert_close(fresh.load_features(clips[1])[0], _direct(m, clips[1]), atol=2e-3, rtol=2e-3)


def test_missing_or_bad_audio_names_the_file(clips, tmp_path):
    m = _make(cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="nope.wav"):
        m.precompute_cache([tmp_path / "nope.wav"], progress=False)
    (tmp_path / "bad.wav").write_bytes(b"RIFF0000WAVEjunk")
    with pytest.raises(ValueError, match="bad.wav"):
        m.precompute_cache([clips[0], tmp_path / "bad.wav"], progress=False)


def test_a_crashed_writers_tmp_files_are_swept_when_old(clips, tmp_path):
    m = _make(cache_dir=str(tmp_path / "cache"))
    m.precompute_cache(clips[:1], progress=False)
    old, live = m.cache_folder() / ".shard-old.safetensors.1.tmp", m.cache_folder() / ".shard-new.safetensors.2.tmp"
    old.write_bytes(b"half a shard"), live.write_bytes(b"being written")
    os.utime(old, (1, 1))
    m.precompute_cache(clips[:1], progress=False)
    assert not old.exists() and live.exists()  # a live writer's tmp file is left alone
