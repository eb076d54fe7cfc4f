"""data.mixture / data.max_tokens: MixtureBatchSampler and the DataModule's training loader built with it."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from data.samplers import (
    MixtureBatchSampler,
    ResumableLoader,
    budget_batches,
    input_group,
    record_length,
)


def three_sources(sizes=(100, 60, 40)) -> list[list[int]]:
    out, start = [], 0
    for n in sizes:
        out.append(list(range(start, start + n)))
        start += n
    return out


def test_batches_come_from_the_sources_in_the_given_proportions():
    sources = three_sources()
    owner = {i: s for s, src in enumerate(sources) for i in src}
    weights = [0.5, 0.3, 0.2]
    s = MixtureBatchSampler(sources, weights, batch_size=4, seed=7, num_batches=20_000)
    counts = Counter()
    for batch in s:
        assert len({owner[i] for i in batch}) == 1  # one file per batch
        counts[owner[batch[0]]] += 1
    assert sum(counts.values()) == 20_000
    for k, w in enumerate(weights):  # binomial sd at 20k draws is ~0.0035
        assert counts[k] / 20_000 == pytest.approx(w, abs=0.015), counts
    # a file drawn more often than its size allows is passed over again: every one of its samples is seen
    seen = {i for batch in s for i in batch}
    assert seen == set(range(200))


def test_order_is_a_function_of_seed_and_epoch():
    sources = three_sources((30, 20, 10))
    a = MixtureBatchSampler(sources, [1, 1, 1], batch_size=3, seed=1)
    b = MixtureBatchSampler(sources, [1, 1, 1], batch_size=3, seed=1)
    assert list(a) == list(b) and list(a) == list(a)  # no hidden state between iterations
    first = list(a)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) != first and list(a) == list(b)
    a.set_epoch(0)
    assert list(a) == first
    assert list(MixtureBatchSampler(sources, [1, 1, 1], batch_size=3, seed=2)) != first
    assert len(a) == 10 + 7 + 4 == len(first)  # one pass's worth of batches over every file


def test_groups_of_one_file_never_share_a_batch():
    recs = [{"speech": ["a.wav"]}] * 9 + [{"speech": [{"text": "hi"}]}] * 7
    groups = [input_group(r, ["speech"]) for r in recs]
    s = MixtureBatchSampler([list(range(16))], [1.0], batch_size=4, seed=0, groups=groups)
    for batch in s:
        assert len({groups[i] for i in batch}) == 1
    assert sorted(i for b in s for i in b) == list(range(16))  # one pass: every sample once, none repeated


def test_a_token_budget_bounds_every_batch():
    lengths = [float(10 + (i * 37) % 90) for i in range(200)]
    s = MixtureBatchSampler([list(range(200))], [1.0], batch_size=64, seed=3, lengths=lengths, max_tokens=400)
    batches = list(s)
    assert sorted(i for b in batches for i in b) == list(range(200))
    assert all(len(b) * max(lengths[i] for i in b) <= 400 for b in batches)
    assert max(len(b) for b in batches) > 8  # short records share a batch, long ones get few companions
    assert min(len(b) for b in batches) < 6
    # one record over the budget is a batch of its own, and batch_size still caps the count
    assert budget_batches([0, 1, 2], [500.0, 1.0, 1.0], batch_size=1, max_tokens=100) == [[0], [1], [2]]
    assert budget_batches([0, 1, 2], [500.0, 1.0, 1.0], batch_size=8, max_tokens=100) == [[0], [1, 2]]


def test_bad_mixtures_are_one_line_errors():
    with pytest.raises(ValueError, match="2 weight"):
        MixtureBatchSampler(three_sources(), [1, 1], batch_size=2)
    with pytest.raises(ValueError, match=">= 0"):
        MixtureBatchSampler(three_sources(), [1, -1, 1], batch_size=2)
    with pytest.raises(ValueError, match="no records"):
        MixtureBatchSampler([[0, 1], []], [1, 1], batch_size=2)


def test_record_length_counts_fixed_length_inputs():
    rec = {"conversations": [{"from": "human", "value": "x" * 40}], "duration": 2.0, "speech": ["a.wav"],
           "stock": [{"ticker": "A"}, {"ticker": "B"}]}
    assert record_length(rec, per_input={"stock": 9.0, "vec": 3.0}) == pytest.approx(10 + 25 + 18)


def _write(path, n, tag):
    path.write_text("".join(json.dumps({"id": f"{tag}{i}", "conversations": [
        {"from": "human", "value": "q" * (4 + i % 50)}, {"from": "gpt", "value": "a"}]}) + "\n" for i in range(n)))
    return str(path)


def test_the_datamodule_draws_its_mixture_and_resumes_it_exactly(tmp_path):
    from data.datamodule import ConversationDataModule

    files = [_write(tmp_path / "a.jsonl", 120, "a"), _write(tmp_path / "b.jsonl", 30, "b")]
    dm = ConversationDataModule(None, {}, {}, train_files=files, batch_size=4, mixture=[0.25, 0.75], seed=5)
    loader = dm.train_dataloader()
    assert isinstance(loader, ResumableLoader) and isinstance(loader.batch_sampler, MixtureBatchSampler)
    recs = dm.records("train")
    batches = list(loader.batch_sampler)
    from_b = sum(recs[b[0]]["id"].startswith("b") for b in batches)
    assert len(batches) == 30 + 8 and from_b > 0.5 * len(batches)  # b is 20 % of the data, 75 % of the draws
    # a loader restored to "epoch 0, 5 batches taken" yields exactly the rest of that epoch's batches
    again = ConversationDataModule(None, {}, {}, train_files=files, batch_size=4, mixture=[0.25, 0.75], seed=5)
    resumed = again.train_dataloader()
    resumed.load_state_dict({"epoch": 0, "batches": 5})
    resumed.collate_fn = loader.collate_fn = lambda samples: [s["id"] for s in samples]
    rest = list(resumed)
    assert len(rest) == len(batches) - 5 and rest == list(loader)[5:]
    with pytest.raises(ValueError, match="data.mixture: 3 weight"):
        ConversationDataModule(None, {}, {}, train_files=files, mixture=[1, 1, 1])


def test_the_datamodule_builds_batches_to_a_token_budget_counting_fixed_length_inputs(tmp_path):
    from data.datamodule import ConversationDataModule

    recs = [{"id": f"r{i}", "vec": ["x"] * (1 + i % 3), "conversations": [
        {"from": "human", "value": "<vec>" * (1 + i % 3) + "q" * (4 * (i % 7))}, {"from": "gpt", "value": "a"}]}
        for i in range(60)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))

    class Fixed:  # a plugin whose inputs are 10 positions each
        def output_length(self, n):
            return 10

        read_record = staticmethod(lambda line, where, rng: None)

    dm = ConversationDataModule(None, {"vec": Fixed()}, {"vec": 1}, train_files=str(tmp_path / "t.jsonl"),
                                batch_size=32, max_tokens=200)
    sampler = dm.train_dataloader().batch_sampler
    assert isinstance(sampler, MixtureBatchSampler) and sampler.max_tokens == 200
    lengths = [record_length(r, per_input={"vec": 10.0}) for r in dm.records("train")]
    assert sampler.lengths == lengths and max(lengths) > 30  # the inputs' 10 positions each are counted
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(60))
    assert all(len(b) * max(lengths[i] for i in b) <= 200 for b in batches)
    # data.input_tokens overrides the plugin's own length
    dm2 = ConversationDataModule(None, {"vec": Fixed()}, {"vec": 1}, train_files=str(tmp_path / "t.jsonl"),
                                 batch_size=32, max_tokens=200, input_tokens={"vec": 50})
    assert dm2.train_dataloader().batch_sampler.lengths == [record_length(r, per_input={"vec": 50.0})
                                                             for r in dm2.records("train")]


def test_ranks_split_one_global_order_between_them():
    sources = three_sources((40, 20, 12))
    whole = list(MixtureBatchSampler(sources, [2, 1, 1], batch_size=3, seed=4, num_batches=12))
    ranks = [MixtureBatchSampler(sources, [2, 1, 1], batch_size=3, seed=4, num_batches=6, rank=r, world_size=2)
             for r in (0, 1)]
    assert [list(r) for r in ranks] == [whole[0::2], whole[1::2]] and len(ranks[0]) == 6
    assert len(MixtureBatchSampler(sources, [1, 1, 1], batch_size=3, world_size=2)) == (14 + 7 + 4) // 2


def test_lightning_sets_each_epochs_order_and_a_resumed_fit_continues_it(tmp_path):
    import lightning as L
    import torch

    class Record(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen: list[list[int]] = []

        def training_step(self, batch, i):
            self.seen.append(batch.tolist())
            return (self.w * batch.float().mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    def loader():
        s = MixtureBatchSampler(three_sources((12, 8, 4)), [1, 1, 2], batch_size=2, seed=9)
        return ResumableLoader(list(range(24)), batch_sampler=s, seed=9), s

    def trainer(**kw):
        return L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, **kw)

    dl, s = loader()
    model = Record()
    trainer(max_epochs=2, enable_checkpointing=False).fit(model, dl)
    expect = [list(MixtureBatchSampler(s.sources, s.weights, 2, seed=9)) for _ in range(2)]
    later = MixtureBatchSampler(s.sources, s.weights, 2, seed=9)
    later.set_epoch(1)
    expect[1] = list(later)
    assert expect[0] != expect[1] and model.seen == expect[0] + expect[1]  # each epoch its own order
    # stopped mid-epoch 1, resumed from that checkpoint: the rest of epoch 1, as the whole run drew it
    half = len(expect[0]) + 5
    first = Record()
    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=half)
    trainer(max_steps=half, callbacks=[saver]).fit(first, loader()[0])
    ckpt = tmp_path / "last.ckpt"
    resumed = Record()
    trainer(max_epochs=2, enable_checkpointing=False).fit(resumed, loader()[0], ckpt_path=ckpt)
    assert first.seen + resumed.seen == model.seen
