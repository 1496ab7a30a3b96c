"""The `reference` backend: naive PyTorch that materializes the [tokens x vocabulary] logits.

This is what preference trainers do today (logits -> float32 -> log_softmax -> gather), kept as
the baseline that benchmarks compare against. It multiplies in the head's compute dtype
(`fdpo.heads.head_compute_dtype`; the public entries turn an outer autocast into it), not in
whatever an active autocast would pick, and is differentiated by autograd (whose backward follows
the autocast state it is called under: call backward outside autocast, as PyTorch recommends),
which can differentiate twice.
"""

from dataclasses import replace

import torch

from ..heads import (
    LOGPROBS_ONLY,
    HeadInput,
    HeadStats,
    LMHead,
    ScoredTokens,
    StatsRequest,
    gathered,
    head_compute_dtype,
)
from ..options import PairLossSpec
from . import PAIR_METRICS, pairs


class GatheredLinear(torch.autograd.Function):
    """h W^T + b with the head's `gather` context entered in the backward too (the forward runs in it).

    The backward is written with differentiable ops, so create_graph=True still differentiates twice.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, head: LMHead):
        ctx.save_for_backward(hidden, weight, bias)
        ctx.head = head
        return torch.nn.functional.linear(hidden, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        with gathered(ctx.head):
            hidden, weight, bias = ctx.saved_tensors
            d_hidden = grad @ weight if ctx.needs_input_grad[0] else None
            flat_grad, flat_hidden = grad.reshape(-1, grad.shape[-1]), hidden.reshape(-1, hidden.shape[-1])
            d_weight = flat_grad.T @ flat_hidden if ctx.needs_input_grad[1] else None
            d_bias = flat_grad.sum(0) if bias is not None and ctx.needs_input_grad[2] else None
        return d_hidden, d_weight, d_bias, None


def rounded(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x with its values rounded to `dtype`, kept in x's dtype, and the gradient of the identity: the
    operand of a product formed in `dtype` whose gradient comes back in x's own dtype."""
    return x + (x.to(dtype).to(x.dtype) - x).detach()


def logits(head: HeadInput) -> torch.Tensor:
    """float32 [..., V] capped(scale (h W^T + b)) / temperature (docs/math.md 0, 13), the products in the
    head's compute dtype whatever autocast is active. A head whose hidden states and weight both have
    the compute dtype is multiplied in it (a 16-bit head's logits rounded to it, as trainers do);
    any other head's operands are rounded to the compute dtype (whole tensors: this backend
    materializes everything anyway) and multiplied in float32, the bias added in float32."""
    dtype = head_compute_dtype(head)
    hidden, weight, bias = head.hidden, head.weight, head.bias
    if not hidden.dtype == weight.dtype == dtype:
        hidden, weight = rounded(hidden, dtype).float(), rounded(weight, dtype).float()
        bias = None if bias is None else bias.float()
    elif bias is not None:
        bias = bias.to(dtype)
    with torch.autocast(head.hidden.device.type, enabled=False):
        if head.head.gather is None:
            z = torch.nn.functional.linear(hidden, weight, bias)
        else:
            z = GatheredLinear.apply(hidden, weight, bias, head.head)
    z = z.float()
    if head.head.scale != 1.0:
        z = z * head.head.scale
    softcap = head.head.softcap
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / head.head.temperature


def scored_rows_only(head: HeadInput, ignored: torch.Tensor) -> HeadInput:
    """The head with the hidden states of ignored tokens (bool `ignored`, hidden's leading shape) set
    to 0 by a `where`: their logits are masked out anyway, and a NaN there (a padding row) must not
    reach the gradients through softmax's backward (NaN * 0), as the fused backends never read it."""
    return replace(head, hidden=torch.where(ignored.unsqueeze(-1), 0.0, head.hidden))


def expectation(log_w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[...] sum_v w_v x_v over the last dim, w = exp(log_w), under the convention 0 log 0 = 0 of the
    fused backends (docs/math.md 8): an entry of weight 0 (a masked, -inf logit, or an underflowed
    one) adds nothing whatever x is (-inf, +inf, or the NaN of -inf - -inf); one of weight > 0 with
    x = +inf makes the sum +inf, a constant with zero gradient. Both factors are masked before the
    product, so that autograd never forms 0 * inf either. A NaN stays NaN."""
    w = log_w.exp()
    zero = w == 0
    infinite = ~zero & (x == float("inf"))
    skip = zero | infinite
    terms = w.masked_fill(skip, 0.0) * x.masked_fill(skip, 0.0)
    return terms.sum(-1).masked_fill(infinite.any(-1), float("inf"))


def kl_of(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """[...] KL(a || b) = sum_v a_v (log a_v - log b_v) of log-distributions [..., V], under 0 log 0 = 0
    (`expectation`): +inf, with zero gradient, where some b_v = 0 < a_v."""
    return expectation(log_a, log_a - log_b)


def entropy_of(logp: torch.Tensor) -> torch.Tensor:
    """float32 [...] entropy -sum_v p_v log p_v of the log-softmax values logp [..., V] (docs/math.md 7),
    0 log 0 = 0 at masked logits (`expectation`)."""
    return -expectation(logp, logp)


def top1(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """bool [...]: whether labels (in [0, V)) is the first argmax of z [..., V] (torch.argmax's)."""
    return z.argmax(-1) == labels


def pick(logprobs: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """logprobs[..., label], 0 where labels == ignore_index."""
    ignored = labels == ignore_index
    picked = logprobs.gather(-1, labels.masked_fill(ignored, 0).long().unsqueeze(-1)).squeeze(-1)
    return picked.masked_fill(ignored, 0.0)


def token_stats(policy: HeadInput, labels: torch.Tensor, ref: HeadInput | None = None,
                request: StatsRequest = LOGPROBS_ONLY, ignore_index: int = -100) -> dict[str, torch.Tensor]:
    """float32 [...] per-token statistics from materialized logits of both heads (see `fdpo.heads.HeadStats`).

    "logprob" always; "entropy", "ref_logprob" (with a reference), "kl" (KL(ref || policy)),
    "logprob_plus" / "logprob_minus" (eps) as requested; all 0 where labels == ignore_index. The
    docs/math.md 13 constants "mean_logits", "is_top1" (bool, False there) and "log_sum_sq_probs" are
    detached. `ref` is a constant (detached here).
    """
    ignored = labels == ignore_index
    z = logits(scored_rows_only(policy, ignored))
    logp = torch.log_softmax(z, dim=-1)
    out = {"logprob": pick(logp, labels, ignore_index)}
    if request.entropy:
        out["entropy"] = entropy_of(logp).masked_fill(ignored, 0.0)
    constants = {"mean_logits": lambda: z.mean(-1), "is_top1": lambda: top1(z, labels.clamp(min=0)),
                 "log_sum_sq_probs": lambda: torch.logsumexp(2.0 * logp, dim=-1)}
    for name in request.constants:
        out[name] = constants[name]().detach().masked_fill(ignored, 0)
    if ref is None:
        return out
    ref = ref.detached()
    z_ref = logits(scored_rows_only(ref, ignored))
    ref_logp = torch.log_softmax(z_ref, dim=-1)
    out["ref_logprob"] = pick(ref_logp, labels, ignore_index)
    if request.kl:
        out["kl"] = kl_of(ref_logp, logp).masked_fill(ignored, 0.0)
    eps = request.eps
    if eps is not None:  # constants, as on the other backends (docs/math.md 5)
        z = z.detach()
        z_plus = (1 + eps) * z - eps * z_ref.clamp(min=torch.finfo(torch.float32).min)  # -inf: docs/math.md 8
        out["logprob_plus"] = pick(torch.log_softmax(z_plus, -1), labels, ignore_index)
        if eps > 0:  # z+ is +inf where the reference alone masks: lp+ is -inf there (docs/math.md 8)
            alone = ((z_ref == float("-inf")) & (z > float("-inf"))).any(-1) & ~ignored
            out["logprob_plus"] = out["logprob_plus"].masked_fill(alone, float("-inf"))
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
