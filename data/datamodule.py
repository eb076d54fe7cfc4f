"""One LightningDataModule for every modality and stage: records -> dataset -> collator."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from data.collate import ConversationCollator
from data.dataset import ConversationDataset
from data.records import read_records
from data.samplers import (
    LengthGroupedSampler,
    MixtureBatchSampler,
    ResumableLoader,
    input_group,
    record_length,
)


def _as_list(files: str | list[str] | None) -> list[str]:
    if files is None:
        return []
    return [files] if isinstance(files, str) else list(files)


def _fixed_length(modality: Any) -> float:
    """Positions one input of ``modality`` takes at the least (its whole length when fixed, e.g. a price window)."""
    try:
        return float(modality.output_length(1))
    except ValueError:
        return 0.0


class ConversationDataModule(L.LightningDataModule):
    """Reads record files (LLaVA JSON/JSONL or NeMo manifests) for train / val / eval.

    ``tokenizer``, ``modalities`` and ``placeholder_ids`` come from the runner at build time;
    everything else is plain configuration. ``group_by_length`` batches training records of
    similar estimated length (data/samplers.py): less padding, the same samples. ``mixture`` (one weight per
    training file) draws each training batch from one file in those proportions, and ``max_tokens`` builds training
    batches to that many estimated tokens (padded; ``batch_size`` records at most), with ``input_tokens``
    ({modality: positions per input}) for inputs whose length no ``duration`` gives (default: the plugin's
    ``output_length(1)``, a fixed-length input's whole length) (data.samplers.MixtureBatchSampler).
    """

    def __init__(self, tokenizer: Any, modalities: dict[str, Any], placeholder_ids: dict[str, int],
                 train_files: str | list[str] | None = None, val_files: str | list[str] | None = None,
                 eval_files: str | list[str] | None = None, batch_size: int = 8, eval_batch_size: int = 8,
                 num_workers: int = 0, max_length: int = 1024, skip_bad: bool = False,
                 max_train_samples: int | None = None, max_val_samples: int | None = 64,
                 max_eval_samples: int | None = None, group_by_length: bool = False, seed: int = 0,
                 eval_manifest: str | None = None, prepare: Any = None, system_prompt: str | None = None,
                 mixture: list[float] | None = None, max_tokens: int | None = None,
                 input_tokens: dict[str, float] | None = None):
        super().__init__()
        self.tokenizer, self.modalities, self.placeholder_ids = tokenizer, modalities, placeholder_ids
        self.files = {"train": _as_list(train_files), "val": _as_list(val_files),
                      "eval": _as_list(eval_manifest) or _as_list(eval_files)}
        self.limits = {"train": max_train_samples, "val": max_val_samples, "eval": max_eval_samples}
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.max_length, self.skip_bad = num_workers, max_length, skip_bad
        self.group_by_length, self.seed = group_by_length, seed
        self.system_prompt = system_prompt  # None: the chat template's own default system turn
        self.prepare = prepare  # optional callable(list[Path]) that builds missing data files
        self.mixture = [float(w) for w in mixture] if mixture is not None else None
        if self.mixture is not None and self.files["train"] and len(self.mixture) != len(self.files["train"]):
            raise ValueError(f"data.mixture: {len(self.mixture)} weight(s) for {len(self.files['train'])} "
                             f"data.train_files (one weight per file)")
        self.max_tokens = max_tokens
        self.input_tokens = dict(input_tokens) if input_tokens else None
        self._records: dict[str, list[dict]] = {}
        self._sources: dict[str, list[int]] = {}  # per record: the index of the file it came from

    def prepare_data(self) -> None:
        missing = [f for fs in self.files.values() for f in fs if not Path(f).exists()]
        if missing and self.prepare is not None:
            self.prepare()
        still = [f for fs in self.files.values() for f in fs if not Path(f).exists()]
        if still:
            raise ValueError(f"{still[0]}: data file not found (build it with `make data`, or the Makefile target "
                             f"its experiment names; or point data.train_files / data.eval_manifest at your own)")

    def records(self, split: str) -> list[dict]:
        if split not in self._records:
            adapters = [m.read_record for m in self.modalities.values()]
            recs, sources = [], []
            for k, f in enumerate(self.files[split]):
                got = read_records(f, tuple(self.modalities), self.seed, adapters)
                if not got and split in ("train", "eval"):  # an empty file used to evaluate to eval_samples: 0, exit 0
                    raise ValueError(f"{f}: no records (an empty {split} file)")
                recs += got
                sources += [k] * len(got)
            limit = self.limits[split]
            if limit is not None and len(recs) > limit:
                rng = random.Random(self.seed)  # the same draw as sampling the records themselves
                keep = rng.sample(range(len(recs)), limit) if split == "train" else range(limit)
                recs, sources = [recs[i] for i in keep], [sources[i] for i in keep]
            self._records[split], self._sources[split] = recs, sources
        return self._records[split]

    def _loader(self, split: str, generate: bool = False, shuffle: bool = False) -> DataLoader:
        ds = ConversationDataset(self.records(split), self.modalities, self.skip_bad, self.system_prompt)
        collate = ConversationCollator(self.tokenizer, self.modalities, self.placeholder_ids,
                                       self.max_length, generate=generate, skip_bad=self.skip_bad)
        bs = self.eval_batch_size if generate or split != "train" else self.batch_size
        sampler = None
        groups = [input_group(r, list(self.modalities)) for r in self.records(split)] if shuffle else []
        if shuffle and (self.mixture is not None or self.max_tokens is not None):
            batches = self._mixture_sampler(split, bs, groups)  # batches of one file and one group each
            return ResumableLoader(ds, batch_sampler=batches, seed=self.seed, collate_fn=collate,
                                   num_workers=self.num_workers, persistent_workers=self.num_workers > 0)
        if shuffle and (self.group_by_length or len(set(groups)) > 1):
            # similar lengths per batch: less padding; and clips never batched with inputs given as text
            lengths = [record_length(r) if self.group_by_length else 0.0 for r in self.records(split)]
            sampler = LengthGroupedSampler(lengths, bs, self.seed, groups=groups)
        kwargs = {"batch_size": bs, "sampler": sampler, "collate_fn": collate, "num_workers": self.num_workers,
                  "persistent_workers": self.num_workers > 0}
        if not shuffle:
            return DataLoader(ds, **kwargs)
        # an order seeded per epoch, and the loader's place in it checkpointed: resume= is exact mid-epoch too
        return ResumableLoader(ds, shuffle=sampler is None, seed=self.seed, **kwargs)

    def _mixture_sampler(self, split: str, batch_size: int, groups: list) -> MixtureBatchSampler:
        files = self.files[split]
        sources = [[i for i, k in enumerate(self._sources[split]) if k == f] for f in range(len(files))]
        per_input = {**{name: _fixed_length(m) for name, m in self.modalities.items()}, **(self.input_tokens or {})}
        lengths = [record_length(r, per_input=per_input) for r in self.records(split)]
        trainer = self.trainer  # several processes: each takes its share of one global order
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return MixtureBatchSampler(sources, self.mixture or [1.0] * len(files), batch_size, self.seed,
                                   lengths=lengths, groups=groups, max_tokens=self.max_tokens, rank=rank,
                                   world_size=world)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val") if self.files["val"] else []

    def eval_dataloader(self) -> DataLoader | None:
        return self._loader("eval", generate=True) if self.files["eval"] else None
