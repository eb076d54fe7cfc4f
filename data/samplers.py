"""Length-grouped sampling: batches of similar length waste less compute on padding.

The LLM runs on the padded length of each batch, so on a CPU (or any compute-bound device) a
batch that mixes a 2 s clip with a 6 s one pays for 6 s eight times. As in HF Trainer's
``group_by_length``: shuffle, cut into mega-batches of ``mega`` batches, sort each mega-batch
by length (longest first, so an out-of-memory shows at once), then shuffle the batch order.
Randomness stays (which samples meet, and batch order); padding mostly goes.

``groups`` keeps records that give a modality different kinds of input apart: a clip and a transcript given as
text (reading practice) are read by different paths in one forward, and the collator refuses a batch that mixes
them. Every batch then holds one group; a group's last short batch is filled with random repeats from the same
group (as DistributedSampler pads), so every sample is drawn each epoch and the DataLoader's cut every
``batch_size`` indices never straddles two groups.

Exact resume (``resume=``) mid-epoch: a training epoch's order is a function of the seed and the epoch only
(``EpochShuffleSampler`` for a plain shuffle, ``LengthGroupedSampler``), and the training DataLoader is a
``ResumableLoader``, whose ``state_dict`` (the epoch and how many batches it has handed out) Lightning saves in every
checkpoint: a resumed run draws the same order and skips the batches the checkpoint's steps already trained on.
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from itertools import islice
from typing import Any

import torch
from torch.utils.data import DataLoader, RandomSampler, Sampler

TOKENS_PER_SECOND = 12.5  # LLM positions per second of a record's ``duration`` (the default audio adaptor's rate)


def record_length(rec: dict, tokens_per_second: float = TOKENS_PER_SECOND) -> float:
    """A cheap estimate of a record's token count without loading its inputs.

    Text: ~4 characters a token; audio: its manifest ``duration`` (seconds, a number or a list)
    at the adaptor's rate. Records without a duration count their text only.
    """
    chars = sum(len(t.get("value", "")) for t in rec.get("conversations", []))
    dur = rec.get("duration") or 0.0
    seconds = sum(float(d) for d in dur) if isinstance(dur, (list, tuple)) else float(dur)
    return chars / 4 + tokens_per_second * seconds


def input_group(rec: dict, modalities: Sequence[str]) -> tuple:
    """Which kind of reference a record gives each modality: a file (a path string) or a mapping (e.g. a transcript
    as text, ``{"text": ...}``, standing in for a clip). Records of different groups must not share a batch."""
    return tuple(sorted({(name, isinstance(ref, Mapping)) for name in modalities for ref in rec.get(name) or []}))


class LengthGroupedSampler(Sampler[int]):
    """Yields indices so that consecutive ``batch_size`` of them have similar lengths (and one ``groups`` key)."""

    def __init__(self, lengths: Sequence[float], batch_size: int, seed: int = 0, mega: int = 50,
                 groups: Sequence[Hashable] | None = None):
        if batch_size < 1 or mega < 1:
            raise ValueError(f"batch_size ({batch_size}) and mega ({mega}) must be >= 1")
        if groups is not None and len(groups) != len(lengths):
            raise ValueError(f"groups ({len(groups)}) and lengths ({len(lengths)}) differ in count")
        self.lengths, self.batch_size, self.seed, self.mega = list(lengths), batch_size, seed, mega
        self.groups = list(groups) if groups is not None and len(set(groups)) > 1 else None
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this each epoch: a different, reproducible order per epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        if self.groups is None:
            return len(self.lengths)
        sizes = [self.groups.count(g) for g in dict.fromkeys(self.groups)]
        return sum(-(-n // self.batch_size) * self.batch_size for n in sizes)

    def __iter__(self) -> Iterator[int]:
        rng = random.Random(self.seed + self.epoch)
        if self.groups is not None:
            yield from self._grouped(rng)
            return
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        size = self.mega * self.batch_size
        batches: list[list[int]] = []
        for start in range(0, len(order), size):
            chunk = sorted(order[start:start + size], key=lambda i: -self.lengths[i])
            batches += [chunk[j:j + self.batch_size] for j in range(0, len(chunk), self.batch_size)]
        # the DataLoader cuts the stream every batch_size indices: a short batch (only the last
        # mega-batch can end in one) must go last, or every later batch would straddle two groups
        tail = [b for b in batches if len(b) < self.batch_size]
        full = [b for b in batches if len(b) == self.batch_size]
        rng.shuffle(full)
        if full:  # the longest batch first: an out-of-memory shows at once
            k = max(range(len(full)), key=lambda b: self.lengths[full[b][0]])
            full.insert(0, full.pop(k))
        for batch in full + tail:
            yield from batch

    def _grouped(self, rng: random.Random) -> Iterator[int]:
        """Batches built within each group (each padded to full size by repeats), then shuffled together."""
        members: dict[Hashable, list[int]] = {}
        for i, g in enumerate(self.groups):
            members.setdefault(g, []).append(i)
        batches: list[list[int]] = []
        size = self.mega * self.batch_size
        for idx in members.values():
            rng.shuffle(idx)
            short = -len(idx) % self.batch_size
            idx = idx + [rng.choice(idx) for _ in range(short)]  # the group's last batch filled by repeats
            for start in range(0, len(idx), size):
                chunk = sorted(idx[start:start + size], key=lambda i: -self.lengths[i])
                batches += [chunk[j:j + self.batch_size] for j in range(0, len(chunk), self.batch_size)]
        rng.shuffle(batches)
        for batch in batches:
            yield from batch


class EpochShuffleSampler(RandomSampler):
    """A uniformly random order of ``data_source``, a function of ``seed`` and the epoch (``set_epoch``) only.

    Why: ``DataLoader(shuffle=True)`` draws each epoch's order from the global torch RNG, which a resumed run cannot
    replay, so the rest of an interrupted epoch was a different draw (some samples twice, some never). A
    RandomSampler, so a distributed run gets Lightning's DistributedSampler (seeded per epoch too) in its place.
    """

    def __init__(self, data_source: Any, seed: int = 0):
        super().__init__(data_source)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this each epoch: a different, reproducible order per epoch."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from torch.randperm(len(self.data_source), generator=g).tolist()


class _SkipFirst:
    """The batches of ``sampler`` (a DataLoader's index sampler) but the first ``n``, once (later epochs whole)."""

    def __init__(self, sampler: Iterable, n: int):
        self.sampler, self.n = sampler, n

    def __len__(self) -> int:
        return len(self.sampler)  # the epoch's length, as Lightning counts it (its loop knows n were trained on)

    def __iter__(self) -> Iterator:
        return self._rest()

    def _rest(self) -> Iterator:
        n, self.n = self.n, 0  # taken when the first batch is drawn (a worker pool calls iter() twice, uses one)
        yield from islice(iter(self.sampler), n, None)


class ResumableLoader(DataLoader):
    """A DataLoader whose place in the epoch travels in the checkpoint: ``state_dict()`` is the epoch and the number
    of batches handed out so far in it (Lightning's fit loop saves it for a loader that has one); after
    ``load_state_dict``, the next iteration of that same epoch skips those batches' indices (nothing is loaded for
    them) and yields the rest, in the order the uninterrupted run saw them.

    The order must be a function of the epoch: ``shuffle=True`` becomes an ``EpochShuffleSampler(dataset, seed)``;
    a sampler given must be seeded per epoch (``LengthGroupedSampler``, a DistributedSampler). The workers' seeds
    come from the loader's own generator, reseeded from ``(seed, epoch)``: iterating never draws from the global RNG.
    """

    def __init__(self, dataset: Any, *, seed: int = 0, **kwargs: Any):
        if kwargs.get("shuffle") and kwargs.get("sampler") is None and kwargs.get("batch_sampler") is None:
            kwargs["shuffle"], kwargs["sampler"] = False, EpochShuffleSampler(dataset, seed)
        if kwargs.get("generator") is None:
            kwargs["generator"] = torch.Generator()
        self.seed = seed
        self._epoch: int | None = None  # the epoch being iterated (its sampler's)
        self._taken = 0  # batches handed out in it (a checkpoint's steps trained on these)
        self._skip = 0
        self._resume: dict[str, Any] | None = None
        super().__init__(dataset, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "batches": self._taken}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._resume = dict(state)

    def _sampler_epoch(self) -> int | None:
        for s in (self.sampler, getattr(self.batch_sampler, "sampler", None), self.batch_sampler):
            if isinstance(getattr(s, "epoch", None), int):
                return s.epoch
        return None

    @property
    def _index_sampler(self) -> Any:
        base = super()._index_sampler
        return _SkipFirst(base, self._skip) if self._skip else base

    def __iter__(self) -> Iterator[Any]:
        return self._batches()

    def _batches(self) -> Iterator[Any]:
        # a generator: runs at the first batch, after Lightning's set_epoch (it calls iter() before that)
        epoch = self._sampler_epoch()
        resume, self._resume = self._resume, None
        done = resume["batches"] if resume and resume.get("epoch") == epoch else 0
        self._epoch, self._taken = epoch, done if 0 < done < len(self) else 0
        self.generator.manual_seed(hash((self.seed, epoch or 0)) & 0x7FFF_FFFF_FFFF_FFFF)
        self._skip = self._taken
        try:
            batches = super().__iter__()
        finally:
            self._skip = 0
        for batch in batches:
            self._taken += 1
            yield batch
