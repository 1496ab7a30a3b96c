"""Test configuration: the same suite runs on CPU (interpreted kernels) and on a GPU (compiled).

Without CUDA, TRITON_INTERPRET=1 is set before anything imports triton (`triton.jit` decides at
decoration time whether a kernel is compiled or interpreted), so the real Triton kernels run on
CPU tensors. With CUDA the kernels are compiled and tests put their tensors on the GPU through
the `device` fixture.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def device() -> torch.device:
    """Where kernel tests put their tensors: the GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
