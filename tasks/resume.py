"""Checkpoints a long run loses at most minutes of, and resuming one so that its logs read as if it never stopped.

Why: a cluster job is killed at its time limit or pre-empted, and requeued with the same command. Every checkpoint
is written atomically (a kill mid-write leaves the previous one, never a torn file), last.ckpt is also saved every
``checkpoint_minutes`` of wall time, ``resume=auto`` picks the run's own newest good checkpoint (or starts fresh,
saying so), and metrics.csv keeps the rows logged before that checkpoint (Lightning's CSV logger deletes the file).
A resume is exact mid-epoch too (``ExactResume``): the rest of the epoch's batches in the uninterrupted run's order,
and the random state (dropout) that run had at that step.
Inside a SLURM job an unset ``resume=`` is ``auto``: the job submitit requeues resumes itself (``resume_setting``).
"""

from __future__ import annotations

import csv
import logging
import os
import random
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.plugins.io import CheckpointIO, TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only

from tasks.checkpoint import META_KEY, check_finite, resume_path

log = logging.getLogger(__name__)
AUTO = "auto"
TRAINING_KEYS = ("state_dict", "optimizer_states", "loops", "global_step")  # what an exact resume reads


def clock() -> float:
    """The timed checkpoint's clock (tests replace it: no test sleeps for minutes)."""
    return time.monotonic()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file beside it, flushed to disk, then renames it over the old one.

    Why: Lightning's own save stages the bytes in the system temp folder and copies them into place when that is
    another filesystem; a job killed during that copy left a truncated last.ckpt, the only checkpoint of the run.
    A write that fails (a full disk) removes its temporary file and raises an OSError naming the checkpoint path.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint: storage_options are not supported")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(tmp, 0o666 & ~mask)
            os.replace(tmp, path)
        except BaseException as e:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(e, OSError) and e.errno is not None and e.filename is None:
                # a full disk (ENOSPC) inside torch.save names no file: name the checkpoint that was not written
                # (the previous one is untouched), not a bare "[Errno 28] No space left on device"
                raise OSError(e.errno, e.strerror, str(path)) from e
            raise


def with_atomic_io(plugins: Any) -> list[Any]:
    """The trainer's plugins plus AtomicCheckpointIO, unless the config already chose a CheckpointIO."""
    given = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins] if plugins else []
    return given if any(isinstance(p, CheckpointIO) for p in given) else [*given, AtomicCheckpointIO()]


class LastCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint (last.ckpt every ``every_n_train_steps``), which also saves last.ckpt when
    training ends at a step it did not save at.

    Why: with ``checkpoint_every=3`` a run of 7 steps (or one stopped by a STOP file) ended with last.ckpt at step 6,
    and the next stage's ``init_from`` read weights one step short. Not after an error: a diverged run has none.

    A run told to stop (``trainer.should_stop``: the STOP file) saves at the end of that batch, not at the end of
    training: by then Lightning counts the epoch as finished, and a resume would skip the rest of it.
    """

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.should_stop and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class TimedCheckpoint(Checkpoint):
    """Saves ``path`` (last.ckpt) after the first optimizer step that ends ``minutes`` or more after the previous
    save (or the start): a killed run loses at most that much work, whatever ``checkpoint_every`` says.

    A Checkpoint subclass, so Lightning runs it after the other callbacks (the saved run statistics include the
    step). Only at an optimizer step (not inside gradient accumulation), and rank 0's clock decides for all ranks.
    """

    def __init__(self, path: str | Path, minutes: float):
        if not minutes > 0:
            raise ValueError(f"checkpoint_minutes={minutes}: must be > 0 (null disables the timed checkpoint)")
        self.path, self.minutes = Path(path), float(minutes)
        self._since = 0.0
        self._step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._since, self._step = clock(), trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == self._step or 0 < trainer.max_steps <= trainer.global_step:
            return  # no optimizer step since the last batch (accumulating gradients), or the end (saved anyway)
        self._step, now = trainer.global_step, clock()
        if not trainer.strategy.broadcast(now - self._since >= self.minutes * 60):
            return
        trainer.save_checkpoint(self.path, weights_only=False)  # a resume point: optimizer and loop state too
        self._since = now
        _info("step %d: saved %s (every %g min)", trainer.global_step, self.path, self.minutes)


class FlushLogs(L.Callback):
    """Writes every logger's pending rows to disk when a checkpoint is saved, and again at the next batch (the
    saved step's own row is logged just after the save): a killed run's metrics.csv holds every row up to its
    last checkpoint, which a resume keeps (``resume_from``)."""

    def __init__(self) -> None:
        self._pending = False

    def _flush(self, trainer: L.Trainer) -> None:
        for lg in trainer.loggers:
            lg.save()

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._flush(trainer)
        self._pending = True

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._pending:
            self._flush(trainer)
            self._pending = False


def rng_state() -> dict[str, Any]:
    """The global random states (python, numpy, torch, the current CUDA device's), as a checkpoint can hold them
    (``torch.load(weights_only=True)`` reads no numpy array)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    numpy = (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)
    state = {"python": random.getstate(), "numpy": numpy, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Put back what ``rng_state`` returned."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(state["cuda"])


class ExactResume(L.Callback):
    """A run resumed from a checkpoint saved at step k, mid-epoch or not, trains on step k+1 as the uninterrupted
    run did: the same batch and the same random state (dropout, masks), so its losses are the same step for step.

    Why: Lightning restores weights, optimizer and loop counters, but not the global random state, and a plain
    DataLoader restarts a resumed epoch with a new shuffle (the rest of the epoch was a new draw of batches).

    - Data: the datamodules' training loaders are ``data.samplers.ResumableLoader``s (ConversationDataModule and the
      plugins' own datamodules): an order seeded per epoch whose place Lightning checkpoints and continues after a
      resume. A user's own datamodule gets the same with one line (return a ResumableLoader).
    - Random state: the training stream runs from batch to batch untouched by what runs between them (validation,
      periodic evaluation, checkpointing, a resume): the state at the end of each training batch is put back at
      the start of the next one, and it is what a checkpoint holds. Global states only: the same on every rank, as
      ``seed_everything`` makes them; randomness inside data loading (none in mmlm's datasets) is not covered.
    """

    def __init__(self) -> None:
        self._state: dict[str, Any] | None = None  # the state at the end of the last training batch

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._state is not None:
            set_rng_state(self._state)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._state = rng_state()  # before any checkpoint of this step is saved (Lightning runs those last)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self._state if self._state is not None else rng_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._state = state_dict.get("rng")


class ResumeKeys(L.Callback):
    """A resumed run holds exactly the weights its checkpoint trained: the checkpoint's weights must be this model's
    trainable set, name for name. Why: Lightning loads with the model's ``strict_loading=False`` (checkpoints hold
    only what trains), so a checkpoint of another architecture would load in part and train on, silently."""

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        from tasks.checkpoint import _first, _groups

        trainable = sorted(n for n, p in pl_module.named_parameters() if p.requires_grad)
        saved = sorted(checkpoint.get("state_dict", {}))
        extra, missing = [k for k in saved if k not in set(trainable)], [k for k in trainable if k not in set(saved)]
        if extra or missing:
            what = (f"{len(extra)} weight(s) this model does not train ({_first(extra)})" if extra else
                    f"no {len(missing)} of this model's trainable weight(s) ({_first(missing)})")
            raise ValueError(f"resume: the checkpoint holds {what}; this model trains {_groups(trainable)}, the "
                             f"checkpoint {_groups(saved)} (another architecture or stage settings: init_from= "
                             f"starts a new run from its weights)")


def checkpoint_callbacks(dirpath: Path, every_steps: int | None, minutes: float | None) -> list[L.Callback]:
    """last.ckpt at the end (and every ``every_steps`` steps, and every ``minutes``), logs flushed at each save,
    and an exact resume from any of them (``ExactResume``) of the same trainable set (``ResumeKeys``)."""
    steps = LastCheckpoint(dirpath=dirpath, filename="step{step}", save_last=True, save_top_k=0,
                           every_n_train_steps=every_steps or None, enable_version_counter=False)
    timed = [TimedCheckpoint(dirpath / "last.ckpt", minutes)] if minutes is not None else []
    return [steps, *timed, FlushLogs(), ExactResume(), ResumeKeys()]


@dataclass(frozen=True)
class Resume:
    """The checkpoint a run continues from and the optimizer step it holds."""

    path: Path
    step: int


def read_resumable(path: Path) -> dict[str, Any]:
    """``path`` as a complete training checkpoint with finite weights; anything else is a one-line ValueError."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - a truncated, foreign or corrupt file: one line naming it
        first = (str(e).splitlines() or [""])[0]
        raise ValueError(f"resume={path}: not a readable checkpoint ({type(e).__name__}: {first})") from None
    if not isinstance(ckpt, dict) or META_KEY not in ckpt:
        raise ValueError(f"resume={path}: not an mmlm checkpoint (no '{META_KEY}' metadata)")
    if missing := [k for k in TRAINING_KEYS if k not in ckpt]:
        raise ValueError(f"resume={path}: not a training checkpoint (no {', '.join(missing)}; "
                         f"init_from= starts a new run from weights)")
    check_finite(ckpt["state_dict"], f"resume={path}")
    return ckpt


def check_own(path: Path, meta: dict[str, Any], stage: str, llm: str | None, modalities: list[str]) -> None:
    """Refuse another run's checkpoint: its stage, LLM and modalities must be this run's."""
    if meta.get("stage") != stage:
        raise ValueError(f"resume={path}: a stage={meta.get('stage')} checkpoint, this run is stage={stage} "
                         f"(init_from= starts a new stage from it)")
    if meta.get("llm") != llm:
        raise ValueError(f"resume={path}: trained with llm={meta.get('llm')}, this run uses llm={llm}")
    if sorted(meta.get("modalities") or []) != sorted(modalities):
        raise ValueError(f"resume={path}: trained with modality {meta.get('modalities')}, this run has {modalities}")


def under_slurm(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process is a SLURM job's (sbatch, srun, or submitit's ``hydra/launcher=slurm``)."""
    return bool((os.environ if env is None else env).get("SLURM_JOB_ID"))


def resume_setting(value: str | bool | None, env: Mapping[str, str] | None = None) -> str | bool | None:
    """``resume=`` as the run uses it: unset (null) inside a SLURM job means ``auto``; anything given stays.

    Why: a SLURM job that times out or is pre-empted is requeued with the same command (submitit re-runs the
    pickled job), so the requeued job must find its own last checkpoint without a hand-written ``resume=``; a
    fresh job's empty output dir makes ``auto`` a fresh start (logged). ``resume=false`` always starts fresh.
    """
    return AUTO if value is None and under_slurm(env) else value


def cluster_plugins(plugins: list[Any], env: Mapping[str, str] | None = None) -> list[Any]:
    """``plugins`` plus Lightning's SLURMEnvironment with ``auto_requeue=False`` for a job submitit started
    (``hydra/launcher=slurm``), unless the config already chose a ClusterEnvironment.

    Why: submitit and Lightning both requeue a job on a signal (submitit: SIGUSR2 before the time limit or at
    pre-emption, resubmitting the pickled Hydra job; Lightning: SIGUSR1, saving hpc_ckpt_*.ckpt and calling
    ``scontrol requeue`` itself). One mechanism: submitit's, with ``resume=auto`` reading last.ckpt.
    """
    from lightning.fabric.plugins.environments import (
        ClusterEnvironment,
        SLURMEnvironment,
    )

    env = os.environ if env is None else env
    if env.get("SUBMITIT_EXECUTOR") != "slurm" or any(isinstance(p, ClusterEnvironment) for p in plugins):
        return plugins
    return [*plugins, SLURMEnvironment(auto_requeue=False)]


def resolve_resume(value: str | bool | None, out: Path, stage: str, llm: str | None,
                   modalities: list[str]) -> Resume | None:
    """``resume=``: null (a fresh run; ``auto`` in a SLURM job: ``resume_setting``), false (fresh), ``auto``
    (``find_own``) or a .ckpt of this run (checked, or refused)."""
    if value is None and (value := resume_setting(value)) == AUTO:
        job = "_".join(filter(None, (os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID"))))
        _info("resume unset in SLURM job %s: resume=auto", job or os.environ.get("SLURM_JOB_ID"))
    if not value:
        return None
    own = (stage, llm, modalities)
    if str(value) == AUTO:
        return find_own(out / "checkpoints", *own)
    path = resume_path(value)
    ckpt = read_resumable(path)
    check_own(path, ckpt[META_KEY], *own)
    return Resume(path, int(ckpt["global_step"]))


def find_own(dirpath: Path, stage: str, llm: str | None, modalities: list[str]) -> Resume | None:
    """The newest complete checkpoint with finite weights in ``dirpath``, else None (a fresh start, logged).

    A torn or diverged file is skipped (with a log line); another run's checkpoint is refused, not overwritten.
    """
    found = sorted(dirpath.glob("*.ckpt"), key=lambda p: p.stat().st_mtime_ns, reverse=True) if dirpath.is_dir() else []
    for path in found:
        try:
            ckpt = read_resumable(path)
        except ValueError as e:
            _info("resume=auto: skipping %s: %s", path, e)
            continue
        check_own(path, ckpt[META_KEY], stage, llm, modalities)
        _info("resume=auto: resuming from %s (step %d)", path, int(ckpt["global_step"]))
        return Resume(path, int(ckpt["global_step"]))
    _info("resume=auto: no complete checkpoint in %s; starting fresh", dirpath)
    return None


def _info(msg: str, *args: Any) -> None:
    if rank_zero_only.rank == 0:
        log.info(msg, *args)


def keep_csv_rows(loggers: list[Logger], step: int) -> int:
    """Keep each CSV logger's metrics.csv rows logged before ``step`` (the resumed run logs the later ones again);
    returns how many rows were kept. Call before the trainer first uses its loggers."""
    kept = 0
    for lg in loggers if rank_zero_only.rank == 0 else []:
        if not isinstance(lg, CSVLogger):
            continue
        path = Path(lg.log_dir) / "metrics.csv"
        rows = []
        if path.is_file():
            with path.open(newline="", encoding="utf-8") as f:
                rows = [r for r in csv.DictReader(f) if (r.get("step") or "").isdigit() and int(r["step"]) < step]
        writer = lg.experiment  # Lightning's CSV writer deletes metrics.csv as it starts: the rows are put back
        for r in rows:
            values = {k: v for k, v in r.items() if k not in ("step", None) and v not in ("", None)}
            writer.log_metrics(values, step=int(r["step"]))
        lg.save()
        kept += len(rows)
    return kept


def resume_from(trainer: L.Trainer, resume: Resume | None) -> str | None:
    """``trainer.fit``'s ckpt_path, after putting back the logged rows the checkpoint's steps wrote."""
    if resume is None:
        return None
    kept = keep_csv_rows(trainer.loggers, resume.step)
    _info("resume: step %d from %s (%d logged rows kept)", resume.step, resume.path, kept)
    return str(resume.path)
