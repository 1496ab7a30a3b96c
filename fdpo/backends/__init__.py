"""Backends of the fused LM-head computations and how `backend=` picks one.

- "triton": the fused kernels of `fdpo.kernels` (CUDA tensors, or CPU under TRITON_INTERPRET=1);
- "torch": the same algorithm in chunked PyTorch (`fdpo.backends.chunked`), O(chunk) memory;
- "reference": naive materializing PyTorch (`fdpo.backends.reference`), the baseline;
- "auto": triton on CUDA, torch otherwise (triton on CPU when TRITON_INTERPRET=1).
"""

import os
from types import ModuleType

import torch

BACKENDS = ("auto", "triton", "torch", "reference")


def triton_kernels() -> ModuleType | None:
    """The `fdpo.kernels` module, or None where Triton is not installed."""
    try:
        from fdpo import kernels
    except ImportError:
        return None
    return kernels


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend ("triton", "torch" or "reference") that `backend` means on `device`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        kernels = triton_kernels()
        usable = kernels is not None and (device.type == "cuda" or kernels.interpreting())
        return "triton" if usable else "torch"
    if backend == "triton":
        kernels = triton_kernels()
        if kernels is None:
            raise ValueError("backend='triton' needs the triton package; install it or use backend='torch'")
        if device.type != "cuda" and not kernels.interpreting():
            hint = " (TRITON_INTERPRET=1 was set after fdpo was imported)" if os.environ.get("TRITON_INTERPRET") else ""
            raise ValueError(f"backend='triton' needs CUDA tensors, got tensors on {device}{hint}; "
                             "set TRITON_INTERPRET=1 before importing fdpo to run the kernels on CPU, "
                             "or use backend='torch'")
    return backend


def head_ops(backend: str) -> ModuleType:
    """The module providing logprob_forward / logprob_backward for a concrete fused backend."""
    if backend == "triton":
        return triton_kernels()
    from . import chunked

    return chunked


def pair_ops(backend: str) -> ModuleType:
    """The module providing preference_loss_forward / _backward for a concrete backend.

    The Triton kernels for "triton"; the plain PyTorch path of `fdpo.backends.pairs` for "torch" and
    "reference" (the pair loss has no logits to materialize, so both run the same float32 code).
    """
    if backend == "triton":
        return triton_kernels()
    from . import pairs

    return pairs
