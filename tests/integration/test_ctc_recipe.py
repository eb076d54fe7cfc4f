"""The two-phase alignment recipe through the real experiment configs, shrunk to tiny models:
speech_align_ctc (CTC only, the LLM never runs) -> speech_align_long (soft compression + LoRA) -> evaluate."""

from __future__ import annotations

import json

import pytest
import torch

from tasks.runner import UsageError, run
from tests.integration.test_pipeline import TINY, cfg_for

SHRINK = ["modality.hidden=32", "modality.layers=1", "modality.heads=2", "data.batch_size=4",
          "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "data.max_eval_samples=2"]


def _data(c, tmp_path) -> list[str]:
    return [f"data.train_files={c}/train.jsonl", f"data.val_files={c}/val.jsonl", f"data.eval_files={c}/eval.jsonl",
            f"modality.cache_dir={tmp_path}/cache"]


def _meta(run_dir) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["mmlm"]


@pytest.fixture(scope="module")
def phase1(speech_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("ctc")
    m = run(cfg_for(TINY + ["experiment=speech_align_ctc", "trainer.max_steps=2", "stage.ctc_min_count=2",
                            "trainer.log_every_n_steps=1", f"paths.output_dir={out}/a"] + SHRINK + _data(speech_corpus, out)))
    return out, m


def test_ctc_only_phase_never_runs_the_llm_and_logs_the_ctc_readout(phase1, tiny_lm):
    from modality.speech.asr.ctc import single_char_tokens

    out, m = phase1
    assert m["steps"] == 2 and m["first_loss"] > 0
    header = (out / "a" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "train/ctc_speech" in header and "val/ctc_wer" in header
    assert "train/lm_loss" not in header  # no LM loss: the LLM's forward is skipped
    vocab = _meta(out / "a")["ctc_vocab"]
    ckpt = torch.load(out / "a" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["mmlm"]["ctc_classifier"] == "linear"
    assert ckpt["state_dict"]["objectives.speech_ctc.head.1.weight"].shape[0] == len(vocab)  # the trained classifier is saved
    assert not any(k.startswith("llm.") for k in ckpt["state_dict"])               # and nothing of the LLM
    assert vocab == sorted(vocab) and set(single_char_tokens(tiny_lm.tokenizer)) <= set(vocab)
    assert m["ctc_vocab"] == len(vocab)


def test_phase2_needs_an_align_run_and_inherits_its_ctc_classes(phase1, speech_corpus, tmp_path):
    out, _ = phase1
    common = TINY + ["experiment=speech_align_long", "trainer.max_steps=2", "eval.before=false", "eval.every_n_steps=null",
                     "eval.max_new_tokens=3"] + SHRINK + _data(speech_corpus, out)
    with pytest.raises(UsageError, match="needs init_from"):
        run(cfg_for(common + [f"paths.output_dir={tmp_path}/x"]))
    m = run(cfg_for(common + [f"init_from={out}/a", f"paths.output_dir={tmp_path}/b", "trainer.log_every_n_steps=1",
                              "stage.ctc_min_count=7"]))  # a new min count must NOT change the adaptor's classes
    assert m["steps"] == 2 and "wer" in m
    assert _meta(tmp_path / "b")["ctc_vocab"] == _meta(out / "a")["ctc_vocab"]
    header = (tmp_path / "b" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "train/lm_loss" in header and "train/ctc_speech" not in header  # LM loss only
    # only LoRA trains: phase 1's adaptor and classifier (its spelling) are kept as they are, and not re-saved
    saved = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert saved and all("lora_" in k for k in saved), sorted(saved)[:5]
    # the contract command, no modality keys: evaluate builds the adaptor as trained (transformer, widths, soft)
    ev = run(cfg_for(TINY + ["stage=evaluate", f"init_from={tmp_path}/b", f"paths.output_dir={tmp_path}/ev",
                             f"data.eval_manifest={speech_corpus}/eval.jsonl", "data.max_eval_samples=2", "eval.max_new_tokens=3"]))
    assert ev["ctc_vocab"] == m["ctc_vocab"] and "wer" in ev  # compresses over the classes the adaptor learned
    assert 0 <= ev["ctc_wer"] and all("ctc_readout" in json.loads(r) for r in (tmp_path / "ev" / "predictions.jsonl").open())
    # joint CTC/LLM decoding from the command line: every transcript row keeps its scored candidates
    jt = run(cfg_for(TINY + ["stage=evaluate", f"init_from={tmp_path}/b", f"paths.output_dir={tmp_path}/jt",
                             f"data.eval_manifest={speech_corpus}/eval.jsonl", "data.max_eval_samples=2", "eval.max_new_tokens=3",
                             "eval.num_beams=2", "eval.ctc_beams=2", "eval.joint_weight=0.5"]))
    rows = [json.loads(r) for r in (tmp_path / "jt" / "predictions.jsonl").open()]
    assert "wer" in jt and len(rows) == 2
    for r in rows:
        texts = [c["text"] for c in r["candidates"]]
        assert r["ctc_readout"] in texts or not r["ctc_readout"]
        assert r.get("raw_prediction", r["prediction"]) in texts and {"lm", "ctc", "tokens", "source"} <= set(r["candidates"][0])
    c = speech_corpus
    ins = run(cfg_for(TINY + ["stage=instruct", "trainer.max_steps=1", "eval.before=false", f"init_from={tmp_path}/b",
                              f"paths.output_dir={tmp_path}/ins", f"data.train_files={c}/instruct_train.json",
                              f"data.eval_files={c}/instruct_eval.json", "data.max_eval_samples=2", "eval.max_new_tokens=3"]))
    assert ins["steps"] == 1 and ins["ctc_vocab"] == m["ctc_vocab"]  # instruct, too, builds the adaptor as trained


def test_evaluate_inherits_the_trained_modality_but_the_command_line_wins():
    from tasks.runner import _inherit_modality

    cfg = cfg_for(TINY + ["stage=evaluate", "modality.hidden=99"])
    saved = {"_target_": cfg.modality._target_, "adaptor": "transformer", "hidden": 32, "layers": 1, "ctc_compress": "soft",
             "d_llm": 576}
    taken = _inherit_modality(cfg, [{"stage": "align", "modality_cfg": saved}])
    assert taken["adaptor"] == "transformer" and taken["layers"] == 1 and taken["ctc_compress"] == "soft"
    assert cfg.modality.hidden == 99 and "hidden" not in taken   # given on the command line: kept
    assert "d_llm" not in taken                                  # filled from the LLM at run time, never inherited
    assert cfg.modality.adaptor == "mlp"                         # the composed config is not changed
    other = cfg_for(["llm=tiny", "stage=evaluate", "modality=stock"])
    assert _inherit_modality(other, [{"modality_cfg": saved}]) == {}  # another modality's settings never leak in
    # an align run continuing an align run takes the architecture only (it may change compression on purpose)
    from tasks.runner import ARCH_MODALITY_KEYS

    phase2 = cfg_for(TINY + ["stage=align"])
    saved2 = {**saved, "encoder_layers": "all", "time_mask": 0.2}
    taken = _inherit_modality(phase2, [{"stage": "align", "modality_cfg": saved2}], ARCH_MODALITY_KEYS)
    assert taken["encoder_layers"] == "all" and taken["adaptor"] == "transformer"
    assert "ctc_compress" not in taken and "time_mask" not in taken and set(taken) <= set(ARCH_MODALITY_KEYS)


@pytest.mark.slow
def test_phoneme_chain_then_the_llm_reads_the_phonemes_and_writes_the_words(speech_corpus, tmp_path):
    """speech_align_phonemes -> speech_read_phonemes (LoRA reading soft phonemes) -> evaluate, where the LLM writes
    every transcript (greedy, or its beams re-scored by the phoneme CTC) and the lexicon's words are only a
    reference column."""
    common = TINY + SHRINK + _data(speech_corpus, tmp_path) + ["eval.max_new_tokens=3", "trainer.log_every_n_steps=1"]
    p1 = run(cfg_for(common + ["experiment=speech_align_phonemes", "trainer.max_steps=2", "data.eval_files=null",
                               f"paths.output_dir={tmp_path}/p1"]))
    phonemes = _meta(tmp_path / "p1")["ctc_phonemes"]
    assert p1["steps"] == 2 and phonemes[0] == "<b>"
    p2 = run(cfg_for(common + ["experiment=speech_read_phonemes", "trainer.max_steps=2", "eval.every_n_steps=null",
                               f"init_from={tmp_path}/p1", f"paths.output_dir={tmp_path}/p2"]))
    assert p2["steps"] == 2 and "wer" in p2 and "ctc_per" in p2
    saved = torch.load(tmp_path / "p2" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["state_dict"] and all("lora_" in k for k in saved["state_dict"])  # only the reader trains
    assert saved["mmlm"]["ctc_phonemes"] == phonemes
    header = (tmp_path / "p2" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "train/lm_loss" in header and "train/ctc_speech" not in header
    ev = run(cfg_for(TINY + ["stage=evaluate", f"init_from={tmp_path}/p2", f"paths.output_dir={tmp_path}/ev",
                             f"data.eval_manifest={speech_corpus}/eval.jsonl", "data.max_eval_samples=2",
                             "eval.max_new_tokens=3", "eval.num_beams=2", "eval.joint_weight=0.5",
                             "eval.lexicon.reference=true", "eval.lexicon.words=null"]))
    rows = [json.loads(r) for r in (tmp_path / "ev" / "predictions.jsonl").open()]
    assert {"wer", "lexicon_wer", "ctc_per"} <= set(ev) and len(rows) == 2
    for r in rows:
        assert {c["source"] for c in r["candidates"]} == {"llm"}  # only the LLM's beams are candidates
        assert r.get("raw_prediction", r["prediction"]) in [c["text"] for c in r["candidates"]]
        assert "lexicon" in r and "phoneme_readout" in r


@pytest.mark.slow
def test_tone_heads_train_alone_and_the_next_stage_reads_phonemes_then_tone(speech_corpus, tmp_path):
    """speech_align_phonemes -> speech_tone (only the heads train, on the manifest's voice labels; no LLM) ->
    instruct, whose LLM reads the soft phonemes and then one position per label."""
    common = TINY + SHRINK + _data(speech_corpus, tmp_path) + ["eval.max_new_tokens=3", "trainer.log_every_n_steps=1"]
    run(cfg_for(common + ["experiment=speech_align_phonemes", "trainer.max_steps=2", "data.eval_files=null",
                          f"paths.output_dir={tmp_path}/p1"]))
    tone = run(cfg_for(common + ["experiment=speech_tone", "trainer.max_steps=3", f"init_from={tmp_path}/p1",
                                 f"data.val_files={speech_corpus}/eval.jsonl", f"paths.output_dir={tmp_path}/tone"]))
    assert tone["steps"] == 3
    saved = torch.load(tmp_path / "tone" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["state_dict"] and all(k.startswith(("objectives.speech_tone.heads.", "objectives.speech_tone.trunk.")) for k in saved["state_dict"])
    classes = saved["mmlm"]["tone_classes"]
    assert classes["gender"] == ["female", "male"] and len(classes["speed_class"]) == 3
    header = (tmp_path / "tone" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "train/tone_speech" in header and "val/tone_gender" in header
    c = speech_corpus
    ins = run(cfg_for(TINY + ["stage=instruct", "trainer.max_steps=1", "eval.before=false", f"init_from={tmp_path}/tone",
                              f"paths.output_dir={tmp_path}/ins", f"data.train_files={c}/instruct_train.json",
                              f"data.eval_files={c}/instruct_eval.json", "data.max_eval_samples=2", "eval.max_new_tokens=3"]))
    assert ins["steps"] == 1
    # what the LLM reads for one clip: its phonemes, then 4 tone positions (the chain's soft compression + the heads)
    from tasks.runner import build_trained
    from tests.unit.helpers import batch_for

    model = build_trained(str(tmp_path / "ins"), TINY).model.eval()
    recs = [json.loads(line) for line in (c / "eval.jsonl").open()][:1]
    from modality.speech.records import manifest_record
    import random

    rec = manifest_record(recs[0], "eval.jsonl:1", random.Random(0), "speech", "<speech>")
    rec["root"] = str(c)
    batch = batch_for(model, [rec], generate=True)
    with torch.no_grad():
        embeds, outs, mask = model.embed(batch)
        out, lengths = outs["speech"]
        ctc = model.objectives["speech_ctc"]
        _, k = ctc.transform("speech", out, lengths, model.llm.get_input_embeddings().weight)
    slots = int((batch["input_ids"] == model.placeholder_ids["speech"]).sum())
    attended = int(mask[batch["input_ids"] == model.placeholder_ids["speech"]].sum())
    assert attended == min(int(k[0]) + 4, slots) and "speech_tone" in model.objectives


@pytest.mark.slow
def test_reading_practice_on_text_alone_feeds_the_llm_the_phoneme_rows_of_each_sentence(speech_corpus, tmp_path):
    """speech_align_phonemes -> speech_read_text: samples are sentences (no audio) whose espeak-ng phonemes stand in
    for a clip, one position per phoneme, each the chain's table row (noise off here); only LoRA trains, and
    validation on real clips still runs."""
    common = TINY + SHRINK + _data(speech_corpus, tmp_path) + ["eval.max_new_tokens=3", "trainer.log_every_n_steps=1"]
    run(cfg_for(common + ["experiment=speech_align_phonemes", "trainer.max_steps=2", "data.eval_files=null",
                          f"paths.output_dir={tmp_path}/p1"]))
    texts = [json.loads(line)["text"] for line in (speech_corpus / "train.jsonl").open()][:8]
    lines = tmp_path / "text.jsonl"
    lines.write_text("".join(json.dumps({"id": f"t{i}", "text": t, "from_text": True}) + "\n" for i, t in enumerate(texts)))
    quiet = "modality.text_noise={substitute: 0.0, delete: 0.0, insert: 0.0, soft: 0.0}"
    got = run(cfg_for(common + ["experiment=speech_read_text", "trainer.max_steps=2", "eval.every_n_steps=null",
                                f"data.train_files={lines}", f"init_from={tmp_path}/p1", quiet,
                                f"paths.output_dir={tmp_path}/rt"]))
    assert got["steps"] == 2 and "wer" in got
    saved = torch.load(tmp_path / "rt" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["state_dict"] and all("lora_" in k for k in saved["state_dict"])
    header = (tmp_path / "rt" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "val/lm_loss" in header  # validation read real clips
    # what the LLM reads for a sentence: one position per espeak-ng phoneme, each that phoneme's table row
    from tasks.runner import build_trained
    from tests.unit.helpers import batch_for
    from modality.speech.records import manifest_record
    import random

    model = build_trained(str(tmp_path / "rt"), TINY + [quiet]).model.eval()
    rec = manifest_record({"text": texts[0], "from_text": True}, "text.jsonl:1", random.Random(0), "speech", "<speech>")
    batch = batch_for(model, [rec], generate=True)
    ctc = model.objectives["speech_ctc"]
    ids = [ctc.phonemes.index(p) for p in ctc.phonemizer([texts[0]])[0]]
    slots = batch["input_ids"] == model.placeholder_ids["speech"]
    assert int(slots.sum()) == len(ids) and batch["modal"]["speech"]["kind"] == "symbols"
    with torch.no_grad():
        embeds, outs, _ = model.embed(batch)
    table = ctc.phoneme_table(model.llm.get_input_embeddings().weight)
    assert not outs and torch.allclose(embeds[slots], table[ids])
