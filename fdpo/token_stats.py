"""Per-token statistics of a policy head and a reference head in one pass, without the logits.

`token_kl`, `token_entropy`, `token_statistics` and `perturbed_logprobs` (and the two-model losses
built on them) get, from one online sweep over vocabulary tiles with one `tl.dot` chain per head
and tile:
    policy log-prob of the label and LSE, reference log-prob and LSE, KL(ref || policy),
    policy entropy, and the label log-probs of the logit mixtures (1 +- eps) z -+ eps z_ref
(docs/math.md 5, 6, 7, 8), and the mean logit, whether the label is the top-1 and log sum p^2
(docs/math.md 13, constants). The backward (policy side only: the reference is a constant)
recomputes the policy tile, and the reference tile when the KL has a gradient, from the saved LSEs:
    dz = g_lp (onehot - p) + g_kl (p - p_ref) - g_H p (z - LSE + H).
"""

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from .head_stats import head_stats
from .heads import HeadInput, LMHead, StatsRequest
from .options import BackwardOptions

# The names `token_statistics` computes, in the order of HeadStats' fields.
TOKEN_STATISTICS = ("logprob", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")


def token_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    softcap: float | None = None,
    ref_softcap: float | None = None,
    temperature: float = 1.0,
    backend: str = "auto",
    deterministic: bool = False,
    ref_temperature: float | None = None,
    backward_buffer_bytes: int | None = None,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Label log-probs of policy and reference, and the per-token KL(ref || policy), without logits.

    KL_t = sum_v p_ref,t(v) (log p_ref,t(v) - log p_t(v)), TDPO's sequential KL (docs/math.md 6).

    Args:
        hidden: [..., D] policy final hidden states (float16/bfloat16/float32, any strides).
        weight: [V, D] policy head on the same device, of any float dtype. bias: [V] or None. softcap:
            policy logits soft cap (Gemma-2), or None.
        ref_hidden: [..., D'] reference hidden states of the same tokens (same leading shape).
        ref_weight: [V, D'] reference head of the same vocabulary (may be `weight` itself).
            ref_bias: [V] or None. ref_softcap: the reference's soft cap, or None (give it explicitly
            when the reference model caps its logits).
        labels: integer [...] in [0, V) or ignore_index. temperature: divides the policy's logits,
            and the reference's unless ref_temperature is given.
        backend: "auto" | "triton" | "torch" | "reference" (only "reference" differentiates twice:
            create_graph=True raises RuntimeError on the others). deterministic: fixed-order gradient sums.
        backward_buffer_bytes: the triton backend's split-backward buffer, as in `fdpo.token_logprobs`.
        compute_dtype: the dtype both heads' products are formed in, as in `fdpo.token_logprobs`.

    Returns:
        (logprob, ref_logprob, kl), float32 of hidden's leading shape, exactly 0 at ignored tokens.
        logprob and kl are differentiable in hidden, weight and bias; the reference gets no gradient.
    """
    ref_head = LMHead(ref_weight, ref_bias, ref_softcap, temperature if ref_temperature is None else ref_temperature,
                      compute_dtype=compute_dtype)
    out = head_stats(HeadInput(hidden, LMHead(weight, bias, softcap, temperature, compute_dtype=compute_dtype)), labels,
                     ref=HeadInput(ref_hidden, ref_head, "ref_"), request=StatsRequest(kl=True),
                     ignore_index=ignore_index, backend=backend,
                     backward=BackwardOptions(deterministic, backward_buffer_bytes))
    return out.logprob, out.ref_logprob, out.kl


def token_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    temperature: float = 1.0,
    backend: str = "auto",
    deterministic: bool = False,
    backward_buffer_bytes: int | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Entropy H_t = LSE(z_t) - sum_v p_t(v) z_t(v) of the policy's next-token distribution (docs/math.md 7).

    Args:
        hidden: [..., D]; weight: [V, D]; bias, softcap, temperature as in `fdpo.token_logprobs`.
        labels: integer [...] or None. With labels, tokens whose label is ignore_index get 0 (and no
            gradient); without, every token is scored.
        backend, deterministic, backward_buffer_bytes, compute_dtype: as in `fdpo.token_logprobs`.

    Returns:
        float32 [...] entropies (nats), differentiable in hidden, weight and bias.
    """
    if labels is None:
        if not isinstance(hidden, torch.Tensor):
            raise TypeError(f"hidden must be a tensor, got {type(hidden).__name__}")
        # Label 0 at every token, and an ignore_index no label equals, whatever the caller's was.
        labels, ignore_index = torch.zeros(hidden.shape[:-1], dtype=torch.long, device=hidden.device), -1
    out = head_stats(HeadInput(hidden, LMHead(weight, bias, softcap, temperature, compute_dtype=compute_dtype)),
                     labels, request=StatsRequest(entropy=True), ignore_index=ignore_index, backend=backend,
                     backward=BackwardOptions(deterministic, backward_buffer_bytes))
    return out.entropy


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
    compute_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Several per-token statistics of the policy head from one pass over the vocabulary, without logits.

    With z = capped(logit_scale (h W^T + b)) / temperature (docs/math.md 0, 13) and p = softmax(z):
        "logprob"          log p(label)                 float32, differentiable (always computed)
        "entropy"          -sum_v p_v log p_v           float32, differentiable (docs/math.md 7)
        "mean_logits"      (1/V) sum_v z_v              float32, constant (docs/math.md 13)
        "is_top1"          label == first argmax of z   torch.bool, constant
        "log_sum_sq_probs" log sum_v p_v^2              float32, constant

    Args:
        hidden: [..., D] final hidden states (float16/bfloat16/float32, any strides).
        weight: [V, D] head, any float dtype; bias: [V] or None. softcap, temperature as in `fdpo.token_logprobs`;
            logit_scale: multiplies the logits (bias included) before the soft cap, positive.
        labels: integer [...] in [0, V) or ignore_index (those tokens get 0 / False and no gradient).
        outputs: names among TOKEN_STATISTICS; "logprob" is computed and returned whether named or not.
        backend, deterministic, backward_buffer_bytes, compute_dtype: as in `fdpo.token_logprobs`.
        gather: None, or a zero-argument callable returning a context manager entered around every
            use of weight and bias, forward and backward (DeepSpeed ZeRO-3's parameter gather).

    Returns:
        {name: tensor of labels' shape} for "logprob" and each name of `outputs`. logprob and entropy
        are differentiable in hidden, weight and bias (gradients in each one's dtype); the others are
        constants.

    Raises:
        ValueError: an unknown name in `outputs` (the message lists TOKEN_STATISTICS).
    """
    if isinstance(outputs, str) or not isinstance(outputs, (tuple, list)):
        raise TypeError(f"outputs must be a tuple of names among {TOKEN_STATISTICS}, got {outputs!r}")
    unknown = [name for name in outputs if name not in TOKEN_STATISTICS]
    if unknown:
        raise ValueError(f"outputs must be names among {TOKEN_STATISTICS}; unknown: {unknown}")
    wanted = {"logprob", *outputs}
    request = StatsRequest(entropy="entropy" in wanted, mean_logits="mean_logits" in wanted,
                           top1="is_top1" in wanted, log_sum_sq_probs="log_sum_sq_probs" in wanted)
    head = LMHead(weight, bias, softcap, temperature, scale=logit_scale, gather=gather, compute_dtype=compute_dtype)
    out = head_stats(HeadInput(hidden, head), labels, request=request, ignore_index=ignore_index, backend=backend,
                     backward=BackwardOptions(deterministic, backward_buffer_bytes))
    return {name: getattr(out, name) for name in TOKEN_STATISTICS if name in wanted}


def perturbed_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    *,
    ignore_index: int = -100,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    softcap: float | None = None,
    ref_softcap: float | None = None,
    temperature: float = 1.0,
    backend: str = "auto",
    ref_temperature: float | None = None,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """epsilon-DPO's perturbed label log-probs (docs/math.md 5), without logits and without gradient.

    logprob_plus = log_softmax((1 + eps) z - eps z_ref)[label], logprob_minus = log_softmax((1 - eps) z
    + eps z_ref)[label], with z and z_ref the (capped, temperature-scaled) policy and reference logits.

    Args: as `token_kl` (ref_temperature: the reference's temperature, default `temperature`;
        compute_dtype: both heads'), plus eps in (0, 1).

    Returns:
        (logprob_plus, logprob_minus), float32 of hidden's leading shape, 0 at ignored tokens; constants
        (no gradient).
    """
    ref_head = LMHead(ref_weight, ref_bias, ref_softcap, temperature if ref_temperature is None else ref_temperature,
                      compute_dtype=compute_dtype)
    with torch.no_grad():
        out = head_stats(HeadInput(hidden, LMHead(weight, bias, softcap, temperature, compute_dtype=compute_dtype)),
                         labels,
                         ref=HeadInput(ref_hidden, ref_head, "ref_"), request=StatsRequest(eps=eps),
                         ignore_index=ignore_index, backend=backend)
    return out.logprob_plus, out.logprob_minus
