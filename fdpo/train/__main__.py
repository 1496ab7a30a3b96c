"""`python -m fdpo.train [flags]`: preference fine-tuning; with no flags, the built-in CPU run."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())  # a torchrun worker ends its process inside main (see its docstring)
