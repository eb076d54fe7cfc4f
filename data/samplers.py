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

``MixtureBatchSampler`` draws each batch from one of several training files in configured proportions
(data.mixture), optionally built to a token budget (data.max_tokens) instead of a fixed count.

Exact resume (``resume=``) mid-epoch: a training epoch's order is a function of the seed and the epoch only
(``EpochShuffleSampler`` for a plain shuffle, ``LengthGroupedSampler``, ``MixtureBatchSampler``), and the training DataLoader is a
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


def record_length(rec: dict, tokens_per_second: float = TOKENS_PER_SECOND,
                  per_input: Mapping[str, float] | None = None) -> float:
    """A cheap estimate of a record's token count without loading its inputs.

    Text: ~4 characters a token; audio: its manifest ``duration`` (seconds, a number or a list)
    at the adaptor's rate. ``per_input``: positions each reference of a modality adds (a fixed-length input such
    as a price window: its embeddings plus any reading), by modality key. Records without either count their text.
    """
    chars = sum(len(t.get("value", "")) for t in rec.get("conversations", []))
    dur = rec.get("duration") or 0.0
    seconds = sum(float(d) for d in dur) if isinstance(dur, (list, tuple)) else float(dur)
    refs = {name: rec.get(name) or [] for name in per_input or {}}
    fixed = sum(float(n) * (len(refs[name]) if isinstance(refs[name], list) else 1)
                for name, n in (per_input or {}).items())
    return chars / 4 + tokens_per_second * seconds + fixed


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


def budget_batches(order: Sequence[int], lengths: Sequence[float], batch_size: int,
                   max_tokens: float | None = None) -> list[list[int]]:
    """``order`` cut into consecutive batches of at most ``batch_size`` records whose padded cost (count x the
    longest estimated length) stays within ``max_tokens`` (None: no budget). A record over the budget alone is a
    batch of its own (data.max_length is the hard limit)."""
    batches: list[list[int]] = []
    cur: list[int] = []
    longest = 0.0
    for i in order:
        top = max(longest, lengths[i])
        if cur and (len(cur) == batch_size or (max_tokens is not None and top * (len(cur) + 1) > max_tokens)):
            batches.append(cur)
            cur, top = [], lengths[i]
        cur.append(i)
        longest = top
    return batches + ([cur] if cur else [])


class MixtureBatchSampler(Sampler[list[int]]):
    """Batches drawn from several sources (a run's training files) in the proportions ``weights``, optionally
    built to a token budget.

    Why: a multimodal run mixes corpora of very different sizes (a few hundred cross-modal conversations beside
    thousands of transcripts); drawing by file size would drown the small one. Each batch comes from one source
    (its records' ``groups`` key, e.g. data.samplers.input_group, kept apart as LengthGroupedSampler does), the
    source drawn at random with probability ``weights[s] / sum(weights)``. A source's batches come from passes over
    it, each a fresh shuffle: a source drawn more often than it has batches starts another pass.
    ``max_tokens``: each batch's padded estimated length (count x its longest record, ``lengths``) stays within
    it; records are sorted by length within mega-batches of ``mega x batch_size`` first, so budgets fill well.
    An epoch holds ``num_batches`` batches (default: one pass's worth over every source with weight > 0). The
    order is a function of (seed, epoch) only: ResumableLoader resumes it exactly. Under several processes each
    ``rank`` of ``world_size`` takes every world_size-th batch of the one global order (the trainer then needs
    ``use_distributed_sampler=false``: Lightning cannot put its DistributedSampler into a batch sampler).
    """

    def __init__(self, sources: Sequence[Sequence[int]], weights: Sequence[float], batch_size: int, seed: int = 0,
                 lengths: Sequence[float] | None = None, groups: Sequence[Hashable] | None = None,
                 max_tokens: float | None = None, mega: int = 50, num_batches: int | None = None,
                 rank: int = 0, world_size: int = 1):
        if batch_size < 1 or mega < 1:
            raise ValueError(f"batch_size ({batch_size}) and mega ({mega}) must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..world_size-1 ({world_size})")
        if len(weights) != len(sources):
            raise ValueError(f"data.mixture: {len(weights)} weight(s) for {len(sources)} training file(s)")
        if any(not w >= 0 for w in weights) or not sum(weights) > 0:
            raise ValueError(f"data.mixture: weights must be >= 0 with a positive sum, got {list(weights)}")
        if max_tokens is not None and not max_tokens > 0:
            raise ValueError(f"data.max_tokens must be > 0, got {max_tokens}")
        empty = [s for s, (w, src) in enumerate(zip(weights, sources)) if w > 0 and not src]
        if empty:
            raise ValueError(f"data.mixture: training file #{empty[0]} has weight {weights[empty[0]]} but no records")
        n = 1 + max((i for src in sources for i in src), default=-1)
        self.sources, self.weights = [list(src) for src in sources], [float(w) for w in weights]
        self.lengths = list(lengths) if lengths is not None else [0.0] * n
        self.groups = list(groups) if groups is not None else [None] * n
        self.batch_size, self.seed, self.max_tokens, self.mega = batch_size, seed, max_tokens, mega
        self.epoch, self.rank, self.world_size = 0, rank, world_size
        self.sampler = _EpochOf(self)  # Lightning sets the epoch of a batch sampler's ``sampler``, not its own
        self.num_batches = num_batches if num_batches is not None else max(1, sum(
            len(self._pass(s, 0, 0)) for s, w in enumerate(self.weights) if w > 0) // world_size)  # per rank

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this each epoch: a different, reproducible order per epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def _pass(self, source: int, epoch: int, n: int) -> list[list[int]]:
        """Pass ``n`` over ``source`` in ``epoch``: its batches (each of one group), in a seeded random order."""
        rng = random.Random(f"{self.seed}:{epoch}:{source}:{n}")
        members: dict[Hashable, list[int]] = {}
        for i in self.sources[source]:
            members.setdefault(self.groups[i], []).append(i)
        batches: list[list[int]] = []
        size = self.mega * self.batch_size
        for idx in members.values():
            rng.shuffle(idx)
            for start in range(0, len(idx), size):
                chunk = idx[start:start + size]
                if self.max_tokens is not None:
                    chunk = sorted(chunk, key=lambda i: -self.lengths[i])
                batches += budget_batches(chunk, self.lengths, self.batch_size, self.max_tokens)
        rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        epoch = self.epoch
        rng = random.Random(f"{self.seed}:{epoch}:mixture")
        drawn = rng.choices(range(len(self.sources)), weights=self.weights, k=self.num_batches * self.world_size)
        passes = {s: 0 for s in range(len(self.sources))}
        queues: dict[int, list[list[int]]] = {s: [] for s in passes}
        for k, s in enumerate(drawn):
            if not queues[s]:
                queues[s] = self._pass(s, epoch, passes[s])
                passes[s] += 1
            batch = queues[s].pop()
            if k % self.world_size == self.rank:
                yield batch


class _EpochOf:
    """Forwards ``set_epoch`` to ``owner`` (a batch sampler): Lightning calls it on ``batch_sampler.sampler`` only."""

    def __init__(self, owner: Any):
        self.owner = owner

    @property
    def epoch(self) -> int:
        return self.owner.epoch

    def set_epoch(self, epoch: int) -> None:
        self.owner.set_epoch(epoch)


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
