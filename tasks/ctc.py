"""Auxiliary CTC loss that pulls adaptor outputs towards the LLM's own token embeddings.

For transcript samples, each adaptor position is classified over the LLM vocabulary by cosine
similarity with the (frozen) input-embedding table; the placeholder row serves as the CTC blank.
This gives the adaptor a dense, per-position signal that the LM loss alone lacks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def embedding_ctc_loss(out: Tensor, lengths: Tensor, sample_index: Tensor, targets: list[list[int] | None],
                       embedding_weight: Tensor, blank_id: int, scale: float = 30.0,
                       vocab: Tensor | None = None) -> Tensor | None:
    """out [n, N, D] adaptor output, lengths [n], sample_index [n] (clip -> sample), targets per sample.

    ``vocab`` (sorted unique token ids, the blank among them) restricts the classes to those rows:
    with the ~7k tokens a corpus uses instead of 49k the loss costs ~7x less. A sample whose
    target holds a token outside ``vocab`` is left out of the loss.
    """
    table = embedding_weight.detach()
    if vocab is not None:
        vocab = vocab.to(out.device)
        table = table[vocab]
        blank_id = int(torch.searchsorted(vocab, torch.tensor(blank_id, device=vocab.device)))
        mapped: list[list[int] | None] = []
        for seq in targets:
            if not seq:
                mapped.append(None)
                continue
            t = torch.tensor(seq, device=vocab.device)
            idx = torch.searchsorted(vocab, t).clamp(max=len(vocab) - 1)
            mapped.append(idx.tolist() if bool((vocab[idx] == t).all()) else None)
        targets = mapped
    clips_per_sample = torch.bincount(sample_index, minlength=len(targets))
    rows = [k for k in range(out.shape[0])
            if targets[int(sample_index[k])] and clips_per_sample[int(sample_index[k])] == 1]
    if not rows:
        return None
    tgt = [targets[int(sample_index[k])] for k in rows]
    o = F.normalize(out[rows].float(), dim=-1)                       # [r, N, D]
    table = F.normalize(table.float(), dim=-1)                       # [V, D] (V = len(vocab) if given)
    logp = (o @ table.T * scale).log_softmax(-1)                     # [r, N, V]
    flat = torch.tensor([t for seq in tgt for t in seq], device=out.device)
    tgt_len = torch.tensor([len(seq) for seq in tgt], device=out.device)
    return F.ctc_loss(logp.transpose(0, 1), flat, lengths[rows], tgt_len, blank=blank_id,
                      reduction="mean", zero_infinity=True)


def corpus_vocab(targets: list[list[int]], blank_ids: list[int]) -> Tensor:
    """Sorted unique ids of every target token plus the blanks: the classes embedding_ctc_loss needs."""
    ids = {t for seq in targets for t in seq} | set(blank_ids)
    return torch.tensor(sorted(ids), dtype=torch.long)


def nearest_rows(out: Tensor, embedding_weight: Tensor) -> Tensor:
    """out [..., D] -> index [...] of the embedding row with the highest cosine similarity (what a position 'says')."""
    return (F.normalize(out.float(), dim=-1) @ F.normalize(embedding_weight.float(), dim=-1).T).argmax(-1)


def greedy_ctc_decode(out: Tensor, lengths: Tensor, embedding_weight: Tensor, blank_id: int) -> list[list[int]]:
    """Collapse repeats and drop blanks: a cheap readout of what the adaptor 'says' per position."""
    ids = nearest_rows(out, embedding_weight)
    seqs = []
    for row, n in zip(ids, lengths):
        prev, seq = None, []
        for t in row[: int(n)].tolist():
            if t != prev and t != blank_id:
                seq.append(t)
            prev = t
        seqs.append(seq)
    return seqs


def ctc_compress(out: Tensor, lengths: Tensor, embedding_weight: Tensor, blank_id: int) -> tuple[Tensor, Tensor]:
    """CTC compression: drop positions whose nearest LLM embedding is the blank, average each run of one token.

    out [n, N, D] adaptor output, lengths [n] -> (compressed [n, N, D] with each clip's k segment means first
    and zeros after, k [n] >= 1). Gradients reach every kept position. Why: a CTC-trained adaptor says
    'blank blank the blank cat cat ...'; the LLM reads the collapsed 'the cat' far more like text, and
    the sequence it attends over is ~3x shorter.
    """
    n, N, D = out.shape
    with torch.no_grad():
        ids = nearest_rows(out, embedding_weight)                          # [n, N]
        valid = torch.arange(N, device=out.device)[None, :] < lengths[:, None].to(out.device)
        speak = valid & (ids != blank_id)                                   # [n, N] positions that emit a token
        prev = F.pad(ids[:, :-1], (1, 0), value=-1)
        prev_speak = F.pad(speak[:, :-1], (1, 0), value=False)
        start = speak & ~(prev_speak & (prev == ids))                       # first position of each run
        seg = start.long().cumsum(1) - 1                                    # [n, N] segment index per position
        k = start.sum(1)
        empty = k == 0                                                      # all blank: keep the clip as one mean vector
        speak = speak | (empty[:, None] & valid)
        seg = torch.where(empty[:, None], torch.zeros_like(seg), seg).clamp(min=0)
        k = k.clamp(min=1)
    w = speak.to(out.dtype)[..., None]                                      # [n, N, 1]
    sums = out.new_zeros(n, N, D).scatter_add(1, seg[..., None].expand(-1, -1, D), out * w)
    counts = out.new_zeros(n, N, 1).scatter_add(1, seg[..., None], w)
    return sums / counts.clamp(min=1), k
