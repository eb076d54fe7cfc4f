"""forecast -> align -> instruct -> evaluate (data.csv=) for the stock modality, through the real
Hydra config and tasks.runner.run, shrunk to a tiny LLM and a tiny forecaster.

A spy on runner.build_trainer snapshots the stock modality's weights when each fit starts and
ends, so the hand-offs and the frozen forecaster are checked on the runs themselves.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

import tasks.runner as runner
from modality.stock.data.outlook import FORECAST_TYPES
from modality.stock.data.text import ALL_TYPES, QUESTION_TYPES

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
SMALL = ["modality=stock", "llm=tiny", "modality.context=64", "modality.d_model=32", "modality.n_heads=2",
         "modality.n_layers=1", "modality.d_ff=64", "trainer.enable_model_summary=false", "eval.max_new_tokens=6"]
LLM_STAGES = ["data.batch_size=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
              "data.prepare.n_align=24", "data.prepare.n_instruct=16", "data.prepare.n_qa=16",
              "data.prepare.eval_frac=0.25", "data.max_eval_samples=16"]


def cfg_for(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


class Snapshot(L.Callback):
    """The stock modality's state dict when fit starts and when it ends."""

    def __init__(self) -> None:
        self.start: dict[str, torch.Tensor] = {}
        self.end: dict[str, torch.Tensor] = {}

    @staticmethod
    def _grab(module: L.LightningModule) -> dict[str, torch.Tensor]:
        stock = module.modalities["stock"] if hasattr(module, "modalities") else module
        return {k: v.detach().clone() for k, v in stock.state_dict().items()}

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.start = self._grab(module)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.end = self._grab(module)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("stock_runs")
    data = [f"paths.data_dir={out}/data"]
    snaps: dict[str, Snapshot] = {}
    real = runner.build_trainer

    def spy(cfg, run_dir, callbacks):
        snaps[cfg.stage.name] = Snapshot()
        return real(cfg, run_dir, [*callbacks, snaps[cfg.stage.name]])

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner, "build_trainer", spy)
        forecast = runner.run(cfg_for(SMALL + [
            "stage=forecast", "trainer.max_steps=12", "trainer.val_check_interval=6", "trainer.limit_val_batches=1",
            "data.batch_size=32", "data.tickers=[IBM_2000]", f"paths.output_dir={out}/forecast"]))
        align = runner.run(cfg_for(SMALL + LLM_STAGES + data + [
            "stage=align", "trainer.max_steps=4", f"init_from={out}/forecast", f"paths.output_dir={out}/align"]))
        instruct = runner.run(cfg_for(SMALL + LLM_STAGES + data + [
            "stage=instruct", "trainer.max_steps=3", f"init_from={out}/align", "eval.before=false",
            "data.text_baseline.train_lora=true", f"paths.output_dir={out}/instruct"]))
    return out, {"forecast": forecast, "align": align, "instruct": instruct}, snaps


def _ckpt(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def test_forecast_writes_table_vs_baselines_plot_and_encoder_only_checkpoint(runs):
    out, metrics, _ = runs
    m = json.loads((out / "forecast" / "metrics.json").read_text())
    assert m == json.loads(json.dumps(metrics["forecast"], default=str))
    assert m["steps"] == 12 and m["first_loss"] is not None and m["samples_per_second"] > 0
    table = m["forecast_test"]
    for row in ("model", "persistence", "drift", "seasonal_naive"):
        assert {"mae", "mase", "direction_acc", "rel_mae"} <= set(table[row]), row
    for row in ("model_vol", "historical_vol_20d", "historical_vol_context"):
        assert "vol_mae_ann" in table[row], row
    assert table["persistence"]["rel_mae"] == 1.0 and m["test/mae/persistence"] == round(table["persistence"]["mae"], 5)
    assert list(m["forecast_test_by_series"]) == ["IBM_2000"]
    pngs = sorted((out / "forecast").glob("forecast_*.png"))
    assert pngs and pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = _ckpt(out / "forecast")
    assert ckpt["state_dict"] and all(k.startswith("encoder.") for k in ckpt["state_dict"])
    assert {k: ckpt["mmlm"][k] for k in ("stage", "llm", "modalities", "parent", "lora")} == {
        "stage": "forecast", "llm": None, "modalities": ["stock"], "parent": None, "lora": None}


def test_align_without_forecast_is_refused_in_one_line(tmp_path):
    with pytest.raises(runner.UsageError) as e:
        runner.run(cfg_for(SMALL + ["stage=align", f"paths.output_dir={tmp_path}"]))
    msg = str(e.value)
    assert "\n" not in msg and "needs init_from=<a forecast run" in msg and "stage=forecast modality=stock" in msg


def test_forecaster_handed_off_and_bitwise_frozen_in_align_and_instruct(runs):
    out, _, snaps = runs
    trained = _ckpt(out / "forecast")["state_dict"]  # encoder.* = the stock modality's own keys
    assert any(not torch.equal(snaps["forecast"].start[k], v) for k, v in trained.items())  # forecast trained
    for stage in ("align", "instruct"):
        s = snaps[stage]
        for k, v in trained.items():
            assert torch.equal(s.start[k], v), (stage, "hand-off", k)
            assert torch.equal(s.end[k], v), (stage, "frozen forecaster changed", k)
        moved = [k for k in s.start if k.startswith("adaptor.") and not torch.equal(s.start[k], s.end[k])]
        assert moved, f"{stage}: the adaptor did not train"


def test_instruct_starts_from_align_adaptor_and_chain_reloads_exactly(runs):
    out, _, snaps = runs
    align_sd = _ckpt(out / "align")["state_dict"]
    assert align_sd and all(k.startswith("modalities.stock.adaptor.") for k in align_sd)
    for k, v in align_sd.items():
        assert torch.equal(snaps["instruct"].start[k[len("modalities.stock."):]], v), k
    # a fresh model built the way the runner builds it, then load_chain(instruct run)
    from hydra.utils import instantiate

    from llm.lora import LoraSpec
    from llm.tokens import add_placeholder_tokens
    from tasks.checkpoint import load_chain
    from tasks.multimodal import MultimodalLM
    from tasks.stages import StagePolicy

    cfg = cfg_for(SMALL + ["stage=instruct", "paths.output_dir=/tmp/unused"])
    lm = instantiate(cfg.llm.model)
    stock = runner.instantiate_accepting(cfg.modality, d_llm=lm.hidden_size, target_rms=lm.embedding_rms)
    ids = add_placeholder_tokens(lm.tokenizer, lm.model, ["<stock>"])
    model = MultimodalLM(lm.model, lm.tokenizer, {"stock": stock}, {"stock": ids["<stock>"]},
                         StagePolicy("instruct", lora=True), lora=LoraSpec(r=4, alpha=8), llm_name=lm.name)
    chain = load_chain(model, out / "instruct", lm.name, ["stock"], prefix_for_stage={"forecast": "modalities.stock."})
    assert [p.parent.parent.name for p in chain] == ["instruct", "align", "forecast"]
    now = model.state_dict()
    for k, v in _ckpt(out / "forecast")["state_dict"].items():
        assert torch.equal(now[f"modalities.stock.{k}"], v), k
    inst = _ckpt(out / "instruct")["state_dict"]
    assert any("lora_" in k for k in inst) and all(k.startswith("modalities.stock.adaptor.") or "lora_" in k for k in inst)
    for k, v in inst.items():
        assert torch.equal(now[k], v), k


def test_instruct_scores_each_question_type_next_to_text_baselines(runs):
    out, _, _ = runs
    m = json.loads((out / "instruct" / "metrics.json").read_text())
    for prefix in ("", "text_zero_shot/", "text_lora/", "majority/"):
        for t in ALL_TYPES:
            assert 0.0 <= m[f"{prefix}accuracy/{t}"] <= 1.0, (prefix, t)
    assert all(0.0 <= m[f"forecaster/accuracy/{t}"] <= 1.0 for t in FORECAST_TYPES)  # the forecaster's own call
    assert m["eval_samples"] == m["text_zero_shot/eval_samples"] == m["text_lora/eval_samples"] == 16
    assert m["text_lora/steps"] == m["steps"] == 3
    for name in ("predictions.jsonl", "predictions_text_zero_shot.jsonl", "predictions_text_lora.jsonl"):
        rows = [json.loads(x) for x in (out / "instruct" / name).read_text().splitlines()]
        assert len(rows) == 16 and {r["type"] for r in rows} == set(ALL_TYPES), name
    text = [json.loads(x) for x in (out / "instruct" / "text_baseline" / "eval.jsonl").read_text().splitlines()]
    prompt = text[0]["conversations"][0]["value"]  # the text baseline: the window's closes, no signals
    assert "<stock>" not in prompt and "Daily closes of the last 20" in prompt and "RSI(14)" not in prompt


def test_evaluate_on_any_csv(runs, tmp_path):
    from modality.stock.data.prices import load_packaged

    out, _, _ = runs
    csv = tmp_path / "mine.csv"
    load_packaged()["MSFT_2000"].iloc[-150:].reset_index().to_csv(csv, index=False)
    m = runner.run(cfg_for(SMALL + ["stage=evaluate", f"init_from={out}/instruct", f"data.csv={csv}",
                                    "data.csv_windows=2", f"paths.output_dir={tmp_path}/eval"]))
    # the first window has 20 rows after it: the forecast questions are asked of it too, scored on those rows
    assert m["eval_samples"] == 2 * len(QUESTION_TYPES) + len(FORECAST_TYPES)
    assert m["init_from"][0].endswith("instruct/checkpoints/last.ckpt")
    assert all(f"accuracy/{t}" in m and f"text_zero_shot/accuracy/{t}" in m for t in QUESTION_TYPES)
    rows = [json.loads(x) for x in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    recs = [json.loads(x) for x in (tmp_path / "eval" / "csv_eval_records.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [r["id"] for r in recs] and all(r["stock"][0]["csv"] == str(csv) for r in recs)
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["accuracy"] == m["accuracy"]


def test_packed_model_moves_and_loads_every_trained_weight_for_evaluate_and_instruct(runs, tmp_path):
    """tasks.pack: the chain's weights (forecaster, adaptor, LoRA) in one fp16 folder that works from anywhere."""
    import shutil

    from tasks.checkpoint import read_chain, read_checkpoint
    from tasks.pack import merged_state, pack

    out, _, _ = runs
    folder = pack(out / "instruct", tmp_path / "a" / "stock-tiny", evals={"held-out": out / "instruct"}, max_mb=None)
    moved = tmp_path / "elsewhere"
    shutil.move(str(folder), moved)
    packed = read_checkpoint(moved.resolve())
    expected = merged_state(read_chain(out / "instruct"))
    assert packed["state_dict"].keys() == expected.keys()
    assert all(torch.equal(packed["state_dict"][k], v.float()) for k, v in expected.items())
    names = list(expected)
    for part in ("modalities.stock.encoder.", "modalities.stock.adaptor.", "lora_"):
        assert any(part in k for k in names), part
    assert packed["mmlm"]["stages"] == ["forecast", "align", "instruct"] and packed["mmlm"]["parent"] is None
    card = (moved / "README.md").read_text()  # the evaluation's accuracy table, the model's overall score in it
    assert "| (all) | " + f"{runs[1]['instruct']['accuracy']:.3f}" in card and "| instruct | 3 |" in card
    records = out / "data" / "stock" / "v3_c64_h20" / "stock_qa_test.jsonl"
    m = runner.run(cfg_for(SMALL + ["stage=evaluate", f"init_from={moved}", f"data.eval_manifest={records}",
                                    "data.max_eval_samples=4", f"paths.output_dir={tmp_path}/eval"]))
    assert m["eval_samples"] == 4 and m["init_from"] == [str(moved.resolve())]
    more = runner.run(cfg_for(SMALL + LLM_STAGES + [f"paths.data_dir={out}/data", "stage=instruct", "trainer.max_steps=1",
                                                    f"init_from={moved}", "eval.before=false", "data.max_eval_samples=2",
                                                    "data.text_baseline=null", f"paths.output_dir={tmp_path}/more"]))
    assert more["steps"] == 1
    again = pack(tmp_path / "more", tmp_path / "again", max_mb=None)  # a packed model continued, packed again
    assert read_checkpoint(again)["mmlm"]["stages"] == ["forecast", "align", "instruct", "instruct"]
    rows = [r for r in (again / "README.md").read_text().splitlines() if r.startswith(("| forecast |", "| align |", "| instruct |"))]
    assert [r.split(" | ")[1] for r in rows] == ["12", "4", "3", "1"]  # the parent card's stages, then the new one
    with pytest.raises(ValueError, match="not a readable packed model"):
        (moved / "model.safetensors").write_bytes(b"garbage")
        read_checkpoint(moved.resolve())


def test_chat_answers_streams_keeps_history_and_refuses_bad_input_in_one_line(runs, tmp_path, capsys):
    from modality.stock.data.prices import load_packaged
    from tasks.chat import Chat, interactive, main, parse_args
    from tasks.runner import build, modality_for, stage_policy

    out, _, _ = runs
    csv = tmp_path / "mine.csv"
    load_packaged()["MSFT_2000"].iloc[-100:].reset_index().to_csv(csv, index=False)
    assert modality_for(str(out / "instruct"), ROOT / "conf") == "stock"
    assert parse_args(["init_from=x", "series=[a.csv, b.csv]", "llm=tiny"]) == ({"init_from": "x", "series": ["a.csv", "b.csv"]},
                                                                                  ["llm=tiny"])
    cfg = cfg_for(["stage=evaluate", "modality=stock", "llm=tiny", f"init_from={out}/instruct"])
    built = build(cfg, stage_policy(cfg), 1)
    chat = Chat(built.model.eval(), built.modalities, dict(built.model.placeholder_ids), built.system_prompt, 4)
    streamed: list[str] = []
    first = chat.ask("What is the overall trend?", {"stock": chat.attach("series", [str(csv)])}, stream=streamed.append)
    assert streamed and "".join(streamed).strip() == first  # streamed piece by piece, the same answer
    capsys.readouterr()
    main([f"init_from={out}/instruct", f"series={csv}", "prompt=What is the overall trend?", "llm=tiny",
          "max_new_tokens=4"])
    assert capsys.readouterr().out == "".join(streamed) + "\n"  # the command line streams the same answer
    chat.ask("And the volatility?")  # a follow-up without a new input keeps the window in the history
    assert len(chat.turns) == 4 and chat.turns[0]["value"].startswith("<stock>\n") and chat.refs["stock"] == [{"csv": str(csv)}]
    with pytest.raises(ValueError, match="placeholder"):  # more placeholders than inputs
        chat.ask("<stock> vs <stock>: which is stronger?")
    assert len(chat.turns) == 4 and len(chat.refs["stock"]) == 1  # a refused turn leaves no trace
    with pytest.raises(ValueError, match="nope.csv"):
        chat.attach("series", [str(tmp_path / "nope.csv")])
    with pytest.raises(ValueError, match="reads \\['series'\\], not audio"):
        chat.attach("audio", ["x.wav"])
    lines = iter([f"/series {csv}", "What is the overall trend?", "/series missing.csv", "/quit"])
    printed = io.StringIO()
    chat.reset()
    interactive(chat, {}, read=lambda _: next(lines), out=printed)
    text = printed.getvalue()
    assert f"attached {csv}" in text and "error: " in text and "missing.csv" in text and len(chat.turns) == 2

    records = out / "data" / "stock" / "v3_c64_h20" / "stock_qa_test.jsonl"
    answers = tmp_path / "answers.jsonl"
    main([f"init_from={out}/instruct", f"input={records}", f"output={answers}", "llm=tiny", "max_new_tokens=3",
          "data.max_eval_samples=3"])
    assert len(answers.read_text().splitlines()) == 3


def test_export_peft_merged_and_adaptor_load_where_users_load_them(runs, tmp_path):
    from hydra.utils import instantiate
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.export import export, main
    from tasks.runner import build_trained

    out, _, _ = runs
    built = build_trained(str(out / "instruct"), ["llm=tiny"])
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        ref = built.model.llm(input_ids=ids).logits
    vocab = ref.shape[-1] - 1  # the trained model has one more row: the <stock> placeholder
    export(built, "peft", tmp_path / "peft")
    base = instantiate(cfg_for(["llm=tiny"]).llm.model).model
    loaded = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    with torch.no_grad():
        peft_logits = loaded(input_ids=ids).logits
        with loaded.disable_adapter():
            plain = loaded(input_ids=ids).logits
    assert torch.allclose(peft_logits, ref[..., :vocab], atol=1e-5)
    assert (plain - peft_logits).abs().max() > 1e-4  # the trained LoRA changes the output: the check is not vacuous

    adaptor = export(built, "adaptor", tmp_path / "adaptor")
    weights = load_file(str(adaptor / "adaptor.safetensors"))
    own = built.modality.adaptor.state_dict()
    assert weights.keys() == own.keys() and all(torch.equal(weights[k], own[k]) for k in own)
    assert (adaptor / "encoder.safetensors").is_file()  # the chain pretrained the forecaster: it travels too
    config = json.loads((adaptor / "config.json").read_text())
    assert config["placeholder"] == "<stock>" and config["settings"]["context"] == 64 and (adaptor / "README.md").is_file()

    main([f"init_from={out}/instruct", "format=merged", f"out={tmp_path}/merged", "llm=tiny"])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert "<stock>" in AutoTokenizer.from_pretrained(tmp_path / "merged").get_vocab()
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, ref, atol=1e-4)
    assert (tmp_path / "merged" / "modality" / "adaptor.safetensors").is_file()
    with pytest.raises(ValueError, match="no LoRA"):
        export(build_trained(str(out / "align"), ["llm=tiny"]), "peft", tmp_path / "nope")
