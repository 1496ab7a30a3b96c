"""What is benchmarked: the workloads, their inputs, the implementations compared, and their checks.

A workload is a forward+backward step on fixed inputs:

- "logprobs": per-token label log-probs of hidden [N, D] under the LM head weight [V, D], labels [N]
  (every 8th ignored), backward with a fixed random upstream gradient [N] (float32).
- "dpo-<divergence>" for each f-DPO divergence of `fdpo.preference_loss` ("reverse_kl", "forward_kl",
  "js", "alpha"): the full preference head. The policy's hidden states [2P, T, D] (P chosen rows, then
  P rejected ones; N = 2PT tokens) and head [V, D] get gradients; the reference's hidden states and
  head (the policy's plus a small perturbation, as a reference model drifted from the policy) do not.
  The first quarter of each row is prompt (ignored). Loss: sigmoid shape, beta 0.1, alpha 0.5.
- "tdpo": the two-model TDPO head on the same inputs: per-token label log-probs of both models and
  the per-token KL(reference || policy) over the whole vocabulary, summed per row into TDPO2
  (`fdpo.tdpo_loss`, beta 0.1, alpha 0.5).
- "epsilon-dpo": epsilon-DPO on the same inputs: both models' label log-probs and those of the
  perturbed logits (1 +- eps) z -+ eps z_ref (eps 0.01), whose row sums set each pair's beta; the
  reverse-KL sigmoid loss (`fdpo.epsilon_dpo_loss`, beta 0.1). The steps compare sums with strict
  inequalities, and rho+- - rho is about eps times the pair's log-ratio margin: where that margin is
  near 0, or the row sums are large enough that float32 rounds them by as much, a float32
  implementation can legitimately take the other step, which scales that pair's beta by 1 +- eps.
  Its check allows that (2 eps, see `tolerance`) only where some pair's step is that close to a tie;
  where every step is decided beyond float32 rounding, it is checked at TOLERANCE (`allowed_error`).
- "divergence": the per-token generalized Jensen-Shannon divergence (beta 0.5, TRL's convention;
  `fdpo.token_divergence`, docs/math.md 12) between the policy's and a reference's next-token
  distributions over the whole vocabulary, on the two-model layout with a reference further from
  the policy (DIVERGENCE_DRIFT: a distillation teacher rather than a drifted copy), backward with a
  fixed random upstream gradient [N] (float32). The output is the per-token divergence [N].
- "distillation": TRL's DistillationTrainer loss as the trainer calls it (`_chunked_divergence_loss`
  with the prompt quarter of each row masked out of `completion_mask`): the generalized JSD (beta
  0.5) averaged over the completion tokens, and the student's entropy summed over them, which the
  trainer logs (divided by their count). Same inputs as "divergence"; the output is float32 [2]
  (loss, mean entropy), backward from the loss alone (upstream [1, 0]: the entropy has no gradient).
  fdpo runs its TRL drop-in (`fdpo.integrations.trl.distill.chunked_divergence_loss`), which takes the
  entropy from the divergence's first pass.

An implementation maps a workload's inputs to its output (float32 per-token log-probs [N], the
scalar loss, or the distillation's [2]) through autograd. Every implementation is checked, on the
benchmark inputs themselves, against the naive computation in float64 (values and the gradients of
hidden states and head weight) before it is measured; one that disagrees is reported and not timed.
The workloads of DRIFT_CHECKED are checked a second time with a reference CHECK_DRIFT away from the
policy, where the reference's log-probs and TDPO's KL weigh on the loss (see CHECK_DRIFT).
"""

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import fdpo
from fdpo.backends import reference
from fdpo.backends.divergence import reference_divergence
from fdpo.cost import DEFAULT_BACKWARD_BUFFER_BYTES
from fdpo.divergences import DivergenceSpec
from fdpo.heads import HeadInput, LMHead, StatsRequest
from fdpo.options import DIVERGENCES, BackwardOptions
from fdpo.token_divergence import divergence_stats

TWO_MODEL = ("tdpo", "epsilon-dpo")
# The workloads between the policy's and a reference's whole next-token distributions (per token).
DISTRIBUTIONS = ("divergence", "distillation")
WORKLOADS = ("logprobs", *(f"dpo-{d}" for d in DIVERGENCES), *TWO_MODEL, *DISTRIBUTIONS)
IMPLEMENTATIONS = ("naive", "naive+compile", "fdpo-torch", "fdpo-triton", "fdpo-triton-fused", "fdpo-triton-split",
                   "liger", "liger-eager", "cce", "trl")
# TRL's fused LM head (`add_fused_lm_head`) calls ChunkedLogProbFunction with vocabulary tiles of this width.
TRL_CHUNK_SIZE = 32768

BETA = 0.1
ALPHA = 0.5
EPS = 0.01
# The "divergence" and "distillation" workloads' JS mixture weight (the reference's share), and their
# reference's relative distance from the policy (JS values of a few 1e-2 nats per token: a float32 check
# has digits to check).
JS_BETA = 0.5
DIVERGENCE_DRIFT = 0.5
JS = DivergenceSpec.of("js", beta=JS_BETA)
# Every 8th token of the log-prob workload is ignored; the reference model is the policy plus this
# relative perturbation of hidden states and head (keeps the log-ratios O(1), where the losses are
# neither saturated nor clamped, so the gradient check means something).
IGNORE_EVERY = 8
REFERENCE_DRIFT = 0.01
# The workloads whose loss is linear in the models' log-prob sums (and TDPO's KL sums) are checked a
# second time, on the same policy with a reference CHECK_DRIFT away from it. At REFERENCE_DRIFT the
# reference's log-probs and TDPO's KL move the loss and its gradients by less than the tolerances (plain
# DPO passed as TDPO, and in bfloat16 a DPO whose reference is the policy passed); at CHECK_DRIFT they
# move them by several percent to several times. The other f-DPO scores (forward KL, JS, alpha) are
# exponentials of the log-ratio, which saturate or overflow at such a drift: checked at REFERENCE_DRIFT.
CHECK_DRIFT = 1.0
DRIFT_CHECKED = ("dpo-reverse_kl", "tdpo", "epsilon-dpo")
# Largest max|got - want| / max|want| accepted against the float64 result, by input dtype. In 16 bits
# the naive logits are rounded to the input dtype, and their error adds up over the thousands of tokens
# of a row's log-prob sum: a wrong loss or gradient is off by far more.
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 1e-1, torch.float16: 1e-1}
# epsilon-DPO's steps compare rho+- with rho (differences of the pair's row sums). A float32
# implementation's gaps rho+ - rho and rho - rho- were within 1.1e-7 of float64's, relative to the sum of
# the magnitudes of the pair's six row sums (the naive one, float32 and bfloat16 inputs, rows of 256 to
# 4096 tokens). Where every pair's gaps exceed STEP_DECIDED_RTOL times that magnitude, an implementation
# takes float64's steps and is checked at TOLERANCE (`allowed_error`); elsewhere it may take another step
# on a near-tie, and the check allows 2 eps (`tolerance`).
STEP_DECIDED_RTOL = 1e-6
# Bytes of float64 logits (and their gradient) the chunked float64 reference holds at once.
REFERENCE_CHUNK_BYTES = 1 << 30


@dataclass
class Inputs:
    """A workload's tensors: leaves `hidden` [N, D] or [2P, T, D] and `weight` [V, D] take gradients.

    upstream: float32 [N] gradient of the per-token outputs (logprobs, divergence), [2] of the
    distillation's (loss, mean entropy), else None;
    ref_hidden / ref_weight: the reference model's (no gradient), all workloads but logprobs.
    """

    workload: str
    hidden: torch.Tensor
    weight: torch.Tensor
    labels: torch.Tensor
    upstream: torch.Tensor | None = None
    ref_hidden: torch.Tensor | None = None
    ref_weight: torch.Tensor | None = None

    @property
    def kind(self) -> str:
        return workload_kind(self.workload)

    @property
    def divergence(self) -> str | None:
        return self.workload.removeprefix("dpo-") if self.kind == "dpo" else None

    def reset_grads(self) -> None:
        self.hidden.grad = None
        self.weight.grad = None


def workload_kind(workload: str) -> str:
    """The family of `workload`: logprobs, dpo (any divergence), tdpo, epsilon-dpo, divergence or distillation."""
    return "dpo" if workload.startswith("dpo-") else workload


def tolerance(workload: str, dtype: torch.dtype) -> float:
    """Largest relative error against the float64 reference accepted for `workload` in `dtype`:
    TOLERANCE, and for epsilon-DPO at least 2 eps (a step flipped on a near-tie)."""
    return max(TOLERANCE[dtype], 2 * EPS) if workload_kind(workload) == "epsilon-dpo" else TOLERANCE[dtype]


def steps_decided(inputs: Inputs) -> bool:
    """Whether every pair's epsilon-DPO step on `inputs` (an epsilon-dpo workload's) is decided beyond float32
    rounding: both float64 gaps |rho+ - rho| and |rho - rho-| above STEP_DECIDED_RTOL times the sum of the
    magnitudes of the pair's six row sums (policy, perturbed plus and minus, chosen and rejected)."""
    hidden, ref_hidden, labels = _rows(inputs)
    rows = inputs.labels.shape
    sums = _float64_pass(hidden, inputs.weight, labels, None, ref_hidden, inputs.ref_weight,
                         "epsilon-dpo")[0].view(*rows, -1).sum(dim=1)
    pairs = rows[0] // 2
    lp, plus, minus = (sums[:pairs, k] - sums[pairs:, k] for k in (0, 2, 3))
    magnitude = sums[:, [0, 2, 3]].abs().sum(dim=1)
    magnitude = magnitude[:pairs] + magnitude[pairs:]
    return bool(torch.all(torch.minimum((plus - lp).abs(), (lp - minus).abs()) > STEP_DECIDED_RTOL * magnitude))


def allowed_error(inputs: Inputs) -> float:
    """Largest relative error accepted by the check on `inputs`: `tolerance`, but TOLERANCE for an
    epsilon-DPO workload whose steps are all decided (`steps_decided`): no step can flip there."""
    if inputs.kind == "epsilon-dpo" and steps_decided(inputs):
        return TOLERANCE[inputs.hidden.dtype]
    return tolerance(inputs.workload, inputs.hidden.dtype)


def check_workload(workload: str, tokens: int, pairs: int) -> None:
    """Raise ValueError for an unknown workload or a token count the pair layout cannot split."""
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; allowed: {', '.join(WORKLOADS)}")
    if tokens < 1:
        raise ValueError(f"the number of tokens must be positive, got {tokens}")
    if workload != "logprobs" and (tokens % (2 * pairs) or tokens // (2 * pairs) < 4):
        raise ValueError(f"{workload} lays {tokens} tokens out as {pairs} pairs of chosen and rejected rows: "
                         f"tokens must be a multiple of 2 * pairs = {2 * pairs} with rows of at least 4 tokens")


def scored_tokens(workload: str, tokens: int, pairs: int) -> int:
    """The tokens of `workload`'s inputs at N = `tokens` whose label is scored (not -100): N less every
    IGNORE_EVERY-th for logprobs, the 2P rows less their prompt quarter for the others (see `make_inputs`)."""
    check_workload(workload, tokens, pairs)
    if workload == "logprobs":
        return tokens - -(-tokens // IGNORE_EVERY)
    length = tokens // (2 * pairs)
    return 2 * pairs * (length - length // 4)


def make_inputs(workload: str, tokens: int, vocab: int, dim: int, *, dtype: torch.dtype, device: torch.device,
                pairs: int = 2, seed: int = 0, drift: float | None = None) -> Inputs:
    """Seeded random inputs of `workload` with N = `tokens`, V = `vocab`, D = `dim` (see the module doc).

    `drift`: the reference's relative distance from the policy (default: DIVERGENCE_DRIFT for the
    distribution workloads, else REFERENCE_DRIFT); the same seed gives the same policy and the same
    perturbation direction at any drift.
    """
    check_workload(workload, tokens, pairs)
    gen = torch.Generator(device=device).manual_seed(seed)  # drawn where they live: no host copy of large inputs

    def randn(*shape: int, scale: float = 1.0, dtype: torch.dtype = dtype) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype).mul_(scale)

    weight = randn(vocab, dim, scale=dim**-0.5)
    labels = torch.randint(0, vocab, (tokens,), generator=gen, device=device)
    if workload == "logprobs":
        labels[::IGNORE_EVERY] = -100
        return Inputs(workload, randn(tokens, dim).requires_grad_(), weight.requires_grad_(), labels,
                      upstream=randn(tokens, dtype=torch.float32))
    rows, length = 2 * pairs, tokens // (2 * pairs)
    hidden = randn(rows, length, dim)
    labels = labels.view(rows, length)
    labels[:, : length // 4] = -100
    if drift is None:
        drift = DIVERGENCE_DRIFT if workload in DISTRIBUTIONS else REFERENCE_DRIFT
    ref_hidden = hidden + randn(rows, length, dim, scale=drift)
    ref_weight = weight + randn(vocab, dim, scale=drift * dim**-0.5)
    upstream = None
    if workload == "divergence":
        upstream = randn(tokens, dtype=torch.float32)
    elif workload == "distillation":
        upstream = torch.tensor([1.0, 0.0], device=device)
    return Inputs(workload, hidden.requires_grad_(), weight.requires_grad_(), labels, upstream=upstream,
                  ref_hidden=ref_hidden, ref_weight=ref_weight)


def step(impl: Callable[[Inputs], torch.Tensor], inputs: Inputs) -> torch.Tensor:
    """One forward+backward of `impl` on `inputs` (gradients land in inputs.hidden/weight.grad)."""
    inputs.reset_grads()
    out = impl(inputs)
    target = out if inputs.upstream is None else (out.float() * inputs.upstream).sum()
    target.backward()
    return out.detach()


# ---- the implementations -------------------------------------------------------------------------------

def naive_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """float32 [...] log-probs the way trainers compute them: float32 logits, log_softmax, gather."""
    return reference.token_stats(HeadInput(hidden, LMHead(weight)), labels)["logprob"]


def naive_tdpo_terms(hidden: torch.Tensor, weight: torch.Tensor, ref_hidden: torch.Tensor, ref_weight: torch.Tensor,
                     labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 [...] policy and reference label log-probs and KL(reference || policy) per token, from both
    models' materialized float32 logits (fdpo's reference backend); 0 where labels == -100."""
    out = reference.token_stats(HeadInput(hidden, LMHead(weight)), labels, HeadInput(ref_hidden, LMHead(ref_weight)),
                                StatsRequest(kl=True))
    return out["logprob"], out["ref_logprob"], out["kl"]


def naive_epsilon_terms(hidden: torch.Tensor, weight: torch.Tensor, ref_hidden: torch.Tensor,
                        ref_weight: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """float32 [...] policy and reference label log-probs and those of (1 + eps) z - eps z_ref and
    (1 - eps) z + eps z_ref per token, from materialized float32 logits (fdpo's reference backend)."""
    out = reference.token_stats(HeadInput(hidden, LMHead(weight)), labels, HeadInput(ref_hidden, LMHead(ref_weight)),
                                StatsRequest(eps=EPS))
    return out["logprob"], out["ref_logprob"], out["logprob_plus"], out["logprob_minus"]


def naive_js(hidden: torch.Tensor, weight: torch.Tensor, ref_hidden: torch.Tensor, ref_weight: torch.Tensor,
             labels: torch.Tensor) -> torch.Tensor:
    """float32 [N] generalized JSD (JS_BETA) per token from both models' materialized float32 logits and
    log-softmax (fdpo's reference backend), 0 where labels == -100."""
    rows = reference_divergence(HeadInput(hidden, LMHead(weight)), HeadInput(ref_hidden, LMHead(ref_weight)), JS)
    return rows["divergence"].masked_fill(labels == -100, 0.0)


def trl_js(hidden: torch.Tensor, weight: torch.Tensor, ref_hidden: torch.Tensor, ref_weight: torch.Tensor,
           labels: torch.Tensor) -> torch.Tensor:
    """float32 [N] generalized JSD (JS_BETA) per token from TRL's ChunkedDivergenceFunction (the policy as
    its student), on the scored rows only (it has no ignore_index), scattered back with 0 elsewhere."""
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    scored = (labels != -100).nonzero().squeeze(1)
    value = ChunkedDivergenceFunction.apply(hidden[scored], weight, None, ref_hidden[scored], ref_weight, None,
                                            JS_BETA)[0]
    return torch.zeros(labels.shape, dtype=torch.float32, device=hidden.device).index_put((scored,), value.float())


def distillation_output(loss: torch.Tensor, entropy_sum: torch.Tensor, n_valid: torch.Tensor) -> torch.Tensor:
    """float32 [2]: the distillation loss and the mean entropy the trainer logs (entropy_sum / n_valid)."""
    return torch.stack([loss.float(), entropy_sum.float() / n_valid.clamp(min=1)])


def naive_distillation(hidden: torch.Tensor, weight: torch.Tensor, ref_hidden: torch.Tensor, ref_weight: torch.Tensor,
                       completion_mask: torch.Tensor) -> torch.Tensor:
    """`distillation_output` of TRL's loss from both models' materialized float32 logits (fdpo's reference
    backend): the JSD (JS_BETA) averaged over the completion positions and the student's entropy there."""
    rows = reference_divergence(HeadInput(hidden, LMHead(weight)), HeadInput(ref_hidden, LMHead(ref_weight)), JS,
                                entropy=True)
    valid = completion_mask != 0
    n_valid = valid.sum()
    return distillation_output(rows["divergence"][valid].sum() / n_valid.clamp(min=1), rows["entropy"][valid].sum(),
                               n_valid)


def trl_distillation_arguments(hidden: torch.Tensor, weight: torch.Tensor, ref_hidden: torch.Tensor,
                               ref_weight: torch.Tensor, completion_mask: torch.Tensor) -> dict:
    """The arguments DistillationTrainer passes TRL's `_chunked_divergence_loss` (and fdpo's drop-in): the
    student's and the teacher's [2P, T, D] hidden states and heads, the completion mask, beta JS_BETA."""
    return dict(student_hidden_states=hidden, teacher_hidden_states=ref_hidden, student_lm_head_weight=weight,
                teacher_lm_head_weight=ref_weight, completion_mask=completion_mask, beta=JS_BETA)


def trl_distillation(hidden: torch.Tensor, weight: torch.Tensor, ref_hidden: torch.Tensor, ref_weight: torch.Tensor,
                     completion_mask: torch.Tensor) -> torch.Tensor:
    """`distillation_output` of TRL's own `_chunked_divergence_loss` (ChunkedDivergenceFunction, with the
    student's entropy folded into its first pass)."""
    from fdpo.integrations.trl.distill import TRL_CHUNKED_DIVERGENCE_LOSS

    arguments = trl_distillation_arguments(hidden, weight, ref_hidden, ref_weight, completion_mask)
    return distillation_output(*TRL_CHUNKED_DIVERGENCE_LOSS(**arguments))


def _distillation_tensors(inputs: Inputs) -> tuple[torch.Tensor, ...]:
    """hidden, weight, ref_hidden, ref_weight ([2P, T, D] rows) and the int64 completion mask [2P, T] of a
    distillation workload (1 where the label is scored)."""
    return inputs.hidden, inputs.weight, inputs.ref_hidden, inputs.ref_weight, (inputs.labels != -100).long()


def _rows(inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden, ref_hidden as [N, D] views and labels as [N] of a two-model workload."""
    dim = inputs.hidden.shape[-1]
    return inputs.hidden.view(-1, dim), inputs.ref_hidden.reshape(-1, dim), inputs.labels.reshape(-1)


def _token_impl(logprobs: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                two_model: dict[str, Callable[..., tuple[torch.Tensor, ...]]] | None = None,
                loss_backend: str = "torch",
                divergence: Callable[..., torch.Tensor] | None = None,
                distillation: Callable[..., torch.Tensor] | None = None) -> Callable[[Inputs], torch.Tensor]:
    """An implementation of the workloads from a per-token log-prob function (hidden, weight, labels).

    The dpo workloads sum its log-probs per row (policy, and the reference under no_grad) and apply
    `fdpo.preference_loss` to the sums; "tdpo" and "epsilon-dpo" sum the per-token terms of
    `two_model[kind]` (as `naive_tdpo_terms`, `naive_epsilon_terms`) per row and apply
    `fdpo.tdpo_loss` or `fdpo.epsilon_dpo_loss`; "divergence" is `divergence(hidden, weight, ref_hidden,
    ref_weight, labels)` on the [N, D] rows (as `naive_js`); "distillation" is `distillation(hidden, weight,
    ref_hidden, ref_weight, completion_mask)` on the [2P, T, D] rows (as `naive_distillation`).
    """
    def run(inputs: Inputs) -> torch.Tensor:
        if inputs.kind == "logprobs":
            return logprobs(inputs.hidden, inputs.weight, inputs.labels)
        if inputs.kind == "distillation":
            return distillation(*_distillation_tensors(inputs))
        hidden, ref_hidden, labels = _rows(inputs)
        if inputs.kind == "divergence":
            return divergence(hidden, inputs.weight, ref_hidden, inputs.ref_weight, labels)
        rows = inputs.labels.shape
        pairs = rows[0] // 2
        if inputs.kind in TWO_MODEL:
            terms = two_model[inputs.kind](hidden, inputs.weight, ref_hidden, inputs.ref_weight, labels)
            sums = [part for t in terms for part in t.view(rows).sum(dim=-1).split(pairs)]
            if inputs.kind == "tdpo":
                return fdpo.tdpo_loss(*sums, beta=BETA, alpha=ALPHA, variant="tdpo2").loss
            return fdpo.epsilon_dpo_loss(*sums, beta=BETA, eps=EPS, backend=loss_backend).loss
        policy = logprobs(hidden, inputs.weight, labels).float().view(rows).sum(dim=-1)
        with torch.no_grad():
            ref = logprobs(ref_hidden, inputs.ref_weight, labels).float().view(rows).sum(dim=-1)
        return fdpo.preference_loss(policy[:pairs], policy[pairs:], ref[:pairs], ref[pairs:], beta=BETA,
                                    divergence=inputs.divergence, alpha=ALPHA, backend=loss_backend).loss
    return run


NAIVE_TWO_MODEL = {"tdpo": naive_tdpo_terms, "epsilon-dpo": naive_epsilon_terms}


def _compiled_naive(compile_backend: str) -> Callable[[Inputs], torch.Tensor]:
    """The naive implementation with torch.compile of its per-token functions."""
    return _token_impl(torch.compile(naive_logprobs, backend=compile_backend),
                       {kind: torch.compile(fn, backend=compile_backend) for kind, fn in NAIVE_TWO_MODEL.items()},
                       divergence=torch.compile(naive_js, backend=compile_backend),
                       distillation=torch.compile(naive_distillation, backend=compile_backend))


def _fdpo_impl(backend: str, strategy: str | None = None) -> Callable[[Inputs], torch.Tensor]:
    """fdpo's public entries on `backend`: the per-token log-probs of a FusedLMHead, and PreferenceLoss,
    TDPOLoss and EpsilonDPOLoss with fused heads (the epsilon-DPO module in eval mode: its controller
    records no steps), the per-token JS of `fdpo.token_divergence`'s entry and, for "distillation", the
    TRL drop-in `fdpo.integrations.trl.distill.chunked_divergence_loss`. `strategy` pins the
    triton backend's head backward ("fused": the fused-atomics kernel; "split": the split-K backward
    with the default buffer, `fdpo.cost.DEFAULT_BACKWARD_BUFFER_BYTES`); None lets it choose
    (`fdpo.options.BackwardOptions`)."""
    options = None if strategy is None else BackwardOptions(buffer_bytes=DEFAULT_BACKWARD_BUFFER_BYTES,
                                                            strategy=strategy)

    def head(weight: torch.Tensor) -> fdpo.FusedLMHead:
        module = fdpo.FusedLMHead(weight, backend=backend)
        if options is not None:
            module.backward_options = options
        return module

    def run(inputs: Inputs) -> torch.Tensor:
        if inputs.kind == "logprobs":
            return head(inputs.weight)(inputs.hidden, inputs.labels)
        if inputs.kind == "distillation":
            from fdpo.integrations.trl.distill import chunked_divergence_loss

            arguments = trl_distillation_arguments(*_distillation_tensors(inputs))
            return distillation_output(*chunked_divergence_loss(**arguments, backend=backend))
        if inputs.kind == "divergence":
            hidden, ref_hidden, labels = _rows(inputs)
            return divergence_stats(HeadInput(hidden, LMHead(inputs.weight)), HeadInput(ref_hidden,
                                    LMHead(inputs.ref_weight)), labels, JS, backend=backend,
                                    backward=options or BackwardOptions())
        if inputs.kind == "tdpo":
            loss_fn = fdpo.TDPOLoss(beta=BETA, alpha=ALPHA, variant="tdpo2", backend=backend)
        elif inputs.kind == "epsilon-dpo":
            loss_fn = fdpo.EpsilonDPOLoss(fdpo.EpsilonDPO(beta=BETA, eps=EPS), backend=backend).eval()
        else:
            loss_fn = fdpo.PreferenceLoss(beta=BETA, divergence=inputs.divergence, alpha=ALPHA, backend=backend)
        return loss_fn(inputs.hidden, inputs.labels, head(inputs.weight), ref_hidden=inputs.ref_hidden,
                       ref_head=fdpo.FusedLMHead(inputs.ref_weight, backend=backend)).loss
    return run


def _liger_impl(compiled: bool) -> Callable[[Inputs], torch.Tensor]:
    """Liger-Kernel: LigerFusedLinearDPOLoss (chunks of one pair, torch.compile'd when `compiled`) for the
    DPO head; per token, liger_fused_linear_cross_entropy(reduction="none"), a Triton kernel (CUDA only)."""
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    dpo_loss = LigerFusedLinearDPOLoss(beta=BETA, use_ref_model=True, average_log_prob=False, compiled=compiled)

    def run(inputs: Inputs) -> torch.Tensor:
        if inputs.kind == "logprobs":
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

            return -liger_fused_linear_cross_entropy(inputs.hidden, inputs.weight, inputs.labels,
                                                     reduction="none").float()
        return dpo_loss(inputs.weight, inputs.hidden, inputs.labels, ref_input=inputs.ref_hidden,
                        ref_weight=inputs.ref_weight)[0]
    return run


def cce_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """float32 [N] label log-probs (0 where labels == -100) from cut-cross-entropy's
    linear_cross_entropy(reduction="none"): its Triton kernels on CUDA, impl="torch_compile" elsewhere."""
    from cut_cross_entropy import linear_cross_entropy

    impl = "cce" if hidden.device.type == "cuda" else "torch_compile"
    return -linear_cross_entropy(hidden, weight, labels, reduction="none", impl=impl).float()


def trl_compacts(device: torch.device) -> bool:
    """Whether TRL's fused LM head scores only the valid positions on `device` (its `_use_triton`: a CUDA or
    XPU device with Triton); elsewhere it scores every position."""
    from trl.kernels.chunked_logprob import _use_triton

    return _use_triton(device)


def trl_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """float32 [N] label log-probs (0 where labels == -100) from TRL's ChunkedLogProbFunction, called as
    TRL's fused LM head calls it (trl.trainer.utils.add_fused_lm_head): on a Triton device (`trl_compacts`)
    on the scored rows only, hidden[mask] and labels[mask], scattered back into zeros, its Triton kernel
    folding each tile; elsewhere every position scored with labels clamped to 0 and the ignored ones zeroed
    after, each [4096, V] tile folded by PyTorch ops."""
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    mask = labels != -100
    if trl_compacts(hidden.device):
        logprobs = ChunkedLogProbFunction.apply(hidden[mask], weight, None, labels[mask], 1.0, TRL_CHUNK_SIZE,
                                                None, 1.0, ())[0]
        return logprobs.new_zeros(labels.shape).masked_scatter(mask, logprobs)
    logprobs = ChunkedLogProbFunction.apply(hidden, weight, None, labels.clamp(min=0), 1.0, TRL_CHUNK_SIZE,
                                            None, 1.0, ())[0]
    return logprobs.masked_fill(~mask, 0.0)


@dataclass(frozen=True)
class Implementation:
    """A named implementation; `build` makes the callable (Inputs -> output) once per run."""

    name: str
    description: str
    build: Callable[..., Callable[[Inputs], torch.Tensor]]
    package: str | None = None
    needs_cuda: bool = False


REGISTRY = {
    impl.name: impl for impl in (
        Implementation("naive", "float32 logits -> log_softmax -> gather (fdpo backend='reference'), as TRL does",
                       lambda **_: _token_impl(naive_logprobs, NAIVE_TWO_MODEL, loss_backend="reference",
                                               divergence=naive_js, distillation=naive_distillation)),
        Implementation("naive+compile", "torch.compile of the naive per-token functions",
                       lambda compile_backend="inductor", **_: _compiled_naive(compile_backend)),
        Implementation("fdpo-torch", "fdpo backend='torch' (chunked PyTorch, recomputing backward)",
                       lambda **_: _fdpo_impl("torch")),
        Implementation("fdpo-triton", "fdpo backend='triton' (the fused Triton kernels; head backward chosen by "
                       "the cost model)", lambda **_: _fdpo_impl("triton"), package="triton", needs_cuda=True),
        Implementation("fdpo-triton-fused", "fdpo backend='triton', fused-atomics head backward (budget 0)",
                       lambda **_: _fdpo_impl("triton", "fused"), package="triton", needs_cuda=True),
        Implementation("fdpo-triton-split", "fdpo backend='triton', split-K head backward (dz buffer of "
                       "the default 1 GiB, GEMMs into fp32)", lambda **_: _fdpo_impl("triton", "split"),
                       package="triton", needs_cuda=True),
        Implementation("liger", "Liger-Kernel LigerFusedLinearDPOLoss (compiled) / fused linear cross entropy "
                       "(reduction='none', CUDA only)", lambda **_: _liger_impl(compiled=True), package="liger_kernel"),
        Implementation("liger-eager", "Liger-Kernel LigerFusedLinearDPOLoss(compiled=False) / fused linear cross "
                       "entropy (reduction='none', CUDA only)", lambda **_: _liger_impl(compiled=False),
                       package="liger_kernel"),
        Implementation("cce", "cut-cross-entropy linear_cross_entropy (reduction='none'; impl='torch_compile' off "
                       "CUDA), summed per row for the DPO head", lambda **_: _token_impl(cce_logprobs),
                       package="cut_cross_entropy"),
        Implementation("trl", "TRL's fused LM head: ChunkedLogProbFunction per token (on CUDA on the scored rows "
                       "only, as the head calls it there), summed per row for the DPO head; "
                       "ChunkedDivergenceFunction for the divergence; the DistillationTrainer's "
                       "_chunked_divergence_loss for the distillation",
                       lambda **_: _token_impl(trl_logprobs, divergence=trl_js,
                                               distillation=trl_distillation), package="trl"),
    )
}


def unavailable(name: str, device: torch.device, workload: str | None = None) -> str | None:
    """Why implementation `name` cannot run `workload` on `device`, or None when it can."""
    impl = REGISTRY[name]
    if impl.package is not None and importlib.util.find_spec(impl.package) is None:
        return f"not installed ({impl.package})"
    if impl.needs_cuda and device.type != "cuda":
        if name.startswith("fdpo-triton"):
            return ("needs CUDA: on CPU the kernels would run in Triton's numpy interpreter, which tests "
                    "them but measures nothing")
        return "needs CUDA"
    if name.startswith("liger") and workload == "logprobs" and device.type != "cuda":
        return ("needs CUDA: Liger's per-token fused linear cross entropy is a Triton kernel; its chunked "
                "PyTorch losses return losses, not per-token log-probs")
    if name == "cce" and workload in DISTRIBUTIONS:
        return "cce gives label log-probs only, not the full-vocabulary divergence"
    if name.startswith("fdpo") and workload == "distillation":
        if importlib.util.find_spec("trl") is None:
            return "fdpo's distillation loss is its TRL drop-in (fdpo.integrations.trl): not installed (trl)"
        if name in ("fdpo-triton-fused", "fdpo-triton-split"):
            return "the TRL drop-in takes TRL's arguments only: its backward is the cost model's choice (fdpo-triton)"
    if name.startswith("liger") and workload is not None and workload not in ("logprobs", "dpo-reverse_kl"):
        return "Liger's fused preference loss is DPO with the reverse-KL divergence only"
    if name in ("cce", "trl") and workload in TWO_MODEL:
        return f"{name} gives label log-probs only, not the full-vocabulary terms {workload} needs"
    return None


# ---- the float64 reference and the check ---------------------------------------------------------------

def fdpo_score64(r: torch.Tensor, divergence: str) -> torch.Tensor:
    """The f-DPO score g(r) of docs/math.md section 2 in float64 (additive constants dropped: they cancel)."""
    if divergence == "reverse_kl":
        return r
    if divergence == "forward_kl":
        return -torch.exp(-r)
    if divergence == "js":
        return -F.softplus(-r)
    if divergence == "alpha":
        return -torch.exp(-ALPHA * r) / ALPHA
    raise ValueError(f"unknown divergence {divergence!r}; allowed: {', '.join(DIVERGENCES)}")


def _terms64(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ref_hidden: torch.Tensor | None,
             ref_weight: torch.Tensor | None, kind: str) -> torch.Tensor:
    """float64 per-token terms of float64 hidden [M, D] under weight [V, D] (logits, log_softmax, gather),
    0 where labels == -100: [M, 1] label log-probs; for "tdpo" [M, 3] also the reference's and
    KL(reference || policy); for "epsilon-dpo" [M, 4] also the reference's and those of the perturbed
    logits (1 + eps) z - eps z_ref and (1 - eps) z + eps z_ref; for "divergence" [M, 1] the JS divergence
    beta KL(q || m) + (1 - beta) KL(p || m), m = (1 - beta) p + beta q (docs/math.md 12); for
    "distillation" [M, 2] that and the policy's entropy -sum_v p_v log p_v."""
    ignored = labels == -100
    index = labels.masked_fill(ignored, 0).long()[:, None]
    z = hidden @ weight.T
    logp = torch.log_softmax(z, dim=-1)
    if kind in DISTRIBUTIONS:
        logq = torch.log_softmax(ref_hidden @ ref_weight.T, dim=-1)
        log_m = torch.log((1 - JS_BETA) * logp.exp() + JS_BETA * logq.exp())
        js = (JS_BETA * logq.exp() * (logq - log_m) + (1 - JS_BETA) * logp.exp() * (logp - log_m)).sum(-1)
        terms = [js, -(logp.exp() * logp).sum(-1)] if kind == "distillation" else [js]
        return torch.stack(terms, dim=1).masked_fill(ignored[:, None], 0.0)
    terms = [logp.gather(-1, index)]
    if kind in TWO_MODEL:
        z_ref = ref_hidden @ ref_weight.T
        logr = torch.log_softmax(z_ref, dim=-1)
        terms.append(logr.gather(-1, index))
        if kind == "tdpo":
            terms.append((logr.exp() * (logr - logp)).sum(dim=-1, keepdim=True))
        else:
            terms += [torch.log_softmax((1 + sign * EPS) * z - sign * EPS * z_ref, dim=-1).gather(-1, index)
                      for sign in (1, -1)]
    return torch.cat(terms, dim=1).masked_fill(ignored[:, None], 0.0)


def _float64_pass(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                  upstream: torch.Tensor | None = None, ref_hidden: torch.Tensor | None = None,
                  ref_weight: torch.Tensor | None = None, kind: str = "logprobs"
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The per-token terms of `_terms64` in float64 for hidden [M, D] (and ref_hidden [M, D']) and,
    given upstream [M, K], the gradients of sum(upstream * terms) in hidden and weight.

    Rows go in chunks that keep the float64 [rows, V] temporaries under REFERENCE_CHUNK_BYTES.
    Returns (terms float64 [M, K], d hidden float64 [M, D] or None, d weight float64 [V, D] or None).
    """
    grad = upstream is not None
    weight64 = weight.detach().double().requires_grad_(grad)
    ref_weight64 = None if ref_weight is None else ref_weight.detach().double()
    rows = max(1, REFERENCE_CHUNK_BYTES // (8 * (3 if ref_hidden is None else 10) * weight.shape[0]))
    terms, d_hidden = [], []
    for r0 in range(0, hidden.shape[0], rows):
        h = hidden[r0:r0 + rows].detach().double().requires_grad_(grad)
        ref_h = None if ref_hidden is None else ref_hidden[r0:r0 + rows].detach().double()
        with torch.set_grad_enabled(grad):
            t = _terms64(h, weight64, labels[r0:r0 + rows], ref_h, ref_weight64, kind)
            if grad:
                (t * upstream[r0:r0 + rows].double()).sum().backward()
                d_hidden.append(h.grad)
        terms.append(t.detach())
    if not grad:
        return torch.cat(terms), None, None
    return torch.cat(terms), torch.cat(d_hidden), weight64.grad


def _loss64(inputs: Inputs, sums: torch.Tensor, ref: torch.Tensor | None) -> torch.Tensor:
    """The workload's loss in float64 from per-row sums [2P, K] (columns as `_terms64`), written out
    from docs/math.md (sections 2, 5 and 6) independently of fdpo; `ref` [2P]: reference sums of a dpo workload."""
    pairs = sums.shape[0] // 2

    def chosen_minus_rejected(x: torch.Tensor) -> torch.Tensor:
        return x[:pairs] - x[pairs:]

    if inputs.kind == "dpo":
        score = fdpo_score64(sums[:, 0] - ref, inputs.divergence)
        return F.softplus(-BETA * chosen_minus_rejected(score)).mean()
    lp, ref_lp = sums[:, 0], sums[:, 1]
    if inputs.kind == "tdpo":
        kl = sums[:, 2]
        margin = chosen_minus_rejected(lp - ref_lp) - ALPHA * (kl[pairs:] - kl[:pairs].detach())
        return F.softplus(-BETA * margin).mean()
    rho, rho_plus, rho_minus = (chosen_minus_rejected(x).detach() for x in (lp, sums[:, 2], sums[:, 3]))
    step = ((rho_plus > rho) & (rho > rho_minus)).double() - ((rho_minus > rho) & (rho > rho_plus)).double()
    return F.softplus(-BETA / (1 + EPS * step) * chosen_minus_rejected(lp - ref_lp)).mean()


def float64_reference(inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output, d hidden, d weight) of the workload computed naively in float64 from the same inputs.

    For the losses, the gradients of `_loss64` with respect to the per-row sums become the per-token
    upstream gradients of a second, differentiated float64 pass. The distillation's output is float64
    [2]: the mean JS and the mean entropy over the scored tokens, its gradients the mean JS's.
    """
    if inputs.kind == "logprobs":
        lp, d_hidden, d_weight = _float64_pass(inputs.hidden, inputs.weight, inputs.labels, inputs.upstream[:, None])
        return lp[:, 0], d_hidden, d_weight
    hidden, ref_hidden, labels = _rows(inputs)
    if inputs.kind == "divergence":
        js, d_hidden, d_weight = _float64_pass(hidden, inputs.weight, labels, inputs.upstream[:, None], ref_hidden,
                                               inputs.ref_weight, "divergence")
        return js[:, 0], d_hidden.view(inputs.hidden.shape), d_weight
    if inputs.kind == "distillation":
        scored = (labels != -100).double()
        count = scored.sum().clamp(min=1)
        upstream = torch.stack([scored / count, torch.zeros_like(scored)], dim=1)
        terms, d_hidden, d_weight = _float64_pass(hidden, inputs.weight, labels, upstream, ref_hidden,
                                                  inputs.ref_weight, "distillation")
        return terms.sum(dim=0) / count, d_hidden.view(inputs.hidden.shape), d_weight
    rows = inputs.labels.shape
    two_model = (ref_hidden, inputs.ref_weight, inputs.kind) if inputs.kind in TWO_MODEL else ()
    terms = _float64_pass(hidden, inputs.weight, labels, None, *two_model)[0]
    sums = terms.view(*rows, -1).sum(dim=1).requires_grad_()
    ref = None
    if inputs.kind == "dpo":
        ref = _float64_pass(ref_hidden, inputs.ref_weight, labels)[0].view(rows).sum(dim=1)
    loss = _loss64(inputs, sums, ref)
    loss.backward()
    upstream = sums.grad[:, None, :].expand(*rows, sums.shape[1]).reshape(-1, sums.shape[1])
    _, d_hidden, d_weight = _float64_pass(hidden, inputs.weight, labels, upstream, *two_model)
    return loss.detach(), d_hidden.view(inputs.hidden.shape), d_weight


def relative_error(got: torch.Tensor | None, want: torch.Tensor) -> float:
    """max|got - want| / max|want| (inf when `got` is missing, of another shape or not finite)."""
    if got is None or got.shape != want.shape:
        return math.inf
    err = (got.detach().to(want.device, torch.float64) - want).abs().max().item() / max(want.abs().max().item(), 1e-30)
    return err if math.isfinite(err) else math.inf


def check(impl: Callable[[Inputs], torch.Tensor], inputs: Inputs,
          expected: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """Run one step of `impl` and return its relative errors against `expected` (float64_reference):
    value, grad_hidden, grad_weight; for the distillation value (the loss) and entropy each against its own size."""
    out = step(impl, inputs)
    got = {"value": out, "grad_hidden": inputs.hidden.grad, "grad_weight": inputs.weight.grad}
    want = dict(zip(got, expected, strict=True))
    if inputs.kind == "distillation" and out.shape == want["value"].shape:
        got["value"], got["entropy"] = out
        want["value"], want["entropy"] = want["value"]
    errors = {name: relative_error(got[name], want[name]) for name in want}
    inputs.reset_grads()
    return errors
