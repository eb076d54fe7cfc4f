"""llm.vocab: new tokens as real vocabulary, their rows trainable, every old row frozen bitwise."""

from __future__ import annotations

import pytest
import torch

from llm.lora import LoraSpec, apply_lora
from llm.tokens import add_placeholder_tokens
from llm.vocab import GrownEmbedding, GrownHead, NewRows, add_tokens, new_rows

TOKENS = [f"<unit_{i}>" for i in range(5)]


def grown(lm, tokens=TOKENS, d: int = 64) -> tuple[NewRows, int]:
    add_placeholder_tokens(lm.tokenizer, lm.model, ["<speech>"])  # a no-op when done already
    rows = NewRows(len(tokens), d)
    return rows, add_tokens(lm.tokenizer, lm.model, tokens, rows)


def untied_lm(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=4, intermediate_size=128, tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).requires_grad_(False)


def test_new_tokens_round_trip_through_the_tokenizer_and_both_tables(tiny_lm):
    old_in = tiny_lm.model.get_input_embeddings().weight.shape[0]
    rows, start = grown(tiny_lm)
    tok = tiny_lm.tokenizer
    assert start == old_in + 1  # after the placeholder
    assert tok.convert_tokens_to_ids("<unit_3>") == start + 3
    assert tok.encode("<unit_3><unit_1>", add_special_tokens=False) == [start + 3, start + 1]
    assert tok.decode([start + 3, start + 1], skip_special_tokens=True) == "<unit_3><unit_1>"  # the LLM may write them
    emb, head = tiny_lm.model.get_input_embeddings(), tiny_lm.model.get_output_embeddings()
    assert isinstance(emb, GrownEmbedding) and isinstance(head, GrownHead)
    assert emb.weight.shape[0] == head.weight.shape[0] == start + 5 == len(tok)
    assert torch.equal(emb(torch.tensor([start + 2])), rows.weight[2:3])
    assert torch.equal(head.weight[start:], rows.weight)  # SmolLM2 ties: one table, read and scored
    logits = tiny_lm.model(input_ids=torch.tensor([[1, start + 4]])).logits
    assert logits.shape[-1] == start + 5
    assert add_tokens(tok, tiny_lm.model, TOKENS, rows) == start  # idempotent
    assert new_rows(tiny_lm.model) == [rows]


def test_rows_start_at_the_mean_of_the_old_rows_plus_small_noise(tiny_lm):
    add_placeholder_tokens(tiny_lm.tokenizer, tiny_lm.model, ["<speech>"])
    old = tiny_lm.model.get_input_embeddings().weight.detach().clone()
    rows, _ = grown(tiny_lm)
    mean, spread = old.mean(0), old.std(0)
    dev = (rows.weight.detach() - mean) / spread
    assert 0.05 < float(dev.std()) < 0.2 and float(dev.mean().abs()) < 0.05
    assert not torch.equal(rows.weight[0], rows.weight[1])


def test_untied_llm_gets_separate_output_rows_and_both_old_tables_stay_frozen_bitwise(tiny_lm):
    tiny_lm.model = untied_lm(tiny_lm.tokenizer)
    add_placeholder_tokens(tiny_lm.tokenizer, tiny_lm.model, ["<speech>"])
    old_in = tiny_lm.model.get_input_embeddings().weight.detach().clone()
    old_out = tiny_lm.model.get_output_embeddings().weight.detach().clone()
    rows, start = grown(tiny_lm)
    assert rows.output_weight is not None and rows.output_weight.shape == rows.weight.shape
    head = tiny_lm.model.get_output_embeddings()
    assert torch.equal(head.weight[start:], rows.output_weight)
    params = [rows.weight, rows.output_weight]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    before = [p.detach().clone() for p in params]
    ids = torch.tensor([[1, start + 1, 2, start + 3, start]])
    for _ in range(3):  # text and new tokens in, new tokens and text out
        opt.zero_grad()
        logits = tiny_lm.model(input_ids=ids).logits[0, :-1]
        torch.nn.functional.cross_entropy(logits, ids[0, 1:]).backward()
        opt.step()
    emb = tiny_lm.model.get_input_embeddings()
    assert torch.equal(emb.base.weight, old_in) and torch.equal(head.base.weight, old_out)
    assert all(not torch.equal(p, b) for p, b in zip(params, before))


def test_generate_reads_and_writes_new_tokens_through_lora(tiny_lm):
    rows, start = grown(tiny_lm)
    model = apply_lora(tiny_lm.model, LoraSpec(r=4, alpha=8, dropout=0.0))
    ids = torch.tensor([[1, 2, start + 3]])
    with torch.no_grad():  # make <unit_2> the obvious next token after the prompt
        h = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1]
        rows.weight[2] = 50 * h / h.norm() ** 2 + rows.weight[2] * 0
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                         pad_token_id=tiny_lm.tokenizer.pad_token_id)
    assert int(out[0, 3]) == start + 2  # written by the LLM, then read back as its next input
    assert out.shape[1] == 6


def test_a_second_vocabulary_nests_and_a_partial_one_is_refused(tiny_lm):
    rows, start = grown(tiny_lm)
    more = NewRows(2, 64)
    start2 = add_tokens(tiny_lm.tokenizer, tiny_lm.model, ["<a>", "<b>"], more)
    assert start2 == start + 5
    emb = tiny_lm.model.get_input_embeddings()
    assert torch.equal(emb(torch.tensor([start + 1, start2 + 1])), torch.stack([rows.weight[1], more.weight[1]]))
    assert new_rows(tiny_lm.model) == [more, rows]
    with pytest.raises(ValueError, match="already holds 1 of the 2 new tokens"):
        add_tokens(tiny_lm.tokenizer, tiny_lm.model, ["<a>", "<c>"], NewRows(2, 64))


@pytest.mark.parametrize("tied", [True, False])
def test_materialize_gives_plain_tables_with_the_same_logits(tiny_lm, tied):
    from torch import nn

    from llm.vocab import materialize

    if not tied:
        tiny_lm.model = untied_lm(tiny_lm.tokenizer)
    _, start = grown(tiny_lm)
    ids = torch.tensor([[1, start + 1, 2, start + 4]])
    with torch.no_grad():
        before = tiny_lm.model(input_ids=ids).logits
        materialize(tiny_lm.model)
        after = tiny_lm.model(input_ids=ids).logits
    emb, head = tiny_lm.model.get_input_embeddings(), tiny_lm.model.get_output_embeddings()
    assert type(emb) is nn.Embedding and type(head) is nn.Linear and emb.weight.shape[0] == start + 5
    assert (head.weight is emb.weight) == tied
    torch.testing.assert_close(after, before)


def test_a_placeholder_added_after_a_vocabulary_is_refused(tiny_lm):
    grown(tiny_lm)
    with pytest.raises(ValueError, match=r"placeholders \['<late>'\] must be added before"):
        add_placeholder_tokens(tiny_lm.tokenizer, tiny_lm.model, ["<late>"])
