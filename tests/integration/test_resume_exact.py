"""Issue 21: resume= is exact mid-epoch. A run stopped or killed after step k of an epoch (k not at an epoch's end) and
resumed trains on the batches the uninterrupted run trained on, in its order, with its random state (dropout): its
per-step losses are the uninterrupted run's, step for step, into the next epoch too.

Through the real runner: the tiny stock forecaster (stage=forecast: its own datamodule's plain shuffled DataLoader,
made resumable by tasks.resume.ExactResume) killed after a checkpoint_every save at a step that also validates, and
the tiny speech chain (stage=align: ConversationDataModule's length-grouped loader) stopped by its STOP file.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from modality.stock.plugin import StockModality
from tasks import runner
from tasks.callbacks import StopFile
from tasks.multimodal import MultimodalLM
from tasks.runner import run
from tests.integration import test_hardening, test_pipeline

pytestmark = [pytest.mark.slow]


class Killed(RuntimeError):
    """Stands in for a job killed mid-run (a time limit, pre-emption)."""


class Steps:
    """Every training step a run takes: (global step, batch index in its epoch, the batch's sample ids, the loss),
    recorded by wrapping ``cls.training_step`` (the framework itself is unchanged); ``kill_at``: raise Killed there
    instead of training that step."""

    def __init__(self, monkeypatch, cls: type, ids) -> None:
        self.runs: dict[str, list[tuple[int, int, list, torch.Tensor]]] = {}
        self.tag, self.kill_at = "", None
        real = cls.training_step

        def recorded(model, batch, batch_idx):
            step = model.trainer.global_step
            if step == self.kill_at:
                raise Killed(f"killed at step {step}")
            loss = real(model, batch, batch_idx)
            self.runs[self.tag].append((step, batch_idx, ids(batch), loss.detach().clone()))
            return loss

        monkeypatch.setattr(cls, "training_step", recorded)

    def start(self, tag: str, kill_at: int | None = None) -> None:
        self.tag, self.kill_at = tag, kill_at
        self.runs[tag] = []

    def steps(self, tag: str) -> list[int]:
        return [s for s, *_ in self.runs[tag]]

    def batches(self, tag: str) -> list[tuple[int, list]]:
        return [(s, ids) for s, _, ids, _ in self.runs[tag]]

    def losses(self, tag: str) -> torch.Tensor:
        return torch.stack([loss for *_, loss in self.runs[tag]])


def csv_losses(out: Path) -> dict[int, float]:
    with (out / "metrics.csv").open(newline="") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def assert_resumed_as_uninterrupted(rec: Steps, whole: Path, resumed: Path, k: int, steps: int) -> None:
    starts = [s for s, batch_idx, *_ in rec.runs["whole"] if batch_idx == 0]  # the first step of each epoch
    assert k not in starts and any(k < s < steps for s in starts), f"not mid-epoch / no later epoch: {starts}"
    assert rec.batches("interrupted") == rec.batches("whole")[:k]
    assert rec.steps("resumed") == list(range(k, steps))
    # the rest of the epoch and the next one: the same samples in the same batches, in the same order
    assert rec.batches("resumed") == rec.batches("whole")[k:]
    # the same random state (dropout) with the same weights and optimizer: the same losses
    assert torch.allclose(rec.losses("resumed"), rec.losses("whole")[k:])
    logged, uninterrupted = csv_losses(resumed), csv_losses(whole)
    assert sorted(logged) == sorted(uninterrupted) == list(range(steps))
    assert torch.allclose(torch.tensor([logged[s] for s in range(steps)]),
                          torch.tensor([uninterrupted[s] for s in range(steps)]))


def test_a_forecaster_killed_mid_epoch_resumes_with_the_uninterrupted_runs_batches_and_losses(tmp_path,
                                                                                               monkeypatch):
    # 217 training windows (stride 10): epochs of 6 batches of 32; validation every 3 steps, at the checkpoint too
    steps, k = 16, 9
    args = test_hardening.SMALL + [
        "stage=forecast", "data.tickers=[IBM_2000]", "data.batch_size=32", "data.stride=10", "checkpoint_minutes=null",
        "trainer.log_every_n_steps=1", "trainer.limit_val_batches=1", "trainer.val_check_interval=3",
        f"trainer.max_steps={steps}", f"checkpoint_every={k}"]
    rec = Steps(monkeypatch, StockModality, lambda b: list(zip(b["series"].tolist(), b["anchor"].tolist())))

    rec.start("whole")
    run(test_hardening.cfg_for(args + [f"paths.output_dir={tmp_path}/whole"]))
    rec.start("interrupted", kill_at=k)  # killed in step k + 1, after last.ckpt of step k was saved
    with pytest.raises(Killed):
        run(test_hardening.cfg_for(args + [f"paths.output_dir={tmp_path}/run"]))
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == k
    assert last["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches": k - 6}]
    rec.start("resumed")
    m = run(test_hardening.cfg_for(args + [f"paths.output_dir={tmp_path}/run", "resume=auto"]))
    assert m["resumed_at"] == k and m["steps"] == steps
    assert_resumed_as_uninterrupted(rec, tmp_path / "whole", tmp_path / "run", k, steps)


def test_a_speech_run_stopped_mid_epoch_by_its_stop_file_resumes_exactly(speech_corpus, tmp_path, monkeypatch):
    steps, k = 14, 6  # epochs of 9 length-grouped batches; the stop validates (Lightning does, on should_stop)
    c = speech_corpus
    args = test_pipeline.TINY + [  # time masks at random places: a random state to restore
        "stage=align", "eval.before=false", "data.eval_files=null", "data.group_by_length=true", "modality.time_mask=0.3",
        "checkpoint_minutes=null", "trainer.log_every_n_steps=1", f"trainer.max_steps={steps}",
        f"data.train_files={c}/train.jsonl", f"data.val_files={c}/val.jsonl"]
    rec = Steps(monkeypatch, MultimodalLM, lambda b: list(b["ids"]))

    class TouchedAtK(StopFile):  # stands in for a user's `touch <output_dir>/STOP` during step k
        def on_train_batch_end(self, trainer, *rest):
            if trainer.global_step == k:
                self.path.touch()
            super().on_train_batch_end(trainer, *rest)

    rec.start("whole")
    run(test_pipeline.cfg_for(args + [f"paths.output_dir={tmp_path}/whole"]))
    monkeypatch.setattr(runner, "StopFile", TouchedAtK)
    rec.start("interrupted")
    stopped = run(test_pipeline.cfg_for(args + [f"paths.output_dir={tmp_path}/run"]))
    assert stopped["stopped_early_at"] == k
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == k
    assert last["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 0, "batches": k}]
    monkeypatch.setattr(runner, "StopFile", StopFile)
    rec.start("resumed")
    m = run(test_pipeline.cfg_for(args + [f"paths.output_dir={tmp_path}/run", "resume=auto"]))
    assert m["resumed_at"] == k and m["steps"] == steps
    assert_resumed_as_uninterrupted(rec, tmp_path / "whole", tmp_path / "run", k, steps)
