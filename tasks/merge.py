"""The one merge function: write modality embeddings into the text embeddings at placeholders."""

from __future__ import annotations

import torch
from torch import Tensor


def merge_embeddings(text_embeds: Tensor, placeholder_mask: Tensor, modality_embeds: Tensor) -> Tensor:
    """text_embeds [B, L, D], placeholder_mask [B, L] bool, modality_embeds [M, D] with M = mask.sum().

    Rows fill placeholder positions in row-major order (sample 0's first, left to right), which
    is the order the collator lays clips out in. Raises on a count mismatch.
    """
    n_slots = int(placeholder_mask.sum())
    if modality_embeds.dim() != 2 or n_slots != modality_embeds.shape[0]:
        raise ValueError(f"placeholder/embedding count mismatch: {n_slots} placeholder positions, "
                         f"{tuple(modality_embeds.shape)} modality embeddings")
    if modality_embeds.shape[-1] != text_embeds.shape[-1]:
        raise ValueError(f"modality width {modality_embeds.shape[-1]} != LLM width {text_embeds.shape[-1]}")
    mask = placeholder_mask.unsqueeze(-1).expand_as(text_embeds)  # [B, L, D]
    return text_embeds.masked_scatter(mask, modality_embeds.to(text_embeds.dtype))


def valid_rows(embeds: Tensor, lengths: Tensor) -> Tensor:
    """[n, N_max, D] padded adaptor output + lengths [n] -> [sum(lengths), D] in sample order."""
    keep = torch.arange(embeds.shape[1], device=embeds.device)[None, :] < lengths[:, None]  # [n, N_max]
    return embeds[keep]
