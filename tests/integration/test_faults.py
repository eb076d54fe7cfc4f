"""Issue 24's fault injection, through the real train.py / runner on the tiny stock forecaster (test_hardening's
SMALL config): a run SIGKILLed at a random step resumes with resume=auto from its last checkpoint with its logs
intact; a NaN injected at a chosen step stops the run naming that step, leaving only finite checkpoints (or, with
on_nonfinite=skip, drops and counts that step); a disk that fills up while the second checkpoint is written fails
the run loudly and leaves the first checkpoint intact, with no partial file for resume=auto to pick.

The kill step and the NaN step are drawn from a seed printed in every assertion message; ``FAULT_SEED=<n>``
replays a failure.
"""

from __future__ import annotations

import csv
import errno
import io
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import tasks.resume
from modality.stock.plugin import StockModality
from tasks.callbacks import NonFiniteError
from tasks.resume import Resume, find_own, read_resumable
from tasks.runner import run
from tests.integration.test_hardening import ROOT, SMALL, cfg_for

pytestmark = [pytest.mark.slow]
SEED = int(os.environ.get("FAULT_SEED") or random.SystemRandom().randrange(1 << 31))
WHY = f"(replay with FAULT_SEED={SEED})"
FORECAST = SMALL + ["stage=forecast", "data.tickers=[IBM_2000]", "data.batch_size=32", "checkpoint_minutes=null",
                    "trainer.log_every_n_steps=1", "trainer.limit_val_batches=1"]
OWN = ("forecast", None, ["stock"])  # this run's stage, LLM, modalities: what resume=auto accepts


def rng(case: str) -> random.Random:
    return random.Random(f"{SEED}-{case}")


def csv_rows(out: Path) -> list[dict[str, str]]:
    with (out / "metrics.csv").open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def steps_with(rows: list[dict[str, str]], column: str) -> list[int]:
    """The step of every row with a value in ``column``, in file order (a step logged twice shows twice)."""
    return [int(r["step"]) for r in rows if r.get(column)]


def filled(row: dict[str, str]) -> dict[str, str]:
    """A metrics.csv row's values (a later run adds columns, empty in the earlier rows)."""
    return {k: v for k, v in row.items() if v not in ("", None)}


def step_of(ckpt: Path) -> int:
    return int(torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["global_step"])


def all_finite(ckpt: Path) -> bool:
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    return bool(state) and all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


def start_train_py(args: list[str], out: Path, log: str) -> tuple[subprocess.Popen, Path]:
    """``python train.py`` in its own process group (its Hydra run dir under ``out`` too); output to a file."""
    out.mkdir(parents=True, exist_ok=True)
    log_path = out.parent / f"{out.name}.{log}.log"
    with log_path.open("w") as f:
        p = subprocess.Popen([sys.executable, "train.py", *args, f"paths.output_dir={out}",
                              f"hydra.run.dir={out}/.hydra_run"], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                             start_new_session=True, env={k: v for k, v in os.environ.items() if k != "MMLM_TRACEBACK"})
    return p, log_path


def test_a_run_sigkilled_at_a_random_step_resumes_from_its_checkpoint_with_no_rows_lost(tmp_path):
    steps, every, r = 120, 5, rng("kill")
    kill_at, delay = r.randrange(2 * every, steps - 4 * every), r.uniform(0.0, 0.25)
    args = FORECAST + [f"trainer.max_steps={steps}", f"checkpoint_every={every}", "trainer.val_check_interval=25"]
    out, last = tmp_path / "run", tmp_path / "run" / "checkpoints" / "last.ckpt"
    why = f"kill at step >= {kill_at} + {delay:.2f}s {WHY}"

    p, log = start_train_py(args, out, "killed")
    try:
        deadline = time.monotonic() + 240
        while not (last.exists() and step_of(last) >= kill_at):
            assert p.poll() is None, f"train.py ended (rc {p.returncode}) before step {kill_at} {why}\n" \
                                     f"{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no checkpoint at step >= {kill_at} in 240 s {why}"
            time.sleep(0.01)
        time.sleep(delay)  # anywhere in a later step, a checkpoint write included
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL, why
    k = step_of(last)
    assert kill_at <= k < steps, f"killed with last.ckpt at step {k} {why}"
    assert read_resumable(last)["global_step"] == k, why  # complete and finite: what resume=auto will read
    before = csv_rows(out)
    assert sorted(set(steps_with(before, "train/loss"))) == list(range(max(steps_with(before, "train/loss")) + 1))
    assert max(steps_with(before, "train/loss")) >= k - 1, f"rows up to the checkpoint were not on disk {why}"

    p, log = start_train_py(args + ["resume=auto"], out, "resumed")
    assert p.wait(timeout=300) == 0, f"the resumed run failed {why}\n{log.read_text()[-3000:]}"
    text = log.read_text()
    assert f"resume=auto: resuming from {last} (step {k})" in text, f"{why}\n{text[-3000:]}"
    kept = [row for row in before if int(row["step"]) < k]
    assert f"resume: step {k} from {last} ({len(kept)} logged rows kept)" in text, why

    import json

    m = json.loads((out / "metrics.json").read_text())
    assert m["resumed_at"] == k and m["steps"] == steps, f"{m} {why}"
    assert step_of(last) == steps and read_resumable(last)["global_step"] == steps, why
    assert find_own(out / "checkpoints", *OWN) == Resume(last, steps), why

    after = csv_rows(out)
    # the rows written before the checkpoint survive as written; every step is logged once (none lost, none twice:
    # a restart from step 0 would log steps 0..k-1 again)
    assert [filled(r) for r in after[: len(kept)]] == [filled(r) for r in kept], f"rows before step {k} changed {why}"
    for column in ("train/loss", "lr-AdamW"):
        assert sorted(steps_with(after, column)) == list(range(steps)), f"{column} {why}"
    assert m["first_loss"] == pytest.approx(float(next(r["train/loss"] for r in before if r["train/loss"]))), why


@pytest.fixture
def nan_at(monkeypatch) -> int:
    """The 1-based optimizer step whose loss is NaN: the forecaster's training loss is poisoned there (the
    framework itself is unchanged)."""
    step = rng("nan").randrange(5, 12)
    real = StockModality.training_step

    def poisoned(self, batch, batch_idx):
        loss = real(self, batch, batch_idx)
        return loss * float("nan") if self.trainer.global_step + 1 == step else loss

    monkeypatch.setattr(StockModality, "training_step", poisoned)
    return step


def test_a_nan_at_a_chosen_step_stops_the_run_naming_it_and_keeps_the_last_good_checkpoint(nan_at, tmp_path):
    every, good = 4, (nan_at - 1) // 4 * 4
    why = f"NaN at step {nan_at} {WHY}"
    args = FORECAST + ["trainer.max_steps=12", f"checkpoint_every={every}", "trainer.val_check_interval=50",
                       f"paths.output_dir={tmp_path}"]
    with pytest.raises(NonFiniteError, match=rf"^step {nan_at}: loss is nan; training stopped before this update"):
        run(cfg_for(args))
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt"], why  # no partial or later file
    assert all(all_finite(c) for c in tmp_path.rglob("*.ckpt")), why
    assert step_of(ckpts / "last.ckpt") == good, why  # the checkpoint_every save before the NaN
    assert find_own(ckpts, *OWN) == Resume(ckpts / "last.ckpt", good), why
    assert not (tmp_path / "metrics.json").exists(), why  # a failed run does not report success


def test_on_nonfinite_skip_drops_the_nan_step_and_counts_it(nan_at, tmp_path):
    why = f"NaN at step {nan_at} {WHY}"
    m = run(cfg_for(FORECAST + ["trainer.max_steps=12", "checkpoint_every=4", "trainer.val_check_interval=50",
                                "on_nonfinite=skip", f"paths.output_dir={tmp_path}"]))
    assert m["steps"] == 12 and m["nonfinite_skipped"] == 1 and m["nonfinite_steps"] == [nan_at], f"{m} {why}"
    import json

    assert json.loads((tmp_path / "metrics.json").read_text())["nonfinite_steps"] == [nan_at], why
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert step_of(last) == 12 and all_finite(last), why  # the NaN update was dropped, not applied


class DiskFullOnSecondSave:
    """``torch`` as tasks.resume sees it, whose ``save`` fills the disk halfway through the second checkpoint: half
    of the checkpoint's bytes reach the temporary file, then ENOSPC (every other use of torch is the real one)."""

    def __init__(self) -> None:
        self.saves = 0
        self.partial: Path | None = None
        self.partial_bytes = 0

    def __getattr__(self, name: str):
        return getattr(torch, name)

    def save(self, obj, f, *args, **kwargs) -> None:
        self.saves += 1
        if self.saves != 2:
            return torch.save(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        torch.save(obj, buf)
        f.write(buf.getvalue()[: buf.tell() // 2])
        f.flush()
        self.partial = Path(os.readlink(f"/proc/self/fd/{f.fileno()}"))
        self.partial_bytes = self.partial.stat().st_size
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_disk_full_during_a_checkpoint_write_fails_loudly_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    full = DiskFullOnSecondSave()
    monkeypatch.setattr(tasks.resume, "torch", full)
    args = FORECAST + ["trainer.max_steps=9", "checkpoint_every=3", "trainer.val_check_interval=50",
                       f"paths.output_dir={tmp_path}"]
    with pytest.raises(OSError) as failed:
        run(cfg_for(args))
    # the write's error, naming the checkpoint it could not write (a bare ENOSPC names no file)
    assert failed.value.errno == errno.ENOSPC and failed.value.filename == str(tmp_path / "checkpoints" / "last.ckpt")
    assert full.saves == 2 and full.partial_bytes > 0 and full.partial.parent == tmp_path / "checkpoints"
    assert not full.partial.exists()  # the torn temporary file is removed
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt"]
    last = ckpts / "last.ckpt"
    assert read_resumable(last)["global_step"] == 3 and all_finite(last)  # the first checkpoint, intact
    assert find_own(ckpts, *OWN) == Resume(last, 3)
    assert not (tmp_path / "metrics.json").exists()

    monkeypatch.setattr(tasks.resume, "torch", torch)  # space again: resume=auto continues from step 3
    m = run(cfg_for(args + ["resume=auto"]))
    assert m["resumed_at"] == 3 and m["steps"] == 9 and step_of(last) == 9
