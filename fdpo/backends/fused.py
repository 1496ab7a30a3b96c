"""The hand-written backwards shared by the "triton" and "torch" backends.

`HeadStatsFunction` is the one autograd Function of the head statistics: its forward runs the
backend's per-row forward (never a [tokens x vocabulary] tensor) and lays the rows out per token or
per sequence; its backward maps the outputs' gradients back to rows and runs the backend's backward,
which recomputes the logit tiles from the saved LSEs (docs/math.md 1, 6, 7, 8), inside the heads'
`gather` contexts (docs/math.md 13):
    dz = scale * d(capped)/d(raw) / T * (g_lp (onehot - p) + g_kl (p - p_ref) - g_H p (z - LSE + H)).
`PairLossFunction` is the pair loss' (docs/math.md 2-4): the forward saves the per-pair derivatives
of the loss, the backward scales them by the incoming gradient.
A backend provides the four per-row and per-pair operations of `FusedBackend`.
"""

from dataclasses import replace

import torch

from ..heads import (
    LOGPROBS_ONLY,
    STATS,
    TOKEN_CONSTANTS,
    HeadInput,
    HeadStats,
    ScoredTokens,
    StatsGrad,
    StatsRequest,
    gathered,
    head_compute_dtype,
)
from ..options import DEFAULT_BACKWARD, BackwardOptions, PairLossSpec
from . import PAIR_METRICS

# The public entries whose gradients go through HeadStatsFunction's and PairLossFunction's backwards.
HEAD_FUNCTIONS = ("fdpo.token_logprobs / fdpo.sequence_logprobs / fdpo.token_kl / fdpo.token_entropy / "
                  "fdpo.FusedLMHead / fdpo.PreferenceLoss / fdpo.TDPOLoss / fdpo.EpsilonDPOLoss")
PAIR_FUNCTIONS = "fdpo.preference_loss / fdpo.PreferenceLoss / fdpo.EpsilonDPOLoss / fdpo.epsilon_dpo_loss"
# Per-row outputs that are constants for autograd (the reference's and the perturbed log-probs, and
# the docs/math.md 13 statistics, is_top1 a bool).
CONSTANT_STATS = ("ref_logprob", "logprob_plus", "logprob_minus", *TOKEN_CONSTANTS)


def refuse_double_backward(functions: str, backend: str) -> None:
    """Raise inside a hand-written backward that is asked to build a graph (create_graph=True).

    Those backwards are not differentiable: the gradient they return would silently miss every
    second-order term. Autograd runs a backward with grad mode on exactly when create_graph=True.
    """
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{functions}: double backward (create_graph=True through this function's gradient) is not supported "
            f"on backend={backend!r}, whose backward is hand-written; use backend='reference' (plain autograd "
            "over materialized logits) for higher-order gradients such as gradient penalties")


class FusedBackend:
    """A backend with hand-written backwards: subclasses set `name` and give the per-row and per-pair
    operations; `head_stats` and `pair_loss` (the `fdpo.backends.Backend` protocol) run them through
    the autograd Functions of this module."""

    name: str

    def stats_forward(self, policy: HeadInput, tokens: ScoredTokens, ref: HeadInput | None,
                      request: StatsRequest) -> dict[str, torch.Tensor]:
        """float32 [R] per-row statistics (hidden as [B, T, D] views): the requested STATS ("is_top1"
        torch.bool), "lse", and "ref_lse" with a reference; optionally "logprob_sums", the per-sequence
        sums of "logprob"."""
        raise NotImplementedError

    def stats_backward(self, policy: HeadInput, tokens: ScoredTokens,
                       grad: StatsGrad) -> tuple[torch.Tensor | None, ...]:
        """(d_hidden float32 [R, D], d_weight [V, D], d_bias [V]) of the terms `grad` (hidden as a
        [B, T, D] view; see `fdpo.heads.StatsGrad`); None where `grad` does not need it."""
        raise NotImplementedError

    def pair_forward(self, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                     ref_rejected: torch.Tensor, spec: PairLossSpec) -> dict[str, torch.Tensor]:
        """The pair loss, its metrics and its per-pair derivatives (see `fdpo.kernels.preference_loss_forward`)."""
        raise NotImplementedError

    def pair_backward(self, grad_loss: torch.Tensor, grad_chosen_ratio: torch.Tensor,
                      grad_rejected_ratio: torch.Tensor, spec: PairLossSpec,
                      need_ref: bool) -> tuple[torch.Tensor | None, ...]:
        """The sums' gradients (see `fdpo.kernels.preference_loss_backward`)."""
        raise NotImplementedError

    def head_stats(self, policy: HeadInput, tokens: ScoredTokens, ref: HeadInput | None,
                   request: StatsRequest) -> HeadStats:
        """See `fdpo.backends.Backend.head_stats`."""
        values = HeadStatsFunction.apply(policy.hidden, policy.weight, policy.bias, policy, tokens, ref, request, self)
        return HeadStats(*values)

    def pair_loss(self, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                  ref_rejected: torch.Tensor, spec: PairLossSpec) -> tuple[torch.Tensor, ...]:
        """See `fdpo.backends.Backend.pair_loss`."""
        return PairLossFunction.apply(policy_chosen, policy_rejected, ref_chosen, ref_rejected, spec, self)


def head_versions(head: HeadInput) -> tuple[int, ...]:
    """Autograd's in-place version counters of a head's hidden states, weight and bias (views share
    their base's). Inference tensors (made under torch.inference_mode, as a reference model often
    runs) have none; -1 stands for them: outside inference mode they cannot be changed in place."""
    return tuple(-1 if t.is_inference() else t._version for t in (head.hidden, head.weight, head.bias)
                 if t is not None)


def refuse_changed_reference(functions: str, ref: HeadInput, versions: tuple[int, ...]) -> None:
    """Raise inside a backward that recomputes the reference's logits when the reference's tensors
    were modified in place since the forward took their `head_versions`.

    The reference is no input of the autograd Function (it gets no gradient), so autograd itself does
    not watch it; the recomputed gradient would belong to another reference.
    """
    if head_versions(ref) != versions:
        raise RuntimeError(f"{functions}: the reference's hidden states, weight or bias were modified in place "
                           "between the forward and the backward, which recomputes the reference's logits from "
                           "them: the gradient would be another reference's. Run backward before changing them "
                           "(e.g. before the optimizer step of a shared weight)")


def without_tensors(head: HeadInput) -> HeadInput:
    """`head`'s options (prefix, softcap, temperature, scale, gather, compute_dtype) with hidden, weight
    and bias set to None: what an autograd Function keeps of the policy besides its saved tensors.

    A tensor held as a plain ctx attribute stays alive as long as the graph: activation checkpointing
    (use_reentrant=False) and saved-tensor hooks (offloading, torch.autograd.graph.save_on_cpu) free or
    move only what save_for_backward holds. `with_tensors` puts the saved tensors back.
    """
    return replace(head, hidden=None, head=replace(head.head, weight=None, bias=None))


def with_tensors(options: HeadInput, hidden: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> HeadInput:
    """The head of `without_tensors` with its hidden states, weight and bias given back."""
    return replace(options, hidden=hidden, head=replace(options.head, weight=weight, bias=bias))


def input_grads(tokens: ScoredTokens, row_grads: tuple[torch.Tensor | None, ...], hidden: torch.Tensor,
                weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """A backward's float32 (d_hidden [R, D], d_weight [V, D], d_bias [V]) as the gradients of the
    inputs (hidden, weight, bias): d_hidden scattered to hidden's rows (0 at the rows not scored),
    each in its input's dtype; None stays None."""
    d_hidden, d_weight, d_bias = row_grads
    return (None if d_hidden is None else tokens.scatter_rows(d_hidden, hidden),
            None if d_weight is None else d_weight.to(weight.dtype),
            None if d_bias is None else d_bias.to(bias.dtype))


def kl_row_grad(grad: torch.Tensor, kl: torch.Tensor) -> torch.Tensor:
    """The KL's per-row gradient, 0 at the rows whose KL is +inf: the reference gives probability to
    an entry the policy masks (a -inf logit), and the KL stays +inf for every finite value of the
    policy's parameters nearby, a constant (docs/math.md 8)."""
    return grad.masked_fill(kl == float("inf"), 0.0)


class HeadStatsFunction(torch.autograd.Function):
    """Statistics of the scored tokens through one or two heads, with a hand-written backward.

    forward(hidden, weight, bias, policy, tokens, ref, request, backend) returns the STATS in order
    (None for those not computed), each laid out by `tokens.layout`. logprob, entropy and kl are
    differentiable in the policy's hidden, weight and bias; the reference gets no gradient; the
    CONSTANT_STATS are marked non-differentiable. Saves the inputs and the per-row LSEs (and
    entropy and KL), never anything of size tokens x vocabulary. The backward runs inside the policy head's
    `gather` (and the reference's, when the KL has a gradient): the saved weight is read there.
    Gradients are not materialized: an output that gets no gradient (a KL only logged) reaches the
    backward as None, which then neither recomputes the reference's logits nor checks the reference.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, policy: HeadInput, tokens: ScoredTokens, ref: HeadInput | None,
                request: StatsRequest, backend: FusedBackend):
        ctx.set_materialize_grads(False)
        ref_rows = None if ref is None else ref.rows_view()
        rows = backend.stats_forward(policy.rows_view(), tokens, ref_rows, request)
        ctx.save_for_backward(hidden, weight, bias, rows["lse"], rows.get("ref_lse"), rows.get("entropy"),
                              rows.get("kl"))
        # The policy's tensors only through save_for_backward (see `without_tensors`). The reference's
        # stay plain attributes: saved tensors are all unpacked, and version-checked, together, so an
        # in-place change of the reference (an EMA step) would fail every backward, even one where the
        # KL has no gradient (`refuse_changed_reference` checks it only when its logits are recomputed);
        # and a reference computed under torch.inference_mode cannot be saved for backward at all.
        ctx.policy, ctx.tokens, ctx.ref, ctx.backend = without_tensors(policy), tokens, ref_rows, backend
        ctx.ref_versions = None if ref_rows is None else head_versions(ref_rows)  # see refuse_changed_reference
        out = [rows["logprob_sums"] if "logprob_sums" in rows and name == "logprob"
               else tokens.layout(rows[name]) if name in rows else None for name in STATS]
        ctx.mark_non_differentiable(*(v for name, v in zip(STATS, out, strict=True)
                                      if name in CONSTANT_STATS and v is not None))
        return tuple(out)

    @staticmethod
    def backward(ctx, *grad_outputs):
        """The inputs' gradients; None in `grad_outputs` stands for an output without gradient."""
        backend: FusedBackend = ctx.backend
        refuse_double_backward(HEAD_FUNCTIONS, backend.name)
        if not any(ctx.needs_input_grad[:3]):
            return (None,) * 8
        given = dict(zip(STATS, grad_outputs, strict=True))
        with_kl = given["kl"] is not None and ctx.ref is not None
        with gathered(ctx.policy.head, ctx.ref.head if with_kl else None):
            return HeadStatsFunction.gathered_backward(ctx, given)

    @staticmethod
    def gathered_backward(ctx, given: dict[str, torch.Tensor | None]) -> tuple[torch.Tensor | None, ...]:
        """`backward` inside the heads' gather contexts; `given` maps STATS to their incoming gradients
        (None for an output without gradient: logprob's then counts as 0, the KL's and the entropy's
        terms are left out)."""
        backend: FusedBackend = ctx.backend
        hidden, weight, bias, lse, ref_lse, entropy, kl = ctx.saved_tensors
        tokens: ScoredTokens = ctx.tokens
        with_kl = given["kl"] is not None and ref_lse is not None
        if with_kl:
            refuse_changed_reference(HEAD_FUNCTIONS, ctx.ref, ctx.ref_versions)
        with_entropy = given["entropy"] is not None and entropy is not None
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad = StatsGrad(
            lse=lse,
            logprob_grad=lse.new_zeros(lse.shape) if given["logprob"] is None else tokens.row_grad(given["logprob"]),
            ref=ctx.ref.detached() if with_kl else None, ref_lse=ref_lse if with_kl else None,
            kl_grad=kl_row_grad(tokens.row_grad(given["kl"]), kl) if with_kl else None,
            entropy=entropy if with_entropy else None,
            entropy_grad=tokens.row_grad(given["entropy"]) if with_entropy else None,
            need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias)
        policy = with_tensors(ctx.policy, hidden, weight, bias)
        row_grads = backend.stats_backward(policy.rows_view(), tokens, grad)
        return input_grads(tokens, row_grads, hidden, weight, bias) + (None,) * 5


class PairLossFunction(torch.autograd.Function):
    """Mean pair loss with a hand-written backward.

    forward(policy_chosen, policy_rejected, ref_chosen, ref_rejected, spec, backend) takes float32 [P]
    sums and returns (loss, *PAIR_METRICS); only `loss` is differentiable. The forward saves the
    per-pair derivatives dloss_i/dr_w and dloss_i/dr_l; the backward scales them by the incoming
    gradient (one launch on triton).
    """

    @staticmethod
    def forward(ctx, policy_chosen, policy_rejected, ref_chosen, ref_rejected, spec, backend: FusedBackend):
        out = backend.pair_forward(policy_chosen, policy_rejected, ref_chosen, ref_rejected, spec)
        ctx.save_for_backward(out["grad_chosen_ratio"], out["grad_rejected_ratio"])
        ctx.spec, ctx.backend = spec, backend
        metrics = tuple(out[k] for k in PAIR_METRICS)
        ctx.mark_non_differentiable(*metrics)
        return (out["loss"], *metrics)

    @staticmethod
    def backward(ctx, grad_loss, *unused_metric_grads):
        refuse_double_backward(PAIR_FUNCTIONS, ctx.backend.name)
        grad_chosen_ratio, grad_rejected_ratio = ctx.saved_tensors
        need_ref = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        d_pc, d_pr, d_rc, d_rr = ctx.backend.pair_backward(
            grad_loss.float().contiguous(), grad_chosen_ratio, grad_rejected_ratio, ctx.spec, need_ref)
        return d_pc, d_pr, d_rc, d_rr, None, None


class TritonBackend(FusedBackend):
    """The fused Triton kernels of `fdpo.kernels`; `backward` picks the head backward (the fused-atomics
    one, or the split one with its dz buffer) and whether sums run in a fixed order."""

    name = "triton"

    def __init__(self, kernels, backward: BackwardOptions = DEFAULT_BACKWARD) -> None:
        self.kernels, self.backward = kernels, backward

    def stats_forward(self, policy, tokens, ref, request):
        if ref is None and request == LOGPROBS_ONLY:
            # Log-probs alone: the vocabulary-split kernel, which adds the per-sequence sums with
            # atomics unless the sums must be deterministic (then `tokens.layout` adds them).
            summed = tokens if not self.backward.ordered else replace(tokens, seq_ids=None)
            logprob, lse, sums = self.kernels.head_logprob_forward(policy, summed)
            rows = {"logprob": logprob, "lse": lse}
            return rows if sums is None else {**rows, "logprob_sums": sums}
        return self.kernels.head_stats_forward(policy, tokens, ref, request)

    def stats_backward(self, policy, tokens, grad):
        weight = policy.weight
        buffer_bytes = self.backward.split_buffer_bytes(tokens.rows.numel(), weight.shape[0], weight.shape[1],
                                                        head_compute_dtype(policy), weight.device)
        if buffer_bytes:
            return self.kernels.head_stats_split_backward(policy, tokens, grad, buffer_bytes=buffer_bytes)
        return self.kernels.head_stats_backward(policy, tokens, grad, deterministic=self.backward.ordered)

    def pair_forward(self, policy_chosen, policy_rejected, ref_chosen, ref_rejected, spec):
        return self.kernels.preference_loss_forward(policy_chosen, policy_rejected, ref_chosen, ref_rejected, spec)

    def pair_backward(self, grad_loss, grad_chosen_ratio, grad_rejected_ratio, spec, need_ref):
        return self.kernels.preference_loss_backward(grad_loss, grad_chosen_ratio, grad_rejected_ratio, spec,
                                                     need_ref=need_ref)
