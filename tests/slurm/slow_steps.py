"""Test-only: a Hydra callback that makes every training step of the job take at least ``seconds``.

Why: the requeue test must signal a job between its first checkpoint and its end; a tiny run is over in a
second. Hydra calls ``on_job_start`` inside the SLURM job (the callback travels in submitit's pickle), where it
adds a sleeping Lightning callback to the trainer ``tasks.runner`` builds. Nothing outside tests/ uses it.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
from hydra.experimental.callback import Callback


class _Sleep(L.Callback):
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args: Any) -> None:
        time.sleep(self.seconds)


class SlowSteps(Callback):
    """``+hydra.callbacks.slow._target_=tests.slurm.slow_steps.SlowSteps +hydra.callbacks.slow.seconds=0.3``."""

    def __init__(self, seconds: float) -> None:
        self.seconds = float(seconds)

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        from tasks import runner

        build = runner.build_trainer
        if getattr(build, "slowed", False):
            return

        def slowed(cfg: Any, out: Any, callbacks: list[L.Callback]) -> L.Trainer:
            return build(cfg, out, [*callbacks, _Sleep(self.seconds)])

        slowed.slowed = True  # type: ignore[attr-defined]
        runner.build_trainer = slowed
