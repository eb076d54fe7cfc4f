import pytest
import torch

from data.collate import IGNORE, ConversationCollator, expand_placeholders, tokenize_conversation
from data.dataset import ConversationDataset
from llm.tokens import add_placeholder_tokens


@pytest.fixture()
def setup(tiny_lm, toy_modality):
    ids = add_placeholder_tokens(tiny_lm.tokenizer, tiny_lm.model, ["<toy>"])
    return tiny_lm, toy_modality, {"toy": ids["<toy>"]}


def rec(rid, refs, question, answer):
    return {"id": rid, "where": f"f.jsonl:{rid}", "toy": refs, "root": None,
            "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


def test_labels_cover_exactly_the_answer(setup):
    lm, _, _ = setup
    tok = lm.tokenizer
    msgs = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hello there"},
            {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Hi again"}]
    ids, labels = tokenize_conversation(tok, msgs)
    full = tok.apply_chat_template(msgs, tokenize=False)
    assert tok.decode(ids) == full
    answer_text = tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE])
    assert "Hello there" in answer_text and "Hi again" in answer_text
    assert "Say hi" not in answer_text and "Again" not in answer_text and "user" not in answer_text


def test_placeholders_expand_to_output_length(setup):
    lm, toy, pids = setup
    ds = ConversationDataset([rec(0, ["5", "8"], "<toy> and <toy>: which is longer?", "the second")], {"toy": toy})
    batch = ConversationCollator(lm.tokenizer, {"toy": toy}, pids)([ds[0]])
    n = int((batch["input_ids"] == pids["toy"]).sum())
    assert n == toy.output_length(5) + toy.output_length(8) == 7
    assert (batch["labels"][batch["input_ids"] == pids["toy"]] == IGNORE).all()
    assert batch["modal"]["toy"]["values"].shape == (2, 8, 8)
    assert batch["modal"]["toy"]["mask"].sum(1).tolist() == [5, 8]


def test_placeholder_clip_count_mismatch_names_sample(setup):
    lm, toy, pids = setup
    ds = ConversationDataset([rec(3, ["5", "8"], "only one <toy>", "x")], {"toy": toy})
    with pytest.raises(ValueError, match=r"f.jsonl:3: 1 placeholder token\(s\).*2 input"):
        ConversationCollator(lm.tokenizer, {"toy": toy}, pids)([ds[0]])


def test_generate_mode_left_pads_and_drops_answer(setup):
    lm, toy, pids = setup
    ds = ConversationDataset([rec(0, ["3"], "<toy> hi", "ans one"), rec(1, ["9"], "<toy> longer question here", "ans")],
                             {"toy": toy})
    batch = ConversationCollator(lm.tokenizer, {"toy": toy}, pids, generate=True)([ds[0], ds[1]])
    assert batch["references"] == ["ans one", "ans"]
    assert (batch["attention_mask"][:, -1] == 1).all()  # left padded
    assert batch["attention_mask"][0, 0] == 0
    assert "ans one" not in lm.tokenizer.decode(batch["input_ids"][0])


def test_skip_policy_counts_bad_samples(setup):
    lm, toy, pids = setup
    ds = ConversationDataset([rec(0, ["bad.wav"], "<toy>", "x"), rec(1, ["4"], "<toy>", "y")], {"toy": toy},
                             skip_bad=True)
    batch = ConversationCollator(lm.tokenizer, {"toy": toy}, pids)([ds[0], ds[1]])
    assert batch["skipped"] == [("f.jsonl:0", "bad.wav: corrupt input")]
    assert batch["input_ids"].shape[0] == 1
    strict = ConversationDataset(ds.records, {"toy": toy})
    with pytest.raises(ValueError, match="bad.wav"):
        strict[0]


def test_expand_placeholders_unit():
    ids, labels = expand_placeholders([1, 9, 2, 9], [-100, -100, 5, -100], {9: [2, 3]}, "s")
    assert ids == [1, 9, 9, 2, 9, 9, 9]
    assert labels == [-100, -100, -100, 5, -100, -100, -100]


def test_system_prompt_replaces_template_default_but_not_a_records_own(setup):
    lm, toy, pids = setup
    own = rec(1, ["3"], "<toy> hi", "ans")
    own["conversations"].insert(0, {"from": "system", "value": "Be brief."})
    records = [rec(0, ["3"], "<toy> hi", "ans"), own]
    plain = ConversationDataset(records, {"toy": toy})
    short = ConversationDataset(records, {"toy": toy}, system_prompt="You hear audio.")
    assert plain[0]["messages"][0]["role"] == "user"
    assert short[0]["messages"][0] == {"role": "system", "content": "You hear audio."}
    assert short[1]["messages"] == plain[1]["messages"]  # a record's own system turn wins
    text = lm.tokenizer.decode(ConversationCollator(lm.tokenizer, {"toy": toy}, pids)([short[0]])["input_ids"][0])
    assert "You hear audio." in text and text.index("You hear audio.") < text.index("hi")


def test_expand_placeholders_puts_each_reading_after_its_own_input_unlabelled():
    ids, labels = expand_placeholders([1, 9, 2, 9], [-100, -100, 5, -100], {9: [2, 1]}, "s", {9: [[70, 71], [80]]})
    assert ids == [1, 9, 9, 70, 71, 2, 9, 80]
    assert labels == [-100, -100, -100, -100, -100, 5, -100, -100]


def test_a_plugins_reading_follows_its_positions_as_text(setup):
    lm, toy, pids = setup

    class Reading(type(toy)):
        def reading(self, ref, root=None):
            return f"length {ref}"

    reader = Reading.__new__(Reading)
    reader.__dict__ = toy.__dict__  # the same toy plugin, plus a reading
    ds = ConversationDataset([rec(0, ["5"], "<toy> how long?", "five")], {"toy": reader})
    sample = ds[0]
    assert sample["readings"] == {"toy": ["length 5"]}
    batch = ConversationCollator(lm.tokenizer, {"toy": reader}, pids)([sample])
    ids = batch["input_ids"][0].tolist()
    last = max(i for i, t in enumerate(ids) if t == pids["toy"])
    text_after = lm.tokenizer.decode(ids[last + 1:])
    assert text_after.startswith(" length 5")
    assert (batch["labels"][0, last + 1:last + 4] == IGNORE).all()
    plain = ConversationCollator(lm.tokenizer, {"toy": toy}, pids)([ConversationDataset(ds.records, {"toy": toy})[0]])
    assert batch["input_ids"].shape[1] > plain["input_ids"].shape[1]  # the base plugin reads nothing


def test_skip_policy_covers_a_placeholder_count_mismatch_and_an_overlong_sample(setup):
    """skip_bad skips (counted, named) what fails only once tokenised, not just what fails to load."""
    lm, toy, pids = setup
    recs = [rec(3, ["5", "8"], "only one <toy>", "x"), rec(4, ["4"], "<toy>", "y"), rec(5, ["9"], "<toy>", "z " * 200)]
    ds = ConversationDataset(recs, {"toy": toy}, skip_bad=True)
    batch = ConversationCollator(lm.tokenizer, {"toy": toy}, pids, max_length=64, skip_bad=True)([ds[i] for i in range(3)])
    assert [w for w, _ in batch["skipped"]] == ["f.jsonl:3", "f.jsonl:5"]
    assert "placeholder" in batch["skipped"][0][1] and "data.max_length=64" in batch["skipped"][1][1]
    assert batch["input_ids"].shape[0] == 1 and batch["ids"] == [recs[1]["id"]]
    assert batch["modal"]["toy"]["values"].shape[0] == 1  # the skipped samples' inputs are gone too
    with pytest.raises(ValueError, match=r"f.jsonl:3: 1 placeholder"):
        ConversationCollator(lm.tokenizer, {"toy": toy}, pids, max_length=64)([ds[i] for i in range(3)])
