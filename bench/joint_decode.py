"""Joint decoding's LLM scoring: each prompt once + its KV cache copied to its candidates (modality.speech.asr.decode.lm_logprobs)
vs teacher-forcing every candidate with its whole prompt again, side by side in one run on the real SmolLM2.

    python -m bench.joint_decode [--batch 16] [--prompt 60] [--cands 12] [--cand-len 20] [--repeats 3]

Shapes as measured in the long recipe's held-out evaluation: 16 clips a batch, ~12 candidates a clip
(4 LLM beams + readout + 8 CTC spellings, deduplicated), prompts of ~60 positions (compressed speech +
chat turn), candidates of ~20 tokens. Prompts are left-padded to different lengths. Prints the seconds
of each, the ratio, and the largest difference between the two scores (they must agree).
"""

from __future__ import annotations

import argparse
import time

import torch

from llm.lora import backbone_and_head
from modality.speech.asr.decode import lm_logprobs


@torch.no_grad()
def full_sequences(llm, embeds, mask, owner, cands) -> torch.Tensor:
    """The baseline: every candidate with its whole prompt in one padded batch (the prompt recomputed per candidate)."""
    n, lc = len(cands), max(map(len, cands))
    ids = torch.zeros(n, lc, dtype=torch.long)
    cmask = torch.zeros(n, lc, dtype=torch.long)
    for k, c in enumerate(cands):
        ids[k, : len(c)], cmask[k, : len(c)] = torch.tensor(c), 1
    rows = torch.tensor(owner)
    x = torch.cat([embeds[rows], llm.get_input_embeddings()(ids)], 1)
    m = torch.cat([mask[rows].long(), cmask], 1)
    backbone, head = backbone_and_head(llm)
    h = backbone(inputs_embeds=x, attention_mask=m, position_ids=(m.cumsum(-1) - 1).clamp(min=0), use_cache=False).last_hidden_state
    L = embeds.shape[1]
    lp = head(h[:, L - 1 : L - 1 + lc]).float().log_softmax(-1).gather(-1, ids[..., None])[..., 0]
    return (lp * cmask).sum(-1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=60)
    ap.add_argument("--cands", type=int, default=12)
    ap.add_argument("--cand-len", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    from llm.loader import load_llm

    torch.manual_seed(0)
    llm = load_llm().model.eval()
    V = llm.get_input_embeddings().weight.shape[0]
    lens = [a.prompt - (i % 5) * 4 for i in range(a.batch)]                       # left-padded, ragged
    ids = torch.randint(0, V, (a.batch, a.prompt))
    mask = torch.tensor([[0] * (a.prompt - n) + [1] * n for n in lens])
    embeds = llm.get_input_embeddings()(ids)
    owner = [b for b in range(a.batch) for _ in range(a.cands)]
    cands = [torch.randint(0, V, (a.cand_len - (k % 7),)).tolist() for k in range(len(owner))]
    times = {"shared prompt KV cache": [], "whole sequence per candidate": []}
    for _ in range(a.repeats):
        t = time.perf_counter()
        fast = lm_logprobs(llm, embeds, mask, owner, cands)
        times["shared prompt KV cache"].append(time.perf_counter() - t)
        t = time.perf_counter()
        slow = full_sequences(llm, embeds, mask, owner, cands)
        times["whole sequence per candidate"].append(time.perf_counter() - t)
    print(f"{a.batch} prompts of <= {a.prompt} positions x {a.cands} candidates of <= {a.cand_len} tokens, "
          f"torch threads {torch.get_num_threads()}, best of {a.repeats}")
    best = {k: min(v) for k, v in times.items()}
    for k, v in best.items():
        print(f"  {k:30s} {v:7.2f} s")
    print(f"  ratio {best['whole sequence per candidate'] / best['shared prompt KV cache']:.2f}x; "
          f"max |score difference| {float((fast - slow).abs().max()):.2e}")


if __name__ == "__main__":
    main()
