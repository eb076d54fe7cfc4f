"""Issue 24: timed checkpoints, atomic checkpoint files, resume=auto and the resume checks (tasks.resume), and the
run statistics a resumed run carries (tasks.callbacks.RunStats)."""

from __future__ import annotations

import logging
from itertools import count
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

import tasks.resume
from tasks.callbacks import RunStats
from tests.unit.helpers import TinyLightning as Tiny
from tasks.resume import AtomicCheckpointIO, checkpoint_callbacks, find_own, resolve_resume, with_atomic_io

OWN = ("align", "smollm2:tiny", ["speech"])



def fit(tmp_path: Path, callbacks: list, max_steps: int, ckpt_path: str | None = None, **kw) -> L.Trainer:
    trainer = L.Trainer(max_steps=max_steps, callbacks=callbacks, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", plugins=with_atomic_io(None), **kw)
    trainer.fit(Tiny(), ckpt_path=ckpt_path)
    return trainer


@pytest.fixture
def saves(monkeypatch) -> list[int]:
    """The global_step of every checkpoint written, in order."""
    steps: list[int] = []
    real = AtomicCheckpointIO.save_checkpoint

    def spy(self, checkpoint, path, storage_options=None):
        steps.append(checkpoint["global_step"])
        real(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", spy)
    return steps


def one_minute_per_step(monkeypatch) -> None:
    """The timed checkpoint's clock advances a minute each time it is read (once at the start, once per step)."""
    minutes = count()
    monkeypatch.setattr(tasks.resume, "clock", lambda: 60.0 * next(minutes))


@pytest.mark.parametrize("accumulate", [1, 2])
def test_timed_checkpoint_saves_last_ckpt_every_n_minutes_at_optimizer_steps(tmp_path, monkeypatch, saves,
                                                                               accumulate):
    one_minute_per_step(monkeypatch)
    fit(tmp_path, checkpoint_callbacks(tmp_path / "checkpoints", None, 2), 7, accumulate_grad_batches=accumulate)
    assert saves == [2, 4, 6, 7]  # every 2 minutes, then the end of training
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 7
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt"]  # no temporary left


def test_no_timed_checkpoint_when_disabled_and_step_checkpoints_still_work(tmp_path, monkeypatch, saves):
    one_minute_per_step(monkeypatch)
    fit(tmp_path, checkpoint_callbacks(tmp_path / "checkpoints", None, None), 7)
    assert saves == [7]
    saves.clear()
    fit(tmp_path / "b", checkpoint_callbacks(tmp_path / "b" / "checkpoints", 3, 4), 7)
    assert saves == [3, 4, 6, 7]  # steps 3 and 6, 4 minutes in, the end
    with pytest.raises(ValueError, match=r"^checkpoint_minutes=0: must be > 0"):
        checkpoint_callbacks(tmp_path, None, 0)


def test_a_save_killed_before_it_completes_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"w": torch.ones(3)}, path)

    def killed(*args):
        raise KeyboardInterrupt  # the job is killed once the new bytes are written, before they take the name

    monkeypatch.setattr(tasks.resume.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(3)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_a_configured_checkpoint_io_is_kept():
    mine = AtomicCheckpointIO()
    assert with_atomic_io([mine]) == [mine] and isinstance(with_atomic_io(None)[0], AtomicCheckpointIO)
    assert with_atomic_io("bitsandbytes")[0] == "bitsandbytes" and len(with_atomic_io("bitsandbytes")) == 2


def ckpt(step: int = 5, stage: str = "align", llm: str = "smollm2:tiny", modalities=("speech",), w: float = 1.0,
         **drop) -> dict:
    c = {"state_dict": {"w": torch.full((2,), w)}, "optimizer_states": [{}], "loops": {}, "global_step": step,
         "mmlm": {"stage": stage, "llm": llm, "modalities": list(modalities)}}
    return {k: v for k, v in c.items() if k not in drop}


def save(path: Path, value: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(value, path)
    return path


def test_resume_auto_takes_the_newest_complete_finite_checkpoint(tmp_path, caplog):
    good = save(tmp_path / "checkpoints" / "step4.ckpt", ckpt(step=4))
    save(tmp_path / "checkpoints" / "nan.ckpt", ckpt(step=6, w=float("nan")))
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(good.read_bytes()[:200])  # torn (newest)
    with caplog.at_level(logging.INFO, logger="tasks.resume"):
        found = resolve_resume("auto", tmp_path, *OWN)
    assert found is not None and found.path == good and found.step == 4
    text = caplog.text
    assert "skipping" in text and "last.ckpt: not a readable checkpoint" in text and "non-finite" in text
    assert f"resuming from {good} (step 4)" in text


@pytest.mark.parametrize("files", [[], ["last.ckpt"]])
def test_resume_auto_without_a_good_checkpoint_starts_fresh_saying_so(tmp_path, caplog, files):
    for name in files:
        save(tmp_path / "checkpoints" / name, ckpt(w=float("inf")))
    with caplog.at_level(logging.INFO, logger="tasks.resume"):
        assert resolve_resume("auto", tmp_path, *OWN) is None
    assert f"resume=auto: no complete checkpoint in {tmp_path / 'checkpoints'}; starting fresh" in caplog.text


def test_resume_auto_refuses_another_runs_checkpoint_rather_than_overwrite_it(tmp_path):
    save(tmp_path / "checkpoints" / "last.ckpt", ckpt(stage="instruct"))
    with pytest.raises(ValueError, match=r"a stage=instruct checkpoint, this run is stage=align \(init_from="):
        find_own(tmp_path / "checkpoints", *OWN)


@pytest.mark.parametrize("value, error", [
    (ckpt(), None),
    ("text", r"not a readable checkpoint \("),
    ({"state_dict": {}}, r"not an mmlm checkpoint"),
    (ckpt(loops=1, optimizer_states=1), r"not a training checkpoint \(no optimizer_states, loops; init_from="),
    (ckpt(llm="llama"), r"trained with llm=llama, this run uses llm=smollm2:tiny$"),
    (ckpt(modalities=("stock",)), r"trained with modality \['stock'\], this run has \['speech'\]$"),
    (ckpt(stage="instruct"), r"a stage=instruct checkpoint, this run is stage=align"),
    (ckpt(w=float("nan")), r"weight w holds non-finite values"),
])
def test_an_explicit_resume_must_be_this_runs_complete_checkpoint(tmp_path, value, error):
    path = tmp_path / "x.ckpt"
    if isinstance(value, str):
        path.write_text(value)
    else:
        save(path, value)
    if error is None:
        assert resolve_resume(str(path), tmp_path, *OWN) == tasks.resume.Resume(path, 5)
        return
    with pytest.raises(ValueError, match=rf"^resume={path}: .*{error}") as e:
        resolve_resume(str(path), tmp_path, *OWN)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=rf"^resume={tmp_path}/nope.ckpt: no such checkpoint file$"):
        resolve_resume(str(tmp_path / "nope.ckpt"), tmp_path, *OWN)


def test_run_stats_carry_the_training_time_up_to_a_mid_run_checkpoint(tmp_path):
    stats = RunStats()
    fit(tmp_path, [stats, *checkpoint_callbacks(tmp_path / "checkpoints", 2, None)], 4)
    whole = stats.seconds
    mid = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]["RunStats"]
    assert len(mid["losses"]) == 4 and 0 < mid["seconds"] <= whole  # saved at the end: the whole fit's time

    stats = RunStats()
    fit(tmp_path / "a", [stats, *checkpoint_callbacks(tmp_path / "a" / "checkpoints", 2, None)], 2)
    at2 = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]["RunStats"]
    assert at2["seconds"] > 0 and len(at2["losses"]) == 2  # before: 0.0 here, so a resume divided less time
    resumed = RunStats()
    trainer = fit(tmp_path / "b", [resumed], 4, ckpt_path=str(tmp_path / "a" / "checkpoints" / "last.ckpt"))
    summary = resumed.summary(trainer, trainer.lightning_module)
    assert resumed.seconds > at2["seconds"] and resumed.losses[:2] == at2["losses"] and len(resumed.losses) == 4
    assert summary["first_loss"] == at2["losses"][0]
    assert summary["seconds_per_step"] == round(resumed.seconds / 4, 3)


def test_a_resumed_learning_curve_file_drops_the_points_after_the_checkpoint(tmp_path):
    from types import SimpleNamespace

    from tasks.callbacks import PeriodicEval

    path = tmp_path / "curve.jsonl"
    path.write_text('{"step": 2, "wer": 0.9}\n{"step": 4, "wer": 0.8}\n')  # step 4: measured after the checkpoint
    curve = PeriodicEval(loader=None, every_n_steps=2, max_new_tokens=4, path=path)
    curve.load_state_dict({"curve": [{"step": 2, "wer": 0.9}], "eval_seconds": 1.5})
    curve.on_train_start(SimpleNamespace(is_global_zero=True), None)
    assert path.read_text() == '{"step": 2, "wer": 0.9}\n' and curve.eval_seconds == 1.5


class Wider(Tiny):
    """Another architecture: one more trainable weight than Tiny."""

    def __init__(self) -> None:
        super().__init__()
        self.extra = nn.Linear(2, 1)


class FrozenHalf(Tiny):
    """Tiny with its bias frozen: a checkpoint of Tiny holds a weight this model does not train."""

    def __init__(self) -> None:
        super().__init__()
        self.w.bias.requires_grad_(False)


@pytest.mark.parametrize("other, error", [(Wider, r"holds no 2 of this model's trainable weight\(s\) \(extra.bias, "
                                                  r"extra.weight\)"),
                                         (FrozenHalf, r"holds 1 weight\(s\) this model does not train \(w.bias\)")])
def test_resume_refuses_a_checkpoint_of_another_trainable_set(tmp_path, other, error):
    from tasks.checkpoint import TrainableOnlyCheckpoint

    cbs = lambda: [*checkpoint_callbacks(tmp_path / "ck", None, None), TrainableOnlyCheckpoint({"stage": "align"})]
    fit(tmp_path, cbs(), 2, default_root_dir=tmp_path)
    last = str(tmp_path / "ck" / "last.ckpt")
    trainer = L.Trainer(max_steps=4, callbacks=cbs(), logger=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", plugins=with_atomic_io(None), default_root_dir=tmp_path)
    model = other()
    model.strict_loading = False  # as MultimodalLM: checkpoints hold only what trains
    with pytest.raises(ValueError, match=error):
        trainer.fit(model, ckpt_path=last)
    fit(tmp_path, cbs(), 4, ckpt_path=last, default_root_dir=tmp_path)  # the same trainable set resumes
