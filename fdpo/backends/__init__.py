"""The backends of the head statistics and of the pair loss, and how `backend=` picks one.

Every backend implements the same two operations (the `Backend` protocol):
    head_stats(policy, tokens, ref, request) -> HeadStats   statistics of the scored tokens (fdpo.heads)
    pair_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, spec) -> (loss, *PAIR_METRICS)
- "triton": the fused kernels of `fdpo.kernels` (CUDA tensors, or CPU under TRITON_INTERPRET=1),
  with hand-written backwards (`fdpo.backends.fused`);
- "torch": the same algorithm in chunked PyTorch (`fdpo.backends.chunked`), O(chunk) memory, the
  same hand-written backwards;
- "reference": naive materializing PyTorch differentiated by autograd (`fdpo.backends.reference`);
- "auto": triton on CUDA, torch otherwise (triton on CPU when TRITON_INTERPRET=1).
`resolve_backend` turns a name into a backend once per call of a public entry; nothing below it
looks at the name.
"""

import os
from types import ModuleType
from typing import Protocol

import torch

from ..heads import HeadInput, HeadStats, ScoredTokens, StatsRequest
from ..options import BACKENDS, DEFAULT_BACKWARD, BackwardOptions, PairLossSpec

# The pair loss' outputs after the loss, all detached metrics.
PAIR_METRICS = ("nll", "accuracy", "pair_losses", "chosen_rewards", "rejected_rewards", "margins")


class Backend(Protocol):
    """What a backend computes; `name` is the concrete backend ("triton", "torch" or "reference")."""

    name: str

    def head_stats(self, policy: HeadInput, tokens: ScoredTokens, ref: HeadInput | None,
                   request: StatsRequest) -> HeadStats:
        """Statistics of `tokens` through the policy head (and `ref`), laid out by `tokens.layout`.

        Differentiable in the policy's hidden, weight and bias (logprob, entropy, kl); `ref` is a constant.
        """

    def pair_loss(self, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                  ref_rejected: torch.Tensor, spec: PairLossSpec) -> tuple[torch.Tensor, ...]:
        """(loss, *PAIR_METRICS) of float32 [P] sums under `spec`; only the loss is differentiable."""


def triton_kernels() -> ModuleType | None:
    """The `fdpo.kernels` module; None where Triton is not installed and there is no CUDA device.

    With CUDA present a failed import is an error (raised with the import error as its cause): falling
    back to the chunked PyTorch path would hide a broken Triton installation behind a slow one.
    """
    try:
        from fdpo import kernels
    except ImportError as error:
        if torch.cuda.is_available():
            raise ImportError(f"the Triton kernels (fdpo.kernels) failed to import on a machine with CUDA: {error}; "
                              "fix the Triton installation, or pass backend='torch' to every fdpo call "
                              "after uninstalling triton") from error
        return None
    return kernels


def check_backend_name(backend: str) -> None:
    """`backend` must be one of BACKENDS (modules check it at construction, the functions per call)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def backend_name(backend: str, device: torch.device) -> str:
    """The concrete backend name ("triton", "torch" or "reference") that `backend` means on `device`."""
    check_backend_name(backend)
    if backend == "auto":
        kernels = triton_kernels()
        return "triton" if kernels is not None and kernels.runs_on(device) else "torch"
    if backend == "triton":
        kernels = triton_kernels()
        if kernels is None:
            raise ValueError("backend='triton' needs the triton package; install it or use backend='torch'")
        if not kernels.runs_on(device):
            hint = " (TRITON_INTERPRET=1 was set after fdpo was imported)" if os.environ.get("TRITON_INTERPRET") else ""
            raise ValueError(f"backend='triton' needs CUDA tensors, got tensors on {device}{hint}; "
                             "set TRITON_INTERPRET=1 before importing fdpo to run the kernels on CPU, "
                             "or use backend='torch'")
    return backend


def resolve_backend(backend: str, device: torch.device, *, backward: BackwardOptions = DEFAULT_BACKWARD) -> Backend:
    """The backend that `backend` means on `device`.

    backward: how the triton backend runs the head backward (`fdpo.options.BackwardOptions`: fixed-order
    sums, the split backward's buffer); the other backends always sum in a fixed order and hold no
    such buffer.
    """
    name = backend_name(backend, device)
    if name == "triton":
        from .fused import TritonBackend

        return TritonBackend(triton_kernels(), backward)
    if name == "torch":
        from .chunked import TorchBackend

        return TorchBackend()
    from .reference import ReferenceBackend

    return ReferenceBackend()
