"""Test configuration: run the real Triton kernels on CPU through Triton's interpreter.

TRITON_INTERPRET must be set before anything imports triton, because `triton.jit` decides at
decoration time whether a kernel is compiled or interpreted.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"
