import pytest
import torch

from modality.speech.asr.ctc import class_index, corpus_vocab, cosine_logits, ctc_compress, ctc_loss, greedy_ctc_decode, to_classes


def embedding_ctc_loss(out, lengths, owner, targets, table, blank_id, vocab=None):
    """CTC with the frozen rows as a cosine classifier (over ``vocab``'s rows): how CtcObjective composes it."""
    rows = table if vocab is None else table[vocab]
    return ctc_loss(cosine_logits(out, rows), lengths, owner, to_classes(targets, vocab), class_index(vocab, blank_id))


def test_ctc_prefers_outputs_that_spell_the_transcript():
    torch.manual_seed(0)
    V, D, blank = 20, 16, 0
    table = torch.randn(V, D)
    target = [3, 5, 7]
    spelled = table[[3, 3, blank, 5, 7, blank]].unsqueeze(0)   # [1, 6, D]
    noise = torch.randn(1, 6, D)
    lengths, owner = torch.tensor([6]), torch.tensor([0])
    good = embedding_ctc_loss(spelled, lengths, owner, [target], table, blank)
    bad = embedding_ctc_loss(noise, lengths, owner, [target], table, blank)
    assert good < 0.5 * bad
    assert greedy_ctc_decode(spelled, lengths, table, blank) == [target]


def test_ctc_ignores_non_transcript_and_multi_clip_samples():
    table = torch.randn(10, 4)
    out = torch.randn(3, 5, 4, requires_grad=True)
    owner = torch.tensor([0, 0, 1])  # sample 0 has two clips: no single transcript alignment
    assert embedding_ctc_loss(out, torch.tensor([5, 5, 5]), owner, [[1, 2], None], table, 0) is None
    loss = embedding_ctc_loss(out, torch.tensor([5, 5, 5]), owner, [[1, 2], [3, 4]], table, 0)
    loss.backward()
    assert out.grad[:2].abs().sum() == 0 and out.grad[2].abs().sum() > 0


def test_restricted_vocab_is_ctc_over_those_rows_with_remapped_targets():
    torch.manual_seed(0)
    table = torch.randn(30, 8)
    out = torch.randn(3, 6, 8)
    lengths, owner = torch.tensor([6, 5, 6]), torch.tensor([0, 1, 2])
    targets = [[4, 9, 9], [17], [4, 25]]
    vocab = corpus_vocab(targets, [2])
    assert vocab.tolist() == [2, 4, 9, 17, 25]
    got = embedding_ctc_loss(out, lengths, owner, targets, table, 2, vocab=vocab)
    remapped = [[1, 2, 2], [3], [1, 4]]  # positions in vocab; blank 2 -> 0
    want = embedding_ctc_loss(out, lengths, owner, remapped, table[vocab], 0)
    assert torch.allclose(got, want)
    full = embedding_ctc_loss(out, lengths, owner, targets, table, 2)
    assert not torch.allclose(got, full)  # fewer competing classes: a different (cheaper) loss
    # a target token outside the vocabulary leaves that sample out instead of mislabelling it
    got2 = embedding_ctc_loss(out, lengths, owner, [[4, 9, 9], [17, 11], [4, 25]], table, 2, vocab=vocab)
    want2 = embedding_ctc_loss(out[[0, 2]], lengths[[0, 2]], torch.tensor([0, 1]), [remapped[0], remapped[2]], table[vocab], 0)
    assert torch.allclose(got2, want2)


def test_ctc_compress_drops_blanks_and_averages_runs():
    table = torch.eye(4)  # row 0 = blank
    ids = torch.tensor([[0, 1, 1, 0, 2, 2, 2, 3, 1, 1], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0], [1, 0, 1, 1, 0, 0, 0, 0, 0, 0]])
    out = (table[ids] * torch.arange(1, 11).float()[None, :, None]).requires_grad_()
    comp, k = ctc_compress(out, torch.tensor([8, 5, 4]), table, 0)
    assert k.tolist() == [3, 1, 2]  # 1 1 | 2 2 2 | 3 (past length ignored); all blank -> one mean; 1 _ 1 1 = two runs
    assert torch.equal(comp[0, :3], torch.tensor([[0, 2.5, 0, 0], [0, 0, 6, 0], [0, 0, 0, 8]]))
    assert (comp[0, 3:] == 0).all()
    assert torch.equal(comp[1, 0], torch.tensor([3.0, 0, 0, 0]))  # mean of the 5 valid blank frames
    assert torch.equal(comp[2, :2], torch.tensor([[0, 1.0, 0, 0], [0, 3.5, 0, 0]]))
    comp.sum().backward()
    assert out.grad[0, 0].sum() == 0 and out.grad[0, 1].sum() > 0 and out.grad[0, 8:].abs().sum() == 0


def _without_holes(embeds, mask, holes, other, left: bool):
    """Rebuild each row without its hole positions, re-padded on the same side: what compression means."""
    rows = []
    for e, m, h, o in zip(embeds, mask, holes, other):
        keep = ~h
        rows.append((e[keep], m[keep], o[keep]))
    L = max(r[0].shape[0] for r in rows)
    E, M, O = [], [], []
    for e, m, o in rows:
        p = L - e.shape[0]
        pe, pm, po = e.new_zeros(p, e.shape[1]), m.new_zeros(p), o.new_full((p,), -100)
        E.append(torch.cat([pe, e] if left else [e, pe]))
        M.append(torch.cat([pm, m] if left else [m, pm]))
        O.append(torch.cat([po, o] if left else [o, po]))
    return torch.stack(E), torch.stack(M), torch.stack(O)


def test_compressed_slots_are_holes_the_llm_never_sees(tiny_lm, toy_modality):
    """Loss and greedy generation with holes == the same sequences built without them."""
    from tests.unit.helpers import batch_for, build, ctc, toy_records

    model = build(tiny_lm, toy_modality, "instruct", objectives=ctc(tiny_lm, toy_modality, 0.0, compress=True)).eval()
    with torch.no_grad():  # make runs of equal argmax: duplicate adaptor rows pairwise
        w = model.llm.get_input_embeddings().weight
        toy_modality.adaptor.weight.mul_(0.0)
        toy_modality.adaptor.bias.copy_(w[5] * 3)
    batch = batch_for(model, toy_records(4))
    with torch.no_grad():
        embeds, _, mask = model.embed(batch)
        holes = batch["attention_mask"].bool() & ~mask.bool()
        assert holes.sum(1).tolist() == [n - 1 for n in [2, 2, 3, 3]]  # every clip says token 5 throughout: k = 1
        loss = model.lm_loss(embeds, mask, batch["labels"])
        e2, m2, l2 = _without_holes(embeds, batch["attention_mask"], holes, batch["labels"], left=False)
        torch.testing.assert_close(loss, model.lm_loss(e2, m2, l2))
        gen = batch_for(model, toy_records(4), generate=True)
        embeds, _, mask = model.embed(gen)
        holes = gen["attention_mask"].bool() & ~mask.bool()
        e2, m2, _ = _without_holes(embeds, gen["attention_mask"], holes, gen["input_ids"], left=True)
        ref = model.llm.generate(inputs_embeds=e2, attention_mask=m2, max_new_tokens=6, do_sample=False,
                                 pad_token_id=model.tokenizer.pad_token_id)
    assert model.generate(gen, max_new_tokens=6) == [t.strip() for t in model.tokenizer.batch_decode(ref, skip_special_tokens=True)]


def test_centred_cosine_separates_rows_that_share_a_common_direction():
    """SmolLM2's rows share a direction (mean pairwise cosine 0.44): raw cosines left a margin too small to learn."""
    torch.manual_seed(0)
    V, D = 50, 32
    table = 10 * torch.randn(D) + 0.5 * torch.randn(V, D)          # every row ~ the same direction
    raw_cos = torch.nn.functional.normalize(table, dim=-1) @ torch.nn.functional.normalize(table, dim=-1).T
    assert raw_cos.fill_diagonal_(0).max() > 0.99                   # uncentred: all rows look alike
    target = [3, 5, 7]
    spelled = table[[0, 3, 0, 5, 0, 7, 0]].unsqueeze(0)
    loss = embedding_ctc_loss(spelled, torch.tensor([7]), torch.tensor([0]), [target], table, 0)
    assert loss < 0.1                                               # the exact rows are read with confidence
    assert greedy_ctc_decode(spelled, torch.tensor([7]), table, 0) == [target]


def test_greedy_decode_over_a_vocab_returns_token_ids():
    torch.manual_seed(0)
    table = torch.randn(30, 8)
    vocab = torch.tensor([2, 4, 9, 17, 25])                         # blank = 2
    spelled = table[[2, 9, 9, 2, 25, 4]].unsqueeze(0)
    assert greedy_ctc_decode(spelled, torch.tensor([6]), table, 2, vocab=vocab) == [[9, 25, 4]]
    assert greedy_ctc_decode(spelled, torch.tensor([1]), table, 2, vocab=vocab) == [[]]


def test_soft_compression_turns_confident_positions_into_the_tokens_own_rows():
    """ctc_compress(soft=True): a kept position is p @ E; confident p -> exactly the LLM's row for that token."""
    torch.manual_seed(0)
    table = torch.randn(30, 8)
    vocab = torch.tensor([2, 4, 9, 17, 25])
    out = table[[2, 9, 9, 2, 25, 4, 2, 2]].unsqueeze(0).repeat(2, 1, 1).requires_grad_()
    comp, k = ctc_compress(out, torch.tensor([8, 3]), table, 2, vocab=vocab, soft=True, scale=200.0)
    assert k.tolist() == [3, 1]
    torch.testing.assert_close(comp[0, :3], table[[9, 25, 4]], atol=1e-4, rtol=0)
    torch.testing.assert_close(comp[1, 0], table[9], atol=1e-4, rtol=0)
    assert (comp[0, 3:] == 0).all()
    mean, _ = ctc_compress(out + 0.3 * torch.randn_like(out), torch.tensor([8, 3]), table, 2, vocab=vocab)
    assert not torch.allclose(mean[0, :3], table[[9, 25, 4]], atol=1e-2)  # "mean" keeps the raw outputs
    comp, _ = ctc_compress(out, torch.tensor([8, 3]), table, 2, vocab=vocab, soft=True)  # default scale: not saturated
    (comp * torch.randn_like(comp)).sum().backward()
    assert out.grad[0, :6].abs().sum() > 0                          # the LM loss still reaches the adaptor


def test_ctc_only_step_never_calls_the_llm_and_weights_must_make_sense(tiny_lm, toy_modality, monkeypatch):
    from tasks.multimodal import MultimodalLM
    from tests.unit.helpers import STAGES, batch_for, build, ctc

    model = build(tiny_lm, toy_modality, "align", objectives=ctc(tiny_lm, toy_modality, 1.0), lm_weight=0.0)
    recs = [{"id": f"a{i}", "where": f"asr.jsonl:{i + 1}", "root": None, "toy": [str(3 + i)], "type": "asr",
             "reference": "hello there", "conversations": [{"from": "human", "value": "<toy>\nTranscribe."},
                                                           {"from": "gpt", "value": "hello there"}]} for i in range(3)]
    batch = batch_for(model, recs)

    def boom(*a, **k):
        raise AssertionError("the LLM ran in a CTC-only step")

    monkeypatch.setattr(type(model.llm), "forward", boom)
    monkeypatch.setattr(type(model.llm.model), "forward", boom)
    result = model(batch)
    assert set(result) == {"loss", "ctc_toy"} and result["loss"] > 0
    result["loss"].backward()
    assert all(p.grad is not None for p in model.modalities["toy"].adaptor.parameters())
    args = (tiny_lm.model, tiny_lm.tokenizer, {"toy": toy_modality}, {"toy": 1})
    with pytest.raises(ValueError, match="some loss must have weight > 0"):
        MultimodalLM(*args, STAGES["align"], lm_weight=0.0)
    with pytest.raises(ValueError, match="set stage.lora=false"):
        MultimodalLM(*args, STAGES["instruct"], lm_weight=0.0, objectives=dict(model.objectives), lora=None)


def test_unit_segmenter_respells_rare_words_with_units_and_keeps_the_text(tiny_lm):
    from modality.speech.asr.ctc import SpellingSegmenter, single_char_tokens

    tok = tiny_lm.tokenizer
    common = tok.encode(" the cat sat on the mat", add_special_tokens=False)
    vocab = corpus_vocab([common], [0], always=single_char_tokens(tok))
    seg = SpellingSegmenter(tok, vocab)
    assert seg(common) == common                                      # words made of units stay as written
    rare = tok.encode(" the rhinoceros sat", add_special_tokens=False)
    out = seg(rare)
    assert all(i in set(vocab.tolist()) for i in out) and len(out) > len(rare)
    assert tok.decode(out) == tok.decode(rare)                         # the same text, spelled with units
    assert out[:1] == rare[:1] and out[-1:] == rare[-1:]               # only the rare word was re-spelled
    assert seg(None) is None and seg([]) == []
