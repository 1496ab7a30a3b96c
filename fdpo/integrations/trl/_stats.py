"""`token_statistics` for the TRL head until `fdpo.token_statistics` is public.

Temporary: the label log-probs and the entropy come from one fused pass (`fdpo.head_stats`); the
constants (mean logit, top-1, log sum p^2) from a second chunked pass without gradient; the logit
scale is folded into the weight (a scaled copy, differentiable); `gather` is entered around the
forward only, not the backward.
"""

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch

from ...head_stats import head_stats
from ...heads import HeadInput, LMHead, StatsRequest
from ...options import BackwardOptions

# Rows of logits per chunk of the constants' pass.
CHUNK_ROWS = 1024


def token_statistics(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    outputs: tuple[str, ...] = ("logprob",),
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    ignore_index: int = -100,
    backend: str = "auto",
    deterministic: bool = False,
    backward_buffer_bytes: int | None = None,
    gather: Callable[[], AbstractContextManager] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-token statistics of z = capped(logit_scale (h W^T + b)) / temperature (see the module docstring).

    hidden [..., D], weight [V, D], labels integer [...]. Returns float32 [...] "logprob" and, as
    requested in `outputs`, "entropy" (both differentiable), "mean_logits", "log_sum_sq_probs" and
    bool "is_top1" (constants); 0 / False at ignored tokens.
    """
    with gather() if gather is not None else nullcontext():
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
        hidden, weight = hidden.to(dtype), weight.to(dtype) * logit_scale
        bias = None if bias is None else bias.to(dtype) * logit_scale
        stats = head_stats(HeadInput(hidden, LMHead(weight, bias, softcap, temperature)), labels,
                           request=StatsRequest(entropy="entropy" in outputs), ignore_index=ignore_index,
                           backend=backend, backward=BackwardOptions(deterministic, backward_buffer_bytes))
        result = {"logprob": stats.logprob}
        if "entropy" in outputs:
            result["entropy"] = stats.entropy
        constants = [name for name in ("mean_logits", "is_top1", "log_sum_sq_probs") if name in outputs]
        if constants:
            result.update(_constants(hidden, weight, bias, labels, softcap, temperature, ignore_index, constants))
    return result


@torch.no_grad()
def _constants(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
               softcap: float | None, temperature: float, ignore_index: int,
               names: list[str]) -> dict[str, torch.Tensor]:
    """mean_logits, is_top1 (first maximum wins ties) and log_sum_sq_probs of the scored tokens, chunked."""
    flat_hidden, flat_labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    rows = (flat_labels != ignore_index).nonzero().squeeze(1)
    values = {name: torch.zeros(flat_labels.shape, dtype=torch.float32, device=hidden.device) for name in names}
    for start in range(0, rows.numel(), CHUNK_ROWS):
        chunk = rows[start:start + CHUNK_ROWS]
        z = (flat_hidden[chunk] @ weight.T).float()
        if bias is not None:
            z = z + bias.float()
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        z = z / temperature
        if "mean_logits" in values:
            values["mean_logits"][chunk] = z.mean(-1)
        if "is_top1" in values:
            values["is_top1"][chunk] = (z.argmax(-1) == flat_labels[chunk]).float()
        if "log_sum_sq_probs" in values:
            values["log_sum_sq_probs"][chunk] = torch.logsumexp(2 * torch.log_softmax(z, -1), -1)
    shaped = {name: value.view(labels.shape) for name, value in values.items()}
    if "is_top1" in shaped:
        shaped["is_top1"] = shaped["is_top1"].bool()
    return shaped
