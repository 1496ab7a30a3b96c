"""The `reference` backend: naive PyTorch that materializes the [tokens x vocabulary] logits.

This is what preference trainers do today (logits -> float32 -> log_softmax -> gather), kept as
the baseline that benchmarks compare against. It runs in the dtype given and is differentiated
by autograd.
"""

import torch


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
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    ignored = labels == ignore_index
    picked = logprobs.gather(-1, labels.masked_fill(ignored, 0).long().unsqueeze(-1)).squeeze(-1)
    return picked.masked_fill(ignored, 0.0)

