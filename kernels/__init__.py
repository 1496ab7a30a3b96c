"""Triton kernels of fdpo and their launchers (installed as `fdpo.kernels`).

Pure functions of tensors: no autograd, no nn.Module. Each launcher validates its operands,
allocates its outputs and runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1.
"""

from .launch import Launch, Tiles, interpreting
from .logprob_bwd import logprob_backward, logprob_backward_launches
from .logprob_fwd import logprob_forward, logprob_forward_launches
from .preference_loss import (
    preference_loss_backward,
    preference_loss_backward_launch,
    preference_loss_forward,
    preference_loss_forward_launch,
)
from .token_stats_fwd import token_stats_forward, token_stats_forward_launch

__all__ = [
    "Launch",
    "Tiles",
    "interpreting",
    "logprob_backward",
    "logprob_backward_launches",
    "logprob_forward",
    "logprob_forward_launches",
    "preference_loss_backward",
    "preference_loss_backward_launch",
    "preference_loss_forward",
    "preference_loss_forward_launch",
    "token_stats_forward",
    "token_stats_forward_launch",
]
