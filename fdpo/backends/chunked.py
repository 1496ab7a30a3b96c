"""The `torch` backend: the kernels' algorithm in plain PyTorch, chunked over tokens and vocabulary.

Same contract as `fdpo.kernels.head_stats_forward` / `head_stats_backward`: an online log-sum-exp over
vocabulary chunks in the forward, and a backward that recomputes each logit chunk from the saved
LSE. Peak memory is O(chunk_rows x chunk_vocab), never O(tokens x vocabulary). Every chunk's
logits, softmax and gradient dz are float32 whatever the input dtype, so the results match the
Triton kernels' fp32 accumulation; an outer autocast is not followed here (the public entries turn
it into the head's compute dtype, `fdpo.heads.autocast_compute_dtype`). The GEMMs' operands are the
hidden states, the weight and dz rounded to the head's compute dtype (`fdpo.heads.head_compute_dtype`)
one chunk at a time, never the whole weight (`fdpo.gemm.gemm_operand`, docs/math.md 13): for a
16-bit compute dtype on CUDA, where torch has fp32-accumulating 16-bit GEMMs (`fdpo.gemm`), they
are multiplied as they are on the tensor cores with fp32 accumulation and output (as the Triton
kernels do); anywhere else (the CPU, float32 products) the rounded operands are widened to float32
(exactly) and multiplied in fp32 (`operand_dtype`).
"""

import functools
from collections.abc import Callable
from typing import TypeVar

import torch

from ..gemm import accumulating_16bit_gemm, gemm_into, gemm_operand
from ..heads import (
    LOGPROBS_ONLY,
    HeadInput,
    ScoredTokens,
    StatsGrad,
    StatsRequest,
    head_compute_dtype,
    zero_head_grads,
)
from . import pairs
from .fused import FusedBackend

# Chunk sizes. Rows: 1024, enough for BLAS to run at full speed on a [1024, D] x [D, columns]
# product. Columns: on a GPU 4096 (1024 x 4096 fp32 = 16 MiB), since each of a chunk's dozen
# elementwise ops is a kernel launch of a few microseconds; elsewhere (the CPU) at most 2048, 8 MiB,
# small next to the gradients: the backward holds two such buffers (the logits and dz, built in
# place), three with a reference KL or an entropy gradient, 16 MiB above dHidden and dWeight for the
# log-probs, 1.24x the gradients alone at N = 4096, V = 32000, D = 512 (benchmarks/README.md, "Memory").
CHUNK_ROWS = 1024
CHUNK_VOCAB = 4096
CPU_CHUNK_VOCAB = 2048


def chunk_vocab(device: torch.device) -> int:
    """Vocabulary columns per chunk on `device`: CHUNK_VOCAB on CUDA, at most CPU_CHUNK_VOCAB elsewhere."""
    return CHUNK_VOCAB if device.type == "cuda" else min(CHUNK_VOCAB, CPU_CHUNK_VOCAB)


Result = TypeVar("Result")


def without_autocast(fn: Callable[..., Result]) -> Callable[..., Result]:
    """`fn(policy, ...)` with autocast disabled on the policy's device: its float32 matmuls stay float32.

    An outer torch.autocast (as training loops run models) would otherwise run them in 16 bits.
    """
    @functools.wraps(fn)
    def wrapper(policy: HeadInput, *args, **kwargs) -> Result:
        with torch.autocast(policy.hidden.device.type, enabled=False):
            return fn(policy, *args, **kwargs)

    return wrapper


def operand_dtype(head: HeadInput) -> torch.dtype:
    """The dtype of `head`'s GEMM operands: its compute dtype (`fdpo.heads.head_compute_dtype`) where
    torch multiplies it with fp32 accumulation (16-bit products on CUDA,
    `fdpo.gemm.accumulating_16bit_gemm`), float32 otherwise."""
    dtype = head_compute_dtype(head)
    return dtype if accumulating_16bit_gemm(head.weight.device, dtype) else torch.float32


def gather_rows(head: HeadInput, rows: torch.Tensor) -> torch.Tensor:
    """head.hidden[rows] as [len(rows), D], rounded to the head's compute dtype, of `operand_dtype(head)`,
    for hidden [B, T, D] of any strides and flat rows."""
    T = head.hidden.shape[1]
    return gemm_operand(head.hidden[rows // T, rows % T], head_compute_dtype(head), operand_dtype(head))


def weight_rows(head: HeadInput, v0: int, v1: int, operand: torch.dtype) -> torch.Tensor:
    """The weight rows W[v0:v1] [v1 - v0, D] rounded to the head's compute dtype, of the GEMM operands'
    dtype `operand` (one chunk cast, never the whole weight)."""
    return gemm_operand(head.weight[v0:v1], head_compute_dtype(head), operand)


def logit_chunk(h: torch.Tensor, head: HeadInput, v0: int, v1: int) -> torch.Tensor:
    """capped(scale (h W[v0:v1]^T + b[v0:v1])) / temperature in float32, for rows h [C, D] of `head`
    from `gather_rows` (float32, or the head's 16-bit compute dtype: then one 16-bit GEMM with fp32
    output); the bias is added in float32 as given.

    One [C, v1 - v0] float32 allocation: the scale, soft cap and temperature are applied in place.
    """
    bias, softcap, scale, temperature = head.bias, head.head.softcap, head.head.scale, head.head.temperature
    w = weight_rows(head, v0, v1, h.dtype)
    if h.dtype == torch.float32:
        z = h @ w.T if bias is None else torch.addmm(bias[v0:v1].float(), h, w.T)
    else:
        z = torch.empty(h.shape[0], v1 - v0, dtype=torch.float32, device=h.device)
        gemm_into(z, h, w.T, accumulate=False, mixed=True)
        if bias is not None:
            z += bias[v0:v1]
    if scale != 1.0:
        z.mul_(scale)
    if softcap is not None:
        z.div_(softcap).tanh_().mul_(softcap)
    if temperature != 1.0:
        z.div_(temperature)
    return z


@without_autocast
def stats_forward(
    policy: HeadInput,
    tokens: ScoredTokens,
    ref: HeadInput | None = None,
    request: StatsRequest = LOGPROBS_ONLY,
) -> dict[str, torch.Tensor]:
    """Same outputs as `fdpo.kernels.head_stats_forward`, chunked over rows and vocabulary.

    Each vocabulary chunk updates online accumulators (running max m, s = sum e^(z-m), and the
    weighted sums t = sum e^(z-m) x of the expectations) rescaled to the new max (docs/math.md 8);
    the docs/math.md 13 constants ride along: sum z, the max before the label, sum e^(2(z-m)).
    """
    rows, labels, eps = tokens.rows, tokens.labels, request.eps
    step = chunk_vocab(policy.hidden.device)
    num_rows, vocab = rows.numel(), policy.weight.shape[0]
    perturb, has_ref = eps is not None, ref is not None
    f32 = dict(dtype=torch.float32, device=policy.hidden.device)
    names = ["logprob", "lse"] + ["entropy"] * request.entropy + ["ref_logprob", "ref_lse"] * has_ref \
        + ["kl"] * request.kl + ["logprob_plus", "logprob_minus"] * perturb \
        + [n for n in request.constants if n != "is_top1"]
    out = {name: torch.empty(num_rows, **f32) for name in names}
    if request.top1:
        out["is_top1"] = torch.empty(num_rows, dtype=torch.bool, device=policy.hidden.device)
    for r0 in range(0, num_rows, CHUNK_ROWS):
        r1 = min(r0 + CHUNK_ROWS, num_rows)
        h = gather_rows(policy, rows[r0:r1])
        h_ref = gather_rows(ref, rows[r0:r1]) if has_ref else None
        lab = labels[r0:r1].long()
        used = ["z"] + ["zr"] * has_ref + ["plus", "minus"] * perturb
        acc = {key: OnlineSoftmax(r1 - r0, policy.hidden.device) for key in used}
        z_label = torch.zeros(r1 - r0, **f32)
        zr_label = torch.zeros(r1 - r0, **f32)
        z_sum = torch.zeros(r1 - r0, **f32)
        before_label = torch.full((r1 - r0,), float("-inf"), **f32)
        for v0 in range(0, vocab, step):
            v1 = min(v0 + step, vocab)
            z = logit_chunk(h, policy, v0, v1)
            acc["z"].update(z, entropy=request.entropy, squares=request.log_sum_sq_probs)
            z_label += pick_labels(z, lab, v0, v1)
            if request.mean_logits:
                z_sum += z.sum(dim=1)
            if request.top1:
                before = torch.arange(v0, v1, device=z.device) < lab[:, None]
                before_label = torch.maximum(before_label, z.masked_fill(~before, float("-inf")).amax(dim=1))
            if not has_ref:
                continue
            zr = logit_chunk(h_ref, ref, v0, v1)
            acc["zr"].update(zr, zr - z if request.kl else None)
            zr_label += pick_labels(zr, lab, v0, v1)
            if perturb:
                # A masked z_ref (-inf) read as the most negative float32, as the kernels do (docs/math.md 8).
                acc["plus"].update((1 + eps) * z - eps * zr.clamp(min=torch.finfo(zr.dtype).min))
                acc["minus"].update((1 - eps) * z + eps * zr)
        lse = acc["z"].lse()
        out["lse"][r0:r1], out["logprob"][r0:r1] = lse, z_label - lse
        if request.entropy:
            out["entropy"][r0:r1] = acc["z"].entropy()
        if request.mean_logits:
            out["mean_logits"][r0:r1] = z_sum / vocab
        if request.top1:
            out["is_top1"][r0:r1] = (z_label >= acc["z"].m) & (z_label > before_label)
        if request.log_sum_sq_probs:
            out["log_sum_sq_probs"][r0:r1] = acc["z"].log_sum_squares()
        if not has_ref:
            continue
        ref_lse = acc["zr"].lse()
        out["ref_lse"][r0:r1], out["ref_logprob"][r0:r1] = ref_lse, zr_label - ref_lse
        if request.kl:
            out["kl"][r0:r1] = acc["zr"].expectation() + acc["z"].lse_minus(acc["zr"])
        if perturb:
            lp_plus = (1 + eps) * z_label - eps * zr_label - acc["plus"].lse()
            if eps > 0:  # where the reference alone masks an entry z+ is +inf on paper: lp+ is -inf (docs/math.md 8)
                lp_plus.masked_fill_(acc["plus"].m >= eps * 0.5 * torch.finfo(torch.float32).max, float("-inf"))
            out["logprob_plus"][r0:r1] = lp_plus
            out["logprob_minus"][r0:r1] = (1 - eps) * z_label + eps * zr_label - acc["minus"].lse()
    return out


def weighted_(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x * w in place in x, and 0 wherever the weight w is 0 whatever x is: the convention 0 log 0 = 0
    (docs/math.md 8; `fdpo.kernels.tiles.weighted`). A masked logit (-inf) has weight 0 beside an
    infinite or NaN x; a weight that underflowed to 0 gives 0 either way. A NaN weight stays NaN."""
    return x.mul_(w).masked_fill_(w == 0, 0.0)


def weight_factor_(x: torch.Tensor) -> torch.Tensor:
    """x (float32, in place) as the factor of the weights e^(z - m') of an online sum: -inf becomes the
    most negative float32 and NaN 0, so that the product is 0 where the weight is (0 log 0 = 0,
    docs/math.md 8), +inf stays. Without a temporary of the chunk's size, unlike `weighted_`; exact
    because x is -inf or a NaN of -inf - -inf only where its own head's logit is -inf (weight 0). A
    NaN of a NaN logit becomes 0 too, but that logit makes its head's running sum, and LSE, NaN."""
    return x.nan_to_num_(nan=0.0, posinf=float("inf"), neginf=torch.finfo(x.dtype).min)


class OnlineSoftmax:
    """Online log-sum-exp of logit chunks, and optionally a softmax expectation, the entropy, log sum p^2.

    Masked logits (-inf) follow 0 log 0 = 0 as in the kernels (`weight_factor_`, docs/math.md 8).

    Per row: running max m, s = sum exp(z - m), t = sum exp(z - m) x for an expectation of x,
    u = sum exp(z - m) (z - m) <= 0 for the entropy and q = sum exp(2 (z - m)) for log sum p^2, all
    rescaled whenever m grows (q by the square of the factor; docs/math.md 8, 13); lse() = m + log s,
    expectation() = t / s, entropy() = log s - u / s, log_sum_squares() = log q - 2 log s.
    """

    def __init__(self, num_rows: int, device: torch.device) -> None:
        self.m = torch.full((num_rows,), float("-inf"), device=device)
        self.s = torch.zeros(num_rows, device=device)
        self.t = torch.zeros(num_rows, device=device)
        self.u = torch.zeros(num_rows, device=device)
        self.q = torch.zeros(num_rows, device=device)

    def update(self, z: torch.Tensor, x: torch.Tensor | None = None, *, entropy: bool = False,
               squares: bool = False) -> None:
        """Add the float32 logit chunk z [rows, C]; x [rows, C] (overwritten) feeds expectation(),
        entropy=True entropy(), squares=True log_sum_squares()."""
        m_new = torch.maximum(self.m, z.amax(dim=1))
        # The exponentials' offset: 0 while a row has seen nothing but -inf (a chunk of masked logits
        # before any other), where z - m would be -inf - -inf = NaN (docs/math.md 8).
        offset = m_new.masked_fill(m_new == float("-inf"), 0.0)
        scale = torch.exp(self.m - offset)
        e = torch.sub(z, offset[:, None]).exp_()
        if squares:
            self.q = self.q * scale.square() + e.square().sum(dim=1)
        if entropy:
            # u <- e^(m - m') (u + (m - m') s): both terms <= 0, nothing cancels. Nothing to carry
            # before the first finite logit (s = 0 and m = -inf: (m - m') s would be -inf * 0).
            carried = self.u + torch.where(self.s > 0, self.m - m_new, 0.0) * self.s
            self.u = carried * scale + weight_factor_(torch.sub(z, offset[:, None])).mul_(e).sum(dim=1)
        self.s = self.s * scale + e.sum(dim=1)
        if x is not None:
            self.t = self.t * scale + weight_factor_(x).mul_(e).sum(dim=1)
        self.m = m_new

    def lse(self) -> torch.Tensor:
        return self.m + torch.log(self.s)

    def expectation(self) -> torch.Tensor:
        return self.t / self.s

    def lse_minus(self, other: "OnlineSoftmax") -> torch.Tensor:
        """self.lse() - other.lse() without rounding either LSE (`fdpo.kernels.tiles.lse_difference`)."""
        return (self.m - other.m) + torch.log(self.s / other.s)

    def log_sum_squares(self) -> torch.Tensor:
        """log sum_v p_v^2 = log q - 2 log s (<= 0: q <= s^2)."""
        return torch.log(self.q) - 2.0 * torch.log(self.s)

    def entropy(self) -> torch.Tensor:
        """H = log s - u / s: two non-negative terms, where lse - E_p[z] would cancel at large |z|.

        Clamped at 0 against rounding; NaN stays NaN.
        """
        return (torch.log(self.s) - self.u / self.s).clamp(min=0.0)


def pick_labels(z: torch.Tensor, labels: torch.Tensor, v0: int, v1: int) -> torch.Tensor:
    """z[row, labels[row] - v0] where the label falls in the chunk [v0, v1), else 0."""
    inside = (labels >= v0) & (labels < v1)
    picked = z.gather(1, (labels - v0).clamp(0, v1 - v0 - 1)[:, None]).squeeze(1)
    return torch.where(inside, picked, 0.0)


class HeadGradients:
    """float32 accumulators of a head's gradients, fed one (row chunk, vocabulary chunk) dz at a time.

    `add` takes dz = dL/dz for the capped, scaled, temperature-divided logits z of the chunk, carries it
    through the temperature, the soft cap's 1 - tanh^2 (tanh = z T / c) and the scale (docs/math.md 1,
    13), and adds dz W to dHidden and dz^T h to dWeight as GEMMs into the float32 accumulators (dz and
    W rounded to the head's compute dtype, as h is, see the module docstring) and the float32 dz's
    column sums to dBias.
    """

    def __init__(self, policy: HeadInput, num_rows: int, *, need_hidden: bool, need_weight: bool,
                 need_bias: bool) -> None:
        self.head = policy
        self.hidden, self.weight, self.bias = zero_head_grads(policy, num_rows, need_hidden=need_hidden,
                                                              need_weight=need_weight, need_bias=need_bias)
        self.mixed = operand_dtype(policy) != torch.float32

    def add(self, dz: torch.Tensor, z: torch.Tensor, h: torch.Tensor, r0: int, r1: int, v0: int, v1: int) -> None:
        """Add the chunk rows [r0, r1) x vocabulary [v0, v1): dz and z float32 [r1 - r0, v1 - v0], both
        overwritten (the chain-rule factors are formed in place), h the rows from `gather_rows`."""
        head = self.head.head
        factor = head.scale / head.temperature
        if factor != 1.0:
            dz.mul_(factor)
        if head.softcap is not None:
            dz.mul_(z.mul_(head.temperature / head.softcap).square_().neg_().add_(1.0))
        dz_operand = gemm_operand(dz, head_compute_dtype(self.head), h.dtype)
        if self.hidden is not None:
            gemm_into(self.hidden[r0:r1], dz_operand, weight_rows(self.head, v0, v1, h.dtype), accumulate=True,
                      mixed=self.mixed)
        if self.weight is not None:
            gemm_into(self.weight[v0:v1], dz_operand.T, h, accumulate=True, mixed=self.mixed)
        if self.bias is not None:
            self.bias[v0:v1] += dz.sum(dim=0)

    def result(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(d_hidden [R, D], d_weight [V, D], d_bias [V]), None where not requested."""
        return self.hidden, self.weight, self.bias


@without_autocast
def stats_backward(
    policy: HeadInput,
    tokens: ScoredTokens,
    grad: StatsGrad,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(d_hidden [R, D], d_weight [V, D], d_bias [V]) float32 of the terms `grad` (`fdpo.heads.StatsGrad`,
    float32 [R] per-row tensors; the reference read only with its KL gradient); see
    `fdpo.backends.fused.FusedBackend`.

    Chunks are visited in a fixed order, so the result is always deterministic. dH and dW are GEMMs
    into float32 accumulators of dz, h and W rounded to the head's compute dtype (see the module
    docstring); dBias sums the float32 dz.
    """
    rows, labels, vocab, ref = tokens.rows, tokens.labels, policy.weight.shape[0], grad.ref
    step = chunk_vocab(policy.hidden.device)
    lse, ref_lse, entropy = grad.lse, grad.ref_lse, grad.entropy
    logprob_grad, kl_grad, entropy_grad = grad.logprob_grad, grad.kl_grad, grad.entropy_grad
    out = HeadGradients(policy, rows.numel(), need_hidden=grad.need_hidden, need_weight=grad.need_weight,
                        need_bias=grad.need_bias)
    for r0 in range(0, rows.numel(), CHUNK_ROWS):
        r1 = min(r0 + CHUNK_ROWS, rows.numel())
        h = gather_rows(policy, rows[r0:r1])
        h_ref = gather_rows(ref, rows[r0:r1]) if kl_grad is not None else None
        lab = labels[r0:r1].long()
        # dz = g (onehot - p) + g_kl (p - p_ref) - g_ent p (z - lse + H)
        #    = p (g_kl - g - g_ent (z - lse + H)) - g_kl p_ref + g onehot, built in the buffer of p.
        coef = (0.0 if kl_grad is None else kl_grad[r0:r1, None]) - logprob_grad[r0:r1, None]
        row_lse = lse[r0:r1, None]
        for v0 in range(0, vocab, step):
            v1 = min(v0 + step, vocab)
            z = logit_chunk(h, policy, v0, v1)
            log_p = torch.sub(z, row_lse)
            if entropy_grad is None:
                dz = log_p.exp_().mul_(coef)
            else:
                dz = log_p.exp()
                # A masked logit (z = -inf: p = 0, log p = -inf) gets p (...) = 0 (0 log 0 = 0): its log p
                # is taken as 0 (log p is -inf nowhere else; a NaN stays NaN).
                log_p.nan_to_num_(nan=float("nan"), posinf=float("inf"), neginf=0.0)
                dz.mul_(log_p.add_(entropy[r0:r1, None]).mul_(-entropy_grad[r0:r1, None]).add_(coef))
            del log_p
            if kl_grad is not None:
                p_ref = logit_chunk(h_ref, ref, v0, v1).sub_(ref_lse[r0:r1, None]).exp_()
                dz.sub_(p_ref.mul_(kl_grad[r0:r1, None]))
                del p_ref
            # + g onehot as a scatter, not a boolean-mask index (which reads the mask on the host).
            inside = (lab >= v0) & (lab < v1)
            dz.scatter_add_(1, (lab - v0).clamp_(0, v1 - v0 - 1)[:, None],
                            torch.where(inside, logprob_grad[r0:r1], 0.0)[:, None])
            out.add(dz, z, h, r0, r1, v0, v1)
            del z, dz  # before the next chunk's logits are allocated
    return out.result()


class TorchBackend(FusedBackend):
    """The chunked PyTorch algorithm with the hand-written backwards (always deterministic)."""

    name = "torch"

    def stats_forward(self, policy, tokens, ref, request):
        return stats_forward(policy, tokens, ref, request)

    def stats_backward(self, policy, tokens, grad):
        return stats_backward(policy, tokens, grad)

    def pair_forward(self, policy_chosen, policy_rejected, ref_chosen, ref_rejected, spec):
        return pairs.preference_loss_forward(policy_chosen, policy_rejected, ref_chosen, ref_rejected, spec)

    def pair_backward(self, grad_loss, grad_chosen_ratio, grad_rejected_ratio, spec, need_ref):
        return pairs.preference_loss_backward(grad_loss, grad_chosen_ratio, grad_rejected_ratio, spec,
                                              need_ref=need_ref)
