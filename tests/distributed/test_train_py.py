"""The documented distributed commands through the front door: ``python train.py ... trainer=<ddp|fsdp|ddp_spawn>
trainer.devices=2`` on 2 gloo processes, every stage of both modalities, with the end-of-run and periodic evaluation
(greedy generation, joint CTC/LLM decoding, lexicon decoding, the stock text baseline).

Under FSDP2 the weights stay sharded while every rank evaluates in step (llm.sharding.gathered); the predictions of
each sharded run must equal those of a 1-process ``stage=evaluate`` of its own checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["llm=tiny", "trainer.accelerator=cpu", "data.batch_size=2", "eval.max_new_tokens=4",
          "trainer.limit_val_batches=1", "trainer.val_check_interval=2", "trainer.enable_model_summary=false"]
JOINT = ["eval.num_beams=2", "eval.joint_weight=0.5"]  # joint CTC/LLM decoding at evaluation
STOCK = ["modality=stock", "modality.context=64", "modality.d_model=32", "modality.n_heads=2", "modality.n_layers=1",
         "modality.d_ff=64"]
STOCK_LLM = ["data.prepare.n_align=24", "data.prepare.n_instruct=16", "data.prepare.n_qa=16", "data.prepare.eval_frac=0.25",
             "data.max_eval_samples=8"]


def train(out: Path, *overrides: str, devices: int = 2, trainer: str = "cpu") -> dict:
    """``python train.py`` as a user runs it; returns metrics.json (fails with the run's stderr tail)."""
    cmd = [sys.executable, str(ROOT / "train.py"), *COMMON, f"trainer={trainer}", f"trainer.devices={devices}",
           *overrides, f"paths.output_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MMLM_ROOT": str(ROOT)}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert p.returncode == 0, f"{' '.join(cmd[2:])} failed (rc={p.returncode}):\n{p.stderr[-3000:]}"
    return json.loads((out / "metrics.json").read_text())


def predictions(run_dir: Path, name: str = "predictions.jsonl") -> dict[str, str]:
    return {r["id"]: r["prediction"] for r in map(json.loads, (run_dir / name).read_text().splitlines())}


def evaluate_alone(run_dir: Path, out: Path, records: str | Path, *overrides: str) -> dict[str, str]:
    """1-process ``stage=evaluate`` of a run's checkpoint on ``records``: the reference its sharded evaluation
    must equal."""
    train(out, "stage=evaluate", f"init_from={run_dir}", f"data.eval_manifest={records}", *overrides, devices=1)
    return predictions(out)


@pytest.fixture(scope="module")
def speech_runs(speech_corpus, tmp_path_factory):
    c = speech_corpus
    data = ["modality=speech", "modality.tiny=true", f"data.train_files={c}/train.jsonl", f"data.val_files={c}/val.jsonl",
            f"data.eval_files={c}/eval.jsonl", "data.max_eval_samples=4"]
    instruct = ["stage=instruct", "modality=speech", "modality.tiny=true", "eval.before=false",
                f"data.train_files={c}/instruct_train.json", f"data.eval_files={c}/instruct_eval.json",
                "data.max_eval_samples=4", "trainer.limit_val_batches=0"]
    root = tmp_path_factory.mktemp("front_door_speech")
    runs = {}
    for t in ("fsdp", "ddp", "ddp_spawn"):
        runs[t, "align"] = train(root / t / "align", *data, "stage=align", "trainer.max_steps=2", "stage.ctc_weight=0.3",
                                 "stage.ctc_classifier=linear", "eval.every_n_steps=1", *JOINT, trainer=t)
        runs[t, "instruct"] = train(root / t / "instruct", *instruct, "trainer.max_steps=2",
                                    f"init_from={root / t / 'align'}", trainer=t)
    runs["fsdp", "phonemes"] = train(root / "fsdp" / "phonemes", *data, "experiment=speech_align_phonemes",
                                     "modality.cache_dir=null", "modality.hidden=32", "modality.layers=1",
                                     "modality.heads=2", "data.batch_size=2", "trainer.max_steps=2",
                                     "data.max_val_samples=2", "data.max_eval_samples=4", "trainer.val_check_interval=2",
                                     "trainer.limit_val_batches=1", "eval.lexicon.words=null", trainer="fsdp")
    return root, c, runs


@pytest.mark.parametrize("trainer", ["fsdp", "ddp", "ddp_spawn"])
def test_speech_align_and_instruct_run_through_train_py(speech_runs, trainer):
    root, _, runs = speech_runs
    align, instruct = runs[trainer, "align"], runs[trainer, "instruct"]
    assert align["steps"] == 2 and "wer" in align and "before/wer" in align and "ctc_wer" in align
    assert [p["step"] for p in align["curve"]] == [1, 2]  # the periodic evaluation ran mid-run
    assert instruct["steps"] == 2 and "accuracy" in instruct
    rows = [json.loads(x) for x in (root / trainer / "align" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all("candidates" in r for r in rows)  # joint decoding scored its candidates


def test_sharded_evaluation_equals_one_process_evaluation(speech_runs, tmp_path):
    root, c, _ = speech_runs
    one = ["modality=speech", "modality.tiny=true", "data.max_eval_samples=4"]
    assert evaluate_alone(root / "fsdp" / "align", tmp_path / "a", c / "eval.jsonl", *one, *JOINT) == \
        predictions(root / "fsdp" / "align")
    assert evaluate_alone(root / "fsdp" / "instruct", tmp_path / "i", c / "instruct_eval.json", *one) == \
        predictions(root / "fsdp" / "instruct")


def test_lexicon_decoding_under_fsdp_equals_one_process(speech_runs, tmp_path):
    root, c, runs = speech_runs
    m = runs["fsdp", "phonemes"]
    assert m["steps"] == 2 and "wer" in m and "ctc_per" in m
    alone = evaluate_alone(root / "fsdp" / "phonemes", tmp_path / "p", c / "eval.jsonl", "modality=speech",
                           "modality.tiny=true", "data.max_eval_samples=4", "eval.lexicon.words=null")
    assert alone == predictions(root / "fsdp" / "phonemes")


@pytest.mark.parametrize("trainer", ["fsdp", "ddp"])
def test_stock_chain_runs_through_train_py(trainer, tmp_path):
    data = [f"paths.data_dir={tmp_path}/data"]
    f = train(tmp_path / "f", *STOCK, *data, "stage=forecast", "trainer.max_steps=4", "data.batch_size=16",
              "data.tickers=[IBM_2000]", trainer=trainer)
    assert f["steps"] == 4 and "test/mae/model" in f  # the held-out forecast table, after sharded training
    a = train(tmp_path / "a", *STOCK, *STOCK_LLM, *data, "stage=align", "trainer.max_steps=2", f"init_from={tmp_path}/f",
              trainer=trainer)
    i = train(tmp_path / "i", *STOCK, *STOCK_LLM, *data, "stage=instruct", "trainer.max_steps=2", f"init_from={tmp_path}/a",
              "eval.before=false", trainer=trainer)
    assert a["steps"] == 2 and "accuracy" in a and "before/accuracy" in a
    assert i["steps"] == 2 and "accuracy" in i and "text_zero_shot/accuracy" in i  # the baseline ran too
    if trainer == "fsdp":
        records = tmp_path / "data" / "stock" / "v3_c64_h20" / "stock_qa_test.jsonl"
        assert evaluate_alone(tmp_path / "i", tmp_path / "e", records, *STOCK, *data, "data.max_eval_samples=8") == predictions(tmp_path / "i")
