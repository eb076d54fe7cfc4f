"""A third modality is one package plus one config file: this file holds the plugin (``Vectors``), the test writes
its config (modality and data in one file) into a folder on Hydra's search path, and align -> instruct -> evaluate run through the real
runner (``tasks.runner.run``) with nothing in the core (tasks/, data/, llm/, conf/) touched.

The task is learnable from the input alone: a clip of random 4-d vectors whose mean first coordinate is positive
is answered "up", else "down".
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from modality.base import Modality
from tests.integration.test_pipeline import cfg_for
from tasks.runner import UsageError, run

CONFIG = """\
# @package _global_
modality:
  _target_: tests.integration.test_new_modality.Vectors
  d_llm: ???
  target_rms: null
  hidden: 16
data:          # used for every stage (no conf/data/vec_<stage>.yaml exists)
  _target_: data.datamodule.ConversationDataModule
  train_files: ???
  val_files: null
  eval_files: null
  batch_size: 4
  eval_batch_size: 8
  max_length: 256
"""
pytestmark = pytest.mark.slow


def vectors(ref: str) -> Tensor:
    n, seed = (int(x) for x in str(ref).split(":"))
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(seed))


class Vectors(Modality):
    """A reference "n:seed" names n random 4-d vectors; frozen linear encoder, linear adaptor (one position each)."""

    name = "vec"
    placeholder = "<vec>"

    def __init__(self, d_llm: int, target_rms: float | None = None, hidden: int = 16):
        super().__init__()
        self.d_llm = d_llm
        self.encoder = nn.Linear(4, hidden)
        self.adaptor = nn.Linear(hidden, d_llm)
        self.set_trainable(encoder=False, adaptor=True)

    def load(self, ref, root=None) -> Tensor:
        return vectors(ref)

    def featurize(self, raw: Tensor) -> Tensor:
        return raw

    def output_length(self, feature_length: int) -> int:
        return feature_length

    def encode_frozen(self, features: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        return self.encoder(features) * mask[..., None], mask.sum(1)

    def adapt(self, hidden: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        return self.adaptor(hidden), lengths


def records(n: int, offset: int) -> list[dict]:
    out = []
    for i in range(n):
        ref = f"3:{offset + i}"
        up = vectors(ref)[:, 0].mean() > 0
        out.append({"id": f"v{offset + i}", "vec": [ref], "type": "direction", "conversations": [
            {"from": "human", "value": "<vec>\nUp or down?"}, {"from": "gpt", "value": "up" if up else "down"}]})
    return out


def write(path: Path, recs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_a_third_modality_is_one_package_plus_its_config(tmp_path):
    conf = tmp_path / "conf"
    (conf / "modality").mkdir(parents=True)
    (conf / "modality" / "vec.yaml").write_text(CONFIG)
    train, ev = write(tmp_path / "train.jsonl", records(24, 0)), write(tmp_path / "eval.jsonl", records(6, 100))
    common = [f"hydra.searchpath=[file://{conf}]", "modality=vec", "llm=tiny", "trainer.max_steps=3",
              "eval.max_new_tokens=3", "eval.before=false", "trainer.enable_model_summary=false",
              "trainer.limit_val_batches=0", f"data.train_files={train}", f"data.eval_files={ev}"]
    align = run(cfg_for(common + ["stage=align", f"paths.output_dir={tmp_path}/align"]))
    assert align["modality"] == "vec" and align["steps"] == 3 and "accuracy/direction" in align
    ckpt = torch.load(tmp_path / "align" / "checkpoints" / "last.ckpt", weights_only=True)
    assert set(ckpt["state_dict"]) == {"modalities.vec.adaptor.weight", "modalities.vec.adaptor.bias"}
    instruct = run(cfg_for(common + ["stage=instruct", f"init_from={tmp_path}/align", f"paths.output_dir={tmp_path}/ins"]))
    assert instruct["steps"] == 3 and instruct["trainable_params"] > align["trainable_params"]  # + LoRA
    evaluated = run(cfg_for([c for c in common if not c.startswith("data.")] + [
        "stage=evaluate", f"init_from={tmp_path}/ins", f"+data.eval_manifest={ev}", "data.train_files=null",
        f"paths.output_dir={tmp_path}/ev"]))
    assert evaluated["eval_samples"] == 6 and evaluated["accuracy/direction"] == instruct["accuracy/direction"]
    rows = [json.loads(x) for x in (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"v{100 + i}" for i in range(6)]
    # the core's stage prerequisites hold for the new modality too
    try:
        run(cfg_for(common + ["stage=instruct", f"paths.output_dir={tmp_path}/x"]))
    except UsageError as e:
        assert "needs init_from" in str(e)
    else:
        raise AssertionError("instruct without an align run must be refused")


def test_a_stage_without_a_data_config_is_one_line():
    with pytest.raises(UsageError, match=r"stage=forecast modality=speech: no data config"):
        run(cfg_for(["modality=speech", "stage=forecast", "llm=tiny", "paths.output_dir=/tmp/unused"]))
