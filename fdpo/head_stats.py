"""The one entry of the head statistics: validate, resolve the backend, index the scored tokens, dispatch.

`fdpo.token_logprobs`, `sequence_logprobs`, `token_kl`, `token_entropy`, `perturbed_logprobs`,
`FusedLMHead` and the losses all come here; the backend computes (`fdpo.backends`).
"""

import torch

from .backends import Backend, resolve_backend
from .heads import (
    LOGPROBS_ONLY,
    HeadInput,
    HeadStats,
    StatsRequest,
    autocast_compute_dtype,
    check_packed_layout,
    gathered,
    scored_tokens,
)
from .options import DEFAULT_BACKWARD, BackwardOptions


def head_stats(
    policy: HeadInput,
    labels: torch.Tensor,
    *,
    ref: HeadInput | None = None,
    request: StatsRequest = LOGPROBS_ONLY,
    ignore_index: int = -100,
    cu_seqlens: torch.Tensor | None = None,
    per_sequence: bool = False,
    backend: str | Backend = "auto",
    backward: BackwardOptions = DEFAULT_BACKWARD,
) -> HeadStats:
    """Statistics of the tokens of `labels` (integer, policy.hidden's leading shape) through the policy head.

    ref: the reference model's hidden states of the same tokens with its head (a constant), needed
    by request.kl and request.eps. Returns float32 statistics of hidden's leading shape (0 at ignored
    tokens), or per-sequence sums ([B] padded, [S] packed: cu_seqlens implies per_sequence).
    Differentiable in the policy's hidden, weight and bias (logprob, entropy, kl). `backend` is a
    name of `fdpo.options.BACKENDS` (resolved here, with the `backward` options) or a resolved backend.
    The heads' `gather` contexts are entered around all of it (the checks read the weights' shapes).
    request.mean_logits / top1 / log_sum_sq_probs are per token only: per-sequence sums of them raise
    ValueError. A head without an explicit compute_dtype is computed in the autocast dtype where
    torch.autocast is on for its hidden states' device at this call (`fdpo.heads.autocast_compute_dtype`),
    the policy's and the reference's alike.
    """
    policy = autocast_compute_dtype(policy)
    ref = None if ref is None else autocast_compute_dtype(ref)
    with gathered(policy.head, None if ref is None else ref.head):
        return checked_head_stats(policy, labels, ref, request, ignore_index, cu_seqlens, per_sequence, backend,
                                  backward)


def checked_head_stats(policy: HeadInput, labels: torch.Tensor, ref: HeadInput | None, request: StatsRequest,
                       ignore_index: int, cu_seqlens: torch.Tensor | None, per_sequence: bool,
                       backend: str | Backend, backward: BackwardOptions) -> HeadStats:
    """`head_stats` inside the heads' gather contexts."""
    policy.check(labels, ignore_index)
    if ref is not None:
        ref = HeadInput(ref.hidden, ref.head, prefix="ref_")
        policy.check_reference(ref, labels, ignore_index)
    elif request.kl or request.eps is not None:
        raise ValueError("the KL and the perturbed log-probs need the reference (ref_hidden, ref_weight)")
    eps = request.eps
    if eps is not None and not (isinstance(eps, (int, float)) and 0.0 < eps < 1.0):
        raise ValueError(f"eps must be a number in the open interval (0, 1), got {eps!r}")
    per_sequence = per_sequence or cu_seqlens is not None
    if per_sequence and request.constants:
        raise ValueError(f"{', '.join(request.constants)} are per-token statistics: per-sequence sums "
                         "(sequence_logprobs, cu_seqlens, per_sequence=True) of them are not computed")
    check_packed_layout(policy.hidden, cu_seqlens, per_sequence)
    if isinstance(backend, str):
        backend = resolve_backend(backend, policy.hidden.device, backward=backward)
    tokens = scored_tokens(labels, ignore_index, cu_seqlens, per_sequence)
    return backend.head_stats(policy, tokens, ref, request)
