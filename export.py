"""Export a trained model: ``python export.py init_from=<run or models/...> format=peft|merged|adaptor out=<dir>`` (tasks/export.py)."""

import os
import sys

if __name__ == "__main__":
    from hydra.errors import HydraException

    from tasks.export import main

    try:
        main(sys.argv[1:])
    except (ValueError, HydraException) as e:  # bad input: one line, non-zero exit
        if os.environ.get("MMLM_TRACEBACK"):
            raise
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
