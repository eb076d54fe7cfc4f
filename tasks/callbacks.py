"""Run-level bookkeeping every run writes into metrics.json."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from data.jsonl import dumps, write_jsonl


def batch_size(batch: Any) -> int:
    """Samples in a batch: a dict's token ids (or its first tensor), a tuple's first element."""
    if isinstance(batch, dict):
        first = batch["input_ids"] if "input_ids" in batch else next(
            (v for v in batch.values() if hasattr(v, "shape") and len(v.shape)), None)
        return len(first) if first is not None else 0
    return len(batch[0]) if isinstance(batch, (list, tuple)) else 0


class RunStats(L.Callback):
    """First/last training loss, steps, samples/s and parameter counts. Time spent in evaluations during
    training (``exclude``, called by PeriodicEval) is not training time: seconds per step count steps only.

    A resumed run reports its whole history: the losses, samples and training seconds up to the checkpoint travel
    in it, so ``first_loss`` is the run's first and ``seconds_per_step`` is total training time over total steps.
    """

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.samples = 0
        self.tokens = 0  # attended LLM positions trained on (text and modality positions, padding excluded)
        self.t0 = 0.0
        self.seconds = 0.0  # training time of every fit this run's state has seen (a resumed run's included)
        self._before = 0.0
        self._excluded = 0.0
        self._running = False
        self._starts: list[float] = []  # this fit's step start times: the steady-state step time (median)

    def exclude(self, seconds: float) -> None:
        """Take ``seconds`` (an evaluation inside the fit) out of the training time."""
        self._excluded += seconds

    def elapsed(self) -> float:
        """Training seconds so far: the earlier processes' (carried by the checkpoint) plus this fit's."""
        if not self._running:
            return self.seconds
        return self._before + time.perf_counter() - self.t0 - self._excluded

    def state_dict(self) -> dict[str, Any]:
        """Checkpointed (mid-fit too: the time up to the save) and handed back by spawned ranks."""
        return {"losses": list(self.losses), "samples": self.samples, "tokens": self.tokens, "seconds": self.elapsed()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses, self.samples = list(state["losses"]), int(state["samples"])
        self.tokens = int(state.get("tokens", 0))
        self.seconds = self._before = float(state["seconds"])

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.t0 = time.perf_counter()
        self._excluded = 0.0
        self._running = True

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._starts.append(time.perf_counter())

    def step_seconds(self) -> float | None:
        """Median wall time from one step's start to the next one's (data, forward, backward, optimizer, callbacks
        and logging: all a step costs), the first two steps (warm-up) left out; None under 4 steps. Why: the
        average over a short run is dominated by its first steps."""
        gaps = sorted(b - a for a, b in zip(self._starts[2:], self._starts[3:]))
        return round(gaps[len(gaps) // 2], 4) if gaps else None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and math.isfinite(v := float(loss.detach())):  # a skipped non-finite step: NonFiniteGuard
            self.losses.append(v)
        self.samples += batch_size(batch)
        if isinstance(batch, dict) and "attention_mask" in batch:
            tokens = int(batch["attention_mask"].sum())
            self.tokens += tokens
            if len(self._starts) and pl_module is not None and getattr(pl_module, "_trainer", None) is not None:
                rate = tokens / max(1e-9, time.perf_counter() - self._starts[-1])  # this step, start to end
                pl_module.log("train/tokens_per_second", rate, on_step=True, on_epoch=False, batch_size=1)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seconds = self.elapsed()
        self._running = False

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
            "tokens_per_second": round(self.tokens / self.seconds, 1) if self.seconds and self.tokens else None,
            "seconds_per_step": round(self.seconds / max(1, trainer.global_step), 3) if self.seconds else None,
            "step_seconds_median": self.step_seconds(),  # this process's steps only
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
        return {"curve": list(self.curve), "eval_seconds": self.eval_seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.curve = list(state["curve"])
        self.eval_seconds = float(state.get("eval_seconds", 0.0))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.t0 = time.perf_counter()
        if self.path is not None and trainer.is_global_zero and self.path.exists():
            write_jsonl(self.path, self.curve)  # a resumed run's file: the points after its checkpoint come again

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
        seconds = self.stats.elapsed() if self.stats is not None else time.perf_counter() - self.t0
        point = {"step": step, "train_seconds": round(seconds, 1), **metrics}
        self.curve.append(point)
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(dumps(point) + "\n")
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


class NonFiniteError(ValueError):
    """Training diverged (a NaN/inf loss, gradient or weight); a ValueError so train.py prints it as one line."""


class NonFiniteGuard(L.Callback):
    """Stops training at the first optimizer step whose loss or gradients are not finite, before the update is
    applied, so no checkpoint of a diverged state is ever written; ``policy="skip"`` drops that update instead
    (every step skipped is listed in ``skipped``, which the runner writes to metrics.json).

    Why: a NaN spreads through every weight in one step, and the run used to carry on to exit 0 with an
    all-NaN last.ckpt that a later ``init_from`` loaded. The decision is reduced over ranks (one NaN loss
    makes every rank's all-reduced gradients NaN anyway), so all ranks stop or skip together. Under fp16
    with a GradScaler an inf gradient is the scaler's business (it skips that step and lowers the scale):
    only the loss is checked there. ``on_save_checkpoint`` refuses to write non-finite weights and
    ``on_load_checkpoint`` to resume from them, whatever put them there.
    """

    def __init__(self, policy: str = "error"):
        if policy not in ("error", "skip"):
            raise ValueError(f"on_nonfinite={policy}: must be error or skip")
        self.policy = policy
        self.skipped: list[int] = []  # the steps (1-based optimizer steps) whose update was dropped
        self._bad_loss: float | None = None  # a non-finite loss seen since the last optimizer step

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": list(self.skipped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = list(state.get("skipped", []))

    def metrics(self) -> dict[str, Any]:
        """For metrics.json: how many updates were dropped, and at which steps (the first 100)."""
        return {"nonfinite_skipped": len(self.skipped), **({"nonfinite_steps": self.skipped[:100]} if self.skipped else {})}

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        if self._bad_loss is None and not bool(torch.isfinite(loss.detach()).all()):
            self._bad_loss = float(loss.detach().float().reshape(-1)[0])

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        step, bad_loss, self._bad_loss = trainer.global_step + 1, self._bad_loss, None
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        grads_ok = scaler is not None or _all_finite([p.grad for p in params])
        if trainer.strategy.reduce_boolean_decision(bad_loss is None and grads_ok, all=True):
            return
        if self.policy == "skip":
            for p in params:  # torch optimizers leave a parameter without a gradient untouched (moments included)
                p.grad = None
            self.skipped.append(step)
            return
        if bad_loss is not None:
            what = f"loss is {bad_loss}"
        elif not grads_ok:
            names = {id(p): n for n, p in pl_module.named_parameters()}
            first = next(p for p in params if not _all_finite([p.grad]))
            what = f"gradient of {names.get(id(first), '?')} is not finite"
        else:
            what = "another rank's loss or gradients are not finite"
        raise NonFiniteError(f"step {step}: {what}; training stopped before this update, so no checkpoint holds it "
                             f"(lower stage.optim.lr, or on_nonfinite=skip drops such steps)")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        _refuse_nonfinite(checkpoint.get("state_dict", {}), f"step {trainer.global_step}: not saving a checkpoint")

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        _refuse_nonfinite(checkpoint.get("state_dict", {}), "resume: that checkpoint cannot be resumed")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # a sharded (FSDP2) DTensor: this rank's shard


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """One device sync for any number of tensors."""
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(_local(t)).all() for t in tensors]).all())


def _refuse_nonfinite(state: dict[str, Any], what: str) -> None:
    for k, v in state.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not _all_finite([v]):
            raise NonFiniteError(f"{what}: weight {k} holds non-finite values (nan/inf)")
