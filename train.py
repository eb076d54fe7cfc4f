"""Train or evaluate one stage: ``python train.py stage=align modality=speech``."""

import os
import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from tasks.runner import run

    try:
        run(cfg)
    except ValueError as e:  # bad input or an impossible run: one line, non-zero exit
        if os.environ.get("MMLM_TRACEBACK"):
            raise
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
