import os
import time

import pytest

import lightning as L
import torch
from torch import nn

from tasks.callbacks import StopFile
from tests.unit.helpers import TinyLightning as Tiny


class TouchAt(L.Callback):
    def __init__(self, path, step):
        self.path, self.step = path, step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            self.path.touch()


def fit(callbacks, max_steps=20):
    trainer = L.Trainer(max_steps=max_steps, callbacks=callbacks, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(Tiny())
    return trainer


def test_stop_file_ends_the_run_after_the_current_step(tmp_path):
    stop = StopFile(tmp_path / "STOP")
    trainer = fit([TouchAt(tmp_path / "STOP", 3), stop])
    assert trainer.global_step == 3 and stop.stopped_at == 3


def test_a_stale_stop_file_from_an_earlier_run_is_ignored(tmp_path):
    (tmp_path / "STOP").touch()
    old = time.time() - 3600
    os.utime(tmp_path / "STOP", (old, old))
    stop = StopFile(tmp_path / "STOP")
    trainer = fit([stop], max_steps=5)
    assert trainer.global_step == 5 and stop.stopped_at is None


def test_a_stale_stop_file_touched_again_during_the_run_stops_it(tmp_path):
    (tmp_path / "STOP").touch()
    old = time.time() - 3600
    os.utime(tmp_path / "STOP", (old, old))
    stop = StopFile(tmp_path / "STOP")
    trainer = fit([TouchAt(tmp_path / "STOP", 2), stop])
    assert trainer.global_step == 2 and stop.stopped_at == 2


def test_run_stats_leave_excluded_evaluation_time_out_of_training_time(monkeypatch):
    import tasks.callbacks as cb

    clock = iter([100.0, 130.0])
    monkeypatch.setattr(cb.time, "perf_counter", lambda: next(clock))
    stats = cb.RunStats()
    stats.on_train_start(None, None)
    stats.exclude(12.5)  # an evaluation inside the fit
    stats.on_train_end(None, None)
    assert stats.seconds == pytest.approx(17.5)


def test_run_stats_step_time_is_the_median_gap_between_step_starts_after_warm_up(monkeypatch):
    import tasks.callbacks as cb

    starts = iter([0.0, 9.0, 12.0, 13.0, 14.5, 15.5, 16.5, 30.0])  # two slow warm-up steps, then ~1 s, one 13.5 s
    monkeypatch.setattr(cb.time, "perf_counter", lambda: next(starts))
    stats = cb.RunStats()
    assert stats.step_seconds() is None
    for i in range(8):
        stats.on_train_batch_start(None, None, None, i)
    assert stats.step_seconds() == 1.0  # gaps from the third start: 1, 1.5, 1, 1, 13.5


def test_run_stats_count_attended_tokens_and_carry_them_through_a_resume():
    import tasks.callbacks as cb

    stats = cb.RunStats()
    batch = {"input_ids": torch.zeros(2, 5, dtype=torch.long),
             "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])}
    for i in range(3):
        stats.on_train_batch_end(None, None, torch.tensor(1.0), batch, i)
    assert stats.tokens == 24 and stats.samples == 6  # padding is not a token trained on
    again = cb.RunStats()
    again.load_state_dict(stats.state_dict())
    assert again.tokens == 24
    stats.seconds = 2.0

    class Trainer:
        global_step = 3

    assert stats.summary(Trainer(), torch.nn.Linear(1, 1))["tokens_per_second"] == 12.0
