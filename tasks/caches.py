"""Frozen-encoder caches filled before they are read (a plugin's ``precompute_cache``).

Why two moments: what runs before ``trainer.fit`` (``stage=evaluate``, the evaluation before training) reads only
the eval split, so that split is encoded up front; everything else is encoded in the fit's ``setup`` hook, the
first moment every rank exists with torch.distributed initialized (Lightning's launcher starts the other ranks
inside ``fit``), so each rank encodes its share once and all read all, on the run's accelerator.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import lightning as L

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "eval")


def precompute_caches(dm: Any, modalities: dict[str, Any], splits: Iterable[str] = SPLITS,
                      device: Any = None) -> None:
    """Encode every input of ``splits`` once, batched (frozen encoders with a ``cache_dir`` only)."""
    for name, m in modalities.items():
        if dm.skip_bad or not (m.cache_dir and m.encoder_frozen):
            continue
        refs = {}
        for split in splits:
            for rec in dm.records(split) if dm.files[split] else []:
                for ref in rec.get(name) or []:
                    if not isinstance(ref, dict):  # a dict ref names no file (a plugin's inline input)
                        refs[str(m.resolve(ref, rec.get("root")))] = None
        counts = m.precompute_cache(list(refs), device=device)
        log.info("%s encoder cache (%s): %s", name, "+".join(splits), counts)


class PrecomputeCaches(L.Callback):
    """Fills the caches in ``setup``: every rank, process group up, encoder still unsharded and on the CPU (it
    is moved to the accelerator for the build, then back)."""

    def __init__(self, dm: Any, modalities: dict[str, Any]):
        self.dm, self.modalities = dm, modalities

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            modalities = getattr(pl_module, "modalities", None) or self.modalities  # ddp_spawn: the rank's copy
            precompute_caches(trainer.datamodule or self.dm, dict(modalities), device=trainer.strategy.root_device)
