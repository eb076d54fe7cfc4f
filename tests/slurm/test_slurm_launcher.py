"""``python train.py -m hydra/launcher=slurm ...`` on a real one-node SLURM cluster (tests/slurm/conftest.py):
a 2-job sweep runs as a SLURM array through submitit and its summary lists both jobs; a job pre-empted mid-run
(SIGUSR2, the signal submitit handles, as SLURM sends it before the time limit) is requeued by submitit into the
SAME output dir and resumes from its own last checkpoint (resume unset: ``resume=auto`` inside a SLURM job).

The sweep dir holds ``${now:...%f}`` (microseconds): a requeued job that resolved it again would write elsewhere.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
# the fastest real run: the stock forecaster alone (no LLM), a few steps on one packaged series
TINY = ["stage=forecast", "modality=stock", "modality.context=64", "modality.d_model=32", "modality.n_heads=2",
        "modality.n_layers=1", "modality.d_ff=64", "trainer.enable_model_summary=false", "trainer.accelerator=cpu",
        "trainer.limit_val_batches=1", "data.batch_size=8", "data.tickers=[IBM_2000]", "checkpoint_minutes=null"]
# one CPU, no GPU per job (slurm.yaml asks for trainer.devices GPUs and 8 CPUs per task)
LAUNCHER = ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.timeout_min=30"]


def sweep_cmd(tmp: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "-m", *LAUNCHER, *TINY, *overrides,
            f"hydra.sweep.dir={tmp}/sweep_${{now:%H-%M-%S-%f}}"]


def job_env(cluster) -> dict[str, str]:
    return {**cluster.env, "OMP_NUM_THREADS": "1", "MMLM_ROOT": str(ROOT), "PYTHONPATH": str(ROOT)}


def one_sweep_dir(tmp: Path) -> Path:
    dirs = sorted(tmp.glob("sweep_*"))
    assert len(dirs) == 1, f"expected one sweep dir, found {[d.name for d in dirs]}"
    return dirs[0]


def submitit_logs(sweep: Path, tail: int | None = None) -> str:
    """Every job's submitit stdout and stderr (each attempt of a requeued job appends to the same files)."""
    return "\n".join(f"--- {f}\n{f.read_text(errors='replace')[-(tail or 0):]}"
                     for f in sorted((sweep / ".submitit").rglob("*_log.*")))


def finished(p: subprocess.Popen | subprocess.CompletedProcess, cluster, sweep: Path | None) -> None:
    """The submitting ``train.py -m`` exited 0 (else its stderr, the jobs' logs and the daemons' logs)."""
    if p.returncode:
        jobs = submitit_logs(sweep, tail=3000) if sweep else ""
        pytest.fail(f"train.py -m failed (rc={p.returncode}):\n{(p.stderr or '')[-3000:]}\n{jobs}\n{cluster.logs()}")


def requeued_now(cluster, job_id: str, timeout: float = 60.0) -> None:
    """Once submitit has requeued the job, make it eligible at once (not a test of submitit: slurmctld holds a
    requeued job back for about two minutes, BeginTime, which this test need not wait for)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = cluster.run("squeue", "-h", "-j", job_id, "-o", "%T %r", check=False).split()
        if state and state[0] == "PENDING":
            cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)
            return
        time.sleep(0.5)


def test_a_two_job_sweep_runs_as_slurm_jobs_and_is_summarised(local_slurm, tmp_path):
    p = subprocess.run(sweep_cmd(tmp_path, "trainer.max_steps=4", "checkpoint_every=2", "stage.optim.lr=1e-3,2e-3"),
                       cwd=ROOT, env=job_env(local_slurm), capture_output=True, text=True, timeout=600,
                       check=False)
    finished(p, local_slurm, next(iter(tmp_path.glob("sweep_*")), None))
    sweep = one_sweep_dir(tmp_path)
    lrs = set()
    for num in (0, 1):
        m = json.loads((sweep / str(num) / "metrics.json").read_text())
        assert m["steps"] == 4 and "resumed_at" not in m
        log = (sweep / str(num) / "train.log").read_text()
        assert "resume unset in SLURM job" in log and "starting fresh" in log  # a fresh job: auto finds nothing
        lrs.add((sweep / str(num) / ".hydra" / "overrides.yaml").read_text().count("stage.optim.lr="))
        assert torch.load(sweep / str(num) / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    assert lrs == {1}
    jobs = sorted(d.name for d in (sweep / ".submitit").glob("*_*") if d.is_dir())
    assert len(jobs) == 2, jobs  # one SLURM array, a task per sweep point, each with its result
    assert all(list((sweep / ".submitit" / j).glob("*_result.pkl")) for j in jobs)
    logs = submitit_logs(sweep)
    assert "Job completed successfully" in logs and "SLURM auto-requeueing enabled" not in logs  # submitit's requeue only
    summary = (sweep / "summary.md").read_text()
    assert "| 0.001 |" in summary and "| 0.002 |" in summary and "no metrics.json" not in summary


def test_a_preempted_job_is_requeued_and_resumes_from_its_own_checkpoint(local_slurm, tmp_path):
    steps = 40
    cmd = sweep_cmd(tmp_path, f"trainer.max_steps={steps}", "checkpoint_every=4", "trainer.log_every_n_steps=1",
                    "+hydra.callbacks.slow._target_=tests.slurm.slow_steps.SlowSteps",
                    "+hydra.callbacks.slow.seconds=0.3")
    p = subprocess.Popen(cmd, cwd=ROOT, env=job_env(local_slurm), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        deadline, ckpt = time.monotonic() + 300, None
        while ckpt is None:
            found = list(tmp_path.glob("sweep_*/0/checkpoints/last.ckpt"))
            ckpt = found[0] if found else None
            assert p.poll() is None, f"the sweep ended before its first checkpoint:\n{p.communicate()[1][-3000:]}"
            assert time.monotonic() < deadline, f"no checkpoint after 300 s:\n{local_slurm.logs()}"
            time.sleep(0.2)
        sweep = one_sweep_dir(tmp_path)
        job_id = next(f.parent.name for f in (sweep / ".submitit").glob("*/*_log.out"))  # one job: not an array
        local_slurm.run("scancel", "--signal=USR2", job_id)  # what SLURM sends at pre-emption / before the limit
        requeued_now(local_slurm, job_id)
        _, err = p.communicate(timeout=600)
    finally:
        if p.poll() is None:
            p.kill()
    p.stderr = err
    finished(p, local_slurm, sweep)
    assert one_sweep_dir(tmp_path) == sweep  # the requeued job wrote into the same ${now:...} dir
    run = sweep / "0"
    m = json.loads((run / "metrics.json").read_text())
    logs = submitit_logs(sweep)
    assert "this job is preempted" in logs and f"Requeued job {job_id}" in logs, logs
    assert 4 <= m["resumed_at"] < steps and m["resumed_at"] % 4 == 0, m  # resumed, not restarted
    assert m["steps"] == steps  # and not more: the loop went on from the checkpoint's step
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == steps
    log = (run / "train.log").read_text()
    assert f"resume=auto: resuming from {run / 'checkpoints' / 'last.ckpt'} (step {m['resumed_at']})" in log, log
    with (run / "metrics.csv").open(newline="") as f:
        logged = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert sorted(logged) == list(range(steps)), logged  # every step once: the rows before the checkpoint kept


def test_a_ddp_job_runs_its_ranks_as_slurm_tasks(local_slurm, tmp_path):
    """trainer=ddp trainer.devices=2: srun starts 2 tasks (slurm.yaml: tasks_per_node = devices) and Lightning's
    SLURMEnvironment makes them ranks 0 and 1 of one gloo group, re-launching nothing."""
    p = subprocess.run(sweep_cmd(tmp_path, "trainer=ddp", "trainer.devices=2", "trainer.max_steps=4",
                                 "data.batch_size=4"),
                       cwd=ROOT, env=job_env(local_slurm), capture_output=True, text=True, timeout=600,
                       check=False)
    finished(p, local_slurm, next(iter(tmp_path.glob("sweep_*")), None))
    sweep = one_sweep_dir(tmp_path)
    m = json.loads((sweep / "0" / "metrics.json").read_text())
    assert m["steps"] == 4
    logs = submitit_logs(sweep)
    assert "global_rank=0(2)" in logs and "global_rank=1(2)" in logs  # two SLURM tasks, one job
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in logs and "SLURM auto-requeueing" not in logs
