"""Issue 24 through the real Hydra config and runner (tiny LLM, tiny speech chain): a run killed after a timed
checkpoint continues with resume=auto, and its logs read as the uninterrupted run's (metrics.csv rows before the
checkpoint kept once, first_loss the run's first, seconds per step over all steps); resume=auto with nothing to
resume starts fresh; a file that is not this run's checkpoint is one line from train.py."""

from __future__ import annotations

import csv
import json
import logging
import subprocess
import sys
from itertools import count
from pathlib import Path

import pytest
import torch

import tasks.resume
from tasks import runner
from tasks.callbacks import StopFile
from tasks.resume import AtomicCheckpointIO
from tasks.runner import run
from tests.integration.test_pipeline import ROOT, TINY, cfg_for


class Killed(RuntimeError):
    """Stands in for a job killed mid-run (a time limit, pre-emption)."""


def common(corpus: Path, out: Path, steps: int) -> list[str]:
    return TINY + ["stage=align", "eval.before=false", "data.eval_files=null", "trainer.log_every_n_steps=1",
                   f"trainer.max_steps={steps}", f"data.train_files={corpus}/train.jsonl",
                   f"data.val_files={corpus}/val.jsonl", f"paths.output_dir={out}"]


def rows(out: Path, column: str = "train/loss") -> dict[int, list[str]]:
    """metrics.csv's values of ``column`` per step (a list: a step logged twice shows as two values)."""
    got: dict[int, list[str]] = {}
    with (out / "metrics.csv").open(newline="") as f:
        for r in csv.DictReader(f):
            if r.get(column):
                got.setdefault(int(r["step"]), []).append(r[column])
    return got


@pytest.fixture(scope="module")
def whole(speech_corpus, tmp_path_factory) -> tuple[Path, dict]:
    """The uninterrupted run the resumed one must read like."""
    out = tmp_path_factory.mktemp("whole")
    return out, run(cfg_for(common(speech_corpus, out, 4)))


def test_a_killed_run_resumes_from_its_timed_checkpoint_with_its_logs_intact(speech_corpus, whole, tmp_path,
                                                                              monkeypatch, caplog):
    whole_out, whole_metrics = whole
    saved: list[int] = []
    real_save = AtomicCheckpointIO.save_checkpoint

    def spy(self, checkpoint, path, storage_options=None):
        saved.append(checkpoint["global_step"])
        real_save(self, checkpoint, path, storage_options)

    class KilledAfterStep3(StopFile):
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == 3:
                raise Killed("killed")

    minutes = count()
    monkeypatch.setattr(tasks.resume, "clock", lambda: 60.0 * next(minutes))  # a minute per step
    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", spy)
    monkeypatch.setattr(runner, "StopFile", KilledAfterStep3)
    with pytest.raises(Killed):
        run(cfg_for(common(speech_corpus, tmp_path, 4) + ["checkpoint_minutes=2"]))
    assert saved == [2]  # the timed checkpoint, 2 minutes in; then killed after step 3, before any other save
    assert sorted(rows(tmp_path)) == [0, 1, 2]  # the killed process logged step 2 after its checkpoint
    at2 = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]["RunStats"]
    assert len(at2["losses"]) == 2 and at2["seconds"] > 0

    monkeypatch.setattr(runner, "StopFile", StopFile)
    with caplog.at_level(logging.INFO, logger="tasks.resume"):
        m = run(cfg_for(common(speech_corpus, tmp_path, 4) + ["resume=auto"]))
    assert f"resuming from {tmp_path / 'checkpoints' / 'last.ckpt'} (step 2)" in caplog.text
    assert m["resumed_at"] == 2 and m["steps"] == 4
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4

    # metrics.csv: the rows before the checkpoint survive as written, every step once (step 2 again, not twice)
    resumed, uninterrupted = rows(tmp_path), rows(whole_out)
    assert sorted(resumed) == sorted(uninterrupted) == [0, 1, 2, 3]
    assert all(len(v) == 1 for v in resumed.values())
    assert resumed[0] == uninterrupted[0] and resumed[1] == uninterrupted[1]
    assert sorted(rows(tmp_path, "val/loss")) == sorted(rows(whole_out, "val/loss"))
    # metrics.json: the run's first loss (from before the kill), time and steps over the whole run
    assert m["first_loss"] == pytest.approx(whole_metrics["first_loss"], abs=1e-6)
    assert m["first_loss"] == at2["losses"][0] and m["train_seconds"] > at2["seconds"]  # the killed process's time too
    assert m["seconds_per_step"] == pytest.approx(m["train_seconds"] / 4, abs=3e-3)
    assert json.loads((tmp_path / "metrics.json").read_text())["resumed_at"] == 2


def test_resume_auto_without_a_checkpoint_starts_fresh(speech_corpus, whole, tmp_path, caplog):
    _, whole_metrics = whole
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"torn")  # a checkpoint cut off by a kill (pre-atomic)
    with caplog.at_level(logging.INFO, logger="tasks.resume"):
        m = run(cfg_for(common(speech_corpus, tmp_path, 4) + ["resume=auto"]))
    assert "last.ckpt: not a readable checkpoint" in caplog.text
    assert f"resume=auto: no complete checkpoint in {tmp_path / 'checkpoints'}; starting fresh" in caplog.text
    assert "resumed_at" not in m and m["steps"] == 4 and sorted(rows(tmp_path)) == [0, 1, 2, 3]
    assert m["first_loss"] == pytest.approx(whole_metrics["first_loss"], abs=1e-6)
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4


@pytest.mark.slow
def test_train_py_refuses_a_resume_that_is_not_this_runs_checkpoint_in_one_line(whole, tmp_path):
    whole_out, _ = whole
    not_ckpt = tmp_path / "notes.ckpt"
    not_ckpt.write_text("not a checkpoint")
    for resume, error in [(not_ckpt, f"error: resume={not_ckpt}: not a readable checkpoint ("),
                          (whole_out / "checkpoints" / "last.ckpt",
                           (f"error: resume={whole_out}/checkpoints/last.ckpt: a stage=align checkpoint, this run is "
                            f"stage=forecast (init_from= starts a new stage from it)"))]:
        p = subprocess.run([sys.executable, "train.py", "stage=forecast", "modality=stock", f"resume={resume}",
                            "modality.context=64", "modality.d_model=32", "modality.n_heads=2", "modality.n_layers=1",
                            "modality.d_ff=64", "data.tickers=[IBM_2000]", f"paths.output_dir={tmp_path}/out"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
        errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
        assert p.returncode == 2 and len(errors) == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
        assert errors[0].startswith(error), errors[0]
