"""tasks.tracking (logger choice, offline wandb) and tasks.sweep (ranking, summary files) without training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import get_object

from tasks import sweep, tracking

CONF = Path(__file__).resolve().parents[3] / "conf"


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides + ["paths.output_dir=/tmp/mmlm-test"], return_hydra_config=True)


@pytest.mark.parametrize("overrides,names", [([], ["csv"]), (["logger=tensorboard"], ["tensorboard"]),
                                             (["logger=[csv,wandb]"], ["csv", "wandb"]),
                                             (["logger=all"], ["csv", "tensorboard", "wandb"]),
                                             (["logger=all", "~logger.wandb"], ["csv", "tensorboard"]),
                                             (["~logger"], [])])
def test_logger_choices_compose_to_one_key_per_logger(overrides, names):
    cfg = _compose(overrides)
    assert list(cfg.get("logger") or {}) == names


def test_make_loggers_takes_one_node_a_mapping_or_nothing(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    node = {"_target_": "lightning.pytorch.loggers.CSVLogger", "save_dir": str(tmp_path)}
    assert [type(lg) for lg in tracking.make_loggers(node)] == [CSVLogger]
    assert len(tracking.make_loggers({"a": node, "b": None, "c": node})) == 2
    assert tracking.make_loggers(None) == []


@pytest.mark.parametrize("env,offline", [({}, True), ({"WANDB_API_KEY": "x"}, False),
                                         ({"WANDB_API_KEY": "x", "WANDB_MODE": "offline"}, True),
                                         ({"WANDB_MODE": "online"}, False)])
def test_wandb_is_offline_without_an_api_key(monkeypatch, tmp_path, env, offline):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    lg = tracking.wandb_logger(save_dir=str(tmp_path), project="p")  # nothing starts until .experiment
    assert lg._offline is offline and (lg._wandb_init.get("mode") == "offline") is offline
    assert tracking.wandb_logger(offline=False, save_dir=str(tmp_path))._offline is False


def test_git_state_names_this_checkout():
    state = tracking.git_state()
    assert state["commit"] is None or len(state["commit"]) == 40


def test_sweep_callback_is_configured():
    cfg = _compose([])
    node = cfg.hydra.callbacks.sweep_summary
    assert get_object(node._target_) is sweep.SweepSummary
    assert list(node.rank_by)[:2] == ["max:accuracy", "min:wer"]


def _job(root: Path, num: int, overrides: list[str], metrics: dict | None) -> Path:
    d = root / str(num)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (d / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"num": num}}}))
    (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"paths": {"output_dir": "${hydra:runtime.output_dir}"}}))
    if metrics is not None:
        (d / "metrics.json").write_text(json.dumps(metrics))
    return d


def test_summary_ranks_best_first_and_lists_failed_jobs_last(tmp_path):
    _job(tmp_path, 0, ["stage=align", "stage.optim.lr=0.0003"], {"wer": 0.5, "steps": 2, "llm": "x"})
    _job(tmp_path, 1, ["stage=align", "stage.optim.lr=0.001"], {"wer": 0.25, "steps": 2})
    _job(tmp_path, 2, ["stage=align", "stage.optim.lr=0.01"], None)  # crashed before metrics.json
    jobs = sweep.write_summary(tmp_path)
    assert [j.num for j in jobs] == [1, 0, 2]
    rows = (tmp_path / "summary.csv").read_text().splitlines()
    assert rows[0].startswith("rank,job,status,stage.optim.lr,wer,steps")
    assert rows[1].startswith("1,1,ok,0.001,0.25,2") and rows[3].startswith("3,2,no metrics.json,0.01")
    md = (tmp_path / "summary.md").read_text()
    assert "ranked by `wer` (lower is better)" in md and "Every job: `stage=align`" in md
    assert md.index("| 1 | 1 | 0.001 | 0.25 |") < md.index("| 2 | 0 | 0.0003 | 0.5 |")


def test_rank_by_takes_the_first_key_reported_and_max_or_min(tmp_path):
    _job(tmp_path, 0, ["a=1"], {"accuracy": 0.2, "wer": 0.1})
    _job(tmp_path, 1, ["a=2"], {"accuracy": 0.6, "wer": 0.9})
    jobs, key, mode = sweep.rank(sweep.read_jobs(tmp_path), ["max:bleu", "max:accuracy", "min:wer"])
    assert (key, mode, [j.num for j in jobs]) == ("accuracy", "max", [1, 0])
    jobs, key, _ = sweep.rank(jobs, ["wer"])  # no prefix: lower is better
    assert (key, [j.num for j in jobs]) == ("wer", [0, 1])


def test_cli_rebuilds_with_the_sweeps_own_ranking(tmp_path, capsys):
    _job(tmp_path, 0, ["a=1"], {"accuracy": 0.2, "wer": 0.1})
    _job(tmp_path, 1, ["a=2"], {"accuracy": 0.6, "wer": 0.9})
    (tmp_path / "multirun.yaml").write_text(yaml.safe_dump(
        {"hydra": {"callbacks": {"sweep_summary": {"rank_by": ["min:wer"]}}}}))
    sweep.main([str(tmp_path)])
    assert "ranked by `wer`" in capsys.readouterr().out
    sweep.main([str(tmp_path), "--rank-by", "max:accuracy"])
    assert "ranked by `accuracy` (higher is better)" in (tmp_path / "summary.md").read_text()
