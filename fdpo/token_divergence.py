"""Token-level f-divergences between the policy's and the reference's next-token distributions, fused.

`fdpo.token_divergence` gives, per scored token, forward KL(ref || policy), reverse KL(policy || ref),
the generalized Jensen-Shannon divergence, Amari's alpha-divergence or the total variation between
p = softmax(z) (policy) and q = softmax(z_ref) (reference) over the whole vocabulary, without
building the [tokens x vocabulary] logits of either head (docs/math.md 12). A first pass over
vocabulary tiles forms both LSEs (and the KLs, and on request the policy's entropy, docs/math.md 7);
JS, alpha and TV take a second pass with both LSEs known. The hand-written backward recomputes the
tiles from the saved LSEs and one saved per-row scalar, policy side only:
    forward_kl: p - q;  reverse_kl: p (d - D);  js: (1 - beta) p (log p - log m - KL(p || m));
    alpha: -p (expm1(-(1 - alpha) d) / (1 - alpha) + alpha D);  tv: p (sign(p - q) - E_p[sign(p - q)]) / 2
with d = log p - log q. `TokenDivergenceLoss` is the same as an nn.Module (mean over scored tokens,
or per-sequence sums).
"""

from dataclasses import dataclass

import torch
from torch import nn

from .backends import backend_name, check_backend_name, triton_kernels
from .backends.divergence import divergence_backward, divergence_forward, reference_divergence
from .backends.fused import (
    head_versions,
    input_grads,
    refuse_changed_reference,
    refuse_double_backward,
    with_tensors,
    without_tensors,
)
from .backends.reference import scored_rows_only
from .divergences import DivergenceSpec
from .heads import (
    HeadInput,
    HeadStats,
    LMHead,
    ScoredTokens,
    autocast_compute_dtype,
    check_ignore_index,
    check_packed_layout,
    gathered,
    head_compute_dtype,
    scored_tokens,
)
from .modules import policy_and_reference
from .options import DEFAULT_BACKWARD, BackwardOptions

# The public entries whose gradients go through TokenDivergenceFunction's backward.
DIVERGENCE_FUNCTIONS = "fdpo.token_divergence / fdpo.TokenDivergenceLoss / fdpo.TDPOLoss(token_divergence=...)"
# reduction= of TokenDivergenceLoss: the mean over all scored tokens, or the sum over each sequence's.
REDUCTIONS = ("mean", "sequence")


class TorchDivergence:
    """The chunked PyTorch forward and backward of `fdpo.backends.divergence` (always deterministic)."""

    name = "torch"

    def forward(self, policy: HeadInput, ref: HeadInput, tokens: ScoredTokens, spec: DivergenceSpec,
                entropy: bool = False) -> dict[str, torch.Tensor]:
        return divergence_forward(policy, ref, tokens, spec, entropy=entropy)

    def backward(self, policy: HeadInput, ref: HeadInput, tokens: ScoredTokens, spec: DivergenceSpec,
                 saved: dict[str, torch.Tensor], grad: torch.Tensor,
                 need: tuple[bool, bool, bool]) -> tuple[torch.Tensor | None, ...]:
        return divergence_backward(policy, ref, tokens, spec, saved, grad, need_hidden=need[0],
                                   need_weight=need[1], need_bias=need[2])


@dataclass(frozen=True)
class TritonDivergence:
    """The Triton kernels of `fdpo.kernels.token_divergence_fwd` / `_bwd`; `backward` picks the fused
    (atomics, or fixed-order when deterministic) or the split (dz buffer + GEMMs) backward, as for the
    head statistics (`fdpo.options.BackwardOptions`)."""

    kernels: object
    backward_options: BackwardOptions = DEFAULT_BACKWARD
    name = "triton"

    def forward(self, policy, ref, tokens, spec, entropy=False):
        return self.kernels.token_divergence_forward(policy, ref, tokens, spec, entropy=entropy)

    def backward(self, policy, ref, tokens, spec, saved, grad, need):
        weight = policy.weight
        # The dz buffer holds the head's compute dtype (`head_compute_dtype`), as the kernel sizes it.
        buffer_bytes = self.backward_options.split_buffer_bytes(tokens.rows.numel(), weight.shape[0], weight.shape[1],
                                                                head_compute_dtype(policy),
                                                                weight.device)
        options = dict(need_hidden=need[0], need_weight=need[1], need_bias=need[2])
        if buffer_bytes:
            return self.kernels.token_divergence_split_backward(policy, ref, tokens, spec, saved, grad,
                                                                buffer_bytes=buffer_bytes, **options)
        return self.kernels.token_divergence_backward(policy, ref, tokens, spec, saved, grad,
                                                      deterministic=self.backward_options.ordered, **options)


class TokenDivergenceFunction(torch.autograd.Function):
    """Per-row divergences laid out by `tokens.layout`, with a hand-written backward.

    forward(hidden, weight, bias, policy, ref, tokens, spec, impl, entropy): differentiable in the
    policy's hidden, weight and bias; the reference is a constant. With `entropy` it returns
    (divergence, entropy), the policy's entropy from the forward's first pass laid out the same way
    and marked non-differentiable. Saves the inputs and four float32 [R] rows (LSEs, D, aux), never
    anything of size tokens x vocabulary. The forward (by its caller) and the backward run inside
    both heads' `gather` contexts.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, policy: HeadInput, ref: HeadInput, tokens: ScoredTokens,
                spec: DivergenceSpec, impl, entropy: bool):
        ref_rows = ref.rows_view()
        rows = impl.forward(policy.rows_view(), ref_rows.detached(), tokens, spec, entropy)
        ctx.save_for_backward(hidden, weight, bias, rows["lse"], rows["ref_lse"], rows["divergence"], rows["aux"])
        # The policy's tensors only through save_for_backward (see `without_tensors`). The reference as
        # given (its Parameters, not detached aliases: a ZeRO-3 gather refills a Parameter's data, never
        # an alias taken while it was partitioned), detached where it is read; a plain attribute, as a
        # reference computed under torch.inference_mode cannot be saved for backward.
        ctx.policy, ctx.ref, ctx.tokens, ctx.spec, ctx.impl = without_tensors(policy), ref_rows, tokens, spec, impl
        ctx.ref_versions = head_versions(ref_rows)  # see refuse_changed_reference
        value = tokens.layout(rows["divergence"])
        if not entropy:
            return value
        policy_entropy = tokens.layout(rows["entropy"])
        ctx.mark_non_differentiable(policy_entropy)
        return value, policy_entropy

    @staticmethod
    def backward(ctx, grad, *entropy_grad):
        """Gradients of the divergence's inputs; the entropy's (a non-differentiable output) is ignored."""
        refuse_double_backward(DIVERGENCE_FUNCTIONS, ctx.impl.name)
        if not any(ctx.needs_input_grad[:3]):
            return (None,) * 9
        with gathered(ctx.policy.head, ctx.ref.head):
            return TokenDivergenceFunction.gathered_backward(ctx, grad)

    @staticmethod
    def gathered_backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """`backward` inside both heads' gather contexts (the saved weights are read there)."""
        hidden, weight, bias, lse, ref_lse, value, aux = ctx.saved_tensors
        refuse_changed_reference(DIVERGENCE_FUNCTIONS, ctx.ref, ctx.ref_versions)
        need = tuple(ctx.needs_input_grad[:3])
        tokens: ScoredTokens = ctx.tokens
        policy = with_tensors(ctx.policy, hidden, weight, bias)
        saved = {"lse": lse, "ref_lse": ref_lse, "divergence": value, "aux": aux}
        row_grads = ctx.impl.backward(policy.rows_view(), ctx.ref.detached(), tokens, ctx.spec, saved,
                                      tokens.row_grad(grad), need)
        return input_grads(tokens, row_grads, hidden, weight, bias) + (None,) * 6


def divergence_stats(
    policy: HeadInput,
    ref: HeadInput,
    labels: torch.Tensor,
    spec: DivergenceSpec,
    *,
    ignore_index: int = -100,
    cu_seqlens: torch.Tensor | None = None,
    per_sequence: bool = False,
    backend: str = "auto",
    backward: BackwardOptions = DEFAULT_BACKWARD,
    with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The divergence `spec` of the tokens of `labels`: float32 of hidden's leading shape (0 at ignored
    tokens) or per-sequence sums ([B] padded, [S] packed with cu_seqlens). Validates, resolves the
    backend, dispatches. Differentiable in the policy's hidden, weight and bias. with_entropy: return
    (divergence, entropy), the policy's entropy from the same first pass laid out the same way, a
    constant for autograd (no gradient). The heads' `gather` contexts are entered around all of it
    (the checks read the weights' shapes); the reference is detached only inside them. Heads without
    an explicit compute_dtype are computed in the autocast dtype where torch.autocast is on at this
    call (`fdpo.heads.autocast_compute_dtype`)."""
    if not isinstance(with_entropy, bool):
        raise TypeError(f"with_entropy must be True or False, got {with_entropy!r}")
    policy, ref = autocast_compute_dtype(policy), autocast_compute_dtype(ref)
    with gathered(policy.head, ref.head):
        policy.check(labels, ignore_index)
        ref = HeadInput(ref.hidden, ref.head, prefix="ref_")
        policy.check_reference(ref, labels, ignore_index)
        per_sequence = per_sequence or cu_seqlens is not None
        check_packed_layout(policy.hidden, cu_seqlens, per_sequence)
        name = backend_name(backend, policy.hidden.device)
        tokens = scored_tokens(labels, ignore_index, cu_seqlens, per_sequence)
        if name == "reference":
            ignored = labels == ignore_index
            rows = reference_divergence(scored_rows_only(policy, ignored), scored_rows_only(ref.detached(), ignored),
                                        spec, entropy=with_entropy)
            out = tuple(tokens.layout(value.reshape(-1)[tokens.rows]) for value in rows.values())
            return out if with_entropy else out[0]
        impl = TorchDivergence() if name == "torch" else TritonDivergence(triton_kernels(), backward)
        return TokenDivergenceFunction.apply(policy.hidden, policy.weight, policy.bias, policy, ref, tokens, spec,
                                             impl, with_entropy)


def token_divergence(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    divergence: str,
    alpha: float = 0.5,
    beta: float = 0.5,
    ignore_index: int = -100,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    softcap: float | None = None,
    ref_softcap: float | None = None,
    temperature: float = 1.0,
    ref_temperature: float | None = None,
    backend: str = "auto",
    deterministic: bool = False,
    backward_buffer_bytes: int | None = None,
    logit_scale: float = 1.0,
    ref_logit_scale: float = 1.0,
    with_entropy: bool = False,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token divergence between the policy's next-token distribution p and the reference's q.

    Over the whole vocabulary, without the logits of either head (docs/math.md 12):
        "forward_kl"  KL(q || p) = KL(reference || policy), TDPO's term (= `fdpo.token_kl`'s kl)
        "reverse_kl"  KL(p || q) = KL(policy || reference)
        "js"          beta KL(q || m) + (1 - beta) KL(p || m), m = (1 - beta) p + beta q (TRL's generalized
                      JSD with the policy as student); beta = 0 is forward_kl, beta = 1 reverse_kl
        "alpha"       (1 - sum_v p^alpha q^(1-alpha)) / (alpha (1 - alpha)); alpha = 0 is forward_kl,
                      alpha = 1 reverse_kl (its limits), stable arbitrarily close to both
        "tv"          (1/2) sum_v |p - q| (a sign-based subgradient)

    Args:
        hidden: [..., D] policy final hidden states (float16/bfloat16/float32, any strides); weight
            [V, D], bias [V] or None, softcap, temperature: the policy head, z = capped(s (h W^T + b)) / T.
        ref_hidden: [..., D'] reference hidden states of the same tokens; ref_weight [V, D'], ref_bias,
            ref_softcap, ref_temperature (default `temperature`): the reference head (a constant).
        labels: integer [...]; tokens whose label is ignore_index get 0 and no gradient (the label
            itself is not used by the divergence, which sums over the whole vocabulary).
        divergence: one of `fdpo.divergences.TOKEN_DIVERGENCES`. alpha, beta: in [0, 1] (both checked).
        backend: "auto" | "triton" | "torch" | "reference" (only "reference" differentiates twice).
        deterministic, backward_buffer_bytes: the triton backend's backward, as in `fdpo.token_logprobs`.
        logit_scale, ref_logit_scale: each head's logit scale, multiplying h W^T + b before its soft cap
            (`fdpo.LMHead.scale`, docs/math.md 13).
        with_entropy: also return the policy's entropy H = -sum_v p_v log p_v (docs/math.md 7), taken
            from the first vocabulary pass that forms the policy's LSE: no extra pass over the head.
        compute_dtype: the dtype both heads' products are formed in, as in `fdpo.token_logprobs`.

    Returns:
        float32 [...] divergences (nats; >= 0, clamped against rounding), differentiable in hidden,
        weight and bias; the reference gets no gradient. With with_entropy, (divergences, entropy):
        entropy float32 [...] (nats, >= 0, 0 at ignored tokens) of p, a constant for autograd (no
        gradient: asking for one raises), for logging.

    Raises:
        ValueError / TypeError for an unknown divergence, alpha or beta outside [0, 1], a with_entropy
        that is not a bool, or inputs whose shapes, dtypes or devices do not fit (as `fdpo.token_kl`).
    """
    spec = DivergenceSpec.of(divergence, alpha, beta)
    ref_head = LMHead(ref_weight, ref_bias, ref_softcap, temperature if ref_temperature is None else ref_temperature,
                      scale=ref_logit_scale, compute_dtype=compute_dtype)
    policy_head = LMHead(weight, bias, softcap, temperature, scale=logit_scale, compute_dtype=compute_dtype)
    return divergence_stats(HeadInput(hidden, policy_head),
                            HeadInput(ref_hidden, ref_head, "ref_"), labels, spec, ignore_index=ignore_index,
                            backend=backend, backward=BackwardOptions(deterministic, backward_buffer_bytes),
                            with_entropy=with_entropy)


def divergence_pair_statistics(loss, hidden: torch.Tensor, labels: torch.Tensor, head, *, ref_hidden: torch.Tensor,
                               ref_head, cu_seqlens: torch.Tensor | None, spec: DivergenceSpec) -> HeadStats:
    """Per-sequence statistics of a two-model loss with `spec`'s divergence in place of the KL.

    `loss` is an `fdpo.modules.PairwiseHeadLoss` (its ignore_index, backend and backward options
    apply). Returns float32 [2P] sums: logprob and ref_logprob from the fused label pass, and in
    `kl` the sums of the per-token divergence between policy and reference (docs/math.md 12), with
    the same gradients to the policy head. Two passes over the vocabulary (label log-probs, then the
    divergence) where the KL's single pass gives all three.
    """
    if ref_hidden is None:
        raise ValueError("the two-model losses need the reference model's hidden states (ref_hidden) of the same "
                         "tokens: they use its full next-token distribution, not only its log-prob sums")
    module, frozen = policy_and_reference(loss, head, ref_head)
    labelled = module(hidden, labels, cu_seqlens=cu_seqlens, per_sequence=True, ref_hidden=ref_hidden.detach(),
                      ref_head=frozen)
    divergence = divergence_stats(HeadInput(hidden, module.spec), HeadInput(ref_hidden, frozen, "ref_"), labels, spec,
                                  ignore_index=module.ignore_index, cu_seqlens=cu_seqlens, per_sequence=True,
                                  backend=module.backend, backward=module.backward_options)
    return HeadStats(logprob=labelled["logprob"], ref_logprob=labelled["ref_logprob"], kl=divergence)


class TokenDivergenceLoss(nn.Module):
    """The token-level divergence between policy and reference as a loss, from final hidden states.

    reduction="mean": the mean over all scored tokens (a scalar; 0 when none is scored);
    reduction="sequence": the sum over each sequence's scored tokens, float32 [B] for padded
    hidden [B, T, D], [S] for packed hidden [N, D] with cu_seqlens [S + 1].
    Divergence, alpha and beta as in `fdpo.token_divergence`; invalid values raise at construction.
    They may be set afterwards (e.g. a beta schedule: `loss_fn.beta = 0.3`), validated as at
    construction (ValueError for an invalid value, the module unchanged) and used from the next call.

    Example (distillation-style regularizer toward a frozen reference):

        loss_fn = fdpo.TokenDivergenceLoss("js", beta=0.5)
        hidden = policy.model(input_ids, attention_mask=mask).last_hidden_state
        with torch.no_grad():
            ref_hidden = ref_model.model(input_ids, attention_mask=mask).last_hidden_state
        loss = loss_fn(hidden, labels, policy.lm_head, ref_hidden=ref_hidden, ref_head=ref_model.lm_head)
        loss.backward()

    The heads are an `fdpo.FusedLMHead` (its softcap, temperature and logit scale apply, and, as in the
    pair losses, its own backend, deterministic and backward_buffer_bytes: this module's apply to the
    other kinds of head; its ignore_index must equal this module's), an nn.Linear, an `fdpo.LMHead` or
    a weight tensor [V, D]; ref_head defaults to the policy's head (detached). A reference given as an
    nn.Linear or a weight takes the policy head's temperature, but no soft cap or logit scale (a
    UserWarning says so once where the policy head has either).
    forward(..., with_entropy=True) returns (loss, entropy): the policy's entropy from the forward's
    first vocabulary pass, reduced as the loss (the mean over scored tokens, or per-sequence sums),
    float32 and without gradient (e.g. to log it beside a distillation loss).
    """

    def __init__(
        self,
        divergence: str = "forward_kl",
        alpha: float = 0.5,
        beta: float = 0.5,
        reduction: str = "mean",
        ignore_index: int = -100,
        backend: str = "auto",
        *,
        deterministic: bool = False,
        backward_buffer_bytes: int | None = None,
    ) -> None:
        super().__init__()
        self._configure(divergence, alpha, beta)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        check_ignore_index(ignore_index)
        check_backend_name(backend)
        self.reduction, self.ignore_index, self.backend = reduction, ignore_index, backend
        self.backward_options = BackwardOptions(deterministic, backward_buffer_bytes)

    def _configure(self, divergence: str, alpha: float, beta: float) -> None:
        """Validate (`DivergenceSpec.of`: ValueError, the module unchanged) and set the three settings."""
        self._spec = DivergenceSpec.of(divergence, alpha, beta)
        self._divergence, self._alpha, self._beta = divergence, alpha, beta

    def __setstate__(self, state: dict) -> None:
        # A module pickled whole before divergence, alpha, beta and spec became properties holds them
        # under their public names.
        for name in ("divergence", "alpha", "beta", "spec"):
            if name in state:
                state[f"_{name}"] = state.pop(name)
        super().__setstate__(state)

    @property
    def spec(self) -> DivergenceSpec:
        """The resolved divergence the forward computes (from divergence, alpha and beta)."""
        return self._spec

    @property
    def divergence(self) -> str:
        """The divergence's name (`fdpo.token_divergence`'s divergence); setting it takes effect at the next call."""
        return self._divergence

    @divergence.setter
    def divergence(self, value: str) -> None:
        self._configure(value, self._alpha, self._beta)

    @property
    def alpha(self) -> float:
        """The alpha divergence's alpha in [0, 1]; setting it takes effect at the next call."""
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        self._configure(self._divergence, value, self._beta)

    @property
    def beta(self) -> float:
        """The generalized JS divergence's mixture weight in [0, 1]; setting it takes effect at the next call."""
        return self._beta

    @beta.setter
    def beta(self, value: float) -> None:
        self._configure(self._divergence, self._alpha, value)

    def forward(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor,
        head,
        *,
        ref_hidden: torch.Tensor,
        ref_head=None,
        cu_seqlens: torch.Tensor | None = None,
        with_entropy: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The reduced divergence of the scored tokens of `labels`, and with `with_entropy` the policy's
        entropy reduced the same way, without gradient (see the class docstring)."""
        module, ref = policy_and_reference(self, head, ref_head)  # the reference: a constant, detached where read
        per_sequence = self.reduction == "sequence"
        out = divergence_stats(HeadInput(hidden, module.spec), HeadInput(ref_hidden, ref, "ref_"), labels,
                               self.spec, ignore_index=self.ignore_index, cu_seqlens=cu_seqlens,
                               per_sequence=per_sequence, backend=module.backend, backward=module.backward_options,
                               with_entropy=with_entropy)
        values = out if with_entropy else (out,)
        if not per_sequence:
            count = (labels.long() != self.ignore_index).sum().clamp(min=1)  # as scored_tokens compares
            values = tuple(value.sum() / count for value in values)
        return values if with_entropy else values[0]

    def extra_repr(self) -> str:
        return f"divergence={self.spec.describe()!r}, reduction={self.reduction!r}, backend={self.backend!r}"
