"""Joint CTC/LLM decoding (modality.speech.asr.decode): both scores against brute force, the choice, the sweep CLI."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from modality.speech.asr.decode import (
    DecodeSpec,
    chunk_prompts,
    ctc_logprobs,
    ctc_prefix_beams,
    lm_logprobs,
    main,
    oracle,
    pick,
    score_candidates,
    sweep,
)


def _collapse(path: tuple[int, ...], blank: int) -> list[int]:
    out, prev = [], None
    for t in path:
        if t != prev and t != blank:
            out.append(t)
        prev = t
    return out


def test_ctc_logprobs_is_the_log_sum_over_every_alignment():
    torch.manual_seed(0)
    N, V, blank = 5, 3, 0
    logits = torch.randn(N + 2, V) * 2            # two rows past the clip's length must not count
    logp = logits[:N].log_softmax(-1)
    targets = [[1], [1, 2], [2, 2], [1, 2, 1], [1, 2, 1, 2, 1, 2], None]
    got = ctc_logprobs(logits, N, targets, blank)
    for t, g in zip(targets, got):
        total = sum(math.exp(sum(logp[i, s].item() for i, s in enumerate(path)))
                    for path in itertools.product(range(V), repeat=N) if t and _collapse(path, blank) == t)
        if total == 0:
            assert g == -math.inf                  # longer than the clip, or unspellable
        else:
            assert g == pytest.approx(math.log(total), abs=1e-4)


def test_ctc_prefix_beam_search_ranks_label_sequences_by_their_exact_probability():
    torch.manual_seed(1)
    N, V, blank = 5, 3, 0
    logits = torch.randn(N, V) * 2
    exact: dict[tuple[int, ...], float] = {}
    logp = logits.log_softmax(-1)
    for path in itertools.product(range(V), repeat=N):
        key = tuple(_collapse(path, blank))
        exact[key] = exact.get(key, 0.0) + math.exp(sum(logp[i, s].item() for i, s in enumerate(path)))
    full = ctc_prefix_beams(logits, N, blank, beam=1000, prune=V)   # nothing pruned: exact
    assert len(full) == len(exact)
    for seq, score in full:
        assert score == pytest.approx(math.log(exact[tuple(seq)]), abs=1e-5)
    assert [s for s, _ in full] == sorted((list(k) for k in exact), key=lambda k: -exact[tuple(k)])
    assert ctc_logprobs(logits, N, [full[0][0]], blank)[0] == pytest.approx(full[0][1], abs=1e-5)
    two = ctc_prefix_beams(logits, N, blank, beam=2)
    assert len(two) == 2 and two[0][1] >= two[1][1]


def test_lm_logprobs_matches_scoring_each_candidate_alone(tiny_lm):
    """Left-padded prompts of different lengths, right-padded candidates: same as one unpadded pass each."""
    torch.manual_seed(0)
    llm = tiny_lm.model.eval()
    prompts = [[5, 9, 11, 13, 2], [7, 3]]
    L = max(map(len, prompts))
    ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    embeds = llm.get_input_embeddings()(ids)
    owner, cands = [0, 0, 1, 1], [[4, 8, 15], [16], [23, 42, 4, 8], [15, 16]]
    got = lm_logprobs(llm, embeds, mask, owner, cands)
    with torch.no_grad():
        for k, (o, c) in enumerate(zip(owner, cands)):
            logits = llm(torch.tensor([prompts[o] + c])).logits[0].log_softmax(-1)
            want = sum(logits[len(prompts[o]) - 1 + j, t].item() for j, t in enumerate(c))
            assert got[k].item() == pytest.approx(want, abs=1e-4)
    # in forwards of <= 2 candidates: the same scores, each prompt whole in one group
    assert chunk_prompts(owner, 2) == [[0], [1]] and chunk_prompts([0, 1, 1, 1, 2], 2) == [[0], [1], [2]]
    assert chunk_prompts([0, 1, 2, 2], 3) == [[0, 1], [2]]
    chunked = score_candidates(llm, embeds, mask, owner, cands, limit=2)
    assert chunked == pytest.approx(got.tolist(), abs=1e-5)
    assert score_candidates(llm, embeds, mask, owner, cands) == got.tolist()


def test_pick_trades_the_llm_against_the_audio():
    cands = [{"text": "fluent but wrong", "lm": -2.0, "ctc": -40.0, "tokens": 4},
             {"text": "what was said", "lm": -9.0, "ctc": -3.0, "tokens": 4},
             {"text": "unspellable", "lm": -1.0, "ctc": None, "tokens": 3},
             {"text": "what was said and more", "lm": -9.5, "ctc": -3.5, "tokens": 6}]
    assert pick(cands, 0.0, 0.0) == "unspellable"        # the LLM alone
    assert pick(cands, 0.3, 0.0) == "what was said"      # the audio can veto, and -inf never wins
    assert pick(cands, 1.0, 0.0) == "what was said"
    assert pick(cands, 0.3, 1.0) == "what was said and more"  # a length bonus favours longer ones
    with pytest.raises(ValueError):
        DecodeSpec(num_beams=0)
    with pytest.raises(ValueError):
        DecodeSpec(joint_weight=1.5)


def _asr(i: int, ref: str, clips: int = 1) -> dict:
    return {"id": f"s{i}", "where": f"e.jsonl:{i + 1}", "root": None, "toy": [str(3 + i + k) for k in range(clips)],
            "type": "asr", "reference": ref, "conversations": [
                {"from": "human", "value": "<toy>\n" * clips + "Transcribe."}, {"from": "gpt", "value": ref}]}


def test_joint_decoding_keeps_what_the_audio_supports(tiny_lm, toy_modality, tmp_path, capsys):
    """The CTC classifier says " hello" everywhere; a random LLM babbles. With joint_weight=1 every one-clip
    transcript becomes the readout; other samples keep the LLM's best beam; rows keep scored candidates
    from which the sweep CLI re-picks."""
    from tasks.evaluate import WER_TYPES, run_generation, wer
    from modality.speech.asr.decode import joint_decode
    from modality.speech.asr.decoder import SpeechDecoder
    from tests.unit.helpers import batch_for, build, ctc, toy_records

    model = build(tiny_lm, toy_modality, "align").eval()
    tok = tiny_lm.tokenizer
    with pytest.raises(ValueError, match="needs a chain trained with CTC classes"):  # not a silent greedy decode
        joint_decode(model, None, batch_for(model, [_asr(0, "hello")], generate=True), 4, DecodeSpec(joint_weight=0.5),
                     WER_TYPES)
    hello = tok.encode(" hello", add_special_tokens=False)
    blank = model.placeholder_ids["toy"]
    vocab = torch.tensor(sorted({blank, hello[0]}))
    model = build(tiny_lm, toy_modality, "align", objectives=ctc(tiny_lm, toy_modality, 0.0, vocab=vocab,
                                                                 classifier="linear")).eval()
    objective = model.objectives["toy_ctc"]
    with torch.no_grad():
        head = objective.head[1]
        head.weight.zero_()
        head.bias.copy_((vocab == hello[0]).float() * 10)
    recs = [_asr(0, "hello"), _asr(1, "hello there"), _asr(2, "hello hello", clips=2), toy_records(1)[0]]
    batch = batch_for(model, recs, generate=True)
    greedy = model.generate(batch, max_new_tokens=4)
    assert "hello" not in greedy[:2]                     # the random LLM does not say it
    texts, readouts, cands = joint_decode(model, objective, batch, 4,
                                          DecodeSpec(num_beams=2, joint_weight=1.0, ctc_beams=3), WER_TYPES)
    assert texts[:2] == ["hello", "hello"] and readouts[:2] == ["hello", "hello"] and readouts[2] is None
    assert cands[2] is None and cands[3] is None         # two clips / not a transcript: the LLM's best beam
    beams = model.llm.generate(inputs_embeds=model.embed(batch)[0], attention_mask=model.embed(batch)[2],
                               max_new_tokens=4, do_sample=False, num_beams=2, num_return_sequences=2,
                               early_stopping=True, pad_token_id=tok.pad_token_id)
    assert texts[3] == tok.batch_decode(beams, skip_special_tokens=True)[6].strip()
    first = cands[0]
    assert [c["source"] for c in first][-1] == "ctc" and first[-1]["text"] == "hello"
    assert first[-1]["ctc"] > -5 and all(c["ctc"] is None for c in first[:-1])  # unspellable: null in the JSON
    assert all(c["tokens"] >= 1 and math.isfinite(c["lm"]) for c in first)

    calls = []
    model.adapt_all = lambda b, f=model.adapt_all: calls.append(1) or f(b)  # type: ignore[method-assign]
    model.decoder = SpeechDecoder(objective, DecodeSpec(num_beams=2, joint_weight=1.0))
    m = run_generation(model, [batch], 4, tmp_path / "p.jsonl")
    assert len(calls) == 1  # answer, readout, spellings and CTC scores share one adaptor pass
    def strict(c):
        raise AssertionError(f"not strict JSON: {c}")

    rows = [json.loads(line, parse_constant=strict) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in rows[:2]] == ["hello", "hello"]
    assert m["wer"] == round(wer(["hello", "hello there", "hello hello"], ["hello", "hello", rows[2]["prediction"]]), 4)
    assert [("candidates" in r) for r in rows] == [True, True, False, False]
    table = sweep(rows, [0.0, 1.0], [0.0])
    assert table[1]["wer"] == pytest.approx(1 / 3, abs=1e-4) and table[1]["samples"] == 2
    # the CLI re-picks from stored scores: here the LLM prefers the wrong candidate, the audio the right one
    made = [{"id": "x", "type": "asr", "reference": "what was said", "prediction": "fluent but wrong", "candidates": [
        {"text": "fluent but wrong", "lm": -2.0, "ctc": -40.0, "tokens": 4},
        {"text": "what was said", "lm": -9.0, "ctc": -3.0, "tokens": 4}]}]
    (tmp_path / "made.jsonl").write_text("".join(json.dumps(r) + "\n" for r in made + rows))
    capsys.readouterr()
    main([str(tmp_path / "made.jsonl"), "--weights", "0,1"])
    out = capsys.readouterr().out
    assert "best: joint_weight=1.0" in out and "(3 transcripts)" in out and "oracle" in out
    # the oracle takes each clip's closest candidate whatever its scores: "what was said" wins on the made row
    o = oracle(made)
    assert o == {"wer": 0.0, "samples": 1, "best_source": {"?": 1}}
    made[0]["candidates"][1]["text"], made[0]["candidates"][1]["source"] = "what was", "ctc"
    assert oracle(made)["wer"] == pytest.approx(1 / 3, abs=1e-4) and oracle(made)["best_source"] == {"ctc": 1}
    with pytest.raises(ValueError, match="no transcript rows"):
        sweep([{"type": "asr", "reference": "x", "prediction": "y"}], [0.5], [0.0])
