"""The text-only baselines prompt the way the run prompts (data.system_prompt), so the comparison is fair."""


def test_text_baseline_uses_the_runs_system_turn(tiny_lm):
    from modality.stock.baselines import text_loader

    rec = {"id": "t", "where": "t.jsonl:1", "root": None,
           "conversations": [{"from": "human", "value": "Trend?"}, {"from": "gpt", "value": "up"}]}
    default = next(iter(text_loader([rec], tiny_lm.tokenizer, 1, 256, generate=True)))
    empty = next(iter(text_loader([rec], tiny_lm.tokenizer, 1, 256, generate=True, system_prompt="")))
    text = tiny_lm.tokenizer.decode(empty["input_ids"][0])
    assert empty["input_ids"].shape[1] < default["input_ids"].shape[1]  # the template's default turn is gone
    assert "Trend?" in text
