"""New tokens in an LLM's vocabulary whose rows train while every old row stays frozen, bitwise.

Why not ``resize_token_embeddings`` and a trainable table: that makes all ~49k rows trainable (AdamW's decay and
any stray gradient move them) and puts the whole table in every checkpoint. Here the original input table and LM
head stay as loaded (frozen); thin wrappers put in their place read the k new rows from a small trainable
:class:`NewRows` module. The tokenizer gets the tokens as ordinary added tokens, so ``encode("<unit_3>")`` gives
their ids, the LLM reads them through its own embedding call, scores them in its own head and can WRITE them (HF
``generate`` runs through the wrappers unchanged).

``NewRows`` is owned by the plugin that adds the tokens (e.g. as its adaptor) and only referenced by the
wrappers, so what trains is named by the plugin (``modalities.<name>.adaptor.weight``) whether or not LoRA later
wraps the LLM (PEFT renames every LLM parameter): an align checkpoint loads into the instruct model as is, and
the stage policy trains the rows exactly when it trains the adaptor. Wrappers nest: a second plugin adding its own
tokens wraps the first one's wrappers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class NewRows(nn.Module):
    """The rows of k new tokens: ``weight`` [k, D] (what the LLM reads; for a tied LLM also what its head scores
    them with) and, for an LLM whose head is untied, ``output_weight`` [k, D] (added by :func:`add_tokens`)."""

    def __init__(self, k: int, d: int, std: float = 1.0):
        super().__init__()
        if k < 1 or d < 1:
            raise ValueError(f"NewRows needs k >= 1 rows of width d >= 1, got k={k}, d={d}")
        self.weight = nn.Parameter(torch.randn(k, d) * std)  # replaced by add_tokens' init once bound to an LLM
        self.output_weight: nn.Parameter | None = None

    @property
    def k(self) -> int:
        return self.weight.shape[0]

    def forward(self, ids: Tensor) -> Tensor:
        """Local ids [*] in [0, k) -> input rows [*, D] (the same rows the LLM reads for ids start + local)."""
        return F.embedding(ids, self.weight)


def _num_rows(module: nn.Module) -> int:
    return int(module.weight.shape[0])


def _innermost(module: nn.Module) -> Tensor:
    return _base_of(module).weight


class GrownEmbedding(nn.Module):
    """The LLM's input embedding with k new rows: ids in [start, start + k) read ``rows.weight``, all others the
    frozen ``base`` table (a model whose table was padded past the tokenizer keeps those rows, unused)."""

    def __init__(self, base: nn.Module, rows: NewRows, start: int):
        super().__init__()
        self.base = base
        object.__setattr__(self, "rows", rows)  # referenced, not registered: the plugin owns and names them
        self.start = int(start)
        self.num_embeddings = max(_num_rows(base), self.start + rows.k)
        self.embedding_dim = int(rows.weight.shape[1])
        self.padding_idx = getattr(base, "padding_idx", None)

    @property
    def weight(self) -> Tensor:
        """The whole table [num_embeddings, D] (differentiable in the new rows); for code that reads rows."""
        old = self.base.weight
        new = self.rows.weight.to(old.dtype)
        pad = old.new_zeros(max(0, self.start - old.shape[0]), old.shape[1])
        return torch.cat([old[:self.start], pad, new, old[self.start + self.rows.k:]])

    def forward(self, ids: Tensor) -> Tensor:
        new = (ids >= self.start) & (ids < self.start + self.rows.k)
        out = self.base(torch.where(new, torch.zeros_like(ids), ids))
        if not bool(new.any()):
            return out
        rows = self.rows(torch.where(new, ids - self.start, torch.zeros_like(ids))).to(out.dtype)
        scale = getattr(self.base, "embed_scale", None)  # e.g. Gemma scales its rows inside the embedding
        if scale is not None:
            rows = rows * torch.as_tensor(scale, dtype=out.dtype, device=out.device)
        return torch.where(new[..., None], rows, out)


class GrownHead(nn.Module):
    """The LLM's head with k new rows: logits [..., num_rows] with the new tokens' scores at [start, start + k),
    from ``rows.output_weight`` (untied LLM) or ``rows.weight`` (tied: one table, as for the old rows)."""

    def __init__(self, base: nn.Module, rows: NewRows, start: int):
        super().__init__()
        self.base = base
        object.__setattr__(self, "rows", rows)
        self.start = int(start)
        self.out_features = max(_num_rows(base), self.start + rows.k)
        self.in_features = int(rows.weight.shape[1])

    def _new(self) -> Tensor:
        return self.rows.weight if self.rows.output_weight is None else self.rows.output_weight

    @property
    def weight(self) -> Tensor:
        old = self.base.weight
        pad = old.new_zeros(max(0, self.start - old.shape[0]), old.shape[1])
        return torch.cat([old[:self.start], pad, self._new().to(old.dtype), old[self.start + self.rows.k:]])

    def forward(self, hidden: Tensor) -> Tensor:
        logits = self.base(hidden)
        new = F.linear(hidden, self._new().to(hidden.dtype)).to(logits.dtype)
        end = self.start + self.rows.k
        pad = logits.new_full((*logits.shape[:-1], max(0, self.start - logits.shape[-1])), -float("inf"))
        return torch.cat([logits[..., :self.start], pad, new, logits[..., end:]], -1)


def _check_ids(tokenizer: Any, tokens: Sequence[str]) -> int:
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    start = ids[0]
    if ids != list(range(start, start + len(tokens))):
        raise ValueError(f"new tokens {tokens[0]}..{tokens[-1]} must hold consecutive ids, got {ids[:4]}...")
    for t, i in zip(tokens, ids):
        if tokenizer.encode(t, add_special_tokens=False) != [i]:
            raise ValueError(f"new token {t!r} does not tokenize to its single id {i}")
    return start


def add_tokens(tokenizer: Any, llm: nn.Module, tokens: Sequence[str], rows: NewRows, noise: float = 0.1,
               seed: int = 0) -> int:
    """Add ``tokens`` to ``tokenizer`` (ordinary added tokens: never split, kept when decoding) and make ``llm``'s
    input table and head read ``rows`` for them, old rows frozen as they are. Returns the first new id (the
    tokens hold ids start..start + k - 1). Idempotent for the same tokenizer, LLM and rows.

    Init (``rows`` are overwritten): each new row is the mean of the LLM's old rows plus ``noise`` x their
    per-dimension spread x N(0, 1). Why the mean: a new token's logit h.(mean) is then an average token's, so the
    LLM neither prefers nor shuns the new tokens before they train (Hewitt 2021), and what it reads there is an
    average token, not an out-of-distribution vector; why the noise: so rows start distinguishable. (A unit's
    centroid has no fixed map into the LLM's space before training, so no adaptor-free projection beats this.)
    An untied head gets its own rows, initialised the same way from the head's old rows.
    """
    from tokenizers import AddedToken

    if len(rows.weight) != len(tokens):
        raise ValueError(f"{len(tokens)} new tokens but {len(rows.weight)} rows")
    vocab = tokenizer.get_vocab()
    have = [t for t in tokens if t in vocab]
    if have and len(have) != len(tokens):
        raise ValueError(f"tokenizer already holds {len(have)} of the {len(tokens)} new tokens (e.g. {have[0]}): "
                         f"a vocabulary is added whole")
    if not have:
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False, single_word=False, lstrip=False,
                                         rstrip=False) for t in tokens])
    start = _check_ids(tokenizer, tokens)
    emb, head = llm.get_input_embeddings(), llm.get_output_embeddings()
    if isinstance(emb, GrownEmbedding) and emb.rows is rows:
        return start  # bound already
    tied = head is not None and _innermost(head).data_ptr() == _innermost(emb).data_ptr()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        def init(table: Tensor) -> Tensor:
            old = table.detach()[:start].float()
            z = torch.randn(len(tokens), old.shape[1], generator=g)
            return old.mean(0) + noise * old.std(0) * z

        rows.weight.data = init(emb.weight).to(rows.weight.device)
        if head is not None and not tied:
            rows.output_weight = nn.Parameter(init(head.weight).to(rows.weight.device),
                                              requires_grad=rows.weight.requires_grad)
    llm.set_input_embeddings(GrownEmbedding(emb, rows, start))
    if head is not None:
        llm.set_output_embeddings(GrownHead(head, rows, start))
    total = llm.get_input_embeddings().num_embeddings
    for cfg in {id(c): c for c in (llm.config, llm.config.get_text_config())}.values():
        cfg.vocab_size = total
    return start


def new_rows(llm: nn.Module) -> list[NewRows]:
    """Every NewRows the LLM's input table reads (outermost first): what a stage must treat as its adaptor."""
    out, m = [], llm.get_input_embeddings()
    while isinstance(m, GrownEmbedding):
        out.append(m.rows)
        m = m.base
    return out


def materialize(llm: nn.Module) -> nn.Module:
    """Replace the wrappers by plain ``nn.Embedding`` / ``nn.Linear`` tables holding every row (old and new), tied
    again where they were: what a standalone HF folder must hold (export of a merged model). Returns ``llm``."""
    emb, head = llm.get_input_embeddings(), llm.get_output_embeddings()
    if not isinstance(emb, GrownEmbedding):
        return llm
    tied = head is not None and _innermost(head).data_ptr() == _innermost(emb).data_ptr()
    with torch.no_grad():
        table = emb.weight.detach().clone()
        plain = nn.Embedding(*table.shape, padding_idx=emb.padding_idx, device=table.device, dtype=table.dtype)
        plain.weight.copy_(table)
        plain.weight.requires_grad_(False)
        llm.set_input_embeddings(plain)
        if head is not None:
            if getattr(_base_of(head), "bias", None) is not None:
                raise ValueError("materialize: an LM head with a bias is not supported")
            out = nn.Linear(table.shape[1], head.out_features, bias=False, device=table.device, dtype=table.dtype)
            out.weight = plain.weight if tied else nn.Parameter(head.weight.detach().clone(), requires_grad=False)
            llm.set_output_embeddings(out)
    return llm


def _base_of(module: nn.Module) -> nn.Module:
    while isinstance(module, (GrownEmbedding, GrownHead)):
        module = module.base
    return module
