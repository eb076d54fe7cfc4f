"""Issue 24 through the real Hydra config, runner and train.py (a tiny forecaster, a tiny LLM): a diverging run
stops in one line naming the step with no checkpoint of it (or skips such steps, counted, with on_nonfinite=skip);
metrics.json is strict JSON; init_from refuses non-finite weights and URLs; a missing resume is named; degenerate
evaluation files are refused naming the file or the sample."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from tasks.runner import run

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
SMALL = ["modality=stock", "modality.context=64", "modality.d_model=32", "modality.n_heads=2", "modality.n_layers=1",
         "modality.d_ff=64", "trainer.enable_model_summary=false"]
DIVERGE = SMALL + ["stage=forecast", "trainer.max_steps=3", "stage.optim.lr=1e6", "stage.optim.warmup_steps=0",
                   "trainer.val_check_interval=3", "trainer.limit_val_batches=1", "data.batch_size=32",
                   "data.tickers=[IBM_2000]"]


def cfg_for(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def train_py(args: list[str], out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args, f"paths.output_dir={out}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)


def one_error(p: subprocess.CompletedProcess) -> str:
    """The run failed with exactly one ``error:`` line and no traceback; that line."""
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode == 2 and len(errors) == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    return errors[0]


@pytest.fixture(scope="module")
def skipped(tmp_path_factory):
    out = tmp_path_factory.mktemp("skip")
    return out, run(cfg_for(DIVERGE + ["on_nonfinite=skip", f"paths.output_dir={out}"]))


def test_a_diverging_run_stops_naming_the_step_with_no_checkpoint_of_it(tmp_path):
    err = one_error(train_py(DIVERGE, tmp_path))
    assert err.startswith("error: step ") and ": loss is nan" in err and "on_nonfinite=skip" in err
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists() and not (tmp_path / "metrics.json").exists()


def test_skip_policy_counts_the_dropped_steps_in_strict_metrics_json(skipped):
    out, m = skipped
    assert m["steps"] == 3 and m["nonfinite_skipped"] >= 1 and m["nonfinite_steps"][-1] == 3
    text = (out / "metrics.json").read_text()
    metrics = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.json"))
    assert metrics["nonfinite_steps"] == m["nonfinite_steps"] and metrics["last_loss"] is not None
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_init_from_refuses_a_checkpoint_with_non_finite_weights(skipped, tmp_path):
    out, _ = skipped
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    name = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point())
    ckpt["state_dict"][name].view(-1)[0] = float("inf")
    torch.save(ckpt, tmp_path / "diverged.ckpt")
    with pytest.raises(ValueError, match=rf"diverged\.ckpt: weight {name} holds non-finite values"):
        run(cfg_for(SMALL + ["stage=align", "llm=tiny", f"init_from={tmp_path}/diverged.ckpt",
                             f"paths.output_dir={tmp_path}/align"]))


def test_resume_and_init_from_must_be_local_existing_paths(tmp_path):
    err = one_error(train_py(["stage=forecast", "modality=stock", f"resume={tmp_path}/nope.ckpt"], tmp_path / "a"))
    assert err == f"error: resume={tmp_path}/nope.ckpt: no such checkpoint file"
    err = one_error(train_py(["stage=align", "modality=stock", "init_from=s3://bucket/runs/align"], tmp_path / "b"))
    assert err == "error: init_from=s3://bucket/runs/align: must be a local path, not a URL (download it first)"
    with pytest.raises(ValueError, match=r"^resume=https://host/last\.ckpt: must be a local path, not a URL"):
        run(cfg_for(SMALL + ["stage=forecast", "resume=https://host/last.ckpt", f"paths.output_dir={tmp_path}/c"]))


def test_degenerate_evaluation_files_are_refused_before_generating(skipped, tmp_path):
    out, _ = skipped
    evaluate = SMALL + ["stage=evaluate", "llm=tiny", f"init_from={out}", f"paths.output_dir={tmp_path}/ev"]
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"empty\.jsonl: no records \(an empty eval file\)"):
        run(cfg_for(evaluate + [f"data.eval_manifest={tmp_path}/empty.jsonl"]))
    turns = [{"from": "human", "value": "<stock>\nWhat was said?"}, {"from": "gpt", "value": "up 3 %"}]
    rows = [{"id": "fine", "conversations": turns}, {"id": "silent", "type": "transcribe", "reference": " ",
                                                     "conversations": turns},
            {"id": "open", "conversations": turns[:1]}]
    for bad in ("silent", "open"):
        (tmp_path / f"{bad}.jsonl").write_text("\n".join(json.dumps(r) for r in rows if r["id"] in ("fine", bad)))
        why = "empty reference transcript" if bad == "silent" else "no answer turn to score"
        with pytest.raises(ValueError, match=rf"{bad}\.jsonl:2 \(id {bad}\): {why}"):
            run(cfg_for(evaluate + [f"data.eval_manifest={tmp_path}/{bad}.jsonl"]))
    assert not (tmp_path / "ev" / "predictions.jsonl").exists()
