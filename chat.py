"""Talk to a trained model: ``python chat.py init_from=<run or models/...> series=<csv> prompt="..."`` (tasks/chat.py)."""

import os
import sys

if __name__ == "__main__":
    from hydra.errors import HydraException

    from tasks.chat import main

    try:
        main(sys.argv[1:])
    except (ValueError, KeyboardInterrupt, HydraException) as e:  # bad input: one line, non-zero exit
        if os.environ.get("MMLM_TRACEBACK"):
            raise
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        sys.exit(2)
