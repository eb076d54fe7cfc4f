"""Inside a SLURM job an unset ``resume=`` is ``auto`` (a requeued job finds its own last checkpoint), submitit's
jobs get Lightning's SLURM environment without Lightning's own requeue, and conf/hydra/launcher/slurm.yaml
resolves as the launcher reads it (before any job's HydraConfig exists). No SLURM needed: tests/slurm runs it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from lightning.fabric.plugins.environments import LightningEnvironment, SLURMEnvironment
from omegaconf import OmegaConf

from tasks.resume import (
    AUTO,
    cluster_plugins,
    resolve_resume,
    resume_setting,
    under_slurm,
)

CONF = Path(__file__).resolve().parents[3] / "conf"
SLURM = {"SLURM_JOB_ID": "42"}


@pytest.mark.parametrize("value,env,expected", [(None, {}, None), (None, SLURM, AUTO), (False, SLURM, False),
                                                ("a/last.ckpt", SLURM, "a/last.ckpt"), (AUTO, {}, AUTO),
                                                (None, {"SLURM_JOB_ID": ""}, None)])
def test_an_unset_resume_is_auto_only_inside_a_slurm_job(value, env, expected):
    assert resume_setting(value, env) == expected
    assert under_slurm(env) is bool(env.get("SLURM_JOB_ID"))


def test_a_fresh_slurm_job_starts_fresh_saying_why(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    with caplog.at_level(logging.INFO, logger="tasks.resume"):
        assert resolve_resume(None, tmp_path, "align", "tiny", ["speech"]) is None
        assert resolve_resume(False, tmp_path, "align", "tiny", ["speech"]) is None  # resume=false: not even looked
    assert "resume unset in SLURM job 42: resume=auto" in caplog.text
    assert caplog.text.count("starting fresh") == 1


def test_submitit_jobs_get_lightnings_slurm_environment_without_its_requeue():
    assert cluster_plugins([], {"SLURM_JOB_ID": "1"}) == []  # plain sbatch/srun: Lightning detects SLURM itself
    added = cluster_plugins(["io"], {"SLURM_JOB_ID": "1", "SUBMITIT_EXECUTOR": "slurm"})
    assert added[0] == "io" and isinstance(added[1], SLURMEnvironment) and added[1].auto_requeue is False
    chosen = [LightningEnvironment()]
    assert cluster_plugins(chosen, {"SUBMITIT_EXECUTOR": "slurm"}) == chosen  # the config's choice wins


def test_the_slurm_launcher_config_resolves_before_any_job_exists(monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="make install (extra mmlm[slurm])")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "stage=instruct", "trainer.devices=4",
                                          "hydra.sweep.dir=/tmp/sweep"], return_hydra_config=True)
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)  # as in the submitting process: no job config yet
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["name"] == "mmlm_instruct" and launcher["tasks_per_node"] == launcher["gpus_per_node"] == 4
    assert launcher["submitit_folder"] == "/tmp/sweep/.submitit/%j"
