"""modality.speech.unit_writing: next-unit accuracy of an LLM vs a unigram baseline."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from llm.vocab import NewRows, add_tokens
from modality.speech.unit_writing import next_unit_accuracy

U, FIRST = 4, 100  # 4 units at LLM ids 100..103, a prosody token (local 4) at 104
CYCLE = [torch.tensor([4, 0, 1, 2, 3, 4, 0, 1]), torch.tensor([4, 0, 1])]  # unit targets: 6 + 2


class CycleLM(nn.Module):
    """Predicts unit (u + step) % U after unit u, unit 0 after anything else."""

    def __init__(self, correct: bool = True):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.step = 1 if correct else 2

    def forward(self, input_ids, attention_mask):
        local = input_ids - FIRST
        nxt = torch.where((local >= 0) & (local < U), (local + self.step) % U, torch.zeros_like(local))
        logits = torch.full((*input_ids.shape, FIRST + U + 1), -20.0)
        logits.scatter_(2, (nxt + FIRST)[..., None], 20.0)
        return SimpleNamespace(logits=logits)


def test_counts_only_unit_targets_and_beats_the_unigram_when_it_knows_the_sequence():
    train = [torch.tensor([0, 0, 0, 1])]  # unigram: unit 0 (3 of 4), add-one smoothed
    got = next_unit_accuracy(CycleLM(), CYCLE, FIRST, U, train=train, batch_size=1)
    assert got["positions"] == 8  # unit targets only: not the prosody token after <unit_3>, not the first tokens
    assert got["accuracy"] == got["accuracy_any"] == 1.0 and got["nll"] < 1e-6
    targets = [0, 1, 2, 3, 0, 1, 0, 1]  # held-out unit targets
    assert got["unigram_accuracy"] == pytest.approx(3 / 8)
    p = {0: 4 / 8, 1: 2 / 8, 2: 1 / 8, 3: 1 / 8}
    assert got["unigram_nll"] == pytest.approx(-sum(math.log(p[t]) for t in targets) / 8)
    wrong = next_unit_accuracy(CycleLM(correct=False), CYCLE, FIRST, U, train=train, batch_size=2)
    assert wrong["accuracy"] == 3 / 8 and wrong["nll"] > got["unigram_nll"]  # after a unit it bets on the wrong one


def test_prefix_positions_are_not_scored_and_nothing_to_score_is_an_error():
    with_prefix = next_unit_accuracy(CycleLM(), CYCLE, FIRST, U, prefix=[5, FIRST + 0, FIRST + 1])
    assert with_prefix["positions"] == 8  # the prefix's own units are read, never targets
    with pytest.raises(ValueError, match="nothing to score"):
        next_unit_accuracy(CycleLM(), [torch.tensor([4, 4])], FIRST, U)


def test_runs_on_a_tiny_llm_whose_vocabulary_holds_the_units(tiny_lm):
    rows = NewRows(U + 1, tiny_lm.hidden_size)
    first = add_tokens(tiny_lm.tokenizer, tiny_lm.model, [f"<unit_{i}>" for i in range(U)] + ["<pitch_0>"], rows)
    got = next_unit_accuracy(tiny_lm.model, CYCLE, first, U, pad_id=tiny_lm.tokenizer.pad_token_id)
    assert got["positions"] == 8 and 0 <= got["accuracy"] <= 1 and math.isfinite(got["nll"])
    with torch.no_grad():
        rows.weight.zero_()  # all-equal unit rows: every unit scores the same, the nll is log U
    tied = next_unit_accuracy(tiny_lm.model, CYCLE, first, U, pad_id=tiny_lm.tokenizer.pad_token_id)
    assert tied["nll"] == pytest.approx(math.log(U), abs=1e-5)
