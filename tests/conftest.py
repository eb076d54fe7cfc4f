"""Shared fixtures: the real SmolLM2 tokenizer (cached conversion), tiny random models, a toy modality."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from modality.base import Modality

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("MMLM_ROOT", str(ROOT))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class ToyModality(Modality):
    """Features [T, F] -> linear 'encoder' -> stack-2 + linear adaptor. N = ceil(T / 2)."""

    name = "toy"
    placeholder = "<toy>"

    def __init__(self, d_llm: int = 64, feat: int = 8, hidden: int = 16):
        super().__init__()
        self.encoder = nn.Linear(feat, hidden)
        self.adaptor = nn.Linear(2 * hidden, d_llm)
        self.encoder.requires_grad_(False)

    def load(self, ref, root=None):
        if isinstance(ref, str) and ref.startswith("bad"):
            raise ValueError(f"{ref}: corrupt input")
        n = int(ref) if not isinstance(ref, dict) else ref["n"]
        g = torch.Generator().manual_seed(n)
        return torch.randn(n, 8, generator=g)

    def featurize(self, raw: Tensor) -> Tensor:
        return raw

    def output_length(self, feature_length: int) -> int:
        return (feature_length + 1) // 2

    def encode_frozen(self, features: Tensor, mask: Tensor):
        return self.encoder(features), mask.sum(1)

    def adapt(self, hidden: Tensor, lengths: Tensor):
        B, T, H = hidden.shape
        if T % 2:
            hidden = torch.cat([hidden, hidden.new_zeros(B, 1, H)], 1)
        out = self.adaptor(hidden.reshape(B, -1, 2 * H))  # [B, ceil(T/2), d_llm]
        return out, (lengths + 1) // 2


@pytest.fixture()
def tiny_lm():
    """Tokenizer of SmolLM2 (converted once to the cache) + a tiny random Llama."""
    from llm.loader import load_llm

    return load_llm(tiny={"hidden_size": 64, "layers": 2, "heads": 4, "intermediate_size": 128})


@pytest.fixture()
def toy_modality():
    torch.manual_seed(0)
    return ToyModality()


@pytest.fixture(scope="session")
def speech_corpus(tmp_path_factory) -> Path:
    """A small real espeak corpus (align manifests + instruct conversations)."""
    if not shutil.which("espeak-ng"):
        pytest.fail("espeak-ng is not installed: run `make install`")
    from modality.speech.corpus.build import main

    out = tmp_path_factory.mktemp("speech")
    main(["--out", str(out), "--n-align", "40", "--n-instruct", "16", "--jobs", "2"])
    return out
