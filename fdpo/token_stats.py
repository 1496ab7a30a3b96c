"""Per-token statistics of a policy head and a reference head in one pass, without the logits.

`token_kl`, `token_entropy` and `perturbed_logprobs` (and the two-model losses built on them) get,
from one online sweep over vocabulary tiles with one `tl.dot` chain per head and tile:
    policy log-prob of the label and LSE, reference log-prob and LSE, KL(ref || policy),
    policy entropy, and the label log-probs of the logit mixtures (1 +- eps) z -+ eps z_ref
(docs/math.md 5, 6, 7, 8). The backward (policy side only: the reference is a constant) recomputes the
policy tile, and the reference tile when the KL has a gradient, from the saved LSEs:
    dz = g_lp (onehot - p) + g_kl (p - p_ref) - g_H p (z - LSE + H).
"""

import torch

from .backends import head_ops, reference, resolve_backend
from .backends.chunked import segment_sums
from .logprobs import (
    LMHead,
    ScoredTokens,
    check_head,
    check_packed_layout,
    refuse_double_backward,
    rows_view,
    scored_tokens,
)

# Per-row outputs of the fused pass, in the order the autograd Function returns them.
STATS = ("logprob", "entropy", "ref_logprob", "kl", "logprob_plus", "logprob_minus")
DIFFERENTIABLE = ("logprob", "entropy", "kl")
# The public entries whose gradients go through FusedTokenStats' backward.
STATS_FUNCTIONS = "fdpo.token_kl / fdpo.token_entropy / fdpo.FusedLMHead / fdpo.TDPOLoss / fdpo.EpsilonDPOLoss"


def _ref_kwargs(ref_hidden: torch.Tensor | None, ref_head: LMHead | None) -> dict:
    """The reference head as the backends' `ref_*` keyword arguments."""
    if ref_head is None:
        return {}
    return dict(ref_hidden=rows_view(ref_hidden), ref_weight=ref_head.weight, ref_bias=ref_head.bias,
                ref_softcap=ref_head.softcap, ref_temperature=ref_head.temperature)


class FusedTokenStats(torch.autograd.Function):
    """Per-row statistics of the scored tokens through one or two heads, with a hand-written backward.

    forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, head, ref_head, tokens, backend,
    entropy, kl, eps, deterministic) returns the float32 [R] tensors of STATS over the scored rows
    (None for those not computed). logprob, entropy and kl are differentiable in the policy's hidden,
    weight and bias; the reference inputs get no gradient. Saves the inputs and the per-row LSEs
    (and entropy), never anything of size tokens x vocabulary.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, head: LMHead,
                ref_head: LMHead | None, tokens: ScoredTokens, backend: str, entropy: bool, kl: bool,
                eps: float | None, deterministic: bool):
        out = head_ops(backend).token_stats_forward(
            rows_view(hidden), weight, tokens.rows, tokens.labels, bias=bias, softcap=head.softcap,
            temperature=head.temperature, entropy=entropy, kl=kl, eps=eps, **_ref_kwargs(ref_hidden, ref_head))
        ctx.save_for_backward(hidden, weight, bias, ref_hidden, out["lse"], out.get("ref_lse"), out.get("entropy"))
        ctx.head, ctx.ref_head, ctx.tokens = head, ref_head, tokens
        ctx.backend, ctx.deterministic = backend, deterministic
        ctx.mark_non_differentiable(*(out[k] for k in ("ref_logprob", "logprob_plus", "logprob_minus") if k in out))
        return tuple(out.get(name) for name in STATS)

    @staticmethod
    def backward(ctx, grad_lp, grad_entropy, grad_ref_lp, grad_kl, grad_plus, grad_minus):
        refuse_double_backward(STATS_FUNCTIONS, ctx.backend)
        hidden, weight, bias, ref_hidden, lse, ref_lse, entropy = ctx.saved_tensors
        tokens: ScoredTokens = ctx.tokens
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        if not (need_hidden or need_weight or need_bias):
            return (None,) * 14
        grad_lp = lse.new_zeros(lse.shape) if grad_lp is None else grad_lp.float().contiguous()
        kl_terms = {}
        if grad_kl is not None and ref_lse is not None:
            kl_terms = dict(ref_lse=ref_lse, kl_grad=grad_kl.float().contiguous(),
                            **_ref_kwargs(ref_hidden, ctx.ref_head))
        if grad_entropy is not None and entropy is not None:
            kl_terms.update(entropy=entropy, entropy_grad=grad_entropy.float().contiguous())
        head: LMHead = ctx.head
        d_hidden, d_weight, d_bias = head_ops(ctx.backend).logprob_backward(
            rows_view(hidden), weight, tokens.rows, tokens.labels, lse, grad_lp, bias=bias, softcap=head.softcap,
            temperature=head.temperature, need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias,
            deterministic=ctx.deterministic, **kl_terms)
        if d_hidden is not None:
            full = hidden.new_zeros(tokens.num_tokens, hidden.shape[-1])
            d_hidden = full.index_copy_(0, tokens.rows, d_hidden.to(hidden.dtype)).view(hidden.shape)
        if d_weight is not None:
            d_weight = d_weight.to(weight.dtype)
        if d_bias is not None:
            d_bias = d_bias.to(bias.dtype)
        return (d_hidden, d_weight, d_bias) + (None,) * 11


def _check_ref(hidden: torch.Tensor, ref_hidden: torch.Tensor, ref_head: LMHead, labels: torch.Tensor,
               weight: torch.Tensor, ignore_index: int) -> None:
    if not isinstance(ref_hidden, torch.Tensor) or ref_hidden.dim() < 1 or ref_hidden.shape[:-1] != hidden.shape[:-1]:
        raise ValueError(f"ref_hidden must have hidden's leading shape {tuple(hidden.shape[:-1])} (one row per "
                         f"token, any hidden size), got {tuple(getattr(ref_hidden, 'shape', ()))}")
    check_head(ref_hidden, ref_head, labels, ignore_index, prefix="ref_")
    if ref_head.weight.shape[0] != weight.shape[0]:
        raise ValueError(f"ref_weight has {ref_head.weight.shape[0]} vocabulary rows but weight has "
                         f"{weight.shape[0]}: the two heads must share one vocabulary")
    if ref_hidden.device != hidden.device:
        raise ValueError(f"ref_hidden is on {ref_hidden.device} but hidden is on {hidden.device}")


def head_token_stats(
    hidden: torch.Tensor,
    head: LMHead,
    labels: torch.Tensor,
    *,
    ref_hidden: torch.Tensor | None = None,
    ref_head: LMHead | None = None,
    entropy: bool = False,
    kl: bool = False,
    eps: float | None = None,
    ignore_index: int = -100,
    cu_seqlens: torch.Tensor | None = None,
    per_sequence: bool = False,
    backend: str = "auto",
    deterministic: bool = False,
) -> dict[str, torch.Tensor]:
    """The shared entry of the token statistics (validated, dispatched, laid out).

    Returns a dict with "logprob" and, as requested, "entropy", "ref_logprob" (whenever a reference
    is given), "kl", "logprob_plus", "logprob_minus": float32 of hidden's leading shape (0 at
    ignored tokens), or per-sequence sums ([B] padded, [S] packed: cu_seqlens implies per_sequence)
    when per_sequence. Differentiable in the policy's hidden, weight and bias (logprob, entropy, kl).
    """
    check_head(hidden, head, labels, ignore_index)
    if (ref_hidden is None) != (ref_head is None):
        raise ValueError("the reference needs both ref_hidden and its head (ref_weight)")
    if ref_hidden is not None:
        _check_ref(hidden, ref_hidden, ref_head, labels, head.weight, ignore_index)
    elif kl or eps is not None:
        raise ValueError("the KL and the perturbed log-probs need the reference (ref_hidden, ref_weight)")
    if eps is not None and not (isinstance(eps, (int, float)) and 0.0 < eps < 1.0):
        raise ValueError(f"eps must be a number in the open interval (0, 1), got {eps!r}")
    per_sequence = per_sequence or cu_seqlens is not None
    check_packed_layout(hidden, cu_seqlens, per_sequence)
    concrete = resolve_backend(backend, hidden.device)
    if concrete == "reference":
        ref = {} if ref_head is None else dict(ref_hidden=ref_hidden.detach(), ref_weight=ref_head.weight.detach(),
                                               ref_bias=None if ref_head.bias is None else ref_head.bias.detach(),
                                               ref_softcap=ref_head.softcap, ref_temperature=ref_head.temperature)
        per_token = reference.token_stats(hidden, head.weight, labels, bias=head.bias, softcap=head.softcap,
                                          temperature=head.temperature, ignore_index=ignore_index,
                                          entropy=entropy, kl=kl, eps=eps, **ref)
        if not per_sequence:
            return per_token
        tokens = scored_tokens(labels, ignore_index, cu_seqlens, per_sequence=True)
        return {k: segment_sums(v.reshape(-1)[tokens.rows], tokens.seq_ids, tokens.num_seqs)
                for k, v in per_token.items()}
    tokens = scored_tokens(labels, ignore_index, cu_seqlens, per_sequence)
    ref_weight, ref_bias = (ref_head.weight, ref_head.bias) if ref_head is not None else (None, None)
    values = FusedTokenStats.apply(hidden, head.weight, head.bias, ref_hidden, ref_weight, ref_bias, head, ref_head,
                                   tokens, concrete, entropy, kl, eps, deterministic)
    out = {}
    for name, rows_value in zip(STATS, values, strict=True):
        if rows_value is None:
            continue
        if per_sequence:
            out[name] = segment_sums(rows_value, tokens.seq_ids, tokens.num_seqs)
        else:
            full = rows_value.new_zeros(tokens.num_tokens).index_copy(0, tokens.rows, rows_value)
            out[name] = full.view(tokens.lead_shape)
    return out


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Label log-probs of policy and reference, and the per-token KL(ref || policy), without logits.

    KL_t = sum_v p_ref,t(v) (log p_ref,t(v) - log p_t(v)), TDPO's sequential KL (docs/math.md 6).

    Args:
        hidden: [..., D] policy final hidden states (float16/bfloat16/float32, any strides).
        weight: [V, D] policy head, same dtype and device. bias: [V] or None. softcap: policy logits
            soft cap (Gemma-2), or None.
        ref_hidden: [..., D'] reference hidden states of the same tokens (same leading shape).
        ref_weight: [V, D'] reference head of the same vocabulary (may be `weight` itself).
            ref_bias: [V] or None. ref_softcap: the reference's soft cap, or None (give it explicitly
            when the reference model caps its logits).
        labels: integer [...] in [0, V) or ignore_index. temperature: divides both heads' logits.
        backend: "auto" | "triton" | "torch" | "reference" (only "reference" differentiates twice:
            create_graph=True raises RuntimeError on the others). deterministic: fixed-order gradient sums.

    Returns:
        (logprob, ref_logprob, kl), float32 of hidden's leading shape, exactly 0 at ignored tokens.
        logprob and kl are differentiable in hidden, weight and bias; the reference gets no gradient.
    """
    out = head_token_stats(hidden, LMHead(weight, bias, softcap, temperature), labels, ref_hidden=ref_hidden,
                           ref_head=LMHead(ref_weight, ref_bias, ref_softcap, temperature), kl=True,
                           ignore_index=ignore_index, backend=backend, deterministic=deterministic)
    return out["logprob"], out["ref_logprob"], out["kl"]


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
) -> torch.Tensor:
    """Entropy H_t = LSE(z_t) - sum_v p_t(v) z_t(v) of the policy's next-token distribution (docs/math.md 7).

    Args:
        hidden: [..., D]; weight: [V, D]; bias, softcap, temperature as in `fdpo.token_logprobs`.
        labels: integer [...] or None. With labels, tokens whose label is ignore_index get 0 (and no
            gradient); without, every token is scored.

    Returns:
        float32 [...] entropies (nats), differentiable in hidden, weight and bias.
    """
    if labels is None:
        if not isinstance(hidden, torch.Tensor):
            raise TypeError(f"hidden must be a tensor, got {type(hidden).__name__}")
        labels = torch.zeros(hidden.shape[:-1], dtype=torch.long, device=hidden.device)
    out = head_token_stats(hidden, LMHead(weight, bias, softcap, temperature), labels, entropy=True,
                           ignore_index=ignore_index, backend=backend, deterministic=deterministic)
    return out["entropy"]


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """epsilon-DPO's perturbed label log-probs (docs/math.md 5), without logits and without gradient.

    logprob_plus = log_softmax((1 + eps) z - eps z_ref)[label], logprob_minus = log_softmax((1 - eps) z
    + eps z_ref)[label], with z and z_ref the (capped, temperature-scaled) policy and reference logits.

    Args: as `token_kl`, plus eps in (0, 1).

    Returns:
        (logprob_plus, logprob_minus), float32 of hidden's leading shape, 0 at ignored tokens; constants
        (no gradient).
    """
    with torch.no_grad():
        out = head_token_stats(hidden, LMHead(weight, bias, softcap, temperature), labels, ref_hidden=ref_hidden,
                               ref_head=LMHead(ref_weight, ref_bias, ref_softcap, temperature), eps=eps,
                               ignore_index=ignore_index, backend=backend)
    return out["logprob_plus"], out["logprob_minus"]
