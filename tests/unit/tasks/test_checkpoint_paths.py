"""init_from / resume: local paths only, a missing resume named, a checkpoint with non-finite weights refused."""

from __future__ import annotations

import pytest
import torch

from tasks.checkpoint import META_KEY, local_path, read_chain, resume_path


@pytest.mark.parametrize("url", ["http://host/run/last.ckpt", "https://x/y", "s3://bucket/run", "gs://b/c.ckpt", "hf://m"])
def test_urls_are_refused_as_local_paths(url):
    with pytest.raises(ValueError, match=rf"^init_from={url}: must be a local path, not a URL"):
        read_chain(url)
    with pytest.raises(ValueError, match=rf"^resume={url}: must be a local path, not a URL"):
        resume_path(url)
    assert str(local_path("init_from", "runs/a:b")) == "runs/a:b"  # a colon is not a scheme


def test_a_missing_resume_file_is_named(tmp_path):
    with pytest.raises(ValueError, match=rf"^resume={tmp_path}/nope.ckpt: no such checkpoint file$"):
        resume_path(tmp_path / "nope.ckpt")
    with pytest.raises(ValueError, match=r"a directory: give its checkpoints/last.ckpt"):
        resume_path(tmp_path)
    (tmp_path / "last.ckpt").write_bytes(b"x")
    assert resume_path(tmp_path / "last.ckpt") == tmp_path / "last.ckpt"


def test_init_from_refuses_a_checkpoint_with_non_finite_weights(tmp_path):
    meta = {"stage": "align", "llm": "tiny", "modalities": ["toy"], "parent": None}
    good = {"state_dict": {"a.weight": torch.ones(2), "steps": torch.tensor(3)}, META_KEY: meta}
    torch.save(good, tmp_path / "good.ckpt")
    assert read_chain(tmp_path / "good.ckpt")[0][0] == (tmp_path / "good.ckpt").resolve()
    bad = {"state_dict": {"a.weight": torch.tensor([1.0, float("nan")])}, META_KEY: meta}
    torch.save(bad, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match=r"bad\.ckpt: weight a\.weight holds non-finite values"):
        read_chain(tmp_path / "bad.ckpt")
    child = {"state_dict": {"b.weight": torch.ones(1)}, META_KEY: {**meta, "parent": str(tmp_path / "bad.ckpt")}}
    torch.save(child, tmp_path / "child.ckpt")
    with pytest.raises(ValueError, match=r"bad\.ckpt: weight a\.weight"):  # a diverged parent, named
        read_chain(tmp_path / "child.ckpt")
