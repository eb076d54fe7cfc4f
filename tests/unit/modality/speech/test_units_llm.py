"""The discrete speech path inside an LLM: its tokens are the LLM's, their rows train per stage, old rows stay
bitwise, checkpoints carry the rows and the codebook."""

from __future__ import annotations

import shutil

import pytest
import torch

from llm.lora import LoraSpec
from llm.tokens import add_placeholder_tokens
from tasks.checkpoint import META_KEY, TrainableOnlyCheckpoint, load_chain
from tasks.multimodal import MultimodalLM, OptimSpec
from tasks.stages import StagePolicy, trainable_names
from tests.unit.helpers import batch_for
from tests.unit.llm.test_vocab import untied_lm
from tests.unit.modality.speech.test_units import corpus, make  # noqa: F401  (a fixture)

STAGES = {"align": StagePolicy("align"), "instruct": StagePolicy("instruct", lora=True),
          "evaluate": StagePolicy("evaluate", adaptor=False, lora=True)}


def bound(lm, m, stage: str = "align") -> MultimodalLM:
    """As tasks.runner.build orders it: placeholders, the plugin's vocabulary, then stage and LoRA."""
    pid = add_placeholder_tokens(lm.tokenizer, lm.model, [m.placeholder])[m.placeholder]
    m.bind_llm(lm.tokenizer, lm.model)
    return MultimodalLM(lm.model, lm.tokenizer, {m.name: m}, {m.name: pid}, STAGES[stage],
                        lora=LoraSpec(r=4, alpha=8, dropout=0.0), optim=OptimSpec(lr=1e-2, warmup_steps=0),
                        llm_name=lm.name, chain_lora=stage == "evaluate")


def records(corpus, answers: list[str]) -> list[dict]:  # noqa: F811
    return [{"id": f"r{i}", "where": f"t.jsonl:{i}", "root": str(corpus), "speech": [f"c{i}.wav"],
             "conversations": [{"from": "human", "value": "<speech>\nRepeat the first unit."},
                               {"from": "gpt", "value": a}]} for i, a in enumerate(answers)]


def test_unit_and_prosody_tokens_are_llm_tokens_and_adapt_reads_the_llm_table(corpus, tiny_lm):  # noqa: F811
    m = make(corpus, d_llm=tiny_lm.hidden_size)
    model = bound(tiny_lm, m)
    tok, first = tiny_lm.tokenizer, m.first_id
    names = m.token_names()
    assert len(tok) == first + len(names) and tok.convert_ids_to_tokens(first + 7) == "<unit_7>"
    for name in ("<unit_3>", "<pitch_uv>", "<energy_1>", "<register_2>", "<dur_1>", "<rate_0>"):
        assert tok.convert_tokens_to_ids(name) == first + names.index(name)
    assert tok.encode("<unit_3><unit_7>", add_special_tokens=False) == [first + 3, first + 7]
    ids = m.featurize(m.load("c0.wav", str(corpus)))
    rows, _ = m.adapt(torch.cat([ids, ids.new_zeros(2)])[None], torch.tensor([len(ids)]))
    table = model.llm.get_input_embeddings()
    assert torch.equal(rows[0, :len(ids)], table(ids + first)) and not rows[0, len(ids):].any()
    text = tok.encode(m.describe(ids).replace(" ", ""), add_special_tokens=False)
    assert text == (ids + first).tolist()  # the clip written as text is the same token ids


@pytest.mark.parametrize("tied", [True, False])
def test_trainable_set_by_parameter_name_per_stage(corpus, tiny_lm, tied):  # noqa: F811
    rows = ["modalities.speech.adaptor.weight"] + ([] if tied else ["modalities.speech.adaptor.output_weight"])
    for stage in ("align", "instruct", "evaluate"):
        from llm.loader import load_llm

        lm = load_llm(tiny={"hidden_size": 64, "layers": 2, "heads": 4, "intermediate_size": 128})
        if not tied:
            lm.model = untied_lm(lm.tokenizer)
        names = trainable_names(bound(lm, make(corpus, d_llm=64), stage))
        if stage == "align":
            assert names == rows
        elif stage == "instruct":
            assert [n for n in names if "lora_" not in n] == rows and len(names) > len(rows)
            assert all(".lora_A." in n or ".lora_B." in n for n in names if n not in rows)
        else:  # as tasks.runner builds it: LoRA layers of the chain present (lora=True), the rows frozen
            assert [n for n in names if "lora_" not in n] == []


def test_align_steps_move_only_the_new_rows_old_input_and_output_rows_stay_bitwise(corpus, tiny_lm):  # noqa: F811
    m = make(corpus, d_llm=tiny_lm.hidden_size)
    model = bound(tiny_lm, m)
    emb, head = model.llm.get_input_embeddings(), model.llm.get_output_embeddings()
    old_in, old_out = emb.base.weight.detach().clone(), head.base.weight.detach().clone()
    batch = batch_for(model, records(corpus, ["<unit_1> low", "<unit_2> low", "<unit_5> high"]))
    assert (batch["labels"] >= m.first_id).any()  # the LLM is taught to WRITE unit tokens too
    before = m.adaptor.weight.detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        loss = model(batch)["loss"]
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    assert torch.equal(emb.base.weight, old_in) and torch.equal(head.base.weight, old_out)
    assert (m.adaptor.weight.detach() != before).any(1).all()  # every new row moved (read, written or decayed)
    assert torch.equal(head.weight[m.first_id:], m.adaptor.weight)  # tied: the head scores with the same rows


def test_checkpoint_holds_only_new_rows_and_codebook_and_reloads_where_no_codebook_file_is(corpus, tiny_lm,  # noqa: F811
                                                                                           tmp_path):
    from llm.loader import load_llm

    m = make(corpus, d_llm=tiny_lm.hidden_size)
    model = bound(tiny_lm, m)
    recs = records(corpus, ["<unit_1> low", "high"])
    batch = batch_for(model, recs)
    with torch.no_grad():
        m.adaptor.weight.add_(0.5 * torch.randn_like(m.adaptor.weight))  # as if trained
    saved = {"state_dict": model.state_dict()}
    TrainableOnlyCheckpoint({"stage": "align", "llm": tiny_lm.name, "modalities": ["speech"], "parent": None}) \
        .on_save_checkpoint(None, model, saved)
    assert sorted(saved["state_dict"]) == ["modalities.speech.adaptor.weight",
                                           "modalities.speech.encoder.carried_centroids"]
    assert saved[META_KEY]["trainable"] == ["modalities.speech.adaptor.weight"]
    torch.save(saved, tmp_path / "last.ckpt")

    elsewhere = tmp_path / "elsewhere"  # another machine: the clips, no codebook file, no fit manifest, no cache
    elsewhere.mkdir()
    for i in range(2):
        shutil.copy(corpus / f"c{i}.wav", elsewhere)
    torch.manual_seed(1)
    fresh = make(elsewhere, d_llm=tiny_lm.hidden_size, fit_manifest=None)
    assert not torch.isfinite(fresh.encoder.carried_centroids).any()
    model2 = bound(load_llm(tiny={"hidden_size": 64, "layers": 2, "heads": 4, "intermediate_size": 128}), fresh)
    assert not torch.equal(fresh.adaptor.weight, m.adaptor.weight)
    load_chain(model2, tmp_path / "last.ckpt", tiny_lm.name, ["speech"])
    assert torch.equal(fresh.centroids, m.centroids)
    batch2 = batch_for(model2, [dict(r, root=str(elsewhere)) for r in recs])
    assert torch.equal(batch2["modal"]["speech"]["values"], batch["modal"]["speech"]["values"])

    def logits(mdl, b):
        with torch.no_grad():
            embeds, _, mask = mdl.embed(b)
            return mdl.llm(inputs_embeds=embeds, attention_mask=mask).logits

    assert torch.equal(logits(model2, batch2), logits(model, batch))


def test_a_resumed_run_restores_the_codebook_and_resume_sees_only_what_trains(corpus, tiny_lm):  # noqa: F811
    from tasks.resume import ResumeKeys

    m = make(corpus, d_llm=tiny_lm.hidden_size)
    model = bound(tiny_lm, m)
    m.featurize(m.load("c0.wav", str(corpus)))  # the codebook is fitted at first use
    saved = {"state_dict": {k: v.clone() for k, v in model.state_dict().items()}}  # as written to disk
    TrainableOnlyCheckpoint({"stage": "align"}).on_save_checkpoint(None, model, saved)
    with torch.no_grad():
        m.encoder.carried_centroids.fill_(float("nan"))
    model.on_load_checkpoint(saved)  # Lightning calls it before loading the weights and the callbacks' hooks
    assert torch.isfinite(m.encoder.carried_centroids).all()
    assert sorted(saved["state_dict"]) == ["modalities.speech.adaptor.weight"]
    ResumeKeys().on_load_checkpoint(None, model, saved)  # the trainable set, name for name: no error


def test_the_codebook_stays_on_the_cpu_in_float32_when_the_model_is_cast(corpus, tiny_lm):  # noqa: F811
    m = make(corpus, d_llm=tiny_lm.hidden_size)
    model = bound(tiny_lm, m).to(torch.bfloat16)
    assert m.adaptor.weight.dtype == torch.bfloat16  # what trains follows the model
    assert m.encoder.carried_centroids.dtype == torch.float32 and m.encoder.carried_centroids.device.type == "cpu"
    assert "modalities.speech.encoder.carried_centroids" in model.state_dict()
