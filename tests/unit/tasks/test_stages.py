import pytest
import torch

from tasks.stages import trainable_names
from tests.unit.helpers import batch_for, build, toy_records


def test_align_trains_only_the_adaptor(tiny_lm, toy_modality):
    model = build(tiny_lm, toy_modality, "align")
    names = trainable_names(model)
    assert names and all(n.startswith("modalities.toy.adaptor.") for n in names)


def test_instruct_trains_adaptor_and_llm_lora_only(tiny_lm, toy_modality):
    model = build(tiny_lm, toy_modality, "instruct")
    names = trainable_names(model)
    adaptor = [n for n in names if n.startswith("modalities.toy.adaptor.")]
    lora = [n for n in names if n.startswith("llm.") and "lora_" in n]
    assert adaptor and lora and len(adaptor) + len(lora) == len(names)
    assert not any("encoder" in n for n in names)
    # LoRA is scoped to the LLM: no LoRA layer inside any modality
    assert not any("lora_" in n for n, _ in model.modalities.named_parameters())


def test_frozen_weights_bitwise_unchanged_after_steps(tiny_lm, toy_modality):
    model = build(tiny_lm, toy_modality, "instruct")
    model.optim.lr = 1e-1
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    train0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    batch = batch_for(model, toy_records(4))
    model.trainer = None
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-1)
    for _ in range(2):
        model(batch)["loss"].backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    changed = [n for n, p in model.named_parameters() if n in train0 and not torch.equal(p, train0[n])]
    assert any("adaptor" in n for n in changed) and any("lora_B" in n for n in changed)


def test_loss_equals_full_logits_cross_entropy(tiny_lm, toy_modality):
    """The head runs only where labels exist; the loss must equal HF's full-logits CE."""
    model = build(tiny_lm, toy_modality, "align")
    batch = batch_for(model, toy_records(3))
    with torch.no_grad():
        ours = model(batch)["loss"]
        embeds, _, _ = model.embed(batch)
        logits = model.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
        ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(ours, ref, atol=1e-5)
    assert (batch["labels"] != -100).sum() < batch["attention_mask"].sum() / 2  # prompt + placeholders unlabeled


def test_a_stage_after_a_lora_stage_keeps_the_lora_layers_frozen(tiny_lm, toy_modality):
    """align after a LoRA-trained stage (e.g. speech_tone after speech_read_phonemes): the chain's LoRA layers are
    built so its weights load, and the stage's trainable set stays the adaptor's."""
    from llm.lora import LoraSpec
    from llm.tokens import add_placeholder_tokens
    from tasks.multimodal import MultimodalLM
    from tests.unit.helpers import STAGES

    pid = add_placeholder_tokens(tiny_lm.tokenizer, tiny_lm.model, [toy_modality.placeholder])[toy_modality.placeholder]
    model = MultimodalLM(tiny_lm.model, tiny_lm.tokenizer, {"toy": toy_modality}, {"toy": pid}, STAGES["align"],
                         lora=LoraSpec(r=4, alpha=8, dropout=0.0), chain_lora=True)
    lora = [n for n, _ in model.named_parameters() if "lora_" in n]
    names = trainable_names(model)
    assert lora and not any("lora_" in n for n in names)
    assert names and all(n.startswith("modalities.toy.adaptor.") for n in names)


def test_inputs_given_as_symbols_without_an_objective_that_embeds_them_are_one_clear_error(tiny_lm, toy_modality):
    model = build(tiny_lm, toy_modality)
    table = model.llm.get_input_embeddings().weight
    with pytest.raises(ValueError, match=r"toy inputs given as symbols need an objective .*this run has \[\]"):
        model.symbol_rows("toy", torch.zeros(1, 3, 5), table)
