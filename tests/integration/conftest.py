import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def speech_corpus(tmp_path_factory) -> Path:
    """A small real espeak corpus (align manifests + instruct conversations)."""
    if not shutil.which("espeak-ng"):
        pytest.fail("espeak-ng is not installed: run `make install`")
    from data.build_speech import main

    out = tmp_path_factory.mktemp("speech")
    main(["--out", str(out), "--n-align", "40", "--n-instruct", "16", "--jobs", "2"])
    return out
