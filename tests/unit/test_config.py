"""Every config group composes with the real train.yaml, and every _target_ resolves."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_object
from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[2] / "conf"
COMBOS = [("align", "speech"), ("instruct", "speech"), ("evaluate", "speech"),
          ("align", "speech_units"), ("instruct", "speech_units"), ("evaluate", "speech_units"),
          ("forecast", "stock"), ("align", "stock"), ("instruct", "stock"), ("evaluate", "stock")]


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides + ["paths.output_dir=/tmp/mmlm-test"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # so ${hydra:runtime.choices...} resolves as in a real run
    return cfg


def targets(node, path=""):
    if not path:  # resolve every interpolation once; d_llm-style ??? values are filled at run time
        node = OmegaConf.masked_copy(node, [k for k in node if k != "hydra"])
        node = OmegaConf.to_container(node, resolve=True, throw_on_missing=False)
        path = "cfg"
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "hydra":
                continue
            if k == "_target_":
                yield path, v
            else:
                yield from targets(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from targets(v, f"{path}[{i}]")


@pytest.mark.parametrize("stage,modality", COMBOS)
def test_stage_modality_combinations_compose(stage, modality):
    if not (CONF / "modality" / f"{modality}.yaml").exists():
        pytest.skip(f"modality {modality} not configured")
    cfg = compose_cfg([f"stage={stage}", f"modality={modality}"])
    assert cfg.stage.name == stage
    for where, target in targets(cfg):
        assert get_object(target) is not None, where


GROUPS = ["llm", "trainer", "logger", "stage", "experiment"]


@pytest.mark.parametrize("group,option", [(g, p.stem) for g in GROUPS if (CONF / g).exists()
                                          for p in sorted((CONF / g).glob("*.yaml"))])
def test_every_group_option_composes(group, option):
    overrides = [f"{group}={option}"]
    if group == "stage" and option == "forecast":
        overrides.append("modality=stock")
    cfg = compose_cfg(overrides)
    for where, target in targets(cfg):
        assert get_object(target) is not None, where


def test_command_line_contract_keys_exist():
    cfg = compose_cfg(["trainer.max_steps=7", "data.batch_size=3", "init_from=/x"])
    assert cfg.trainer.max_steps == 7 and cfg.data.batch_size == 3 and cfg.init_from == "/x"
    assert cfg.paths.output_dir == "/tmp/mmlm-test"
