"""CTC over LLM tokens: the adaptor learns to spell the transcript in the LLM's own vocabulary.

For transcript samples, each adaptor position is classified over LLM token classes (the placeholder
token is the CTC blank): a dense, per-position signal that the LM loss alone lacks, and one that needs
no LLM forward at all (stage.lm_weight=0). Pieces:

* classes: a corpus vocabulary (``corpus_vocab``: tokens seen >= min_count times + single characters);
  ``SpellingSegmenter`` re-spells rarer words with them, so every target is spellable;
* classifier: ``cosine_logits`` against the frozen embedding rows, or a trained linear head
  (MultimodalLM.ctc_logits), turned into a loss by ``ctc_loss``;
* readout: ``greedy_ctc_decode`` (what the adaptor says) and ``ctc_compress`` (blanks dropped, runs
  merged; ``soft`` feeds ``p @ E`` to the LLM).

The cosine is taken after subtracting the classes' mean row from both sides. Why: SmolLM2's
embedding rows share a common direction (mean pairwise cosine 0.44, nearest other row 0.66 on
average; centred: 0.00 and 0.37), so with raw cosines even an output equal to the right row wins
by a margin of only ~0.3 x scale: the classifier was ill-conditioned and CTC learned slowly.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def to_classes(targets: list[list[int] | None], vocab: Tensor | None) -> list[list[int] | None]:
    """Token ids -> class indices of ``vocab`` (sorted ids); a target holding a token outside it becomes None."""
    if vocab is None:
        return targets
    mapped: list[list[int] | None] = []
    for seq in targets:
        if not seq:
            mapped.append(None)
            continue
        t = torch.tensor(seq, device=vocab.device)
        idx = torch.searchsorted(vocab, t).clamp(max=len(vocab) - 1)
        mapped.append(idx.tolist() if bool((vocab[idx] == t).all()) else None)
    return mapped


def class_index(vocab: Tensor | None, token_id: int) -> int:
    """The class index of ``token_id`` (e.g. the blank) among ``vocab``'s sorted ids; the id itself without one."""
    return token_id if vocab is None else int(torch.searchsorted(vocab, torch.tensor(token_id, device=vocab.device)))


def ctc_loss(logits: Tensor, lengths: Tensor, sample_index: Tensor, targets: list[list[int] | None],
             blank: int) -> Tensor | None:
    """logits [n, N, V] per clip, lengths [n], sample_index [n] (clip -> sample), class-index targets per sample.

    Only single-clip samples with a target count (a two-clip answer has no one-clip alignment).
    """
    clips_per_sample = torch.bincount(sample_index, minlength=len(targets))
    rows = [k for k in range(logits.shape[0])
            if targets[int(sample_index[k])] and clips_per_sample[int(sample_index[k])] == 1]
    if not rows:
        return None
    tgt = [targets[int(sample_index[k])] for k in rows]
    logp = logits[rows].float().log_softmax(-1)                      # [r, N, V]
    flat = torch.tensor([t for seq in tgt for t in seq], device=logits.device)
    tgt_len = torch.tensor([len(seq) for seq in tgt], device=logits.device)
    return F.ctc_loss(logp.transpose(0, 1), flat, lengths[rows].to(logits.device), tgt_len, blank=blank,
                      reduction="mean", zero_infinity=True)


def corpus_vocab(targets: list[list[int]], blank_ids: list[int], min_count: int = 1,
                 always: Iterable[int] = ()) -> Tensor:
    """Sorted unique ids of the target tokens seen at least ``min_count`` times, plus ``always`` (e.g. every
    single-character token, so any word can be spelled) and the blanks: a corpus's CTC classes."""
    counts = Counter(t for seq in targets for t in seq)
    ids = {t for t, c in counts.items() if c >= min_count} | set(always) | set(blank_ids)
    return torch.tensor(sorted(ids), dtype=torch.long)


def single_char_tokens(tokenizer: Any) -> list[int]:
    """Ids of the tokens that are one character of the tokenizer's alphabet (byte-level BPE: all 256 bytes)."""
    return sorted(i for t, i in tokenizer.get_vocab().items() if len(t) == 1)


class SpellingSegmenter:
    """Re-spells a transcript's token ids with CTC units only: words whose tokens are all units stay as the
    tokenizer wrote them, any other word is re-split by greedy longest match over the units' strings.

    Why: over the 10,200-clip corpus half of the ~8.6k transcript tokens occur in ONE sentence, and 8.8 % of
    held-out words hold a token never seen in training: a CTC classifier cannot learn such classes. With
    units = frequent tokens + single characters every word is spellable from classes that were trained,
    and the LLM reads a rare word as the pieces it is spelled with (it still writes it its own way).
    """

    def __init__(self, tokenizer: Any, units: Tensor):
        self.units = set(units.tolist())
        vocab = tokenizer.get_vocab()
        self.by_string = {t: i for t, i in vocab.items() if i in self.units}
        self.strings = {i: t for t, i in vocab.items()}
        self.longest = max(len(t) for t in self.by_string)
        self.cache: dict[tuple[int, ...], list[int]] = {}

    def word_starts(self, ids: list[int]) -> list[int]:
        return [k for k, i in enumerate(ids) if k == 0 or self.strings.get(i, "")[:1] in ("Ġ", " ", "▁")]

    def spell(self, text: str) -> list[int] | None:
        out, k = [], 0
        while k < len(text):
            for n in range(min(self.longest, len(text) - k), 0, -1):
                if (i := self.by_string.get(text[k:k + n])) is not None:
                    out.append(i)
                    k += n
                    break
            else:
                return None  # a character no unit covers
        return out

    def __call__(self, ids: list[int] | None) -> list[int] | None:
        if not ids:
            return ids
        key = tuple(ids)
        if key not in self.cache:
            starts = self.word_starts(ids) + [len(ids)]
            out: list[int] | None = []
            for a, b in pairwise(starts):
                word = ids[a:b]
                if all(i in self.units for i in word):
                    out += word
                elif (spelled := self.spell("".join(self.strings[i] for i in word))) is not None:
                    out += spelled
                else:
                    out = None  # left out of the loss, as embedding_ctc_loss does with unknown tokens
                    break
            self.cache[key] = out
        return self.cache[key]


def linear_head(d: int, n_classes: int) -> nn.Module:
    """The trained CTC classifier (stage.ctc_classifier=linear): LayerNorm first, since adaptor outputs sit on
    the embeddings' small scale (RMS ~0.1 with target_rms), then Linear(d -> classes)."""
    return nn.Sequential(nn.LayerNorm(d, elementwise_affine=False), nn.Linear(d, n_classes))


def cosine_logits(out: Tensor, rows: Tensor, scale: float = 30.0) -> Tensor:
    """out [..., D], class rows [V, D] (frozen) -> logits [..., V]: scale x cosine, both sides centred on the rows' mean."""
    rows = rows.detach().float()
    centre = rows.mean(0)
    return F.normalize(out.float() - centre, dim=-1) @ F.normalize(rows - centre, dim=-1).T * scale


def greedy_ctc_decode(out: Tensor, lengths: Tensor, embedding_weight: Tensor, blank_id: int,
                      vocab: Tensor | None = None, logits: Tensor | None = None) -> list[list[int]]:
    """Collapse repeats and drop blanks: a cheap readout of what the adaptor 'says' per position.

    Classes are the rows of ``vocab`` (all rows without one) scored by cosine, or ``logits`` [n, N, V] of a
    trained classifier over them; token ids are returned.
    """
    if vocab is not None:
        vocab = vocab.to(out.device)
    ids = (logits if logits is not None else
           cosine_logits(out, embedding_weight if vocab is None else embedding_weight[vocab])).argmax(-1)
    blank = class_index(vocab, blank_id)
    seqs = []
    for row, n in zip(ids, lengths):
        prev, seq = None, []
        for t in row[: int(n)].tolist():
            if t != prev and t != blank:
                seq.append(t)
            prev = t
        seqs.append(vocab[seq].tolist() if vocab is not None and seq else seq)
    return seqs


def ctc_compress(out: Tensor, lengths: Tensor, embedding_weight: Tensor, blank_id: int,
                 vocab: Tensor | None = None, soft: bool = False, scale: float = 30.0,
                 logits: Tensor | None = None, drop_blank: bool = False) -> tuple[Tensor, Tensor]:
    """CTC compression: drop positions whose class is the blank, average each run of one class.

    out [n, N, D] adaptor output, lengths [n] -> (compressed [n, N, D] with each clip's k segment means first
    and zeros after, k [n] >= 1). Gradients reach every kept position. Why: a CTC-trained adaptor says
    'blank blank the blank cat cat ...'; the LLM reads the collapsed 'the cat' far more like text, and
    the sequence it attends over is ~3x shorter.

    Classes: ``vocab``'s rows (sorted ids, the blank among them; all rows without one) scored by cosine, or
    ``logits`` [n, N, V] of a trained classifier over them. ``soft``: each kept position becomes its class
    distribution mapped through the embedding rows (``p @ E``) before averaging, so a confident position IS
    the token's own embedding row: the LLM reads text it knows, and gradients still reach the adaptor via p.
    (A ``hard`` variant, each kept position its argmax class's row, was measured and removed: held-out WER
    52.4 % vs 52.8 %, bench/RESULTS.md.) ``drop_blank``: the soft mixture leaves the blank out (its
    probability renormalised over the other classes): phoneme classes, whose table has no row for it.
    """
    if vocab is not None:
        vocab = vocab.to(out.device)
    table = embedding_weight if vocab is None else embedding_weight[vocab]
    if logits is None:
        logits = cosine_logits(out, table, scale)                      # [n, N, V]
    blank = class_index(vocab, blank_id)
    n, N, D = out.shape
    with torch.no_grad():
        ids = logits.argmax(-1)                                         # [n, N]
        valid = torch.arange(N, device=out.device)[None, :] < lengths[:, None].to(out.device)
        speak = valid & (ids != blank)                                  # [n, N] positions that emit a token
        prev = F.pad(ids[:, :-1], (1, 0), value=-1)
        prev_speak = F.pad(speak[:, :-1], (1, 0), value=False)
        start = speak & ~(prev_speak & (prev == ids))                   # first position of each run
        seg = start.long().cumsum(1) - 1                                # [n, N] segment index per position
        k = start.sum(1)
        empty = k == 0                                                  # all blank: keep the clip as one mean vector
        speak = speak | (empty[:, None] & valid)
        seg = torch.where(empty[:, None], torch.zeros_like(seg), seg).clamp(min=0)
        k = k.clamp(min=1)
    if soft:
        p = logits.float().softmax(-1)                                  # [n, N, V]
        if drop_blank:
            p = p.index_fill(-1, torch.tensor([blank], device=p.device), 0.0)
            p = p / p.sum(-1, keepdim=True).clamp(min=1e-6)
        out = (p @ table.detach().float()).to(out.dtype)                # [n, N, V] @ [V, D]
    w = speak.to(out.dtype)[..., None]                                  # [n, N, 1]
    sums = out.new_zeros(n, N, D).scatter_add(1, seg[..., None].expand(-1, -1, D), out * w)
    counts = out.new_zeros(n, N, 1).scatter_add(1, seg[..., None], w)
    return sums / counts.clamp(min=1), k
