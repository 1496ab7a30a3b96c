"""Triton kernels of fdpo and their launchers (installed as `fdpo.kernels`).

Pure functions of tensors: no autograd, no nn.Module. Each launcher validates its operands,
allocates its outputs and runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1. The
head launchers take the types of `fdpo.heads` (HeadInput, ScoredTokens, StatsRequest, StatsGrad).
"""

from .head_logprob_fwd import head_logprob_forward, head_logprob_forward_launches
from .head_stats_bwd import head_stats_backward, head_stats_backward_launches
from .head_stats_fwd import head_stats_forward, head_stats_forward_launch
from .head_stats_split_bwd import head_stats_dz_launch, head_stats_split_backward
from .launch import Launch, Tiles, interpreting, runs_on
from .preference_loss import (
    preference_loss_backward,
    preference_loss_backward_launch,
    preference_loss_forward,
    preference_loss_forward_launch,
)
from .token_divergence_bwd import (
    token_divergence_backward,
    token_divergence_backward_launches,
    token_divergence_dz_launch,
    token_divergence_split_backward,
)
from .token_divergence_fwd import token_divergence_forward, token_divergence_forward_launch

__all__ = [
    "Launch",
    "Tiles",
    "head_logprob_forward",
    "head_logprob_forward_launches",
    "head_stats_backward",
    "head_stats_backward_launches",
    "head_stats_dz_launch",
    "head_stats_forward",
    "head_stats_forward_launch",
    "head_stats_split_backward",
    "interpreting",
    "preference_loss_backward",
    "preference_loss_backward_launch",
    "preference_loss_forward",
    "preference_loss_forward_launch",
    "runs_on",
    "token_divergence_backward",
    "token_divergence_backward_launches",
    "token_divergence_dz_launch",
    "token_divergence_forward",
    "token_divergence_forward_launch",
    "token_divergence_split_backward",
]
