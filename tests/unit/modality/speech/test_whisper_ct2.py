"""CTranslate2 Whisper import on a tiny random model written in CTranslate2's binary layout.

The writer below mirrors CTranslate2's converter (fused q/k/v with a zero k bias, fused
cross-attention k/v, projection aliased to the embeddings), so a round trip HF -> ct2 -> HF
must give the original model's logits.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

from modality.speech.whisper_ct2 import cached_conversion, load_ct2_whisper, read_ct2_model

CFG = {"d_model": 32, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4,
       "decoder_attention_heads": 4, "encoder_ffn_dim": 48, "decoder_ffn_dim": 48, "vocab_size": 96,
       "num_mel_bins": 80, "max_source_positions": 40, "max_target_positions": 16, "pad_token_id": 0,
       "bos_token_id": 1, "eos_token_id": 1, "decoder_start_token_id": 2, "begin_suppress_tokens": None}
DTYPE_IDS = {torch.float32: 0, torch.int8: 1, torch.int16: 2, torch.float16: 4}


def _ct2_variables(model: WhisperForConditionalGeneration, int8: bool = False) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}

    def linear(scope, w, b=None):
        if int8:  # ct2's int8 scheme: per-row scale = 127 / amax, q = round(w * scale)
            scale = 127.0 / w.abs().amax(dim=1)
            out[f"{scope}/weight"] = torch.round(w * scale[:, None]).to(torch.int8)
            out[f"{scope}/weight_scale"] = scale
        else:
            out[f"{scope}/weight"] = w
        if b is not None:
            out[f"{scope}/bias"] = b

    def ln(scope, prefix):
        out[f"{scope}/gamma"], out[f"{scope}/beta"] = sd[f"{prefix}.weight"], sd[f"{prefix}.bias"]

    def attn(scope, p, cross):
        ln(f"{scope}/layer_norm", f"{p}_layer_norm")
        q, k, v, o = f"{p}.q_proj", f"{p}.k_proj", f"{p}.v_proj", f"{p}.out_proj"
        zeros = torch.zeros_like(sd[f"{q}.bias"])
        if cross:
            linear(f"{scope}/linear_0", sd[f"{q}.weight"], sd[f"{q}.bias"])
            linear(f"{scope}/linear_1", torch.cat([sd[f"{k}.weight"], sd[f"{v}.weight"]]), torch.cat([zeros, sd[f"{v}.bias"]]))
            linear(f"{scope}/linear_2", sd[f"{o}.weight"], sd[f"{o}.bias"])
        else:
            w = torch.cat([sd[f"{q}.weight"], sd[f"{k}.weight"], sd[f"{v}.weight"]])
            linear(f"{scope}/linear_0", w, torch.cat([sd[f"{q}.bias"], zeros, sd[f"{v}.bias"]]))
            linear(f"{scope}/linear_1", sd[f"{o}.weight"], sd[f"{o}.bias"])

    def ffn(scope, p):
        ln(f"{scope}/layer_norm", f"{p}.final_layer_norm")
        linear(f"{scope}/linear_0", sd[f"{p}.fc1.weight"], sd[f"{p}.fc1.bias"])
        linear(f"{scope}/linear_1", sd[f"{p}.fc2.weight"], sd[f"{p}.fc2.bias"])

    e, d = "model.encoder", "model.decoder"
    for i in (1, 2):
        out[f"encoder/conv{i}/weight"], out[f"encoder/conv{i}/bias"] = sd[f"{e}.conv{i}.weight"], sd[f"{e}.conv{i}.bias"]
    out["encoder/position_encodings/encodings"] = sd[f"{e}.embed_positions.weight"]
    ln("encoder/layer_norm", f"{e}.layer_norm")
    out["encoder/num_heads"] = torch.tensor(CFG["encoder_attention_heads"], dtype=torch.int16)
    for i in range(CFG["encoder_layers"]):
        attn(f"encoder/layer_{i}/self_attention", f"{e}.layers.{i}.self_attn", cross=False)
        ffn(f"encoder/layer_{i}/ffn", f"{e}.layers.{i}")
    out["decoder/embeddings/weight"] = sd[f"{d}.embed_tokens.weight"]
    out["decoder/position_encodings/encodings"] = sd[f"{d}.embed_positions.weight"]
    ln("decoder/layer_norm", f"{d}.layer_norm")
    out["decoder/num_heads"] = torch.tensor(CFG["decoder_attention_heads"], dtype=torch.int16)
    out["decoder/scale_embeddings"] = torch.tensor(0, dtype=torch.int8)
    for i in range(CFG["decoder_layers"]):
        attn(f"decoder/layer_{i}/self_attention", f"{d}.layers.{i}.self_attn", cross=False)
        attn(f"decoder/layer_{i}/attention", f"{d}.layers.{i}.encoder_attn", cross=True)
        ffn(f"decoder/layer_{i}/ffn", f"{d}.layers.{i}")
    return out


def write_ct2(path: Path, variables: dict[str, torch.Tensor], version: int = 6, spec: str = "WhisperSpec") -> None:
    def string(s: str) -> bytes:
        b = s.encode() + b"\0"
        return struct.pack("<H", len(b)) + b

    blob = struct.pack("<I", version) + string(spec) + struct.pack("<II", 3, len(variables))
    for name in sorted(variables):
        t = variables[name].contiguous()
        blob += string(name) + struct.pack("<B", t.ndim) + b"".join(struct.pack("<I", s) for s in t.shape)
        data = t.numpy().tobytes()
        blob += struct.pack("<BI", DTYPE_IDS[t.dtype], len(data)) + data
    blob += struct.pack("<I", 1) + string("decoder/projection/weight") + string("decoder/embeddings/weight")
    path.write_bytes(blob)


@pytest.fixture(scope="module")
def tiny_hf() -> WhisperForConditionalGeneration:
    torch.manual_seed(0)
    return WhisperForConditionalGeneration(WhisperConfig(**CFG)).eval()


@pytest.fixture()
def ct2_dir(tmp_path: Path, tiny_hf) -> Path:
    d = tmp_path / "ct2"
    d.mkdir()
    write_ct2(d / "model.bin", _ct2_variables(tiny_hf))
    return d


def _logits(model, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(2, 80, 80, generator=g)  # 80 mel frames = 40 encoder positions
    ids = torch.randint(0, CFG["vocab_size"], (2, 7), generator=g)
    with torch.no_grad():
        return model(input_features=feats, decoder_input_ids=ids).logits


def test_round_trip_gives_the_original_logits(ct2_dir: Path, tiny_hf, tmp_path: Path) -> None:
    model = load_ct2_whisper(ct2_dir, cache_dir=tmp_path / "cache")
    assert model.config.encoder_attention_heads == 4 and model.config.decoder_layers == 2
    assert model.config.tie_word_embeddings  # projection was an alias of the embeddings
    torch.testing.assert_close(_logits(model), _logits(tiny_hf), atol=2e-3, rtol=2e-3)  # cache is fp16


def test_int8_weights_are_dequantized(tmp_path: Path, tiny_hf) -> None:
    write_ct2(tmp_path / "model.bin", _ct2_variables(tiny_hf, int8=True))
    from modality.speech.whisper_ct2 import ct2_state_dict

    sd, _ = ct2_state_dict(read_ct2_model(tmp_path / "model.bin"))
    ref = tiny_hf.state_dict()["model.encoder.layers.0.fc1.weight"]
    step = ref.abs().amax(dim=1, keepdim=True) / 127.0  # one quantization step per row
    err = (sd["model.encoder.layers.0.fc1.weight"] - ref).abs()
    assert (err <= step / 2 + 1e-6).all()


def test_cache_is_reused_and_refreshed_when_the_source_changes(ct2_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    folder = cached_conversion(ct2_dir, cache)
    first = (folder / "model.safetensors").stat().st_mtime_ns
    assert cached_conversion(ct2_dir, cache) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == first  # no reconversion
    st = (ct2_dir / "model.bin").stat()
    os.utime(ct2_dir / "model.bin", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    cached_conversion(ct2_dir, cache)
    assert (folder / "model.safetensors").stat().st_mtime_ns != first


@pytest.mark.parametrize("cut", [3, 10, 200, -20, -1])
def test_truncated_model_bin_raises_one_line_naming_the_file(ct2_dir: Path, tmp_path: Path, cut: int) -> None:
    data = (ct2_dir / "model.bin").read_bytes()
    bad = tmp_path / "truncated" / "model.bin"
    bad.parent.mkdir()
    bad.write_bytes(data[:cut])
    with pytest.raises(ValueError) as e:
        load_ct2_whisper(bad.parent, cache_dir=tmp_path / "cache")
    assert str(bad) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("version,spec,match", [(99, "WhisperSpec", "version 99"), (6, "TransformerSpec", "TransformerSpec")])
def test_wrong_header_raises(tmp_path: Path, tiny_hf, version: int, spec: str, match: str) -> None:
    write_ct2(tmp_path / "model.bin", {"encoder/conv1/weight": torch.zeros(2, 2, 3)}, version=version, spec=spec)
    with pytest.raises(ValueError, match=match) as e:
        read_ct2_model(tmp_path / "model.bin")
    assert str(tmp_path / "model.bin") in str(e.value)


def test_garbage_and_trailing_bytes_raise(tmp_path: Path, ct2_dir: Path) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match="junk.bin"):
        read_ct2_model(junk)
    extra = tmp_path / "extra.bin"
    extra.write_bytes((ct2_dir / "model.bin").read_bytes() + b"\0\0")
    with pytest.raises(ValueError, match="trailing bytes"):
        read_ct2_model(extra)
    with pytest.raises(ValueError, match="not found"):
        load_ct2_whisper(tmp_path / "nowhere")
