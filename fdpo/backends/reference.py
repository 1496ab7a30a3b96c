"""The `reference` backend: naive PyTorch that materializes the [tokens x vocabulary] logits.

This is what preference trainers do today (logits -> float32 -> log_softmax -> gather), kept as
the baseline that benchmarks compare against. It runs in the dtype given, whatever autocast is
active, and is differentiated by autograd (whose backward follows the autocast state it is called
under: call backward outside autocast, as PyTorch recommends), which can differentiate twice.
"""

import torch

from ..heads import LOGPROBS_ONLY, HeadInput, HeadStats, ScoredTokens, StatsRequest
from ..options import PairLossSpec
from . import PAIR_METRICS, pairs


def logits(head: HeadInput) -> torch.Tensor:
    """float32 [..., V] capped(h W^T + b) / temperature, the matmul in the inputs' dtype whatever autocast is active."""
    with torch.autocast(head.hidden.device.type, enabled=False):
        z = torch.nn.functional.linear(head.hidden, head.weight, head.bias).float()
    softcap = head.head.softcap
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / head.head.temperature


def pick(logprobs: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """logprobs[..., label], 0 where labels == ignore_index."""
    ignored = labels == ignore_index
    picked = logprobs.gather(-1, labels.masked_fill(ignored, 0).long().unsqueeze(-1)).squeeze(-1)
    return picked.masked_fill(ignored, 0.0)


def token_stats(policy: HeadInput, labels: torch.Tensor, ref: HeadInput | None = None,
                request: StatsRequest = LOGPROBS_ONLY, ignore_index: int = -100) -> dict[str, torch.Tensor]:
    """float32 [...] per-token statistics from materialized logits of both heads (see `fdpo.heads.HeadStats`).

    "logprob" always; "entropy", "ref_logprob" (with a reference), "kl" (KL(ref || policy)),
    "logprob_plus" / "logprob_minus" (eps) as requested; all 0 where labels == ignore_index.
    """
    z = logits(policy)
    logp = torch.log_softmax(z, dim=-1)
    ignored = labels == ignore_index
    out = {"logprob": pick(logp, labels, ignore_index)}
    if request.entropy:
        out["entropy"] = (-(logp.exp() * logp).sum(-1)).masked_fill(ignored, 0.0)
    if ref is None:
        return out
    z_ref = logits(ref)
    ref_logp = torch.log_softmax(z_ref, dim=-1)
    out["ref_logprob"] = pick(ref_logp, labels, ignore_index)
    if request.kl:
        out["kl"] = (ref_logp.exp() * (ref_logp - logp)).sum(-1).masked_fill(ignored, 0.0)
    eps = request.eps
    if eps is not None:
        out["logprob_plus"] = pick(torch.log_softmax((1 + eps) * z - eps * z_ref, -1), labels, ignore_index)
        out["logprob_minus"] = pick(torch.log_softmax((1 - eps) * z + eps * z_ref, -1), labels, ignore_index)
    return out


class ReferenceBackend:
    """Materialized logits and plain autograd: the baseline, and the backend that differentiates twice."""

    name = "reference"

    def head_stats(self, policy: HeadInput, tokens: ScoredTokens, ref: HeadInput | None,
                   request: StatsRequest) -> HeadStats:
        # -1 marks the tokens that are not scored (the scored labels are in [0, V)).
        flat = torch.full((tokens.num_tokens,), -1, dtype=torch.long, device=tokens.rows.device)
        labels = flat.index_copy(0, tokens.rows, tokens.labels.long()).view(tokens.lead_shape)
        per_token = token_stats(policy, labels, ref, request, ignore_index=-1)
        return HeadStats(**{name: tokens.layout(value.reshape(-1)[tokens.rows]) for name, value in per_token.items()})

    def pair_loss(self, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                  ref_rejected: torch.Tensor, spec: PairLossSpec) -> tuple[torch.Tensor, ...]:
        out = pairs.preference_loss_forward(policy_chosen, policy_rejected, ref_chosen, ref_rejected, spec)
        return (out["loss"], *(out[k].detach() for k in PAIR_METRICS))
