"""What is benchmarked: the workloads, their inputs, the implementations compared, and their checks.

A workload is a forward+backward step on fixed inputs:

- "logprobs": per-token label log-probs of hidden [N, D] under the LM head weight [V, D], labels [N]
  (every 8th ignored), backward with a fixed random upstream gradient [N] (float32).
- "dpo-<divergence>" for each f-DPO divergence of `fdpo.preference_loss` ("reverse_kl", "forward_kl",
  "js", "alpha"): the full preference head. The policy's hidden states [2P, T, D] (P chosen rows, then
  P rejected ones; N = 2PT tokens) and head [V, D] get gradients; the reference's hidden states and
  head (the policy's plus a small perturbation, as a reference model drifted from the policy) do not.
  The first quarter of each row is prompt (ignored). Loss: sigmoid shape, beta 0.1, alpha 0.5.

An implementation maps a workload's inputs to its output (float32 per-token log-probs [N], or the
scalar loss) through autograd. Every implementation is checked, on the benchmark inputs themselves,
against the naive computation in float64 (values and the gradients of hidden states and head weight)
before it is measured; one that disagrees is reported and not timed.
"""

import importlib.util
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import fdpo
from fdpo.backends import reference

DIVERGENCES = ("reverse_kl", "forward_kl", "js", "alpha")
WORKLOADS = ("logprobs", *(f"dpo-{d}" for d in DIVERGENCES))
IMPLEMENTATIONS = ("naive", "naive+compile", "fdpo-torch", "fdpo-triton", "liger", "cce")

BETA = 0.1
ALPHA = 0.5
# Every 8th token of the log-prob workload is ignored; the reference model is the policy plus this
# relative perturbation of hidden states and head (keeps the log-ratios O(1), where the losses are
# neither saturated nor clamped, so the gradient check means something).
IGNORE_EVERY = 8
REFERENCE_DRIFT = 0.01
# Largest max|got - want| / max|want| accepted against the float64 result, by input dtype.
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 5e-2}
# Bytes of float64 logits (and their gradient) the chunked float64 reference holds at once.
REFERENCE_CHUNK_BYTES = 1 << 30


@dataclass
class Inputs:
    """A workload's tensors: leaves `hidden` [N, D] or [2P, T, D] and `weight` [V, D] take gradients.

    upstream: float32 [N] gradient of the per-token log-probs (logprobs workload), else None;
    ref_hidden / ref_weight: the reference model's (no gradient), dpo workloads only.
    """

    workload: str
    hidden: torch.Tensor
    weight: torch.Tensor
    labels: torch.Tensor
    upstream: torch.Tensor | None = None
    ref_hidden: torch.Tensor | None = None
    ref_weight: torch.Tensor | None = None

    @property
    def divergence(self) -> str | None:
        return self.workload.removeprefix("dpo-") if self.workload.startswith("dpo-") else None

    @property
    def num_tokens(self) -> int:
        return self.labels.numel()

    def reset_grads(self) -> None:
        self.hidden.grad = None
        self.weight.grad = None


def check_workload(workload: str, tokens: int, pairs: int) -> None:
    """Raise ValueError for an unknown workload or a token count the pair layout cannot split."""
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; allowed: {', '.join(WORKLOADS)}")
    if tokens < 1:
        raise ValueError(f"the number of tokens must be positive, got {tokens}")
    if workload != "logprobs" and (tokens % (2 * pairs) or tokens // (2 * pairs) < 4):
        raise ValueError(f"{workload} lays {tokens} tokens out as {pairs} pairs of chosen and rejected rows: "
                         f"tokens must be a multiple of 2 * pairs = {2 * pairs} with rows of at least 4 tokens")


def make_inputs(workload: str, tokens: int, vocab: int, dim: int, *, dtype: torch.dtype, device: torch.device,
                pairs: int = 2, seed: int = 0) -> Inputs:
    """Seeded random inputs of `workload` with N = `tokens`, V = `vocab`, D = `dim` (see the module doc)."""
    check_workload(workload, tokens, pairs)
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    weight = randn(vocab, dim, scale=dim**-0.5)
    labels = torch.randint(0, vocab, (tokens,), generator=gen)
    if workload == "logprobs":
        labels[::IGNORE_EVERY] = -100
        upstream = torch.randn(tokens, generator=gen).to(device)
        return Inputs(workload, randn(tokens, dim).requires_grad_(), weight.requires_grad_(), labels.to(device),
                      upstream=upstream)
    rows, length = 2 * pairs, tokens // (2 * pairs)
    hidden = randn(rows, length, dim)
    labels = labels.view(rows, length)
    labels[:, : length // 4] = -100
    ref_hidden = hidden + randn(rows, length, dim, scale=REFERENCE_DRIFT)
    ref_weight = weight + randn(vocab, dim, scale=REFERENCE_DRIFT * dim**-0.5)
    return Inputs(workload, hidden.requires_grad_(), weight.requires_grad_(), labels.to(device),
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
    return reference.token_logprobs(hidden, weight, labels)


def _dpo_from_sums(inputs: Inputs, sums: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                   backend: str) -> torch.Tensor:
    """The f-DPO loss of `inputs` given a function (hidden, weight, labels) -> per-row log-prob sums [2P]."""
    policy = sums(inputs.hidden, inputs.weight, inputs.labels)
    with torch.no_grad():
        ref = sums(inputs.ref_hidden, inputs.ref_weight, inputs.labels)
    pairs = policy.shape[0] // 2
    return fdpo.preference_loss(policy[:pairs], policy[pairs:], ref[:pairs], ref[pairs:], beta=BETA,
                                divergence=inputs.divergence, alpha=ALPHA, backend=backend).loss


def _token_impl(logprobs: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                loss_backend: str = "torch") -> Callable[[Inputs], torch.Tensor]:
    """An implementation of every workload from a per-token log-prob function (hidden, weight, labels).

    The dpo workloads sum its log-probs per row and apply `fdpo.preference_loss` to the sums.
    """
    def run(inputs: Inputs) -> torch.Tensor:
        if inputs.divergence is None:
            return logprobs(inputs.hidden, inputs.weight, inputs.labels)

        def sums(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            flat = logprobs(hidden.view(-1, hidden.shape[-1]), weight, labels.reshape(-1))
            return flat.float().view(labels.shape).sum(dim=-1)
        return _dpo_from_sums(inputs, sums, loss_backend)
    return run


def _fdpo_impl(backend: str) -> Callable[[Inputs], torch.Tensor]:
    """fdpo's public entries on `backend`: token_logprobs, and PreferenceLoss with fused heads."""
    def run(inputs: Inputs) -> torch.Tensor:
        if inputs.divergence is None:
            return fdpo.token_logprobs(inputs.hidden, inputs.weight, inputs.labels, backend=backend)
        loss_fn = fdpo.PreferenceLoss(beta=BETA, divergence=inputs.divergence, alpha=ALPHA, backend=backend)
        return loss_fn(inputs.hidden, inputs.labels, fdpo.FusedLMHead(inputs.weight, backend=backend),
                       ref_hidden=inputs.ref_hidden,
                       ref_head=fdpo.FusedLMHead(inputs.ref_weight, backend=backend)).loss
    return run


def _liger_impl() -> Callable[[Inputs], torch.Tensor]:
    """Liger-Kernel: fused linear cross entropy (reduction="none") per token; its fused DPO loss."""
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    options = {"beta": BETA, "use_ref_model": True}
    if "average_log_prob" in inspect.signature(LigerFusedLinearDPOLoss).parameters:
        options["average_log_prob"] = False
    dpo_loss = LigerFusedLinearDPOLoss(**options)

    def run(inputs: Inputs) -> torch.Tensor:
        if inputs.divergence is None:
            return -liger_fused_linear_cross_entropy(inputs.hidden, inputs.weight, inputs.labels,
                                                     reduction="none").float()
        out = dpo_loss(inputs.weight, inputs.hidden, inputs.labels, ref_input=inputs.ref_hidden,
                       ref_weight=inputs.ref_weight)
        return out[0] if isinstance(out, tuple) else out
    return run


def _cce_impl() -> Callable[[Inputs], torch.Tensor]:
    """Apple's cut-cross-entropy: linear_cross_entropy(reduction="none") per token (and its row sums)."""
    from cut_cross_entropy import linear_cross_entropy

    return _token_impl(lambda h, w, y: -linear_cross_entropy(h, w, y, reduction="none").float())


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
                       lambda **_: _token_impl(naive_logprobs, loss_backend="reference")),
        Implementation("naive+compile", "torch.compile of the naive per-token function",
                       lambda compile_backend="inductor", **_: _token_impl(
                           torch.compile(naive_logprobs, backend=compile_backend))),
        Implementation("fdpo-torch", "fdpo backend='torch' (chunked PyTorch, recomputing backward)",
                       lambda **_: _fdpo_impl("torch")),
        Implementation("fdpo-triton", "fdpo backend='triton' (the fused Triton kernels)",
                       lambda **_: _fdpo_impl("triton"), package="triton", needs_cuda=True),
        Implementation("liger", "Liger-Kernel fused linear cross entropy (reduction='none') / fused linear DPO loss",
                       lambda **_: _liger_impl(), package="liger_kernel", needs_cuda=True),
        Implementation("cce", "cut-cross-entropy linear_cross_entropy (reduction='none')",
                       lambda **_: _cce_impl(), package="cut_cross_entropy", needs_cuda=True),
    )
}


def unavailable(name: str, device: torch.device, workload: str | None = None) -> str | None:
    """Why implementation `name` cannot run `workload` on `device`, or None when it can."""
    impl = REGISTRY[name]
    if impl.package is not None and importlib.util.find_spec(impl.package) is None:
        return f"not installed ({impl.package})"
    if impl.needs_cuda and device.type != "cuda":
        if name == "fdpo-triton":
            return ("needs CUDA: on CPU the kernels would run in Triton's numpy interpreter, which tests "
                    "them but measures nothing")
        return "needs CUDA"
    if name == "liger" and workload is not None and workload not in ("logprobs", "dpo-reverse_kl"):
        return "Liger's fused DPO loss has the reverse-KL (standard DPO) divergence only"
    return None


# ---- the float64 reference and the check ---------------------------------------------------------------

def fdpo_score64(r: torch.Tensor, divergence: str) -> torch.Tensor:
    """The f-DPO score g(r) of MATH.md section 2 in float64 (additive constants dropped: they cancel)."""
    if divergence == "reverse_kl":
        return r
    if divergence == "forward_kl":
        return -torch.exp(-r)
    if divergence == "js":
        return -F.softplus(-r)
    if divergence == "alpha":
        return -torch.exp(-ALPHA * r) / ALPHA
    raise ValueError(f"unknown divergence {divergence!r}; allowed: {', '.join(DIVERGENCES)}")


def _logprobs64(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """float64 [M] log-probs of float64 hidden [M, D] under weight [V, D]: logits, log_softmax, gather."""
    ignored = labels == -100
    logprobs = torch.log_softmax(hidden @ weight.T, dim=-1)
    picked = logprobs.gather(-1, labels.masked_fill(ignored, 0).long()[:, None]).squeeze(-1)
    return picked.masked_fill(ignored, 0.0)


def _float64_pass(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                  upstream: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Naive float64 log-probs of hidden [M, D] and, given upstream [M], the gradients of sum(upstream * lp).

    Rows go in chunks so that the float64 logits stay under REFERENCE_CHUNK_BYTES. Returns
    (log-probs float64 [M], d hidden float64 [M, D] or None, d weight float64 [V, D] or None).
    """
    weight64 = weight.detach().double().requires_grad_(upstream is not None)
    rows = max(1, REFERENCE_CHUNK_BYTES // (8 * 3 * weight.shape[0]))
    logprobs, d_hidden = [], []
    for r0 in range(0, hidden.shape[0], rows):
        h = hidden[r0:r0 + rows].detach().double().requires_grad_(upstream is not None)
        with torch.set_grad_enabled(upstream is not None):
            lp = _logprobs64(h, weight64, labels[r0:r0 + rows])
            if upstream is not None:
                (lp * upstream[r0:r0 + rows].double()).sum().backward()
                d_hidden.append(h.grad)
        logprobs.append(lp.detach())
    if upstream is None:
        return torch.cat(logprobs), None, None
    return torch.cat(logprobs), torch.cat(d_hidden), weight64.grad


def float64_reference(inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output, d hidden, d weight) of the workload computed naively in float64 from the same inputs."""
    dim = inputs.hidden.shape[-1]
    hidden, labels = inputs.hidden.reshape(-1, dim), inputs.labels.reshape(-1)
    if inputs.divergence is None:
        lp, d_hidden, d_weight = _float64_pass(hidden, inputs.weight, labels, inputs.upstream)
        return lp, d_hidden.view(inputs.hidden.shape), d_weight
    rows = inputs.labels.shape
    policy = _float64_pass(hidden, inputs.weight, labels, None)[0].view(rows).sum(-1).requires_grad_()
    ref = _float64_pass(inputs.ref_hidden.reshape(-1, dim), inputs.ref_weight, labels, None)[0].view(rows).sum(-1)
    pairs = rows[0] // 2
    score = fdpo_score64(policy - ref, inputs.divergence)
    loss = F.softplus(-BETA * (score[:pairs] - score[pairs:])).mean()
    loss.backward()
    upstream = policy.grad[:, None].expand(rows).reshape(-1)
    _, d_hidden, d_weight = _float64_pass(hidden, inputs.weight, labels, upstream)
    return loss.detach(), d_hidden.view(inputs.hidden.shape), d_weight


def relative_error(got: torch.Tensor | None, want: torch.Tensor) -> float:
    """max|got - want| / max|want| (inf when `got` is missing, of another shape or not finite)."""
    if got is None or got.shape != want.shape:
        return math.inf
    err = (got.detach().to(want.device, torch.float64) - want).abs().max().item() / max(want.abs().max().item(), 1e-30)
    return err if math.isfinite(err) else math.inf


def check(impl: Callable[[Inputs], torch.Tensor], inputs: Inputs,
          expected: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """Run one step of `impl` and return its relative errors against `expected` (float64_reference)."""
    out = step(impl, inputs)
    errors = [relative_error(got, want) for got, want in
              zip((out, inputs.hidden.grad, inputs.weight.grad), expected, strict=True)]
    inputs.reset_grads()
    return dict(zip(("value", "grad_hidden", "grad_weight"), errors, strict=True))
