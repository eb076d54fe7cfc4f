import random
from itertools import chain

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


def taken(loader, n: int) -> tuple[list[list[int]], dict]:
    """The first ``n`` batches of ``loader`` (an iteration left open, as a killed run leaves it) and its state."""
    it = iter(loader)
    first = [next(it).tolist() for _ in range(n)]
    return first, loader.state_dict()


@pytest.mark.parametrize("kind", ["shuffle", "length_grouped", "workers"])
def test_a_resumable_loader_continues_the_epoch_its_state_left_off(kind):
    """Issue 21: the state of a loader stopped after k batches of epoch 1 makes a new loader (a resumed run) yield
    exactly the uninterrupted epoch's other batches, then whole epochs as the uninterrupted run."""
    from data.samplers import ResumableLoader

    def make():
        if kind == "length_grouped":
            s = LengthGroupedSampler([float(i % 7) for i in range(50)], batch_size=4, seed=5, mega=3)
            return ResumableLoader(range(50), batch_size=4, sampler=s, seed=5)
        workers = {"num_workers": 2, "persistent_workers": True} if kind == "workers" else {}
        return ResumableLoader(range(50), batch_size=4, shuffle=True, seed=5, **workers)

    whole = make()
    whole.sampler.set_epoch(1)
    epoch1 = [b.tolist() for b in whole]
    whole.sampler.set_epoch(2)
    epoch2 = [b.tolist() for b in whole]
    assert len(epoch1) == 13 and epoch1 != epoch2 and sorted(chain(*epoch1)) == list(range(50))

    killed = make()
    killed.sampler.set_epoch(1)
    first, state = taken(killed, 5)
    assert first == epoch1[:5] and state == {"epoch": 1, "batches": 5}

    resumed = make()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(1)  # Lightning's fit loop: the restored epoch
    assert len(resumed) == 13  # Lightning counts the whole epoch (its loop knows 5 batches were trained on)
    it = iter(resumed)
    rest = [next(it).tolist() for _ in range(3)]
    assert resumed.state_dict() == {"epoch": 1, "batches": 8}  # a second checkpoint in the resumed epoch
    rest += [b.tolist() for b in it]
    assert rest == epoch1[5:]
    resumed.sampler.set_epoch(2)
    assert [b.tolist() for b in resumed] == epoch2  # the next epoch whole, not skipped again


def test_a_state_of_another_or_a_finished_epoch_skips_nothing():
    from data.samplers import ResumableLoader

    loader = ResumableLoader(range(20), batch_size=4, shuffle=True, seed=1)
    loader.sampler.set_epoch(3)
    whole = [b.tolist() for b in loader]
    for state in ({"epoch": 2, "batches": 2}, {"epoch": 3, "batches": 5}, {"epoch": 3, "batches": 0}):
        loader.load_state_dict(state)  # saved at an epoch's end: Lightning goes on with the next epoch, whole
        assert [b.tolist() for b in loader] == whole, state
    assert loader.state_dict() == {"epoch": 3, "batches": 5}


def test_the_order_is_a_function_of_seed_and_epoch_and_iterating_draws_no_global_random_number():
    import torch

    from data.samplers import EpochShuffleSampler, ResumableLoader

    a, b = EpochShuffleSampler(range(30), seed=2), EpochShuffleSampler(range(30), seed=2)
    torch.manual_seed(0)
    first = list(a)
    torch.manual_seed(1)  # the global RNG (dropout, a resumed run's restored state) does not decide the order
    assert list(b) == first and sorted(first) == list(range(30)) and first != list(range(30))
    b.set_epoch(1)
    assert list(b) != first and list(EpochShuffleSampler(range(30), seed=3)) != first
    loader = ResumableLoader(range(30), batch_size=4, shuffle=True, seed=2)
    before = torch.get_rng_state()
    assert [i for batch in loader for i in batch.tolist()] == first
    assert torch.equal(torch.get_rng_state(), before)  # a DataLoader draws its workers' base seed from it


def test_the_datamodule_training_loader_is_resumable(tmp_path):
    import json

    from data.datamodule import ConversationDataModule
    from data.samplers import EpochShuffleSampler, ResumableLoader

    (tmp_path / "train.jsonl").write_text("".join(
        json.dumps({"id": str(i), "duration": 1.0 + i % 3, "conversations": [{"from": "human", "value": "say a"},
                                                                             {"from": "gpt", "value": "a"}]}) + "\n"
        for i in range(16)))
    for grouped, sampler in ((False, EpochShuffleSampler), (True, LengthGroupedSampler)):
        dm = ConversationDataModule(None, {}, {}, train_files=str(tmp_path / "train.jsonl"), batch_size=4,
                                    group_by_length=grouped, seed=3)
        loader = dm.train_dataloader()
        assert isinstance(loader, ResumableLoader) and isinstance(loader.sampler, sampler)
        assert loader.sampler.seed == 3
