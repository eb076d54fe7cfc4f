"""modality.speech.hybrid: continuous embeddings then unit/prosody tokens of one clip, at one placeholder."""

from __future__ import annotations

import torch

from llm.lora import LoraSpec
from llm.tokens import add_placeholder_tokens
from modality.speech.hybrid import SpeechHybridModality
from tasks.checkpoint import TrainableOnlyCheckpoint
from tasks.multimodal import MultimodalLM, OptimSpec
from tasks.stages import StagePolicy, trainable_names
from tests.unit.helpers import batch_for
from tests.unit.modality.speech.test_units import corpus  # noqa: F401  (a fixture)


def make(corpus, d_llm: int = 64, **kw) -> SpeechHybridModality:  # noqa: F811
    torch.manual_seed(0)
    args = {"d_llm": d_llm, "tiny": True, "n_units": 8, "stack": 2, "hidden": 32,
            "codebook": str(corpus / "cb.safetensors"), "fit_manifest": str(corpus / "train.jsonl"),
            "units_cache_dir": str(corpus / "units"), **kw}
    return SpeechHybridModality(**args)


def bound(lm, m) -> MultimodalLM:
    pid = add_placeholder_tokens(lm.tokenizer, lm.model, [m.placeholder])[m.placeholder]
    m.bind_llm(lm.tokenizer, lm.model)
    return MultimodalLM(lm.model, lm.tokenizer, {m.name: m}, {m.name: pid}, StagePolicy("align"),
                        lora=LoraSpec(r=4, alpha=8, dropout=0.0), optim=OptimSpec(lr=1e-2, warmup_steps=0),
                        llm_name=lm.name)


def test_one_clip_reads_its_continuous_embeddings_then_its_tokens(corpus, tiny_lm):  # noqa: F811
    m = make(corpus)
    bound(tiny_lm, m)
    packed, kind = m.load_features("c0.wav", str(corpus))
    hidden = m.units._hidden(corpus / "c0.wav")
    ids = m.units.load_features(corpus / "c0.wav")[0]
    n_c = -(-hidden.shape[0] // 2)
    assert kind == "features" and packed.shape[0] == m.output_length(packed.shape[0]) == n_c + len(ids)
    out, n = m.encode(packed[None], torch.ones(1, packed.shape[0], dtype=torch.bool))
    cont, _ = m.continuous.adapt(hidden[None], torch.tensor([hidden.shape[0]]))
    table = tiny_lm.model.get_input_embeddings()
    assert int(n) == packed.shape[0]
    torch.testing.assert_close(out[0, :n_c], cont[0])  # the continuous adaptor's positions first
    assert torch.equal(out[0, n_c:], table(ids + m.units.first_id))  # then the LLM's own rows of the tokens


def test_a_padded_batch_gives_each_clip_what_it_gives_alone(corpus, tiny_lm):  # noqa: F811
    import soundfile as sf

    m = make(corpus)
    bound(tiny_lm, m)
    wave, sr = sf.read(corpus / "c1.wav", dtype="float32")
    sf.write(corpus / "short.wav", wave[: len(wave) // 3], sr)
    feats = [m.load_features(p, str(corpus))[0] for p in ("c1.wav", "short.wav")]
    values, mask = m.collate_features(feats)
    batch, lengths = m.encode(values, mask)
    for i, f in enumerate(feats):
        alone, n = m.encode(f[None], torch.ones(1, f.shape[0], dtype=torch.bool))
        assert int(lengths[i]) == int(n) == f.shape[0]
        torch.testing.assert_close(batch[i, :f.shape[0]], alone[0])
        assert not batch[i, f.shape[0]:].any()


def test_align_trains_both_adaptors_and_the_new_rows_checkpoint_carries_the_codebook(corpus, tiny_lm):  # noqa: F811
    m = make(corpus)
    model = bound(tiny_lm, m)
    names = trainable_names(model)
    assert "modalities.speech.adaptor.units.weight" in names
    assert all(n.startswith("modalities.speech.adaptor.") for n in names)
    assert any(n.startswith("modalities.speech.adaptor.continuous.") for n in names)
    old = tiny_lm.model.get_input_embeddings().base.weight.detach().clone()
    recs = [{"id": f"r{i}", "where": f"t.jsonl:{i}", "root": str(corpus), "speech": [f"c{i}.wav"],
             "conversations": [{"from": "human", "value": "<speech>\nHow high?"},
                               {"from": "gpt", "value": "low <unit_1>" if i < 2 else "high"}]} for i in range(4)]
    batch = batch_for(model, recs)
    slots = int((batch["input_ids"] == model.placeholder_ids["speech"]).sum())
    assert slots == int(batch["modal"]["speech"]["mask"].sum())
    loss = model(batch)["loss"]
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if p.requires_grad)
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2).step()
    assert torch.equal(tiny_lm.model.get_input_embeddings().base.weight, old)
    saved = {"state_dict": model.state_dict()}
    TrainableOnlyCheckpoint({"stage": "align"}).on_save_checkpoint(None, model, saved)
    assert set(saved["state_dict"]) == set(names) | {"modalities.speech.encoder.units.carried_centroids"}


def test_config_composes_for_every_stage():
    from hydra import compose, initialize_config_dir
    from hydra.utils import get_object

    from tests.unit.test_config import CONF

    for stage in ("align", "instruct", "evaluate"):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("train", overrides=[f"stage={stage}", "modality=speech_hybrid", "paths.output_dir=/tmp/x"])
        assert get_object(cfg.modality._target_) is SpeechHybridModality
        assert cfg.data._target_ and cfg.modality.units_cache_dir.endswith("units_cache")
