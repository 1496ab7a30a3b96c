"""Test configuration: the same suite runs on CPU (interpreted kernels) and on a GPU (compiled).

Without CUDA, TRITON_INTERPRET=1 is set before anything imports triton (`triton.jit` decides at
decoration time whether a kernel is compiled or interpreted), so the real Triton kernels run on
CPU tensors. With CUDA the kernels are compiled and tests put their tensors on the GPU through
the `device` fixture.
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def device() -> torch.device:
    """Where kernel tests put their tensors: the GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def poisoned(allocate):
    """`allocate` (torch.empty and kin) whose result, when fdpo's own code asked for it, is filled with
    NaN (floating, complex), True (bool) or a sentinel far from 0 (integers: -123456789, or the
    largest value of an unsigned or narrower type)."""
    def allocate_poisoned(*args, **kwargs):
        tensor = allocate(*args, **kwargs)
        caller = sys._getframe(1).f_code.co_filename
        if caller.startswith(OWN_CODE) and tensor.device.type != "meta" and tensor.numel():
            with torch.no_grad():
                if tensor.dtype.is_floating_point or tensor.dtype.is_complex:
                    tensor.fill_(float("nan"))
                elif tensor.dtype == torch.bool:
                    tensor.fill_(True)
                else:
                    limits = torch.iinfo(tensor.dtype)
                    tensor.fill_(-123456789 if limits.min <= -123456789 else limits.max)
        return tensor
    return allocate_poisoned


def own_code() -> tuple[str, ...]:
    import fdpo
    import fdpo.kernels
    return tuple(os.path.dirname(module.__file__) + os.sep for module in (fdpo, fdpo.kernels))


OWN_CODE = own_code()
ALLOCATORS = ((torch, "empty"), (torch, "empty_like"), (torch, "empty_strided"), (torch.Tensor, "new_empty"))


@pytest.fixture(autouse=True)
def uninitialized_memory_is_poisoned():
    """A fresh CPU allocation is usually zero-filled, a GPU one holds whatever was there: so that a
    kernel or launcher that reads or returns memory it never wrote fails here too, every tensor fdpo's
    code allocates uninitialized (torch.empty, empty_like, empty_strided, Tensor.new_empty) starts as
    NaN or a sentinel during the tests."""
    saved = [getattr(owner, name) for owner, name in ALLOCATORS]
    for (owner, name), allocate in zip(ALLOCATORS, saved, strict=True):
        setattr(owner, name, poisoned(allocate))
    try:
        yield
    finally:
        for (owner, name), allocate in zip(ALLOCATORS, saved, strict=True):
            setattr(owner, name, allocate)
