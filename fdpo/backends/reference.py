"""The `reference` backend: naive PyTorch that materializes the [tokens x vocabulary] logits.

This is what preference trainers do today (logits -> float32 -> log_softmax -> gather), kept as
the baseline that benchmarks compare against. It runs in the dtype given, whatever autocast is
active, and is differentiated by autograd (whose backward follows the autocast state it is called
under: call backward outside autocast, as PyTorch recommends).
"""

import torch


def logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None,
           temperature: float) -> torch.Tensor:
    """float32 [..., V] capped(h W^T + b) / temperature, the matmul in the inputs' dtype whatever autocast is active."""
    with torch.autocast(hidden.device.type, enabled=False):
        z = torch.nn.functional.linear(hidden, weight, bias).float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def pick(logprobs: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """logprobs[..., label], 0 where labels == ignore_index."""
    ignored = labels == ignore_index
    picked = logprobs.gather(-1, labels.masked_fill(ignored, 0).long().unsqueeze(-1)).squeeze(-1)
    return picked.masked_fill(ignored, 0.0)


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """float32 [...] log p(label), 0 where labels == ignore_index; hidden [..., D], labels [...]."""
    logprobs = torch.log_softmax(logits(hidden, weight, bias, softcap, temperature), dim=-1)
    return pick(logprobs, labels, ignore_index)


def token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    temperature: float = 1.0,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    ref_softcap: float | None = None,
    ref_temperature: float = 1.0,
    entropy: bool = False,
    kl: bool = False,
    eps: float | None = None,
) -> dict[str, torch.Tensor]:
    """float32 [...] per-token statistics from materialized logits of both heads (see fdpo.token_stats).

    "logprob" always; "entropy", "ref_logprob" (with a reference), "kl" (KL(ref || policy)),
    "logprob_plus" / "logprob_minus" (eps) as requested; all 0 where labels == ignore_index.
    """
    z = logits(hidden, weight, bias, softcap, temperature)
    logp = torch.log_softmax(z, dim=-1)
    ignored = labels == ignore_index
    out = {"logprob": pick(logp, labels, ignore_index)}
    if entropy:
        out["entropy"] = (-(logp.exp() * logp).sum(-1)).masked_fill(ignored, 0.0)
    if ref_hidden is None:
        return out
    z_ref = logits(ref_hidden, ref_weight, ref_bias, ref_softcap, ref_temperature)
    ref_logp = torch.log_softmax(z_ref, dim=-1)
    out["ref_logprob"] = pick(ref_logp, labels, ignore_index)
    if kl:
        out["kl"] = (ref_logp.exp() * (ref_logp - logp)).sum(-1).masked_fill(ignored, 0.0)
    if eps is not None:
        out["logprob_plus"] = pick(torch.log_softmax((1 + eps) * z - eps * z_ref, -1), labels, ignore_index)
        out["logprob_minus"] = pick(torch.log_softmax((1 - eps) * z + eps * z_ref, -1), labels, ignore_index)
    return out
