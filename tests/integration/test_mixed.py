"""modality=mixed: one MultimodalLM over speech and stock, through the real Hydra config and tasks.runner.run,
shrunk to a tiny LLM, a tiny Whisper and a tiny forecaster; the data are cross-modal conversations built by
modality.mixed.build (a spoken claim + a real chart) beside speech-only clips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from modality.mixed.build import build_split
from tasks import runner
from tests.integration.test_pipeline import cfg_for

STOCK = ["modality.plugins.stock.context=64", "modality.plugins.stock.d_model=32", "modality.plugins.stock.n_heads=2",
         "modality.plugins.stock.n_layers=1", "modality.plugins.stock.d_ff=64"]
MIXED = ["modality=mixed", "modality.plugins.speech.tiny=true", *STOCK, "llm=tiny", "trainer.enable_model_summary=false",
         "eval.max_new_tokens=4", "data.batch_size=2", "trainer.limit_val_batches=0", "data.val_files=null"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Cross-modal conversations (train 8, eval 4) and speech-only transcription manifests of the same clips."""
    out = tmp_path_factory.mktemp("mixed_data")
    for split, n in (("train", 8), ("eval", 4)):
        build_split(out, n, split, context=64, jobs=1)
        recs = [json.loads(x) for x in (out / f"agree_{split}.jsonl").read_text().splitlines()]
        (out / f"asr_{split}.jsonl").write_text("".join(json.dumps(
            {"audio_filepath": r["speech"][0], "text": r["meta"]["claim_text"], "duration": r["duration"]}) + "\n"
            for r in recs))
    return out


def test_a_mixed_config_builds_one_model_with_both_plugins(tmp_path):
    cfg = cfg_for(MIXED + ["stage=align", "allow_no_init=true", f"paths.output_dir={tmp_path}",
                           "data.train_files=null", "data.eval_files=null"])
    assert set(cfg.modality.plugins) == {"speech", "stock"} and "_target_" not in cfg.modality
    b = runner.build(cfg, runner.stage_policy(cfg), 2)
    assert set(b.model.modalities) == {"speech", "stock"} and set(b.modalities) == {"speech", "stock"}
    assert b.modalities["stock"].cfg.context == 64 and b.modalities["speech"].encoder_name == "tiny"
    ids = b.model.placeholder_ids
    assert len(set(ids.values())) == 2 and all(b.lm.tokenizer.convert_ids_to_tokens(ids[n]) == f"<{n}>" for n in ids)
    for m in b.modalities.values():  # align: both adaptors train, both encoders stay frozen
        assert all(p.requires_grad for p in m.adaptor.parameters()) and m.encoder_frozen
    assert set(b.dm.modalities) == {"speech", "stock"}


def test_a_mixed_align_without_the_forecaster_is_one_line(tmp_path):
    with pytest.raises(runner.UsageError) as e:
        runner.run(cfg_for(MIXED + ["stage=align", f"paths.output_dir={tmp_path}"]))
    msg = str(e.value)
    assert "\n" not in msg and "stage=align modality=mixed needs init_from=<a forecast run" in msg
    assert "stage=forecast modality=stock" in msg


def test_the_count_check_names_a_record_missing_one_of_its_inputs(corpus, tmp_path):
    rec = json.loads((corpus / "agree_train.jsonl").read_text().splitlines()[0])
    del rec["stock"]  # the text still holds <speech> and <stock>
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**rec, "speech": [str(corpus / rec["speech"][0])]}) + "\n")
    with pytest.raises(ValueError) as e:
        runner.run(cfg_for(MIXED + ["stage=align", "allow_no_init=true", "trainer.max_steps=1", "eval.before=false",
                                    f"data.train_files=[{bad}]", "data.mixture=null", "data.eval_files=null",
                                    f"paths.output_dir={tmp_path}/run"]))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{bad}:1: 1 placeholder token(s)") and "0 input(s)" in msg


@pytest.fixture(scope="module")
def chain(corpus, tmp_path_factory):
    """forecast (stock alone) -> mixed align (init_from the forecast run) -> mixed instruct -> mixed evaluate."""
    out = tmp_path_factory.mktemp("mixed_runs")
    c = corpus
    forecast = runner.run(cfg_for([
        "modality=stock", "llm=tiny", "modality.context=64", "modality.d_model=32", "modality.n_heads=2",
        "modality.n_layers=1", "modality.d_ff=64", "trainer.enable_model_summary=false", "stage=forecast",
        "trainer.max_steps=3", "trainer.limit_val_batches=1", "trainer.val_check_interval=3", "data.batch_size=8",
        "data.tickers=[IBM_2000]", f"paths.output_dir={out}/forecast"]))
    data = [f"data.train_files=[{c}/agree_train.jsonl,{c}/asr_train.jsonl]", "data.mixture=[0.5,0.5]",
            f"data.eval_files=[{c}/agree_eval.jsonl,{c}/asr_eval.jsonl]"]
    align = runner.run(cfg_for(MIXED + data + ["stage=align", "trainer.max_steps=3", "eval.before=false",
                                               f"init_from={out}/forecast", f"paths.output_dir={out}/align"]))
    instruct = runner.run(cfg_for(MIXED + data + ["stage=instruct", "trainer.max_steps=2", "eval.before=false",
                                                  f"init_from={out}/align", f"paths.output_dir={out}/instruct"]))
    # evaluate names only the modality option: every plugin setting (tiny encoders, context 64) comes from the chain
    evaluated = runner.run(cfg_for(["modality=mixed", "llm=tiny", "stage=evaluate", f"init_from={out}/instruct",
                                    f"+data.eval_manifest={c}/agree_eval.jsonl", "eval.max_new_tokens=4",
                                    f"paths.output_dir={out}/evaluate"]))
    return out, {"forecast": forecast, "align": align, "instruct": instruct, "evaluate": evaluated}


@pytest.mark.slow
def test_mixed_runs_train_both_adaptors_and_report_per_input_numbers(chain):
    out, m = chain
    assert m["align"]["steps"] == 3 and m["instruct"]["steps"] == 2 and m["align"]["modality"] == "speech+stock"
    ckpt = torch.load(out / "align" / "checkpoints" / "last.ckpt", weights_only=True)
    groups = {".".join(k.split(".")[:3]) for k in ckpt["state_dict"]}
    assert groups == {"modalities.speech.adaptor", "modalities.stock.adaptor"}
    meta = ckpt["mmlm"]
    assert meta["modality"] == "mixed" and set(meta["modality_cfg"]["plugins"]) == {"speech", "stock"}
    assert meta["modality_cfg"]["plugins"]["stock"]["context"] == 64 and meta["modalities"] == ["speech", "stock"]
    # the eval set mixes clip-only and clip+chart records: each set's own numbers beside the overall ones
    for key in ("inputs/speech/wer", "inputs/speech+stock/accuracy/agree", "inputs/speech+stock/eval_samples", "wer",
                "accuracy/agree"):
        assert key in m["instruct"], key
    assert m["instruct"]["inputs/speech+stock/eval_samples"] == 4 and m["instruct"]["inputs/speech/eval_samples"] == 4
    rows = [json.loads(x) for x in (out / "instruct" / "predictions.jsonl").read_text().splitlines()]
    assert sorted({r["inputs"] for r in rows}) == ["speech", "speech+stock"]


@pytest.mark.slow
def test_evaluate_init_from_a_mixed_run_rebuilds_both_plugins_with_the_forecaster(chain):
    out, m = chain
    assert m["evaluate"]["eval_samples"] == 4 and m["evaluate"]["modality"] == "speech+stock"
    assert m["evaluate"]["accuracy/agree"] == m["instruct"]["inputs/speech+stock/accuracy/agree"]
    assert runner.modality_for(str(out / "instruct"), runner.Path(runner.__file__).parents[1] / "conf") == "mixed"
    built = runner.build_trained(str(out / "instruct"), ["llm=tiny"])  # as chat.py / export.py build it
    assert set(built.modalities) == {"speech", "stock"} and built.modalities["stock"].cfg.d_model == 32
    assert built.modalities["speech"].encoder_name == "tiny"
    forecaster = torch.load(out / "forecast" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    stock = built.modalities["stock"].state_dict()
    assert forecaster and all(torch.equal(stock[k], v) for k, v in forecaster.items())  # the forecast run's encoder
    trained = torch.load(out / "instruct" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    own = dict(built.model.named_parameters())
    for k in ("modalities.speech.adaptor", "modalities.stock.adaptor"):
        keys = [n for n in trained if n.startswith(k)]
        assert keys and all(torch.equal(own[n], trained[n]) for n in keys)


@pytest.mark.slow
def test_export_writes_one_folder_per_modality(chain, tmp_path):
    from tasks.export import main as export_main

    out, _ = chain
    export_main([f"init_from={out}/instruct", "format=adaptor", f"out={tmp_path}/x", "llm=tiny"])
    speech, stock = (json.loads((tmp_path / "x" / n / "config.json").read_text()) for n in ("speech", "stock"))
    assert speech["placeholder"] == "<speech>" and speech["files"] == ["adaptor.safetensors"]
    assert stock["files"] == ["adaptor.safetensors", "encoder.safetensors"]  # the forecast run trained its encoder
    assert stock["settings"]["context"] == 64 and "plugins" not in stock["settings"]


@pytest.mark.slow
def test_the_stock_plugins_own_checkpoint_key_stands_in_for_init_from(chain, tmp_path):
    out, _ = chain
    ckpt = out / "forecast" / "checkpoints" / "last.ckpt"
    cfg = cfg_for(MIXED + ["stage=align", f"modality.plugins.stock.checkpoint={ckpt}", f"paths.output_dir={tmp_path}",
                           "data.train_files=null", "data.eval_files=null"])
    b = runner.build(cfg, runner.stage_policy(cfg), 2)  # no init_from, no allow_no_init: the forecaster is given
    forecaster = torch.load(ckpt, weights_only=True)["state_dict"]
    stock = b.modalities["stock"].state_dict()
    assert all(torch.equal(stock[k], v) for k, v in forecaster.items())
