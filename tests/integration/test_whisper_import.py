"""The packaged CTranslate2 Whisper tiny.en, imported into transformers, transcribes espeak-ng speech.

Also checks that encoding the real length (SpeechModality) stays close to Whisper's own
30 s padded encoding on a real clip. Measured here (tiny.en, three espeak clips of 2.4-3.6 s):
per-frame cosine similarity real vs padded, mean 0.94-0.97, first 10 frames 0.97-0.98;
the lowest frames are the last ones, where the padded run sees trailing silence.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from modality.speech.audio import load_audio

pytestmark = pytest.mark.slow

# (voice, text); tiny.en's own decoder is exact on these (it is weaker on other espeak voices)
SENTENCES = [("en", "Well, that's how I feel all the time."), ("en-us", "Please send the quarterly report to the finance team by Friday.")]


def _words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()


def wer(ref: str, hyp: str) -> float:
    r, h = _words(ref), _words(hyp)
    d = list(range(len(h) + 1))  # Levenshtein over words, one row at a time
    for i, rw in enumerate(r, 1):
        prev, d[0] = d[0], i
        for j, hw in enumerate(h, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (rw != hw))
    return d[len(h)] / max(1, len(r))


@pytest.fixture(scope="module")
def packaged() -> Path:
    from modality.speech.whisper_ct2 import find_packaged_whisper

    try:
        return find_packaged_whisper()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list[tuple[str, torch.Tensor]]:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    out = []
    for i, (voice, text) in enumerate(SENTENCES):
        wav = tmp_path_factory.mktemp("tts") / f"s{i}.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-w", str(wav), text], check=True, capture_output=True)
        out.append((text, load_audio(wav)))  # espeak writes 22,050 Hz; load_audio resamples to 16 kHz
    return out


def test_wer_helper() -> None:
    assert wer("a b c d", "a b c d") == 0.0
    assert wer("a b c d", "a x c") == 0.5


def test_imported_model_transcribes_espeak(packaged: Path, clips) -> None:
    from modality.speech.whisper_ct2 import load_ct2_processor, load_ct2_whisper

    model, proc = load_ct2_whisper(packaged), load_ct2_processor(packaged)
    assert model.config.d_model == 384 and model.config.vocab_size == 51864
    for text, wave in clips:
        feats = proc.feature_extractor(wave.numpy(), sampling_rate=16000, return_tensors="pt").input_features
        with torch.no_grad():
            ids = model.generate(feats)
        hyp = proc.tokenizer.batch_decode(ids, skip_special_tokens=True)[0]
        assert wer(text, hyp) <= 0.2, (text, hyp)


def test_real_length_encoding_is_close_to_padded(clips) -> None:
    from transformers import WhisperFeatureExtractor

    from modality.speech.plugin import SpeechModality

    m = SpeechModality(d_llm=8, hidden=8).eval()
    _, wave = clips[1]
    feats = m.featurize(wave)
    padded = torch.from_numpy(WhisperFeatureExtractor()(wave.numpy(), sampling_rate=16000).input_features)
    with torch.no_grad():
        real, n = m.encode_frozen(feats[None], torch.ones(1, feats.shape[0], dtype=torch.bool))
        ref = m.encoder(padded).last_hidden_state  # HF's own 30 s path
    k = int(n)
    assert k == -(-feats.shape[0] // 2) and ref.shape[1] == 1500
    cos = torch.nn.functional.cosine_similarity(real[0, :k], ref[0, :k], dim=-1)
    assert cos[:10].mean() > 0.95 and cos.mean() > 0.9, cos
