"""The f-DPO pair loss over P preference pairs: one forward launch, one backward launch.

From the per-sequence log-prob sums of the policy (a_w, a_l) and the reference (b_w, b_l):
    r = a - b,   m = beta * (g(r_w) - g(r_l)),   loss_i = shape(m_i),   loss = mean_i loss_i
where g is the divergence's log-space score f'(exp r) - f'(1) (docs/math.md 2) and `shape` one of the
loss shapes of docs/math.md 3 and 4 (IPO uses the length-normalized r / |y| and no beta factor in m).
An optional NLL term adds nll_weight * mean_i(-a_w / |y_w|). P is small (a batch of pairs): the
kernels exist to replace a few dozen tiny PyTorch ops with one launch each way.
"""

import math

import torch
import triton
import triton.language as tl

from fdpo.options import DIVERGENCES, LOSS_SHAPES, PairLossSpec

from .launch import BATCH_SIZED, Launch, interpreting
from .tiles import expm1, log1p
from .validate import check_device

# Kernel codes. Forward KL is the alpha score at alpha = 1, so it shares POWER.
LINEAR = tl.constexpr(0)
POWER = tl.constexpr(1)
JS = tl.constexpr(2)
SIGMOID = tl.constexpr(0)
ROBUST = tl.constexpr(1)
HINGE = tl.constexpr(2)
IPO = tl.constexpr(3)
BPO = tl.constexpr(4)
_DIVERGENCE_CODES = {"reverse_kl": LINEAR.value, "forward_kl": POWER.value, "js": JS.value, "alpha": POWER.value}
_LOSS_CODES = {"sigmoid": SIGMOID.value, "robust": ROBUST.value, "hinge": HINGE.value, "ipo": IPO.value,
               "bpo": BPO.value}

# Pairs per block. On a GPU one block of 1024 covers any usual batch, so the forward's reduction
# loop runs once; the interpreter's numpy ops cost the same at any width, and 64 keeps tests'
# pair counts above one block so that the loop and its masks run.
_BLOCK_P_GPU = 1024
_BLOCK_P_INTERPRETER = 64


def _block_p() -> int:
    return _BLOCK_P_INTERPRETER if interpreting() else _BLOCK_P_GPU


# Scalar fp32 math of the pair loss, in the forms that stay accurate in both tails (with `tiles.log1p`
# and `tiles.expm1`).
@triton.jit
def softplus(x):
    """log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|)): never overflows, accurate in both tails."""
    return tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL) + log1p(tl.exp(-tl.abs(x)))


@triton.jit
def sigmoid(x):
    """1 / (1 + exp(-x)) through exp(-|x|), which never overflows."""
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0.0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def js_score(r):
    """log(2 sigma(r)) in fp32 without cancellation.

    Near r = 0 the direct log 2 - softplus(-r) is the small difference of two numbers close to log 2
    (4 % off at r = 1e-6). For |r| < 1 it is -log1p(expm1(-r) / 2) instead: the same value, since
    2 sigma(r) = 1 / (1 + expm1(-r) / 2), with expm1(-r) / 2 in (-0.32, 0.86). For |r| >= 1 the
    direct form loses at most a factor 2.6 (at r = 1) to cancellation: a few ulps.
    """
    near = -log1p(0.5 * expm1(-tl.minimum(tl.maximum(r, -1.0, propagate_nan=tl.PropagateNan.ALL), 1.0, propagate_nan=tl.PropagateNan.ALL)))
    return tl.where(tl.abs(r) < 1.0, near, 0.6931471805599453 - softplus(-r))


@triton.jit
def divergence_score(r, alpha, exp_max, DIVERGENCE: tl.constexpr):
    """(g(r), g'(r)) in fp32 for log-ratios r, shifted so that g(0) = 0 (docs/math.md 2).

    LINEAR (reverse KL): g = r. JS: g = log(2 sigma(r)), g' = sigma(-r), see `js_score`.
    POWER (alpha; forward KL is alpha = 1): g = (1 - exp(-alpha r)) / alpha,
    g' = exp(-alpha r), through expm1 so that small alpha * r keeps its precision; the exponent
    -alpha r is clamped at exp_max, beyond which g is constant and g' = 0. Here and in `loss_shape`
    the derivatives of a NaN input are NaN (comparisons with NaN are false: each `where` tests the
    branch that excludes NaN), so that a NaN sum cannot leave a finite gradient.
    """
    if DIVERGENCE == LINEAR:
        return r, tl.full(r.shape, 1.0, tl.float32)
    elif DIVERGENCE == JS:
        return js_score(r), sigmoid(-r)
    else:
        x = -alpha * r
        xc = tl.minimum(x, exp_max, propagate_nan=tl.PropagateNan.ALL)
        return -expm1(xc) / alpha, tl.where(x > exp_max, 0.0, tl.exp(xc))  # NaN r: NaN


@triton.jit
def loss_shape(m, beta, smoothing, lam, m_lo, m_hi, LOSS: tl.constexpr):
    """(loss, dloss/dm) of the margins m, in fp32 (docs/math.md 3 and 4).

    With eps = smoothing (label smoothing):
    SIGMOID: (1-eps) softplus(-m) + eps softplus(m), derivative eps sigma(m) - (1-eps) sigma(-m)
    (the equal sigma(m) - (1-eps) cancels: at eps = 0 it is 0 for m > 17 instead of -sigma(-m)).
    ROBUST: ((1-eps) softplus(-m) - eps softplus(m)) / (1 - 2 eps). HINGE: relu(1 - m).
    IPO: (m - 1/(2 beta))^2 with m the unscaled score gap.
    BPO (SBA, lambda = lam): exp(-(lam+1) m) / (4 (lam+1)) - exp(lam m) / (4 lam), or
    (exp(-m) - m) / 4 at lam = 0, with m clamped to [m_lo, m_hi] and zero gradient outside.
    """
    if LOSS == SIGMOID:
        loss = (1.0 - smoothing) * softplus(-m) + smoothing * softplus(m)
        dm = smoothing * sigmoid(m) - (1.0 - smoothing) * sigmoid(-m)
    elif LOSS == ROBUST:
        loss = ((1.0 - smoothing) * softplus(-m) - smoothing * softplus(m)) / (1.0 - 2.0 * smoothing)
        dm = (-(1.0 - smoothing) * sigmoid(-m) - smoothing * sigmoid(m)) / (1.0 - 2.0 * smoothing)
    elif LOSS == HINGE:
        loss = tl.maximum(1.0 - m, 0.0, propagate_nan=tl.PropagateNan.ALL)
        dm = tl.where(m >= 1.0, 0.0, tl.where(m < 1.0, -1.0, m))  # NaN m: NaN
    elif LOSS == IPO:
        t = m - 0.5 / beta
        loss = t * t
        dm = 2.0 * t
    else:
        mc = tl.minimum(tl.maximum(m, m_lo, propagate_nan=tl.PropagateNan.ALL), m_hi, propagate_nan=tl.PropagateNan.ALL)
        e_neg = tl.exp(-(lam + 1.0) * mc)
        e_pos = tl.exp(lam * mc)
        lam_zero = lam == 0.0
        loss = e_neg / (4.0 * (lam + 1.0)) - tl.where(lam_zero, mc, e_pos / tl.where(lam_zero, 1.0, lam)) * 0.25
        dm = tl.where((m < m_lo) | (m > m_hi), 0.0, -0.25 * (e_neg + e_pos))  # NaN m: NaN
    return loss, dm


# Grid: one program. It walks the pairs in blocks of BLOCK_P, computing every per-pair quantity
# in fp32 registers (scores and their derivatives, margin, loss shape) and accumulating the loss,
# the NLL and the reward-accuracy count in fp32 vectors that are summed once at the end: a fixed
# order, so the mean loss is deterministic, with no atomics and no second launch. It saves
# dloss_i/dr_w and dloss_i/dr_l per pair, all the backward needs besides the lengths.
@triton.jit(do_not_specialize=BATCH_SIZED)
def _preference_loss_fwd_kernel(
    pc_ptr, pr_ptr, ref_c_ptr, ref_r_ptr, beta_ptr, len_c_ptr, len_r_ptr,
    loss_ptr, nll_ptr, acc_ptr, pair_loss_ptr, c_reward_ptr, r_reward_ptr, margin_ptr, grad_ratio_c_ptr, grad_ratio_r_ptr,
    P, beta, alpha, smoothing, lam, m_lo, m_hi, exp_max, nll_weight,
    BETA_PER_PAIR: tl.constexpr, HAS_LENGTHS: tl.constexpr, DIVERGENCE: tl.constexpr, LOSS: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    loss_acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
    nll_acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
    win_acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        offs = p0 + tl.arange(0, BLOCK_P)
        mask = offs < P
        a_w = tl.load(pc_ptr + offs, mask=mask, other=0.0)
        r_w = a_w - tl.load(ref_c_ptr + offs, mask=mask, other=0.0)
        r_l = tl.load(pr_ptr + offs, mask=mask, other=0.0) - tl.load(ref_r_ptr + offs, mask=mask, other=0.0)
        if BETA_PER_PAIR:
            b = tl.load(beta_ptr + offs, mask=mask, other=1.0)
        else:
            b = tl.full((BLOCK_P,), beta, tl.float32)
        if HAS_LENGTHS:
            len_w = tl.load(len_c_ptr + offs, mask=mask, other=1.0)
            len_l = tl.load(len_r_ptr + offs, mask=mask, other=1.0)
            nll_acc += tl.where(mask, -a_w / len_w, 0.0)
        if LOSS == IPO:
            r_w = r_w / len_w
            r_l = r_l / len_l
        g_w, dg_w = divergence_score(r_w, alpha, exp_max, DIVERGENCE)
        g_l, dg_l = divergence_score(r_l, alpha, exp_max, DIVERGENCE)
        if LOSS == IPO:
            m = g_w - g_l
            scale_w = dg_w / len_w
            scale_l = dg_l / len_l
        else:
            m = b * (g_w - g_l)
            scale_w = b * dg_w
            scale_l = b * dg_l
        loss, dm = loss_shape(m, b, smoothing, lam, m_lo, m_hi, LOSS)
        c_reward = b * g_w
        r_reward = b * g_l
        margin = c_reward - r_reward
        tl.store(pair_loss_ptr + offs, loss, mask=mask)
        tl.store(c_reward_ptr + offs, c_reward, mask=mask)
        tl.store(r_reward_ptr + offs, r_reward, mask=mask)
        tl.store(margin_ptr + offs, margin, mask=mask)
        tl.store(grad_ratio_c_ptr + offs, dm * scale_w, mask=mask)
        tl.store(grad_ratio_r_ptr + offs, -dm * scale_l, mask=mask)
        loss_acc += tl.where(mask, loss, 0.0)
        win_acc += tl.where(mask & (margin > 0.0), 1.0, 0.0)
    inv_p = 1.0 / P
    nll = tl.sum(nll_acc, axis=0) * inv_p
    tl.store(loss_ptr, tl.sum(loss_acc, axis=0) * inv_p + nll_weight * nll)
    tl.store(nll_ptr, nll)
    tl.store(acc_ptr, tl.sum(win_acc, axis=0) * inv_p)


# Grid: blocks of BLOCK_P pairs. The chain rule from the mean loss back to the four inputs:
# r = a - b, so d/da_w = g/P * dloss/dr_w - g * nll_weight / (P |y_w|), d/da_l = g/P * dloss/dr_l,
# d/db = -(the pair-loss part); g is the incoming gradient of the mean loss, read on device.
@triton.jit(do_not_specialize=BATCH_SIZED)
def _preference_loss_bwd_kernel(
    grad_ptr, grad_ratio_c_ptr, grad_ratio_r_ptr, len_c_ptr,
    d_pc_ptr, d_pr_ptr, d_refc_ptr, d_refr_ptr,
    P, nll_weight,
    HAS_NLL: tl.constexpr, NEED_REF: tl.constexpr, BLOCK_P: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask = offs < P
    g = tl.load(grad_ptr) / P
    d_w = tl.load(grad_ratio_c_ptr + offs, mask=mask, other=0.0) * g
    d_l = tl.load(grad_ratio_r_ptr + offs, mask=mask, other=0.0) * g
    d_a_w = d_w
    if HAS_NLL:
        d_a_w -= nll_weight * g / tl.load(len_c_ptr + offs, mask=mask, other=1.0)
    tl.store(d_pc_ptr + offs, d_a_w, mask=mask)
    tl.store(d_pr_ptr + offs, d_l, mask=mask)
    if NEED_REF:
        tl.store(d_refc_ptr + offs, -d_w, mask=mask)
        tl.store(d_refr_ptr + offs, -d_l, mask=mask)


def _check_pairs(named: dict[str, torch.Tensor | None]) -> int:
    """All given tensors float32, 1-D, contiguous, of one length P >= 1 and on one device; returns P."""
    first_name, first = next(iter(named.items()))
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.dim() != 1 or not t.is_contiguous():
            raise TypeError(f"{name} must be a contiguous 1-D float32 tensor [P], got "
                            f"{getattr(t, 'dtype', type(t).__name__)} of shape {tuple(getattr(t, 'shape', ()))}")
        if t.shape != first.shape:
            raise ValueError(f"{name} has {t.shape[0]} pairs but {first_name} has {first.shape[0]}: "
                             "every per-pair tensor must have the same length P")
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")
    if first.shape[0] < 1:
        raise ValueError(f"{first_name} must hold at least one pair, got shape {tuple(first.shape)}")
    check_device(first.device)
    return first.shape[0]


def preference_loss_forward_launch(
    policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
    spec: PairLossSpec,
) -> tuple[Launch, dict[str, torch.Tensor]]:
    """Build (without running) the launch of `preference_loss_forward` and allocate its outputs."""
    if not isinstance(spec, PairLossSpec):
        raise TypeError(f"spec must be an fdpo.options.PairLossSpec, got {type(spec).__name__}")
    beta, divergence, loss, alpha, nll_weight = spec.beta, spec.divergence, spec.loss, spec.alpha, spec.nll_weight
    chosen_lengths, rejected_lengths = spec.chosen_lengths, spec.rejected_lengths
    margin_min, margin_max = spec.margin_min, spec.margin_max
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if loss not in LOSS_SHAPES:
        raise ValueError(f"loss must be one of {LOSS_SHAPES}, got {loss!r}")
    beta_tensor = beta if isinstance(beta, torch.Tensor) else None
    num_pairs = _check_pairs({"policy_chosen": policy_chosen, "policy_rejected": policy_rejected,
                              "ref_chosen": ref_chosen, "ref_rejected": ref_rejected, "beta": beta_tensor,
                              "chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths})
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("chosen_lengths and rejected_lengths must be given together")
    if chosen_lengths is None and (loss == "ipo" or nll_weight != 0.0):
        raise ValueError(f"got loss={loss!r} and nll_weight={nll_weight} without lengths: loss='ipo' and any "
                         "nll_weight != 0 each need chosen_lengths and rejected_lengths")
    if divergence == "alpha" and not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in the open interval (0, 1), got {alpha}")
    if not margin_min <= margin_max:
        raise ValueError(f"margin_min ({margin_min}) must not exceed margin_max ({margin_max})")

    f32 = dict(dtype=torch.float32, device=policy_chosen.device)
    outputs = {"loss": torch.empty((), **f32), "nll": torch.empty((), **f32), "accuracy": torch.empty((), **f32)}
    for name in ("pair_losses", "chosen_rewards", "rejected_rewards", "margins",
                 "grad_chosen_ratio", "grad_rejected_ratio"):
        outputs[name] = torch.empty(num_pairs, **f32)
    launch = Launch(
        _preference_loss_fwd_kernel,
        grid=(1,),
        args=dict(
            pc_ptr=policy_chosen, pr_ptr=policy_rejected, ref_c_ptr=ref_chosen, ref_r_ptr=ref_rejected,
            beta_ptr=beta_tensor, len_c_ptr=chosen_lengths, len_r_ptr=rejected_lengths,
            loss_ptr=outputs["loss"], nll_ptr=outputs["nll"], acc_ptr=outputs["accuracy"],
            pair_loss_ptr=outputs["pair_losses"], c_reward_ptr=outputs["chosen_rewards"],
            r_reward_ptr=outputs["rejected_rewards"], margin_ptr=outputs["margins"],
            grad_ratio_c_ptr=outputs["grad_chosen_ratio"], grad_ratio_r_ptr=outputs["grad_rejected_ratio"],
            P=num_pairs, beta=1.0 if beta_tensor is not None else float(beta),
            alpha=1.0 if divergence == "forward_kl" else float(alpha), smoothing=float(spec.label_smoothing),
            lam=float(spec.bpo_lambda), m_lo=float(margin_min), m_hi=float(margin_max), exp_max=float(spec.exp_max),
            nll_weight=float(nll_weight),
        ),
        constexprs=dict(
            BETA_PER_PAIR=beta_tensor is not None, HAS_LENGTHS=chosen_lengths is not None,
            DIVERGENCE=_DIVERGENCE_CODES[divergence], LOSS=_LOSS_CODES[loss], BLOCK_P=_block_p(),
        ),
        num_warps=4,
        num_stages=1,
    )
    return launch, outputs


def preference_loss_forward(
    policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
    spec: PairLossSpec,
) -> dict[str, torch.Tensor]:
    """The f-DPO pair loss and its metrics in one launch.

    Args:
        policy_chosen, policy_rejected, ref_chosen, ref_rejected: contiguous float32 [P] log-prob sums.
        spec: the loss' settings: beta (float > 0 or float32 [P] per-pair betas); divergence (one of
            DIVERGENCES) and alpha in (0, 1) for "alpha" (ignored otherwise); loss (one of
            LOSS_SHAPES), label_smoothing (sigmoid, robust), bpo_lambda and the BPO margin clamp
            [margin_min, margin_max] (bpo); exp_max, the largest exponent of the forward-KL and alpha
            scores (clamped beyond, zero gradient); nll_weight, the weight of mean(-a_w / |y_w|)
            added to the loss; chosen_lengths, rejected_lengths: float32 [P] scored-token counts
            (needed by ipo and NLL).

    Returns:
        dict of float32 tensors: "loss", "nll", "accuracy" (scalars; nll is 0 without lengths);
        "pair_losses", "chosen_rewards", "rejected_rewards", "margins" [P]; and
        "grad_chosen_ratio", "grad_rejected_ratio" [P] = dloss_i/dr_w, dloss_i/dr_l, the per-pair
        derivatives that `preference_loss_backward` turns into input gradients.
    """
    launch, outputs = preference_loss_forward_launch(policy_chosen, policy_rejected, ref_chosen, ref_rejected, spec)
    launch()
    return outputs


def preference_loss_backward_launch(
    grad_loss: torch.Tensor, grad_chosen_ratio: torch.Tensor, grad_rejected_ratio: torch.Tensor, spec: PairLossSpec,
    *, need_ref: bool = False,
) -> tuple[Launch, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]]:
    """Build (without running) the launch of `preference_loss_backward` and allocate its outputs."""
    chosen_lengths, nll_weight = spec.chosen_lengths, spec.nll_weight
    num_pairs = _check_pairs({"grad_chosen_ratio": grad_chosen_ratio, "grad_rejected_ratio": grad_rejected_ratio,
                              "chosen_lengths": chosen_lengths})
    if not isinstance(grad_loss, torch.Tensor) or grad_loss.numel() != 1 or grad_loss.dtype != torch.float32 \
            or grad_loss.device != grad_chosen_ratio.device:
        raise TypeError("grad_loss must be a one-element float32 tensor on the pairs' device")
    if nll_weight != 0.0 and chosen_lengths is None:
        raise ValueError("nll_weight != 0 needs chosen_lengths")
    d_pc, d_pr = torch.empty_like(grad_chosen_ratio), torch.empty_like(grad_rejected_ratio)
    d_refc = torch.empty_like(grad_chosen_ratio) if need_ref else None
    d_refr = torch.empty_like(grad_rejected_ratio) if need_ref else None
    block = _block_p()
    launch = Launch(
        _preference_loss_bwd_kernel,
        grid=(triton.cdiv(num_pairs, block),),
        args=dict(grad_ptr=grad_loss, grad_ratio_c_ptr=grad_chosen_ratio, grad_ratio_r_ptr=grad_rejected_ratio,
                  len_c_ptr=chosen_lengths, d_pc_ptr=d_pc, d_pr_ptr=d_pr, d_refc_ptr=d_refc, d_refr_ptr=d_refr,
                  P=num_pairs, nll_weight=float(nll_weight)),
        constexprs=dict(HAS_NLL=nll_weight != 0.0, NEED_REF=need_ref, BLOCK_P=block),
        num_warps=4,
        num_stages=1,
    )
    return launch, (d_pc, d_pr, d_refc, d_refr)


def preference_loss_backward(
    grad_loss: torch.Tensor, grad_chosen_ratio: torch.Tensor, grad_rejected_ratio: torch.Tensor, spec: PairLossSpec,
    *, need_ref: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of the mean pair loss with respect to its four float32 [P] inputs.

    Args:
        grad_loss: one-element float32 tensor, the incoming gradient of the mean loss (read on device).
        grad_chosen_ratio, grad_rejected_ratio: float32 [P] from `preference_loss_forward`.
        spec: the forward's settings; its nll_weight and chosen_lengths (float32 [P], needed when
            nll_weight != 0) enter the gradient.
        need_ref: also return the gradients of the reference sums (the negated pair-loss part).

    Returns:
        (d policy_chosen, d policy_rejected, d ref_chosen or None, d ref_rejected or None), float32 [P].
    """
    launch, outputs = preference_loss_backward_launch(grad_loss, grad_chosen_ratio, grad_rejected_ratio, spec,
                                                      need_ref=need_ref)
    launch()
    return outputs


def aot_launches(dtype: torch.dtype) -> dict[str, Launch]:
    """Every loss shape and every divergence of the pair kernels, on meta operands.

    The pair kernels read float32 log-prob sums whatever the model's dtype, so they are listed
    once, under float32; the variants with per-pair beta, lengths and NLL take the longest paths.
    """
    if dtype != torch.float32:
        return {}
    pairs = 512
    meta = [torch.empty(pairs, dtype=torch.float32, device="meta") for _ in range(7)]
    seqs, (beta, len_c, len_r) = meta[:4], meta[4:]
    common = dict(alpha=0.5, label_smoothing=0.1, bpo_lambda=-0.5, margin_min=-60.0, margin_max=-math.log(0.01),
                  exp_max=30.0)
    launches = {}
    for loss in LOSS_SHAPES:
        spec = PairLossSpec(beta=beta, divergence="alpha", loss=loss, nll_weight=0.5, chosen_lengths=len_c,
                            rejected_lengths=len_r, **common)
        launch, _ = preference_loss_forward_launch(*seqs, spec)
        launches[f"forward, alpha, {loss}, per-pair beta, NLL"] = launch
    for divergence in ("reverse_kl", "js"):
        spec = PairLossSpec(beta=0.1, divergence=divergence, loss="sigmoid", nll_weight=0.0, **common)
        launch, _ = preference_loss_forward_launch(*seqs, spec)
        launches[f"forward, {divergence}, sigmoid"] = launch
    grad = torch.empty((), dtype=torch.float32, device="meta")
    spec = PairLossSpec(beta=0.1, divergence="alpha", loss="ipo", nll_weight=0.5, chosen_lengths=len_c,
                        rejected_lengths=len_r, **common)
    launch, _ = preference_loss_backward_launch(grad, seqs[0], seqs[1], spec, need_ref=True)
    launches["backward, NLL, reference gradients"] = launch
    return launches
