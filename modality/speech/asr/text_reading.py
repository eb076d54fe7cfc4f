"""Reading practice on text alone: a transcript's espeak-ng phonemes, noised like a recognizer's, in place of a clip.

Why: with ``modality.ctc_compress=soft`` the LLM reads one position per phoneme heard (each position its phoneme
distribution @ the LLM's rows for the phonemes' IPA text). Learning to turn such a string into words is the
step that failed on audio alone (held-out WER ~100 % after 4,000 clips, bench/RESULTS.md): the LLM must learn
English spelling from phonemes, and clips are few and slow (the encoder cache, ~2.5 s a step). Text is free:
any sentence's phonemes give the same kind of input, tens of thousands of sentences, no audio, and a step
costs the LLM alone. The noise (substitutions, deletions, insertions, soft mass on another class) makes the
reader robust to what a recognizer at ~18 % phoneme error gets wrong.

A speech input written ``{"text": "..."}`` (a manifest line with ``"from_text": true``) loads as
[N, V] phoneme distributions (kind ``symbols``); ``CtcObjective.symbol_rows`` maps them through the same
table the audio path uses, so what the LLM reads is the same kind of row either way.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)


@dataclass
class PhonemeNoise:
    """Per-phoneme error rates of the practice input (~ a recognizer at 15-20 % PER), and the soft mass."""

    substitute: float = 0.08
    delete: float = 0.05
    insert: float = 0.03
    soft: float = 0.5  # each position gives U(0, soft) of its mass to another class

    def __post_init__(self) -> None:
        rates = (self.substitute, self.delete, self.insert, self.soft)
        if any(not 0 <= r < 1 for r in rates) or self.substitute + self.delete >= 1:
            raise ValueError(f"phoneme noise rates must be in [0, 1) (substitute + delete < 1), got {self}")


def noisy_distribution(ids: Sequence[int], n_classes: int, noise: PhonemeNoise, rng: random.Random) -> Tensor:
    """Class indices (blank = 0 excluded) -> [N, n_classes] float32 distributions with noise; N >= 1.

    Each kept phoneme is swapped for a random class with ``substitute``, dropped with ``delete``, followed by a
    random class with ``insert``; then each position keeps 1 - m of its mass, m ~ U(0, soft), the rest on a
    random class (the soft readout of a recognizer that hesitates)."""
    if not ids:
        raise ValueError("no phonemes to read")
    if n_classes < 2 or any(not 0 < i < n_classes for i in ids):
        raise ValueError(f"phoneme classes must be in [1, {n_classes}), got {sorted(set(ids))[:5]}...")
    seq: list[int] = []
    for i in ids:
        r = rng.random()
        if r < noise.delete:
            continue
        seq.append(rng.randrange(1, n_classes) if r < noise.delete + noise.substitute else i)
        if rng.random() < noise.insert:
            seq.append(rng.randrange(1, n_classes))
    seq = seq or [ids[0]]
    dist = torch.zeros(len(seq), n_classes)
    for k, c in enumerate(seq):
        m = rng.uniform(0.0, noise.soft) if noise.soft else 0.0
        dist[k, c] += 1.0 - m
        dist[k, rng.randrange(1, n_classes)] += m
    return dist


class TextPhonemes:
    """A transcript -> its noised phoneme distributions over a chain's classes (``SpeechModality.text_reader``)."""

    def __init__(self, phonemizer: Any, classes: Sequence[str], noise: PhonemeNoise | None = None, seed: int = 0):
        self.phonemizer, self.classes = phonemizer, list(classes)
        self.index = {p: i for i, p in enumerate(self.classes)}
        self.noise = noise or PhonemeNoise()
        self.rng = random.Random(seed)
        self.dropped: dict[str, int] = {}  # phonemes without a class: how often each was dropped

    def __call__(self, text: str, where: str = "") -> Tensor:
        """A phoneme the chain has no class for is dropped (the recognizer can never say it: to the reader it is a
        deletion), counted in ``dropped`` and logged once per phoneme, naming the sentence."""
        try:
            seq = self.phonemizer([text])[0]
        except ValueError as e:
            raise ValueError(f"{where or text!r}: {e}") from None
        ids = []
        for p in seq:
            if p in self.index:
                ids.append(self.index[p])
                continue
            if p not in self.dropped:
                log.warning("%s: phoneme %r is not among the chain's %d classes: dropped (counted in dropped)",
                            where or repr(text), p, len(self.classes))
            self.dropped[p] = self.dropped.get(p, 0) + 1
        if not ids:
            raise ValueError(f"{where or text!r}: none of its phonemes {sorted(set(seq))} is among the chain's classes")
        return noisy_distribution(ids, len(self.classes), self.noise, self.rng)
