"""Special tokens the modalities need (placeholders), added to the tokenizer and the LLM."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llm.vocab import GrownEmbedding

DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant: {% endif %}"
)


def add_placeholder_tokens(tokenizer: Any, model: nn.Module, tokens: list[str]) -> dict[str, int]:
    """Add each token as one special token (never split), growing the embeddings with mean-initialised rows.

    Placeholder rows are overwritten by modality embeddings before the LLM sees them, so their
    values never matter; mean init keeps the output softmax sane. Returns token -> id.
    """
    new = [t for t in tokens if t not in tokenizer.get_vocab()]
    if new and isinstance(model.get_input_embeddings(), GrownEmbedding):  # resizing would undo the frozen/new split
        raise ValueError(f"placeholders {new} must be added before a plugin's own vocabulary (llm.vocab)")
    if new:
        tokenizer.add_tokens(new, special_tokens=True)
    vocab = len(tokenizer)
    emb = model.get_input_embeddings()
    if emb.weight.shape[0] < vocab:
        old = emb.weight.shape[0]
        with torch.no_grad():
            mean = emb.weight[:old].float().mean(0)
        model.resize_token_embeddings(vocab, mean_resizing=False)
        with torch.no_grad():
            model.get_input_embeddings().weight[old:] = mean.to(emb.weight.dtype)
            out = model.get_output_embeddings()
            if out is not None and out.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
                out.weight[old:] = 0
    if tokenizer.chat_template is None:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in tokens}
    for t, i in ids.items():
        if tokenizer.encode(t, add_special_tokens=False) != [i]:
            raise ValueError(f"placeholder {t!r} does not tokenize to a single id")
    return ids


def stop_token_ids(tokenizer: Any) -> list[int]:
    """The ids that end an assistant turn: the chat turn end (``<|im_end|>``) where the tokenizer has one, then
    EOS. The first is what a finished answer ends with (joint decoding appends it when scoring a candidate)."""
    ids = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
    valid = [i for i in ids if isinstance(i, int) and i >= 0 and i != tokenizer.unk_token_id]
    return list(dict.fromkeys(valid))
