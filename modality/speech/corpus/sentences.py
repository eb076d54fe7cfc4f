"""Real English sentences for TTS, taken from offline Debian packages.

Why fortunes: a few thousand varied, human-written English sentences (quotes, proverbs,
literature) that ship in Debian's ``fortunes`` / ``fortunes-min`` packages, so the speech
corpus is built offline with no hub download and no template text. They give the held-out
eval/val pools and part of train.

Why WordNet too (``wordnet-base``): its glosses quote ~27k short example sentences of everyday
English ("The draft gave me a cold."), five times the fortune train pool, and ~66k definitions
("A tangible and visible entity."). More distinct training sentences is what an alignment corpus of
a few thousand sentences lacks most (measured: half the held-out error is unseen sentences, see bench/RESULTS.md).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterable
from pathlib import Path

FORTUNE_DIR = Path("/usr/share/games/fortunes")
APT_PACKAGES = ("fortunes", "fortunes-min")
WORDNET_DIR = Path("/usr/share/wordnet")
WORDNET_PACKAGE = "wordnet-base"
# Collections left out: pictures, jargon-heavy or stereotype-heavy files, nonsense dialogue.
EXCLUDED_FILES = frozenset(
    {"art", "ascii-art", "debian", "linux", "linuxcookie", "perl", "computers", "ethnic",
     "men-women", "drugs", "zippy", "translate-me", "startrek", "knghtbrd", "disclaimer"}
)
MIN_WORDS, MAX_WORDS = 5, 14

_ALLOWED = re.compile(r"^[A-Z][A-Za-z' ,\-]*[A-Za-z][.!?]$")  # letters, commas, apostrophes
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_ATTRIBUTION = re.compile(r"^\s*(--|~|-\s)")
_ABBREV = re.compile(r"\b(Mr|Mrs|Ms|Dr|St|Jr|Sr|Prof|Gen|Col|Capt|Lt|Rev|Vs|Etc|Inc|Co)\.$")
_SHOUTED = re.compile(r"\b[A-Z]{2,}\b")  # acronyms / shouting: espeak spells or stresses oddly
# A capitalised function word mid-sentence marks verse ("And the want Of thought...") or a
# title: its transcript would teach odd casing, so such sentences are dropped.
_FUNCTION_WORDS = frozenset(
    ["a", "an", "the", "of", "and", "or", "but", "nor", "to", "in", "on", "at", "by", "for", "with", "from", "as", "is", "am", "are", "was", "were", "be", "it", "that", "this", "not", "no", "so", "if", "then", "than", "my", "your", "his", "her", "its", "our", "their", "we", "you", "he", "she", "they", "me", "him", "us", "them"]
)


def _entries(text: str) -> list[str]:
    """Split a fortune file into its cookies (separated by lines holding only '%')."""
    return [e for e in re.split(r"^%\s*$", text, flags=re.MULTILINE) if e.strip()]


def _clean_entry(entry: str) -> str:
    """Drop attribution lines ("-- Author") and join wrapped lines into one paragraph."""
    lines = [ln for ln in entry.splitlines() if not _ATTRIBUTION.match(ln)]
    return re.sub(r"\s+", " ", " ".join(lines)).strip()


def clean_sentence(sentence: str) -> str | None:
    """Return the sentence normalised for TTS, or None when it breaks an extraction rule.

    Rules: ASCII letters with commas/apostrophes/hyphens only (no digits, quotes, symbols),
    starts with a capital, ends in . ! or ?, MIN_WORDS..MAX_WORDS words, no all-caps words
    (acronyms), no capitalised function word after the first word (verse lines), no
    sentence ending on an abbreviation ("Mr.").
    """
    s = sentence.strip().replace("--", ", ")
    s = re.sub(r"\s+", " ", s)
    s = re.sub(r"\s+,", ",", s)
    s = re.sub(r",(\s*,)+", ",", s)
    if not _ALLOWED.match(s) or _ABBREV.search(s) or _SHOUTED.search(s):
        return None
    if re.search(r"(^|\s)[-']|[-']($|\s)|--|''|,[.!?]$", s):  # dangling hyphen/quote marks
        return None
    if any(w[0].isupper() and w.lower() in _FUNCTION_WORDS for w in re.findall(r"[A-Za-z]+", s)[1:]):
        return None
    n = len(s.split())
    if not MIN_WORDS <= n <= MAX_WORDS:
        return None
    return s


def extract_sentences(text: str) -> list[str]:
    """All clean sentences of one fortune file's text, in file order (may repeat)."""
    out = []
    for entry in _entries(text):
        for piece in _SPLIT.split(_clean_entry(entry)):
            s = clean_sentence(piece)
            if s is not None:
                out.append(s)
    return out


def _stable_key(sentence: str, seed: int) -> str:
    return hashlib.sha1(f"{seed}:{sentence}".encode()).hexdigest()


def load_sentences(fortune_dir: str | Path = FORTUNE_DIR, seed: int = 0, min_count: int = 2000) -> list[str]:
    """Deduplicated, deterministically shuffled English sentences from the fortune files.

    The order depends only on the sentence text and ``seed`` (not on file listing order), so
    it is stable across machines. Raises FileNotFoundError (one line) naming the apt packages
    when the data files are missing or too few (``fortunes-min`` alone gives ~540).
    """
    root = Path(fortune_dir)
    files = sorted(p for p in root.glob("*") if p.is_file() and not p.suffix and p.name not in EXCLUDED_FILES) if root.is_dir() else []
    if not files:
        raise FileNotFoundError(
            f"no fortune data files in {root}: install them with `apt-get install {' '.join(APT_PACKAGES)}`"
        )
    seen: dict[str, str] = {}
    for path in files:
        text = path.read_bytes().decode("utf-8", errors="replace")
        for s in extract_sentences(text):
            seen.setdefault(s.lower(), s)
    if len(seen) < min_count:
        raise FileNotFoundError(
            f"only {len(seen)} sentences (< {min_count}) in the fortune files of {root}: "
            f"install them with `apt-get install {' '.join(APT_PACKAGES)}`"
        )
    return sorted(seen.values(), key=lambda s: _stable_key(s, seed))


def _wordnet_glosses(root: Path) -> Iterable[str]:
    """Every synset's gloss ("definition; \"example\"; ...") in WordNet's four data files."""
    files = [root / f"data.{pos}" for pos in ("noun", "verb", "adj", "adv")]
    if not all(f.is_file() for f in files):
        raise FileNotFoundError(f"no WordNet data files (data.noun, ...) in {root}: install them with "
                                f"`apt-get install {WORDNET_PACKAGE}`")
    for path in files:
        for line in path.read_text(errors="replace").splitlines():
            if not line.startswith("  ") and " | " in line:  # not the license header, a synset with a gloss
                yield line.split(" | ", 1)[1]


def _as_sentence(text: str) -> str | None:
    """Capitalised, full-stopped and cleaned (:func:`clean_sentence`); None when it breaks a rule."""
    t = text.strip()
    if not t:
        return None
    return clean_sentence(t[0].upper() + t[1:] + ("" if t[-1] in ".!?" else "."))


def wordnet_examples(wordnet_dir: str | Path = WORDNET_DIR, seed: int = 0, exclude: Iterable[str] = (),
                     part: str = "examples") -> list[str]:
    """WordNet text that passes :func:`clean_sentence`, deduplicated, stably shuffled.

    ``part``: ``examples`` = the glosses' quoted example sentences (~27k); ``definitions`` = the
    definitions themselves (~66k, "A tangible and visible entity."): a far wider vocabulary, which is
    what the recognizer lacks (it rarely spells a word seen in fewer than four training clips).
    ``exclude``: sentences (any case) that must not come back, e.g. the held-out eval/val pools.
    A missing WordNet raises FileNotFoundError (one line) naming the apt package.
    """
    if part not in ("examples", "definitions"):
        raise ValueError(f"part must be 'examples' or 'definitions', got {part!r}")
    banned = {e.lower() for e in exclude}
    seen: dict[str, str] = {}
    for gloss in _wordnet_glosses(Path(wordnet_dir)):
        if part == "examples":
            pieces = re.findall(r'"([^"]+)"', gloss)
        else:
            head = gloss.split(";", 1)[0]
            pieces = [] if '"' in head else [head]
        for piece in pieces:
            c = _as_sentence(piece)
            if c is not None and c.lower() not in banned:
                seen.setdefault(c.lower(), c)
    return sorted(seen.values(), key=lambda s: _stable_key(s, seed))


def split_sentences(sentences: list[str], eval_fraction: float = 0.1, val_fraction: float = 0.05) -> dict[str, list[str]]:
    """Disjoint train / val / eval sentence pools (eval and val text never appears in train)."""
    if not 0 <= eval_fraction + val_fraction < 1:
        raise ValueError(f"eval_fraction + val_fraction must be in [0, 1), got {eval_fraction + val_fraction}")
    n = len(sentences)
    n_eval, n_val = max(1, round(n * eval_fraction)), max(1, round(n * val_fraction))
    return {"eval": sentences[:n_eval], "val": sentences[n_eval:n_eval + n_val], "train": sentences[n_eval + n_val:]}


def shuffled(items: list, seed: int) -> list:
    """A deterministic shuffle that leaves the input untouched."""
    out = list(items)
    random.Random(seed).shuffle(out)
    return out
