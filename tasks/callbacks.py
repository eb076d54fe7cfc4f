"""Run-level bookkeeping every run writes into metrics.json."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L


def batch_size(batch: Any) -> int:
    """Samples in a batch: a dict's token ids (or its first tensor), a tuple's first element."""
    if isinstance(batch, dict):
        first = batch["input_ids"] if "input_ids" in batch else next(
            (v for v in batch.values() if hasattr(v, "shape") and len(v.shape)), None)
        return len(first) if first is not None else 0
    return len(batch[0]) if isinstance(batch, (list, tuple)) else 0


class RunStats(L.Callback):
    """First/last training loss, steps, samples/s and parameter counts. Time spent in evaluations during
    training (``exclude``, called by PeriodicEval) is not training time: seconds per step count steps only."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.samples = 0
        self.t0 = 0.0
        self.seconds = 0.0  # training time of every fit this run's state has seen (a resumed run's included)
        self._before = 0.0
        self._excluded = 0.0

    def exclude(self, seconds: float) -> None:
        """Take ``seconds`` (an evaluation inside the fit) out of the training time."""
        self._excluded += seconds

    def state_dict(self) -> dict[str, Any]:
        """Checkpointed (a resumed run reports its whole history) and handed back by spawned ranks."""
        return {"losses": list(self.losses), "samples": self.samples, "seconds": self.seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses, self.samples = list(state["losses"]), int(state["samples"])
        self.seconds = self._before = float(state["seconds"])

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.t0 = time.perf_counter()
        self._excluded = 0.0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self.losses.append(float(loss.detach()))
        self.samples += batch_size(batch)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seconds = self._before + time.perf_counter() - self.t0 - self._excluded

    def summary(self, trainer: L.Trainer, module: L.LightningModule) -> dict[str, Any]:
        params = list(module.named_parameters())
        k = max(1, min(10, len(self.losses) // 5))
        return {
            "steps": int(trainer.global_step),
            "first_loss": self.losses[0] if self.losses else None,
            "last_loss": self.losses[-1] if self.losses else None,
            "first_loss_avg": sum(self.losses[:k]) / k if self.losses else None,
            "last_loss_avg": sum(self.losses[-k:]) / k if self.losses else None,
            "train_seconds": round(self.seconds, 2),
            "samples_per_second": round(self.samples / self.seconds, 3) if self.seconds else None,
            "seconds_per_step": round(self.seconds / max(1, trainer.global_step), 3) if self.seconds else None,
            "trainable_params": sum(p.numel() for _, p in params if p.requires_grad),
            "total_params": sum(p.numel() for _, p in params),
        }


class PeriodicEval(L.Callback):
    """Generate on a held-out loader every N steps: the learning curve (step, seconds, metrics).

    With ``path`` each point is also appended to a JSONL file as it is measured, so a run stopped
    early (a killed job, a SLURM time limit) keeps its curve.
    """

    def __init__(self, loader: Any, every_n_steps: int, max_new_tokens: int, path: str | Path | None = None,
                 num_beams: int = 1, stats: RunStats | None = None):
        self.loader, self.every, self.max_new_tokens, self.num_beams = loader, every_n_steps, max_new_tokens, num_beams
        self.stats = stats  # told how long each evaluation took, so it is not counted as training time
        self.eval_seconds = 0.0
        self.path = Path(path) if path is not None else None
        self.curve: list[dict[str, Any]] = []
        self.t0 = 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"curve": list(self.curve)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.curve = list(state["curve"])

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        step, zero = trainer.global_step, trainer.is_global_zero  # every rank generates in step, rank 0 records
        if self.every <= 0 or step % self.every:
            return
        if self.curve and self.curve[-1]["step"] == step:
            return  # several micro-batches share one optimizer step under accumulation
        from tasks.evaluate import run_generation

        t = time.perf_counter()
        metrics = run_generation(pl_module, self.loader, self.max_new_tokens, desc=f"evaluate@{step}",
                                 num_beams=self.num_beams, progress=zero)
        took = time.perf_counter() - t
        self.t0 += took  # the curve's clock counts training time only
        self.eval_seconds += took
        if self.stats is not None:
            self.stats.exclude(took)
        if not zero:
            self.curve.append({"step": step})
            return
        point = {"step": step, "train_seconds": round(time.perf_counter() - self.t0, 1), **metrics}
        self.curve.append(point)
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(point, default=str) + "\n")
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                pl_module.log(f"curve/{k}", float(v), rank_zero_only=True)


class StopFile(L.Callback):
    """``touch <output_dir>/STOP`` ends a run cleanly after the current step: the last checkpoint,
    the final evaluation and metrics.json are written as if max_steps had been reached.

    Why: a cluster time limit or a shared machine needs a run to end early without losing its
    results (a kill loses metrics.json; SIGTERM raises in Lightning). A STOP file already there when
    the run starts is left from an earlier run and ignored until it is touched again (compared by
    its own mtime, not the clock: filesystem timestamps lag ``time.time()`` by milliseconds).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.stale: int | None = None  # mtime_ns of a STOP file present at the start
        self.stopped_at: int | None = None

    def _mtime(self) -> int | None:
        try:
            return self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.stale = self._mtime()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if self.stopped_at is None and (m := self._mtime()) is not None and m != self.stale:
            self.stopped_at = trainer.global_step
            trainer.should_stop = True
