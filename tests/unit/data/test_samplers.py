import random

import pytest
from torch.utils.data import DataLoader

from data.samplers import LengthGroupedSampler, record_length


def spread(batches, lengths):
    return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)


def test_batches_are_a_permutation_of_similar_lengths():
    rng = random.Random(0)
    lengths = [rng.uniform(10, 100) for _ in range(403)]
    s = LengthGroupedSampler(lengths, batch_size=8, seed=1, mega=10)
    order = list(s)
    assert sorted(order) == list(range(403))
    grouped = [b.tolist() for b in DataLoader(range(403), batch_size=8, sampler=s)]
    assert all(len(b) == 8 for b in grouped[:-1]) and len(grouped[-1]) == 403 % 8  # the short batch is last
    shuffled = list(range(403))
    rng.shuffle(shuffled)
    random_batches = [shuffled[i:i + 8] for i in range(0, 403, 8)]
    assert spread(grouped, lengths) < 0.25 * spread(random_batches, lengths)
    assert max(lengths[i] for i in grouped[0]) == max(lengths)  # the longest batch first


def test_order_is_reproducible_per_seed_and_changes_per_epoch():
    lengths = list(range(100))
    a, b = LengthGroupedSampler(lengths, 4, seed=3), LengthGroupedSampler(lengths, 4, seed=3)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first and sorted(a) == sorted(first)


def test_record_length_counts_text_and_audio_seconds():
    rec = {"conversations": [{"from": "human", "value": "x" * 40}, {"from": "gpt", "value": "y" * 8}],
           "duration": [2.0, 1.0]}
    assert record_length(rec) == pytest.approx(48 / 4 + 12.5 * 3)
    assert record_length({"conversations": [{"from": "human", "value": "abcd"}]}) == 1


def test_bad_batch_size_is_refused():
    with pytest.raises(ValueError, match="batch_size"):
        LengthGroupedSampler([1, 2], batch_size=0)


def test_datamodule_groups_training_batches_by_manifest_duration(tmp_path):
    import json

    from data.datamodule import ConversationDataModule

    rng = random.Random(0)
    durs = [round(rng.uniform(1, 8), 2) for _ in range(64)]
    (tmp_path / "train.jsonl").write_text("".join(
        json.dumps({"id": str(i), "duration": d, "conversations": [{"from": "human", "value": "say a b c"},
                                                                   {"from": "gpt", "value": "a b c"}]}) + "\n"
        for i, d in enumerate(durs)))
    dm = ConversationDataModule(None, {}, {}, train_files=str(tmp_path / "train.jsonl"), batch_size=8,
                                group_by_length=True)
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, LengthGroupedSampler)
    batches = [b.tolist() for b in DataLoader(range(64), batch_size=8, sampler=loader.sampler)]
    assert spread(batches, durs) < 1.0  # seconds within a batch (random batches: ~5)
    plain = ConversationDataModule(None, {}, {}, train_files=str(tmp_path / "train.jsonl"), batch_size=8)
    assert not isinstance(plain.train_dataloader().sampler, LengthGroupedSampler)


def test_groups_never_share_a_batch_and_every_sample_is_drawn():
    from data.samplers import LengthGroupedSampler, input_group

    recs = [{"speech": ["a.wav"]}] * 7 + [{"speech": [{"text": "hi"}]}] * 5 + [{"conversations": []}] * 2
    groups = [input_group(r, ["speech"]) for r in recs]
    assert len(set(groups)) == 3  # clip, text-given, no input
    s = LengthGroupedSampler([float(i % 4) for i in range(len(recs))], batch_size=3, seed=1, mega=2, groups=groups)
    for epoch in range(3):
        s.set_epoch(epoch)
        order = list(s)
        assert len(order) == len(s) == 9 + 6 + 3  # each group padded up to whole batches by repeats
        batches = [order[i:i + 3] for i in range(0, len(order), 3)]
        assert all(len({groups[i] for i in b}) == 1 for b in batches), batches
        assert set(order) == set(range(len(recs)))  # nothing left out


def test_one_group_samples_as_before():
    from data.samplers import LengthGroupedSampler

    lengths = [float(i) for i in range(20)]
    a = list(LengthGroupedSampler(lengths, 4, seed=3))
    b = list(LengthGroupedSampler(lengths, 4, seed=3, groups=[("speech", False)] * 20))
    assert a == b and sorted(a) == list(range(20))
