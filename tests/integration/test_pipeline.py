"""align -> instruct -> evaluate through the real Hydra config and runner, shrunk to tiny models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from modality.speech.shards import read_shard_header
from tasks.runner import run

ROOT = Path(__file__).resolve().parents[2]
TINY = ["llm=tiny", "modality.tiny=true", "data.batch_size=4", "eval.max_new_tokens=6",
        "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "trainer.enable_model_summary=false"]


def cfg_for(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.fixture(scope="module")
def runs(speech_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    c = speech_corpus
    align = run(cfg_for(TINY + ["stage=align", "trainer.max_steps=4", "eval.every_n_steps=2", f"paths.output_dir={out}/align",
                                f"data.train_files={c}/train.jsonl", f"data.val_files={c}/val.jsonl",
                                f"data.eval_files={c}/eval.jsonl"]))
    instruct = run(cfg_for(TINY + ["stage=instruct", "trainer.max_steps=3", f"paths.output_dir={out}/instruct",
                                   f"init_from={out}/align", f"data.train_files={c}/instruct_train.json",
                                   f"data.eval_files={c}/instruct_eval.json", "eval.before=false"]))
    return out, align, instruct


def test_metrics_json_contract(runs):
    out, align, instruct = runs
    for stage in ("align", "instruct"):
        m = json.loads((out / stage / "metrics.json").read_text())
        for key in ("first_loss", "last_loss", "steps", "trainable_params", "total_params", "samples_per_second"):
            assert m[key] is not None, (stage, key)
        assert (out / stage / "checkpoints" / "last.ckpt").exists()
    assert align["steps"] == 4 and "wer" in align and "before/wer" in align
    assert instruct["steps"] == 3 and "accuracy" in instruct
    assert instruct["trainable_params"] > align["trainable_params"]  # + LoRA


def test_learning_curve_in_metrics_and_written_as_measured(runs):
    out, align, _ = runs
    assert [p["step"] for p in align["curve"]] == [2, 4]
    assert all("wer" in p and p["train_seconds"] >= 0 for p in align["curve"])
    lines = [json.loads(x) for x in (out / "align" / "curve.jsonl").read_text().splitlines()]
    assert lines == json.loads(json.dumps(align["curve"]))  # the file survives a run killed mid-way
    # evaluations during training are timed apart: seconds per step count the steps only
    assert align["periodic_eval_seconds"] > 0
    assert align["seconds_per_step"] == pytest.approx(align["train_seconds"] / align["steps"], abs=3e-3)  # both rounded


def test_checkpoint_holds_only_what_trains(runs):
    out, align, instruct = runs
    ckpt = torch.load(out / "align" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["state_dict"] and all(k.startswith("modalities.speech.adaptor.") for k in ckpt["state_dict"])
    ckpt = torch.load(out / "instruct" / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(k.startswith("modalities.speech.adaptor.") or "lora_" in k for k in ckpt["state_dict"])
    assert ckpt["mmlm"]["parent"].endswith("align/checkpoints/last.ckpt")
    assert instruct["checkpoint_mb"] < 0.5 * instruct["llm_mb"]


def test_align_to_instruct_handoff_restores_adaptor_exactly(runs, speech_corpus):
    out, _, _ = runs
    align_sd = torch.load(out / "align" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    from hydra.utils import instantiate

    from llm.lora import LoraSpec
    from llm.tokens import add_placeholder_tokens
    from tasks.checkpoint import load_chain
    from tasks.multimodal import MultimodalLM
    from tasks.stages import StagePolicy

    cfg = cfg_for(TINY + ["stage=instruct", "paths.output_dir=/tmp/unused"])
    lm = instantiate(cfg.llm.model)
    sp = instantiate(cfg.modality, d_llm=lm.hidden_size, target_rms=lm.embedding_rms)
    ids = add_placeholder_tokens(lm.tokenizer, lm.model, ["<speech>"])
    model = MultimodalLM(lm.model, lm.tokenizer, {"speech": sp}, {"speech": ids["<speech>"]},
                         StagePolicy("instruct", lora=True), lora=LoraSpec(r=4, alpha=8), llm_name=lm.name)
    before = {k: v.clone() for k, v in model.state_dict().items() if k in align_sd}
    assert any(not torch.equal(before[k], v) for k, v in align_sd.items())  # fresh init differs
    load_chain(model, out / "align", lm.name, ["speech"])
    now = model.state_dict()
    for k, v in align_sd.items():
        assert torch.equal(now[k], v), k


def test_evaluate_any_manifest_writes_predictions(runs, speech_corpus, tmp_path):
    out, _, _ = runs
    m = run(cfg_for(TINY + ["stage=evaluate", f"init_from={out}/instruct", f"paths.output_dir={tmp_path}",
                            f"data.eval_manifest={speech_corpus}/eval.jsonl"]))
    assert "wer" in m and m["eval_samples"] > 0
    rows = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == m["eval_samples"] and {"id", "reference", "prediction"} <= set(rows[0])


def _train(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args, f"paths.output_dir={tmp_path}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_instruct_without_align_exits_with_one_line(tmp_path):
    p = _train(["stage=instruct", "modality=speech", "llm=tiny", "modality.tiny=true"], tmp_path)
    assert p.returncode != 0
    err = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "needs init_from=" in err[0] and "stage=align" in err[0]


def test_init_from_wrong_llm_is_refused(runs, tmp_path):
    out, _, _ = runs
    p = _train(["stage=instruct", "modality=speech", "modality.tiny=true", f"init_from={out}/align"], tmp_path)
    assert p.returncode != 0 and "trained with llm=smollm2-135m-instruct:tiny" in p.stderr.splitlines()[-1]
    p = _train(["stage=instruct", "modality=speech", "modality.tiny=true", f"init_from={out}/align", "llm=tiny",
                "llm.model.tiny.hidden_size=32"], tmp_path)
    assert p.returncode != 0 and "has shape" in p.stderr.splitlines()[-1]


def test_encoder_cache_is_built_up_front_and_matches_live_encoding(speech_corpus, tmp_path):
    c = speech_corpus
    common = TINY + ["stage=align", "trainer.max_steps=2", "eval.before=false", "data.max_eval_samples=4",
                     f"data.train_files={c}/train.jsonl", f"data.val_files={c}/val.jsonl", f"data.eval_files={c}/eval.jsonl"]
    live = run(cfg_for(common + [f"paths.output_dir={tmp_path}/live"]))
    cached = run(cfg_for(common + [f"paths.output_dir={tmp_path}/cached", f"modality.cache_dir={tmp_path}/cache"]))
    n_clips = sum(1 for f in ("train", "val", "eval") for _ in open(c / f"{f}.jsonl"))
    shards = list((tmp_path / "cache").rglob("shard-*.safetensors"))
    keys = [k for s in shards for k in read_shard_header(s)[0]]
    assert len(keys) == len(set(keys)) == n_clips and len(shards) < n_clips  # each clip once, many to a shard
    # fp16 cache vs live fp32 encoder: the same training trajectory up to rounding
    assert abs(live["first_loss"] - cached["first_loss"]) < 1e-2


def test_align_long_recipe_options_run_through_the_runner(speech_corpus, tmp_path, caplog):
    """CTC over the corpus vocabulary + length-grouped batches + an empty system turn, end to end."""
    import logging

    c = speech_corpus
    with caplog.at_level(logging.INFO, logger="modality.speech.asr.objective"):
        m = run(cfg_for(TINY + ["stage=align", "trainer.max_steps=2", "stage.ctc_weight=0.5", "stage.ctc_vocab=corpus",
                                "data.group_by_length=true", "data.system_prompt=''", "eval.max_new_tokens=2", "trainer.log_every_n_steps=1",
                                f"paths.output_dir={tmp_path}", f"data.train_files={c}/train.jsonl",
                                f"data.val_files={c}/val.jsonl", f"data.eval_files={c}/eval.jsonl"]))
    assert m["steps"] == 2 and m["first_loss"] > 0
    assert any("CTC over the corpus vocabulary" in r.getMessage() for r in caplog.records)
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    assert "train/ctc_speech" in header  # the CTC term was computed (a transcript corpus)
    assert m["system_prompt"] == ""
    ev = run(cfg_for(TINY + ["stage=evaluate", f"init_from={tmp_path}", f"paths.output_dir={tmp_path}/ev",
                             f"data.eval_manifest={c}/eval.jsonl", "data.max_eval_samples=2", "eval.max_new_tokens=2"]))
    assert ev["system_prompt"] == ""  # evaluate prompts the way the run was trained


def test_discrete_units_path_aligns_then_instructs_through_the_runner(speech_corpus, tmp_path):
    """modality=speech_units: codebook fitted on first use, ids cached, align -> instruct hand-off."""
    c = speech_corpus
    units = ["modality=speech_units", "modality.tiny=true", "modality.n_units=16", "modality.fit_clips=20",
             f"modality.codebook={tmp_path}/cb.safetensors", f"modality.fit_manifest={c}/train.jsonl",
             f"modality.cache_dir={tmp_path}/units", "modality.encoder_cache_dir=null"]
    align = run(cfg_for(TINY + units + ["stage=align", "trainer.max_steps=2", "eval.before=false",
                                        f"paths.output_dir={tmp_path}/align", f"data.train_files={c}/train.jsonl",
                                        f"data.val_files={c}/val.jsonl", f"data.eval_files={c}/eval.jsonl"]))
    assert (tmp_path / "cb.safetensors").is_file() and any((tmp_path / "units" / "ids").rglob("*.safetensors"))
    assert align["steps"] == 2 and "wer" in align
    ckpt = torch.load(tmp_path / "align" / "checkpoints" / "last.ckpt", weights_only=True)
    # the new rows and the codebook (so the run evaluates where its codebook file is absent), nothing else
    assert sorted(ckpt["state_dict"]) == ["modalities.speech.adaptor.weight", "modalities.speech.encoder.carried_centroids"]
    instruct = run(cfg_for(TINY + units + ["stage=instruct", "trainer.max_steps=1", "eval.before=false",
                                           f"paths.output_dir={tmp_path}/instruct", f"init_from={tmp_path}/align",
                                           f"data.train_files={c}/instruct_train.json",
                                           f"data.eval_files={c}/instruct_eval.json"]))
    assert instruct["steps"] == 1 and "accuracy" in instruct
    # merged export: the unit tokens are rows of a plain HF model (the grown-table wrappers materialised)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.export import main as export_main

    export_main([f"init_from={tmp_path}/instruct", "format=merged", f"out={tmp_path}/merged", "llm=tiny", *units])
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.get_input_embeddings().weight.shape[0] == len(tok) and "<unit_3>" in tok.get_vocab()
    # a continuous-speech run cannot start from the units checkpoint: its weights do not fit
    with pytest.raises(ValueError, match="weight\\(s\\) this model lacks"):
        run(cfg_for(TINY + ["stage=instruct", "trainer.max_steps=1", f"paths.output_dir={tmp_path}/x",
                            f"init_from={tmp_path}/align", f"data.train_files={c}/instruct_train.json"]))


def test_stop_file_ends_a_run_with_checkpoint_eval_and_metrics(speech_corpus, tmp_path, monkeypatch):
    import tasks.runner as runner
    from tasks.callbacks import StopFile

    class TouchAfterFirstStep(StopFile):  # stands in for a user's `touch <output_dir>/STOP`
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 1:
                self.path.touch()
            super().on_train_batch_end(trainer, *args)

    monkeypatch.setattr(runner, "StopFile", TouchAfterFirstStep)
    c = speech_corpus
    m = run(cfg_for(TINY + ["stage=align", "trainer.max_steps=50", "eval.before=false", f"paths.output_dir={tmp_path}",
                            f"data.train_files={c}/train.jsonl", f"data.val_files={c}/val.jsonl",
                            f"data.eval_files={c}/eval.jsonl", "data.max_eval_samples=2"]))
    assert m["steps"] == 1 and m["stopped_early_at"] == 1 and "wer" in m
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 1 and all(k.startswith("modalities.speech.adaptor.") for k in ckpt["state_dict"])
    assert json.loads((tmp_path / "metrics.json").read_text())["stopped_early_at"] == 1


def test_align_continues_from_an_align_run_with_new_optimizer_settings(speech_corpus, tmp_path):
    """init_from=<align run> in stage=align loads its adaptor AND LoRA (the way speech_align_long was continued)."""
    c = speech_corpus
    common = TINY + ["stage=align", "stage.lora=true", "trainer.max_steps=2", "eval.before=false", "data.max_eval_samples=2",
                     f"data.train_files={c}/train.jsonl", f"data.val_files={c}/val.jsonl", f"data.eval_files={c}/eval.jsonl"]
    run(cfg_for(common + [f"paths.output_dir={tmp_path}/a1"]))
    # lr ~0: if the continuation did not start from a1's weights, they could not end equal to a1's
    run(cfg_for(common + [f"paths.output_dir={tmp_path}/a2", f"init_from={tmp_path}/a1",
                          "stage.optim.lr=1e-12", "stage.optim.lora_lr=1e-12"]))
    first = torch.load(tmp_path / "a1" / "checkpoints" / "last.ckpt", weights_only=True)
    second = torch.load(tmp_path / "a2" / "checkpoints" / "last.ckpt", weights_only=True)
    assert any("lora_" in k for k in first["state_dict"]) and set(first["state_dict"]) == set(second["state_dict"])
    for k, v in first["state_dict"].items():
        assert torch.allclose(second["state_dict"][k], v, atol=1e-8), k
    assert second["mmlm"]["parent"].endswith("a1/checkpoints/last.ckpt")
    fresh = run(cfg_for(common + [f"paths.output_dir={tmp_path}/a3", "stage.optim.lr=1e-12", "stage.optim.lora_lr=1e-12"]))
    third = torch.load(tmp_path / "a3" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert fresh["steps"] == 2 and any(not torch.allclose(third[k], v, atol=1e-6) for k, v in first["state_dict"].items())


def test_chat_hears_clips_keeps_them_in_the_history_and_refuses_bad_audio(runs, speech_corpus, tmp_path, capsys):
    from tasks.chat import Chat, main
    from tasks.runner import build_trained

    out, _, _ = runs
    wav = sorted(Path(speech_corpus).rglob("*.wav"))[0]
    built = build_trained(str(out / "instruct"), ["llm=tiny"])
    chat = Chat(built.model, built.modalities, dict(built.model.placeholder_ids), built.system_prompt, 3)
    streamed: list[str] = []
    answer = chat.ask("What is said?", {"speech": chat.attach("audio", [str(wav)])}, stream=streamed.append)
    assert "".join(streamed).strip() == answer
    assert chat.turns[0]["value"] == "<speech>\nWhat is said?" and chat.refs["speech"] == [str(wav.resolve())]
    with pytest.raises(ValueError, match="reads \\['audio'\\], not series"):
        chat.attach("series", ["x.csv"])
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF0000WAVEnot audio")
    with pytest.raises(ValueError, match="bad.wav"):
        chat.attach("audio", [str(bad)])
    capsys.readouterr()
    main([f"init_from={out}/instruct", f"audio=[{wav},{wav}]", "prompt=Which clip is longer?", "llm=tiny",
          "max_new_tokens=3"])
    assert capsys.readouterr().out.endswith("\n")
