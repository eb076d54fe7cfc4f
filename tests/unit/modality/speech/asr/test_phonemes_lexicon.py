"""Phoneme targets (modality.speech.asr.phonemes) and words from phonemes (modality.speech.asr.lexicon): real espeak-ng, synthetic emissions."""

from __future__ import annotations

import math

import pytest
import torch

from modality.speech.asr.lexicon import UNK, LexiconDecoder, NgramLM, build_lexicon
from modality.speech.asr.phonemes import BLANK, WORD, Phonemizer, phoneme_inventory


@pytest.fixture(scope="module")
def ph() -> Phonemizer:
    return Phonemizer("en-us")


def emissions(phones: list[str], classes: list[str], frames: int = 3) -> torch.Tensor:
    """A confident CTC path: each phoneme on one frame, then blanks -> log-probs [1, T, C]."""
    idx = {p: i for i, p in enumerate(classes)}
    e = torch.full((1, frames * len(phones), len(classes)), -12.0)
    for k, p in enumerate(phones):
        e[0, frames * k, idx[p]] = 0.0
        e[0, frames * k + 1:frames * (k + 1), 0] = 0.0
    return e.log_softmax(-1)


def test_phonemes_mark_words_and_differ_where_the_sound_does(ph):
    cat, bat = ph(["cat", "bat"])
    assert cat[-1] == WORD and bat[-1] == WORD
    assert cat[1:] == bat[1:] and cat[0] != bat[0]  # one sound apart
    seq = ph(["The cat sat on the mat."])[0]
    assert seq.count(WORD) == 6
    assert not any(p in ("ˈ", "ˌ") or "ˈ" in p for p in seq)  # stress dropped
    assert ph.words(["Hello, world."]) == ph.words(["Hello, world."])  # cached, same result


def test_units_espeak_merges_or_splits_are_aligned_back_to_the_text_words(ph):
    words = ph.by_word("The cat sat on the mat.")
    assert len(ph.words(["on the mat"])[0]) == 2  # espeak says 'on the' as one unit...
    assert [sum(len(u) for u in w) for w in words] == [2, 3, 3, 2, 2, 3]  # ...split back: on | the
    assert words[3] == [["ɔ", "n"]] and words[4] == [["ð", "ə"]]
    mixed = ph.by_word("It is 25 dollars, a well-known fact.")  # '25' is two units, 'well-known' two words
    assert len(mixed) == 8 and len(mixed[2]) == 2
    assert mixed[5] == [["w", "ɛ", "l"]] and mixed[6] == [["n", "oʊ", "n"]]
    flat = ph(["on the mat"])[0]
    assert flat.count(WORD) == 3 and flat[:3] == ["ɔ", "n", WORD]


def test_a_text_espeak_cannot_say_raises_naming_it(ph):
    with pytest.raises(ValueError, match="'...'"):
        ph(["..."])


def test_inventory_has_the_blank_first_and_every_phoneme(ph):
    seqs = ph(["a quick brown fox", "jumps over"])
    classes = phoneme_inventory(seqs)
    assert classes[0] == BLANK and WORD in classes
    assert set(classes[1:]) == {p for s in seqs for p in s}
    assert classes[1:] == sorted(classes[1:])


def test_ngram_lm_is_a_distribution_and_prefers_what_it_read():
    sents = [["their", "cat", "sat"], ["their", "cat", "ran"], ["the", "dog", "ran"]]
    lm = NgramLM(sents, vocab=["their", "there", "cat", "sat", "ran", "the", "dog", "zebra"])
    vocab = list(lm.uni)
    for ctx in [("<s>", "<s>"), ("<s>", "their"), ("their", "cat"), ("cat", "zebra")]:
        assert sum(math.exp(lm.logp(ctx, w)) for w in vocab) == pytest.approx(1.0, abs=1e-9)
    assert lm.logp(("<s>", "<s>"), "their") > lm.logp(("<s>", "<s>"), "there")
    assert lm.logp(("<s>", "their"), "cat") > lm.logp(("<s>", "their"), "dog")
    assert lm.logp(("<s>", "<s>"), "zebra") > -100  # a lexicon word the text never had keeps some mass
    assert lm.sentence_logp(["their", "cat", "sat"]) > lm.sentence_logp(["sat", "cat", "their"])


def test_lexicon_spells_each_word_and_adds_in_context_variants(ph):
    classes = phoneme_inventory(ph(["the apple and the cat", "a an the cat apple"]))
    lex = build_lexicon(["the", "cat", "apple"], ph, classes, sentences=["the apple", "the apple"], min_variant=2)
    assert lex["cat"] == [tuple(ph(["cat"])[0])]
    assert all(p[-1] == WORD for prons in lex.values() for p in prons)
    in_context = tuple(ph.words(["the apple"])[0][0]) + (WORD,)
    assert in_context in lex["the"]  # espeak's 'the' before a vowel, seen twice
    lex_once = build_lexicon(["the"], ph, classes, sentences=["the apple"], min_variant=2)
    assert (in_context in lex_once["the"]) == (in_context == lex_once["the"][0])  # once is not enough for a variant
    missing = build_lexicon(["cat", "zebra"], ph, [BLANK, WORD, *[c for c in classes if c not in (BLANK, WORD)][:3]])
    assert "zebra" not in missing  # phonemes outside the classes: left out


def test_decoder_finds_a_word_no_sentence_had_and_the_lm_picks_homophones(ph):
    texts = ["their cat sat", "their dog sat", "the cat ran"]
    words = {"their", "there", "cat", "dog", "sat", "ran", "the", "zebra"}
    classes = phoneme_inventory(ph(texts + ["there zebra"]))
    lex = build_lexicon(words, ph, classes)
    lm = NgramLM([t.split() for t in texts], lex)
    dec = LexiconDecoder(classes, lex, lm, nbest=3, ngram_weight=1.0)
    (best, *_), = dec(emissions(ph(["the zebra sat"])[0], classes), torch.tensor([3 * len(ph(["the zebra sat"])[0])]))
    assert best[0] == "the zebra sat"  # zebra: in the lexicon only
    phones = ph(["there cat sat"])[0]
    assert lex["there"] == lex["their"]  # homophones for espeak
    (best, *_), = dec(emissions(phones, classes), torch.tensor([3 * len(phones)]))
    assert best[0] == "their cat sat"  # the LM read 'their cat', never 'there cat'
    no_lm = LexiconDecoder(classes, lex, None, nbest=3)
    hyps, = no_lm(emissions(phones, classes), torch.tensor([3 * len(phones)]))
    assert {h[0] for h in hyps} >= {"their cat sat", "there cat sat"}
    assert UNK not in " ".join(h[0] for h in hyps)


def test_decoder_needs_blank_first_and_a_word_class():
    with pytest.raises(ValueError, match="must start with"):
        LexiconDecoder(["a", BLANK, WORD], {"a": [("a", WORD)]}, None)


def _asr(i: int, ref: str, n: int = 60) -> dict:
    return {"id": f"a{i}", "where": f"asr.jsonl:{i + 1}", "root": None, "toy": [str(n + i)], "type": "asr",
            "reference": ref, "conversations": [{"from": "human", "value": "<toy>\nTranscribe."},
                                                {"from": "gpt", "value": ref}]}


def test_phoneme_chain_trains_on_espeak_targets_and_decodes_words(tiny_lm, toy_modality, ph):
    from tasks.evaluate import WER_TYPES
    from modality.speech.asr.lexicon import lexicon_decode
    from tests.unit.helpers import batch_for, build, ctc

    texts = ["the cat sat", "the dog ran", "a cat ran"]
    classes = phoneme_inventory(ph(texts))
    model = build(tiny_lm, toy_modality, "align", lm_weight=0.0,
                  objectives=ctc(tiny_lm, toy_modality, 1.0, phonemes=classes, phonemizer=ph))
    objective = model.objectives["toy_ctc"]
    assert set(model.objectives) == {"toy_ctc"} and objective.head[1].out_features == len(classes)
    assert all(p.requires_grad for p in objective.parameters())  # align trains the head with the adaptor
    batch = batch_for(model, [_asr(i, t) for i, t in enumerate(texts)])
    targets = objective.targets(batch)
    assert [[classes[k] for k in t] for t in targets] == ph(texts)
    opt = torch.optim.Adam([*model.modalities["toy"].adaptor.parameters(), *objective.parameters()], lr=3e-2)
    first = None
    for _ in range(60):
        loss = model(batch)["loss"]
        first = first if first is not None else float(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 0.3 * first  # the toy features of three clips are learnable
    model.eval()
    readout = objective.readout(batch, model.adapt_all(batch), model.llm.get_input_embeddings().weight)
    assert readout[0].split() == ph(["the cat sat"])[0]
    lex = build_lexicon({"the", "cat", "sat", "dog", "ran", "a"}, ph, classes, sentences=texts, min_variant=1)
    words_decoder = LexiconDecoder(classes, lex, NgramLM([t.split() for t in texts], lex), nbest=3)
    words_decoder.llm_weight = 0.0
    gen = batch_for(model, [_asr(i, t) for i, t in enumerate(texts)], generate=True)
    words, phones, cands = lexicon_decode(model, objective, words_decoder, gen, 4, WER_TYPES)
    assert words == texts and phones[1] == " ".join(ph(["the dog ran"])[0])
    assert all(c and "decoder" in c[0] for c in cands)


def test_phoneme_classes_must_be_well_formed(tiny_lm, toy_modality):
    from tests.unit.helpers import ctc

    with pytest.raises(ValueError, match="must start with"):
        ctc(tiny_lm, toy_modality, 1.0, phonemes=["a", BLANK, WORD])(1)


def test_the_most_frequent_of_many_homophones_keeps_its_place(ph):
    classes = phoneme_inventory(ph(["cat"]))
    pron = tuple(ph(["cat"])[0])
    names = [f"w{k}" for k in range(8)]  # eight words, one pronunciation: flashlight keeps six
    lex = {w: [pron] for w in names}
    lm = NgramLM([["w7"]] * 5 + [[w] for w in names[:6]], lex)
    dec = LexiconDecoder(classes, lex, lm, nbest=8, ngram_weight=1.0)
    assert len(dec.words) == 6 + 1 and "w7" in dec.words and "w6" not in dec.words  # + <unk>; w6: never in the text
    hyps, = dec(emissions(list(pron), classes), torch.tensor([3 * len(pron)]))
    assert hyps[0][0] == "w7" and {h[0] for h in hyps} <= set(dec.words)


def test_llm_reads_the_phonemes_and_joint_decoding_scores_texts_by_their_sound(tiny_lm, toy_modality, ph):
    """modality.ctc_compress=soft on a phoneme chain: the LLM's input is one position per heard phoneme, each the
    table row of that phoneme (the LLM's own rows for its IPA text); joint decoding scores a candidate text by
    espeak-ng's phonemes of it under the CTC, so the text that was said beats one that was not."""
    from modality.speech.asr.decode import ctc_logprobs
    from tests.unit.helpers import batch_for, build, ctc

    texts = ["the cat sat", "the dog ran", "a cat ran"]
    classes = phoneme_inventory(ph(texts))
    model = build(tiny_lm, toy_modality, "align", lm_weight=0.0,
                  objectives=ctc(tiny_lm, toy_modality, 1.0, phonemes=classes, phonemizer=ph))
    objective = model.objectives["toy_ctc"]
    batch = batch_for(model, [_asr(i, t) for i, t in enumerate(texts)])
    opt = torch.optim.Adam([*model.modalities["toy"].adaptor.parameters(), *objective.parameters()], lr=3e-2)
    for _ in range(60):
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    table = model.llm.get_input_embeddings().weight
    outs = model.adapt_all(batch)
    out, lengths = outs["toy"]
    objective.compress = "soft"
    rows = objective.phoneme_table(table)
    assert rows.shape == (len(classes), table.shape[1]) and float(rows[0].abs().sum()) == 0.0
    word = tiny_lm.tokenizer.encode(" |", add_special_tokens=False)
    assert torch.allclose(rows[classes.index(WORD)], table[word].mean(0))
    with torch.no_grad():
        comp, k = objective.transform("toy", out, lengths, table)
    said = ph(["the cat sat"])[0]
    assert int(k[0]) == len(said)  # one position per phoneme heard (blanks dropped, repeats merged)
    cos = torch.nn.functional.cosine_similarity(comp[0, : len(said)], rows[[classes.index(p) for p in said]], dim=-1)
    assert float(cos.min()) > 0.9
    targets = objective.text_targets(["the cat sat", "the dog sat", "qqqq zzzz"])
    assert [classes[i] for i in targets[0]] == said
    scores = ctc_logprobs(objective.logits(out, table)[0], int(lengths[0]), targets, objective.blank)
    assert scores[0] > scores[1] and scores[0] > math.log(0.5)
    with pytest.raises(ValueError, match="ctc_compress=soft"):
        ctc(tiny_lm, toy_modality, 1.0, phonemes=classes, phonemizer=ph, compress="mean")(1)


def test_lexicon_text_is_read_from_manifests_and_from_json_record_lists(tmp_path):
    """A chain's train files mix NeMo manifests (.jsonl) with instruct conversations (.json lists): both are read,
    records without a transcript give none (a .json list read line by line used to fail at its line 1)."""
    import json

    from modality.speech.asr.lexicon import read_texts

    (tmp_path / "m.jsonl").write_text(json.dumps({"audio_filepath": "a.wav", "text": "Hello there."}) + "\n")
    (tmp_path / "c.json").write_text(json.dumps([{"id": "x", "conversations": []}, {"id": "y", "text": "Good day."}]))
    assert read_texts([str(tmp_path / "m.jsonl"), str(tmp_path / "c.json"), str(tmp_path / "gone.jsonl")]) == \
        ["Good day.", "Hello there."]
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(ValueError, match="bad.json: not a JSON list"):
        read_texts([str(tmp_path / "bad.json")])
