"""Can the LLM WRITE speech units? Next-unit prediction over held-out unit sequences against a unigram baseline.

Why: once units are real tokens (llm.vocab), the LLM could continue or generate speech as units; before anyone
builds on that, measure whether its head predicts the next unit better than the unit frequencies alone do.
bench/probes/unit_writing.py runs it on real weights.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def next_unit_accuracy(llm: Any, held_out: Sequence[Tensor], first_id: int, n_units: int,
                       train: Sequence[Tensor] = (), prefix: Sequence[int] = (), pad_id: int = 0,
                       batch_size: int = 8) -> dict[str, float]:
    """Score ``llm`` (bound: its vocabulary holds the units at ``first_id`` + local id) on every position of the
    ``held_out`` sequences (local token ids, units < ``n_units`` among prosody tokens) whose next token is a unit.

    Returns ``accuracy`` (argmax among the unit tokens), ``accuracy_any`` (argmax over the whole vocabulary is that
    unit), ``nll`` (nats, softmax over the unit tokens) and the unigram baseline fitted on ``train`` (held_out when
    empty) with add-one smoothing: ``unigram_accuracy`` (always its most frequent unit), ``unigram_nll``; and
    ``positions`` scored. ``prefix``: LLM ids read before each sequence (e.g. a prompt).
    """
    counts = Counter(int(t) for s in (train or held_out) for t in s if int(t) < n_units)
    total = sum(counts.values()) + n_units
    logp_uni = torch.tensor([math.log((counts[u] + 1) / total) for u in range(n_units)])
    top = max(range(n_units), key=lambda u: (counts[u], -u))
    hits = hits_any = hits_uni = n = 0
    nll = nll_uni = 0.0
    device = next(llm.parameters()).device
    pre = torch.tensor(list(prefix), dtype=torch.long)
    for i in range(0, len(held_out), batch_size):
        seqs = [torch.cat([pre, s.long().cpu() + first_id]) for s in held_out[i:i + batch_size]]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, s in enumerate(seqs):
            ids[j, :len(s)], mask[j, :len(s)] = s, 1
        logits = llm(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().cpu()  # [B, L, V]
        target = ids[:, 1:] - first_id                                   # local ids of the next tokens
        keep = (mask[:, 1:] == 1) & (target >= 0) & (target < n_units)
        keep[:, :max(0, len(pre) - 1)] = False                          # the prefix's own next tokens
        step = logits[:, :-1][keep]                                      # [n, V]
        t = target[keep]
        units = step[:, first_id:first_id + n_units]
        hits += int((units.argmax(1) == t).sum())
        hits_any += int((step.argmax(1) == t + first_id).sum())
        hits_uni += int((t == top).sum())
        nll += float(F.cross_entropy(units, t, reduction="sum"))
        nll_uni += float(-logp_uni[t].sum())
        n += int(t.numel())
    if n == 0:
        raise ValueError("no held-out position is followed by a unit token: nothing to score")
    return {"positions": n, "accuracy": hits / n, "accuracy_any": hits_any / n, "nll": nll / n,
            "unigram_accuracy": hits_uni / n, "unigram_nll": nll_uni / n}
