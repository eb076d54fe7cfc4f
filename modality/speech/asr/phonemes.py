"""Phoneme targets for speech: what espeak-ng itself says a text sounds like.

Why: the token-level CTC recognizer learned WORDS, not sounds (bench/RESULTS.md: it never spells a word
training had fewer than four times, and ~30 % of held-out words are that rare). Phonemes are a small,
closed class set every sentence exercises, so a phoneme recognizer learns sounds; words then come from a
pronunciation lexicon (modality.speech.asr.lexicon) that can hold words no training clip ever said.

Targets are the canonical phonemization of the text (one voice, ``en-us`` by default), whatever voice
spoke the clip: the recognizer learns to map accents onto one phoneme set, and one lexicon serves all.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
from collections.abc import Iterable, Sequence

from tasks.evaluate import edit_distance, normalize

WORD = "|"  # word boundary class: between words and after the last one (the lexicon decoder's silence token)
BLANK = "<b>"


class Phonemizer:
    """Texts -> phoneme lists with ``WORD`` after every word, from libespeak-ng (``espeak_TextToPhonemes``, IPA).

    Stress marks are dropped (they carry little for word identity and double the classes); results are
    cached per text. espeak-ng splits a text into clauses at punctuation: their phonemes are joined, as the
    ``phonemizer`` package does (it also strips punctuation first; here the clauses stay as spoken). Raises a one-line error naming the text when espeak-ng returns nothing.
    """

    _STRESS = re.compile(r"[ˈˌ'-]+")
    _FLAGS = re.compile(r"\([^)]*\)")  # language-switch flags such as (fr) around a foreign word

    def __init__(self, language: str = "en-us"):
        name = ctypes.util.find_library("espeak-ng") or "libespeak-ng.so.1"
        try:
            lib = ctypes.cdll.LoadLibrary(name)
        except OSError as e:
            raise OSError(f"phoneme targets need libespeak-ng ({name}): apt-get install espeak-ng (make apt)") from e
        if lib.espeak_Initialize(0x02, 0, None, 0) <= 0:  # AUDIO_OUTPUT_SYNCHRONOUS, no audio is made
            raise RuntimeError("espeak_Initialize failed")
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        if lib.espeak_SetVoiceByName(language.encode()) != 0:
            raise ValueError(f"espeak-ng has no voice {language!r}")
        self._to_phonemes = lib.espeak_TextToPhonemes
        self._to_phonemes.restype = ctypes.c_char_p
        self._to_phonemes.argtypes = [ctypes.POINTER(ctypes.c_char_p), ctypes.c_int, ctypes.c_int]
        self.language = language
        self.cache: dict[str, list[str]] = {}
        self._flat: dict[str, list[str]] = {}  # __call__'s result per text: the targets of every training step

    def _phonemize(self, text: str) -> list[str]:
        """One text -> its spoken words, each as '_'-joined IPA phonemes."""
        ptr = ctypes.pointer(ctypes.c_char_p(text.encode("utf8")))
        parts = []
        while ptr.contents.value is not None:  # one clause per call; espeak advances the pointer
            out = self._to_phonemes(ptr, 1, ord("_") << 8 | 0x02)  # UTF-8 text; IPA, '_' between phonemes
            if out:
                parts.append(out.decode())
        line = " ".join(parts).strip().replace("\n", " ")
        line = re.sub(r"_ ", " ", re.sub(r"_+", "_", line))
        words = (self._STRESS.sub("", self._FLAGS.sub("", w)).strip("_") for w in line.split(" "))
        return [w for w in words if w]

    def words(self, texts: Sequence[str]) -> list[list[list[str]]]:
        """Texts -> per text, per spoken word, its phonemes (no WORD marks)."""
        for t in texts:
            if t not in self.cache:
                self.cache[t] = self._phonemize(t)
        result = []
        for t in texts:
            spoken = [[p for p in w.split("_") if p] for w in self.cache[t]]
            result.append([w for w in spoken if w])
        return result

    def by_word(self, text: str) -> list[list[list[str]]]:
        """The text's phonemes as spoken in the sentence, per normalized text word (tasks.evaluate.normalize),
        per spoken unit: usually one unit a word, several for '25' (twenty five).

        Why: espeak-ng speaks some pairs as one unit ('on the' -> ɔnðə), so its units are not the words a
        lexicon and a WER count. The units are aligned to the words (dynamic programming against each word
        said alone) and a merged unit is split where the words' own phonemes fit best.
        """
        words = normalize(text)
        units = self.words([text])[0]
        if not words or not units:
            raise ValueError(f"espeak-ng gave no phonemes for text {text!r}")
        alone = [[p for u in w for p in u] for w in self.words(words)]
        if len(units) == len(words) and all(edit_distance(u, w) <= (len(w) + 1) // 2 for u, w in zip(units, alone)):
            return [[u] for u in units]  # one unit a word, each close to the word said alone (most sentences)
        n, m, inf = len(units), len(words), float("inf")
        cost = [[inf] * (m + 1) for _ in range(n + 1)]
        back: dict[tuple[int, int], tuple[int, int]] = {}
        cost[0][0] = 0.0
        for i in range(n + 1):
            for j in range(m + 1):
                if cost[i][j] == inf:
                    continue
                for a, b in ((1, 1), (1, 2), (1, 3), (2, 1), (3, 1)):
                    if i + a > n or j + b > m:
                        continue
                    c = cost[i][j] + edit_distance([p for u in units[i:i + a] for p in u],
                                                   [p for w in alone[j:j + b] for p in w])
                    if c < cost[i + a][j + b]:
                        cost[i + a][j + b], back[(i + a, j + b)] = c, (a, b)
        if cost[n][m] == inf:
            raise ValueError(f"cannot align espeak-ng's phonemes to the words of {text!r}")
        out: list[list[list[str]]] = []
        i, j = n, m
        while i or j:
            a, b = back[(i, j)]
            i, j = i - a, j - b
            out[:0] = [units[i:i + a]] if b == 1 else [[piece] for piece in _split(units[i], alone[j:j + b])]
        return out

    def __call__(self, texts: Sequence[str]) -> list[list[str]]:
        """Texts -> flat phoneme lists as spoken, ``WORD`` after each unit (so between every two text words)."""
        for t in texts:
            if t not in self._flat:
                self._flat[t] = [p for w in self.by_word(t) for u in w for p in (*u, WORD)]
        return [self._flat[t] for t in texts]


def _split(unit: list[str], parts: list[list[str]]) -> list[list[str]]:
    """Cut one spoken unit into len(parts) non-empty pieces closest (edit distance) to ``parts``."""
    if len(parts) == 1:
        return [unit]
    best: tuple[float, list[list[str]]] = (float("inf"), [unit] + [[]] * (len(parts) - 1))
    for k in range(1, len(unit) - len(parts) + 2):
        rest = _split(unit[k:], parts[1:])
        c = edit_distance(unit[:k], parts[0]) + sum(edit_distance(r, p) for r, p in zip(rest, parts[1:]))
        if c < best[0]:
            best = (c, [unit[:k], *rest])
    return best[1]


def phoneme_inventory(seqs: Iterable[Sequence[str]]) -> list[str]:
    """The classes: BLANK first (index 0), then every phoneme seen, sorted (WORD among them)."""
    return [BLANK] + sorted({p for s in seqs for p in s})

