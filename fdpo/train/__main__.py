"""`python -m fdpo.train [flags]`: preference fine-tuning; with no flags, the built-in CPU run."""

import os
import sys

from .cli import exit_without_finalization, main

if __name__ == "__main__":
    status = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a torchrun worker (see exit_without_finalization)
        exit_without_finalization(status)
    sys.exit(status)
