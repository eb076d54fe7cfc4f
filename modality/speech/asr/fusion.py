"""The LLM writes the transcript, the phoneme CTC steers its beam search word by word (CTC prefix scoring).

Why: re-scoring the LLM's finished beams (modality.speech.asr.decode) can only pick among sentences the LLM
already wrote; when its reading of the phonemes is unsure, the right words are not among them. Here every
hypothesis is scored while it grows: each time a word is complete (the next token starts a new word, or the
answer ends), espeak-ng's phonemes of the text so far are scored against the clip by the CTC *prefix*
probability (Watanabe et al. 2017, "Hybrid CTC/attention", Algorithm 2), so a word the audio does not hold
loses at once and the LLM's next best word takes its place:

    score(y) = (1 - w) * log p_LLM(y | prompt, speech) + w * log p_CTC-prefix(phonemes(complete words of y) | speech)

Every token is the LLM's (its top-k continuations of each beam); the CTC only ranks them. The words are the
LLM's own output, not a lexicon's.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from llm.lora import backbone_and_head
from llm.tokens import stop_token_ids
from modality.speech.asr.decode import _cache_name

NEG = -1e30


class CtcPrefixScorer:
    """log p_CTC(prefix ...) of class sequences for one clip's log-probs [T, V] (blank ``blank``), memoised per prefix."""

    def __init__(self, logp: np.ndarray, blank: int = 0):
        self.lp = logp.astype(np.float64)
        self.T, self.blank = logp.shape[0], blank
        r_b = np.cumsum(self.lp[:, blank])  # the empty prefix: blanks only
        self.memo: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray, float]] = {(): (np.full(self.T, NEG), r_b, 0.0)}

    def _extend(self, prefix: tuple[int, ...], c: int) -> tuple[np.ndarray, np.ndarray, float]:
        r_n, r_b, _ = self.state(prefix)
        lp_c = self.lp[:, c]
        phi = np.logaddexp(r_n, r_b) if not prefix or prefix[-1] != c else r_b.copy()  # [T]
        new_n, new_b = np.full(self.T, NEG), np.full(self.T, NEG)
        new_n[0] = lp_c[0] if not prefix else NEG
        psi = new_n[0]
        blank = self.lp[:, self.blank]
        for t in range(1, self.T):  # the recursion is sequential in t
            new_n[t] = np.logaddexp(new_n[t - 1], phi[t - 1]) + lp_c[t]
            new_b[t] = np.logaddexp(new_b[t - 1], new_n[t - 1]) + blank[t]
            psi = np.logaddexp(psi, phi[t - 1] + lp_c[t])
        return new_n, new_b, float(psi)

    def state(self, prefix: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, float]:
        if prefix not in self.memo:
            for k in range(1, len(prefix) + 1):  # fill the chain from the longest memoised ancestor
                if prefix[:k] not in self.memo:
                    self.memo[prefix[:k]] = self._extend(prefix[: k - 1], prefix[k - 1])
        return self.memo[prefix]

    def prefix(self, seq: tuple[int, ...]) -> float:
        """log of the probability mass of every alignment whose labels START with ``seq``."""
        return self.state(seq)[2]

    def full(self, seq: tuple[int, ...]) -> float:
        """log p_CTC(seq | clip): the labels are exactly ``seq``."""
        r_n, r_b, _ = self.state(seq)
        return float(np.logaddexp(r_n[-1], r_b[-1]))


@torch.no_grad()
def fused_transcribe(model: Any, objective: Any, embeds: Tensor, mask: Tensor, logits: Tensor, length: int,
                     weight: float, beams: int = 4, max_new_tokens: int = 48) -> tuple[str, list[dict]]:
    """One clip's transcript: the LLM's beam search over its own tokens, steered by the phoneme CTC.

    ``embeds`` [1, L, D] / ``mask`` [1, L]: the left-padded prompt (speech merged in); ``logits`` [N, V]: the clip's
    phoneme-class logits, ``length`` its valid frames. Returns (text, the final beams as candidates)."""
    tok = model.tokenizer
    stops = set(stop_token_ids(tok))
    scorer = CtcPrefixScorer(logits[:length].float().log_softmax(-1).cpu().numpy(), objective.blank)
    backbone, head = backbone_and_head(model.llm)
    mask = mask.to(torch.long)
    first = backbone(inputs_embeds=embeds, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                     use_cache=True)
    name = _cache_name(backbone)
    cache = getattr(first, name)
    last = first.last_hidden_state[:, -1]                              # [1, D]
    phon: dict[str, tuple[int, ...] | None] = {}

    def ctc_of(text: str, final: bool) -> float:
        if text not in phon:
            t = objective.text_targets([text])[0] if text.strip() else []
            phon[text] = None if t is None else tuple(t)
        seq = phon[text]
        if seq is None:
            return -math.inf
        return scorer.full(seq) if final else scorer.prefix(seq)

    # a hypothesis: (tokens, llm logp, ctc score of its complete words, finished)
    hyps: list[tuple[list[int], float, float]] = [([], 0.0, 0.0)]
    done: list[tuple[list[int], float, float]] = []
    rows = torch.zeros(1, dtype=torch.long)
    prompt_len = int(mask.sum())
    for step in range(max_new_tokens):
        lp = head(last).float().log_softmax(-1)                         # [n_hyps, V]
        top = lp.topk(beams + 1, dim=-1)
        cands = []
        for i, (toks, l_lm, l_ctc) in enumerate(hyps):
            for v, t in zip(top.values[i].tolist(), top.indices[i].tolist()):
                new = toks + [t]
                if t in stops:
                    text = tok.decode(toks, skip_special_tokens=True)
                    c = ctc_of(text, final=True)
                    cands.append((i, new, l_lm + v, c, True))
                    continue
                piece = tok.convert_ids_to_tokens(t)
                starts_word = piece.startswith(("Ġ", " ", "▁")) and bool(toks)
                c = ctc_of(tok.decode(toks, skip_special_tokens=True), final=False) if starts_word else l_ctc
                cands.append((i, new, l_lm + v, c, False))
        score = lambda c: (1 - weight) * c[2] + weight * c[3]  # noqa: E731
        cands.sort(key=score, reverse=True)
        live = []
        for c in cands:
            if c[4]:
                done.append((c[1], c[2], c[3]))
            elif len(live) < beams:
                live.append(c)
        best_done = max((score((0, d[0], d[1], d[2], True)) for d in done), default=-math.inf)
        if not live or best_done >= score(live[0]):  # both scores only fall as a hypothesis grows
            break
        rows = torch.tensor([c[0] for c in live])
        cache.reorder_cache(rows.to(embeds.device))
        hyps = [(c[1], c[2], c[3]) for c in live]
        n = len(live)
        ids = torch.tensor([[c[1][-1]] for c in live], device=embeds.device)
        m = torch.cat([mask.expand(n, -1), torch.ones(n, step + 1, dtype=torch.long, device=mask.device)], dim=1)
        pos = torch.full((n, 1), prompt_len + step, device=embeds.device)
        x = model.llm.get_input_embeddings()(ids).to(embeds)
        out = backbone(inputs_embeds=x, attention_mask=m, position_ids=pos, use_cache=True, **{name: cache})
        cache = getattr(out, name)
        last = out.last_hidden_state[:, -1]
    if not done:  # ran out of tokens: the live beams as they are
        done = [(h[0], h[1], ctc_of(tok.decode(h[0], skip_special_tokens=True), final=True)) for h in hyps]
    ranked = sorted(done, key=lambda d: (1 - weight) * d[1] + weight * d[2], reverse=True)[: 2 * beams]
    out = [{"text": tok.decode(t, skip_special_tokens=True).strip(), "lm": l, "ctc": c if math.isfinite(c) else None,
            "source": "llm"} for t, l, c in ranked]
    return out[0]["text"], out
