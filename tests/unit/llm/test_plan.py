"""The memory planner: exact against a tiny model measured on CPU, right on known model sizes, and its CLI."""

from __future__ import annotations

import json

import pytest
import torch

from llm.lora import backbone_and_head
from llm.plan import PlanInput, SavedTensorMeter, estimate, lora_params, main
from llm.quant import quantize_linear_layers, quantized_bytes
from llm.shapes import KNOWN, EncoderShape, modality_shapes, model_shape
from tests.unit.helpers import build

TINY = {"hidden_size": 64, "layers": 2, "heads": 4, "intermediate_size": 128}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
GB = 1e9


def tiny_plan(**kw) -> PlanInput:
    base = dict(shape=model_shape("smollm2-135m-instruct", TINY), weight_bytes=4, lora_r=4, lora_targets=TARGETS,
                precision="32-true", micro_batch=2, seq_len=96, label_fraction=0.5)
    return PlanInput(**{**base, **kw})


def storage_bytes(module: torch.nn.Module) -> int:
    """Bytes a module's weights really occupy: distinct storages, 4-bit quantisation state included."""
    seen: dict[int, int] = {}
    for p in module.parameters():
        seen[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            for t in (qs.absmax, qs.code, qs.state2.absmax, qs.state2.code, qs.offset):
                seen[t.untyped_storage().data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


def test_parameter_counts_and_bytes_exact_for_the_tiny_model(tiny_lm, toy_modality):
    model = build(tiny_lm, toy_modality, "instruct")  # adds one placeholder row, applies LoRA r=4
    est = estimate(tiny_plan(adaptor_params=sum(p.numel() for p in toy_modality.adaptor.parameters())))
    llm_params = sum(p.numel() for n, p in model.llm.named_parameters() if "lora_" not in n)
    assert est["llm_params"] == llm_params
    assert est["lora_params"] == sum(p.numel() for n, p in model.llm.named_parameters() if "lora_" in n)
    assert est["llm_bytes_total"] == 4 * llm_params
    assert est["trainable_weights"] == 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_nf4_weight_bytes_exact_for_the_tiny_model(tiny_lm):
    quantize_linear_layers(tiny_lm.model)
    measured = storage_bytes(tiny_lm.model)
    est = estimate(tiny_plan(quant="nf4", lora_r=0, lora_targets=(), extra_tokens=0))
    assert est["llm_bytes_total"] == measured


def test_gradient_and_optimizer_bytes_exact(tiny_lm, toy_modality):
    model = build(tiny_lm, toy_modality, "instruct")
    batch_embeds = torch.randn(2, 16, 64)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    backbone, _ = backbone_and_head(model.llm)
    (backbone(inputs_embeds=batch_embeds).last_hidden_state.sum() + sum(
        p.sum() for p in model.modalities.parameters() if p.requires_grad)).backward()
    opt.step()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    states = sum(v.numel() * v.element_size() for s in opt.state.values() for k, v in s.items() if k != "step")
    est = estimate(tiny_plan(adaptor_params=sum(p.numel() for p in toy_modality.adaptor.parameters())))
    assert est["gradients"] == grads and est["optimizer"] == states


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_estimate_matches_saved_tensors(tiny_lm, toy_modality, checkpointing):
    if checkpointing:
        tiny_lm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = build(tiny_lm, toy_modality, "instruct")
    model.train()
    b, s = 2, 96
    labels = torch.full((b, s), -100)
    labels[:, s // 2:] = 5  # half the positions labeled
    embeds = torch.randn(b, s, 64, requires_grad=True)
    with SavedTensorMeter(model) as meter:
        model.lm_loss(embeds * 1.0, torch.ones(b, s, dtype=torch.long), labels)
    est = estimate(tiny_plan(micro_batch=b, seq_len=s, checkpointing=checkpointing))["activations"]
    assert est == pytest.approx(meter.bytes, rel=0.01)


def test_known_model_sizes():
    llama8 = estimate(PlanInput(shape=KNOWN["llama-3.1-8b"], weight_bytes=2, extra_tokens=0))
    assert llama8["llm_params"] == pytest.approx(8.03e9, rel=0.002)
    assert llama8["llm_bytes_total"] == pytest.approx(16.06 * GB, rel=0.003)  # 8B bf16 ~ 16 GB
    nf4 = estimate(PlanInput(shape=KNOWN["llama-3.1-8b"], weight_bytes=2, quant="nf4", extra_tokens=0))
    head = KNOWN["llama-3.1-8b"].param_counts()["head"]
    # HF keeps the 128k-row LM head (and embeddings) in bf16: ~5.7 GB; with the head in 4 bits too: 4.5-5 GB
    assert nf4["llm_bytes_total"] == pytest.approx(5.70 * GB, rel=0.01)
    assert 4.5 * GB < nf4["llm_bytes_total"] - 2 * head + quantized_bytes(head) < 5.0 * GB
    assert estimate(PlanInput(shape=KNOWN["llama-3.1-70b"], weight_bytes=2))["llm_bytes_total"] == pytest.approx(
        141.1 * GB, rel=0.005)
    assert lora_params(KNOWN["llama-3.1-8b"], 64, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj")) == 167_772_160


def test_fsdp_divides_model_states_not_activations():
    kw = dict(shape=KNOWN["llama-3.1-8b"], weight_bytes=2, lora_r=64, lora_targets=TARGETS, micro_batch=2,
              seq_len=2048, precision="bf16-mixed")
    ddp, fsdp = estimate(PlanInput(strategy="ddp", world=8, **kw)), estimate(PlanInput(strategy="fsdp", world=8, **kw))
    for k in ("llm_weights", "trainable_weights", "gradients", "optimizer"):
        assert fsdp[k] == pytest.approx(ddp[k] / 8)
    assert fsdp["activations"] == ddp["activations"] and fsdp["fsdp_gather"] > 0 == ddp["fsdp_gather"]
    ckpt = estimate(PlanInput(strategy="fsdp", world=8, checkpointing=True, **kw))
    assert ckpt["activations"] < fsdp["activations"] / 5


def test_shapes_from_names_and_config_files(tmp_path):
    assert model_shape("meta-llama/Llama-3.1-8B-Instruct") is KNOWN["llama-3.1-8b"]
    assert model_shape("smollm2-135m-instruct") is KNOWN["smollm2-135m"]
    cfg = {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
           "intermediate_size": 1536, "vocab_size": 49152, "tie_word_embeddings": True, "model_type": "llama"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert model_shape(str(tmp_path)).param_counts() == KNOWN["smollm2-135m"].param_counts()
    assert KNOWN["smollm2-135m"].param_counts()["total"] == 134_515_008  # SmolLM2-135M's published count
    with pytest.raises(ValueError, match="shape unknown offline"):
        model_shape("someone/Mystery-9B")


def test_encoder_and_adaptor_counts_exact():
    from modality.speech.plugin import TINY_ENCODER, SpeechModality

    speech = SpeechModality(d_llm=64, tiny=True, hidden=32)
    enc, adaptor = modality_shapes({"_target_": "modality.speech.plugin.SpeechModality", "tiny": True, "hidden": 32}, 64)
    assert enc.params() == sum(p.numel() for p in speech.encoder.parameters())
    assert adaptor == sum(p.numel() for p in speech.adaptor.parameters())
    whisper_tiny = EncoderShape("w", 384, 4, 1536, 80)
    assert whisper_tiny.params() == pytest.approx(8.2e6, rel=0.01)
    assert TINY_ENCODER["d_model"] == enc.d_model


def test_several_plugins_count_as_their_sum():
    one = {"_target_": "modality.speech.plugin.SpeechModality", "tiny": True, "hidden": 32}
    enc1, ad1 = modality_shapes(one, 64)
    enc, adaptor = modality_shapes({"plugins": {"a": one, "b": {**one, "hidden": 16}}}, 64)
    enc2, ad2 = modality_shapes({**one, "hidden": 16}, 64)
    assert enc.params() == enc1.params() + enc2.params() and adaptor == ad1 + ad2 and ad1 != ad2


def test_cli_composes_the_real_config(capsys):
    est = main(["llm=llama31_8b", "stage=instruct", "trainer=fsdp", "trainer.devices=8", "data.batch_size=4",
                "trainer.precision=bf16-mixed", "--seq-len", "2048", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["input"]["world"] == 8 and out["input"]["strategy"] == "fsdp" and out["input"]["checkpointing"]
    assert est["llm_weights"] == pytest.approx(est["llm_bytes_total"] / 8)
    assert est["lora_params"] == 167_772_160 and est["encoder_params"] > 0


def test_cli_rejects_a_world_size_that_does_not_divide_the_global_batch(capsys):
    with pytest.raises(SystemExit) as e:
        main(["llm=llama31_8b", "trainer=ddp", "trainer.devices=4", "+global_batch_size=10"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "global_batch_size=10 is not divisible by world size 4" in err and "\n" not in err


def test_gpu_bench_toy_mode_runs_on_cpu(tmp_path):
    from bench.gpu_step import main as bench

    out = tmp_path / "bench.json"
    rows = bench(["--toy", "--settings", "lora,qlora+ckpt", "--steps", "1", "--out", str(out)])
    assert [r["setting"] for r in rows] == ["lora", "qlora+ckpt"]
    for r in rows:
        assert r["mmlm"]["tokens_per_s"] > 0 and r["plain"]["tokens_per_s"] > 0 and r["mmlm"]["mfu"] is None
        assert r["planner_gib"]["activations"] == pytest.approx(r["activation_gib_measured"], rel=0.3)
    assert rows[1]["activation_gib_measured"] < 0.5 * rows[0]["activation_gib_measured"]  # checkpointing on
    saved = json.loads(out.read_text())
    assert saved["flops_per_step"]["encoder"] > 0 and saved["flops_per_step"]["adaptor"] > 0
