"""Checkpoint chains: relocatable (parent stored relative to the checkpoint's folder, old absolute entries still
read, a missing parent named in one line) and loaded only when the keys fit the model's trainable set."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from llm.loader import load_llm
from tasks.checkpoint import META_KEY, PARENT_AT, TrainableOnlyCheckpoint, load_chain, read_chain
from tasks.multimodal import MultimodalLM
from tests.conftest import ToyModality
from tests.unit.helpers import build

TINY = {"hidden_size": 64, "layers": 2, "heads": 4, "intermediate_size": 128}
LLM = "smollm2-135m-instruct:tiny"


def model(stage: str) -> MultimodalLM:
    """A fresh tiny model (its own LLM: LoRA wraps the LLM in place, so models must not share one)."""
    torch.manual_seed(0)
    return build(load_llm(tiny=TINY), ToyModality(), stage)


def save(m: MultimodalLM, run: Path, stage: str, parent: Path | None = None,
         drop: tuple[str, ...] = (), extra: dict[str, torch.Tensor] | None = None) -> Path:
    """``run``/checkpoints/last.ckpt as a training run writes it (TrainableOnlyCheckpoint), ``drop`` keys removed and
    ``extra`` added (a checkpoint of another architecture)."""
    folder = run / "checkpoints"
    folder.mkdir(parents=True)
    ckpt = {"state_dict": {k: v.detach().clone() for k, v in m.state_dict().items()}}
    meta = {"stage": stage, "llm": m.llm_name, "modalities": ["toy"], "parent": str(parent) if parent else None}
    TrainableOnlyCheckpoint(meta, folder).on_save_checkpoint(None, m, ckpt)
    for k in drop:
        del ckpt["state_dict"][k]
    ckpt["state_dict"].update(extra or {})
    torch.save(ckpt, folder / "last.ckpt")
    return folder / "last.ckpt"


@pytest.fixture()
def chain(tmp_path):
    """outputs/align/a1 -> outputs/instruct/i1 under tmp_path; returns (outputs, instruct model, its trained state)."""
    out = tmp_path / "outputs"
    align = save(model("align"), out / "align" / "a1", "align")
    instruct = model("instruct")
    with torch.no_grad():
        for n, p in instruct.named_parameters():
            if p.requires_grad:
                p.add_(1.0)  # what it "trained": differs from any fresh model's weights
    save(instruct, out / "instruct" / "i1", "instruct", parent=align)
    trained = {n: p.detach().clone() for n, p in instruct.named_parameters() if p.requires_grad}
    return out, instruct, trained


def one_line(fn, match: str) -> str:
    with pytest.raises(ValueError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_the_parent_is_stored_relative_to_the_checkpoints_folder(chain):
    out, _, _ = chain
    ckpt = torch.load(out / "instruct" / "i1" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt[META_KEY]["parent"] == "../../../align/a1/checkpoints/last.ckpt"
    assert ckpt[PARENT_AT] == str((out / "align" / "a1" / "checkpoints" / "last.ckpt").resolve())
    assert PARENT_AT not in ckpt[META_KEY]  # a packed folder (tasks.pack merges the metadata) ships no absolute path


def test_a_chain_moved_as_one_tree_loads_every_weight(chain, tmp_path):
    out, _, trained = chain
    moved = tmp_path / "elsewhere" / "outputs"
    moved.parent.mkdir()
    shutil.move(out, moved)
    fresh = model("instruct")
    paths = load_chain(fresh, moved / "instruct" / "i1", LLM, ["toy"])
    assert paths == [(moved / d / "checkpoints" / "last.ckpt").resolve() for d in ("instruct/i1", "align/a1")]
    own = dict(fresh.named_parameters())
    assert trained and all(torch.equal(own[n], v) for n, v in trained.items())


def test_a_run_moved_alone_still_finds_its_parent_where_it_was(chain, tmp_path):
    out, _, _ = chain
    shutil.move(out / "instruct" / "i1", tmp_path / "i1")
    paths = read_chain(tmp_path / "i1")
    assert paths[1][0] == (out / "align" / "a1" / "checkpoints" / "last.ckpt").resolve()


def test_a_missing_parent_is_one_line_naming_it_the_child_and_pack(chain, tmp_path):
    out, _, _ = chain
    shutil.move(out, tmp_path / "moved")
    shutil.rmtree(tmp_path / "moved" / "align")
    child = (tmp_path / "moved" / "instruct" / "i1" / "checkpoints" / "last.ckpt").resolve()
    msg = one_line(lambda: read_chain(tmp_path / "moved" / "instruct" / "i1"),
                   r"its parent checkpoint \.\./\.\./\.\./align/a1/checkpoints/last\.ckpt is missing")
    assert msg.startswith(f"{child}: ") and "python -m tasks.pack" in msg


def test_old_absolute_parent_entries_are_still_read(tmp_path):
    meta = {"stage": "align", "llm": "tiny", "modalities": ["toy"], "parent": None}
    torch.save({"state_dict": {"a": torch.ones(1)}, META_KEY: meta}, tmp_path / "p.ckpt")
    old = {"state_dict": {"b": torch.ones(1)}, META_KEY: {**meta, "parent": str(tmp_path / "p.ckpt")}}
    torch.save(old, tmp_path / "c.ckpt")
    assert [p.name for p, _ in read_chain(tmp_path / "c.ckpt")] == ["c.ckpt", "p.ckpt"]
    (tmp_path / "p.ckpt").unlink()
    one_line(lambda: read_chain(tmp_path / "c.ckpt"), rf"c\.ckpt: its parent checkpoint {tmp_path}/p\.ckpt is missing")


def test_a_parent_pointing_back_is_refused_not_followed_forever(tmp_path):
    meta = {"stage": "align", "llm": "tiny", "modalities": ["toy"], "parent": "c.ckpt"}
    torch.save({"state_dict": {}, META_KEY: meta}, tmp_path / "c.ckpt")
    one_line(lambda: read_chain(tmp_path / "c.ckpt"), r"c\.ckpt: its parent chain loops back to")


def test_a_run_from_a_packed_folder_refuses_it_once_it_was_packed_again(chain, tmp_path):
    """Packing a new model into the folder a run started from used to swap that run's base weights silently (and
    count its stages twice on the next card)."""
    from tasks.pack import pack

    out, instruct, _ = chain
    pack(out / "instruct" / "i1", tmp_path / "models" / "m", max_mb=None)
    child = save(instruct, out / "instruct" / "i2", "instruct", parent=tmp_path / "models" / "m")
    assert [p.name for p, _ in read_chain(child)] == ["last.ckpt", "m"]  # the pack it started from: fine
    with torch.no_grad():
        for prm in instruct.parameters():
            if prm.requires_grad:
                prm.add_(1.0)
    save(instruct, out / "instruct" / "i3", "instruct")
    pack(out / "instruct" / "i3", tmp_path / "models" / "m", max_mb=None)  # another model into the same folder
    one_line(lambda: read_chain(child), rf"i2/checkpoints/last\.ckpt: its parent {tmp_path}/models/m was packed again")


# ------------------------------------------------------------------ keys against the trainable set
def test_align_to_instruct_loads_with_fresh_lora(tmp_path):
    """The legal growth: LoRA, absent from the align checkpoint, stays as initialised."""
    align = model("align")
    path = save(align, tmp_path / "a1", "align")
    instruct = model("instruct")
    lora0 = {n: p.detach().clone() for n, p in instruct.named_parameters() if "lora_" in n}
    load_chain(instruct, path, LLM, ["toy"])
    own = dict(instruct.named_parameters())
    assert lora0 and all(torch.equal(own[n], v) for n, v in lora0.items())
    assert torch.equal(own["modalities.toy.adaptor.weight"], dict(align.named_parameters())["modalities.toy.adaptor.weight"])


def test_a_weight_the_model_lacks_is_named_with_the_file_and_the_trainable_set(tmp_path):
    extra = {f"modalities.toy.adaptor.extra{i}": torch.ones(1) for i in range(5)}
    path = save(model("align"), tmp_path / "a1", "align", extra=extra)
    msg = one_line(lambda: load_chain(model("instruct"), path, LLM, ["toy"]),
                   r"5 weight\(s\) this model lacks: modalities\.toy\.adaptor\.extra0, .*extra2 and 2 more")
    assert msg.startswith(f"{path.resolve()}: ")
    assert msg.endswith("this model trains lora (16), modalities.toy.adaptor (2)")


def test_a_component_the_chain_provides_only_in_part_is_refused(tmp_path):
    """An adaptor checkpoint without the bias (another architecture) would leave that weight random, silently."""
    path = save(model("align"), tmp_path / "a1", "align", drop=("modalities.toy.adaptor.bias",))
    msg = one_line(lambda: load_chain(model("instruct"), path, LLM, ["toy"]),
                   r"its chain lacks 1 trainable weight\(s\) of a component it provides: modalities\.toy\.adaptor\.bias;")
    assert msg.startswith(f"{path.resolve()}: ")
    assert "this model trains lora (16), modalities.toy.adaptor (2), the chain provides modalities.toy.adaptor (1)" in msg


def test_a_chain_missing_part_of_its_lora_is_refused(chain, tmp_path):
    _, instruct, _ = chain
    lora = next(n for n, p in instruct.named_parameters() if "lora_" in n)
    path = save(instruct, tmp_path / "i2", "instruct", drop=(lora,))
    one_line(lambda: load_chain(model("instruct"), path, LLM, ["toy"]),
             rf"lacks 1 trainable weight\(s\) of a component it provides: {lora};")


def test_a_cards_provenance_paths_are_written_relative_to_the_working_directory(tmp_path):
    from tasks.pack import local_paths

    m = {"init_from": [str(tmp_path / "outputs/run/checkpoints/last.ckpt"), "/elsewhere/x.ckpt"], "wer": 0.5,
         "nested": {"train_files": [str(tmp_path / "data/a.json")]}, "note": "/ not a path under root"}
    assert local_paths(m, tmp_path) == {"init_from": ["outputs/run/checkpoints/last.ckpt", "/elsewhere/x.ckpt"],
                                        "wer": 0.5, "nested": {"train_files": ["data/a.json"]},
                                        "note": "/ not a path under root"}
