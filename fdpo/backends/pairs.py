"""The pair loss in plain PyTorch: the "torch" and "reference" backends of `fdpo.preference_loss`.

Same contract, formulas, clamps and float32 arithmetic as `fdpo.kernels.preference_loss_forward`
and `preference_loss_backward` (see that module for the math): a few dozen small tensor ops
instead of one launch each way, for machines without Triton or a GPU.
"""

import math

import torch
import torch.nn.functional as F

from ..options import PairLossSpec

LOG2 = math.log(2.0)


def js_score(r: torch.Tensor) -> torch.Tensor:
    """log(2 sigma(r)) without the cancellation of log 2 - softplus(-r) near r = 0.

    -log1p(expm1(-r) / 2) for |r| < 1, the direct form elsewhere (as the kernel's `js_score`). Each
    form's autograd derivative is accurate where it is used ("reference" differentiates this).
    """
    near = -torch.log1p(0.5 * torch.expm1(-r.clamp(-1.0, 1.0)))
    return torch.where(r.abs() < 1.0, near, LOG2 - F.softplus(-r))


def divergence_score(r: torch.Tensor, divergence: str, alpha: float, exp_max: float) -> tuple[torch.Tensor, ...]:
    """(g(r), g'(r)) with g(0) = 0; the forward-KL / alpha exponent is clamped at exp_max (g' = 0 beyond)."""
    if divergence == "reverse_kl":
        return r, torch.ones_like(r)
    if divergence == "js":
        return js_score(r), torch.sigmoid(-r)
    a = 1.0 if divergence == "forward_kl" else alpha
    x = -a * r
    # where, not clamp: clamp's backward gives a NaN input a zero gradient.
    xc = torch.where(x > exp_max, exp_max, x)
    # 1 - exp(x) for x < -1, where it does not cancel: autograd differentiates expm1 through
    # expm1(x) + 1, which is 0 instead of exp(x) once x < -17 (the kernel's expm1 splits there too).
    g = torch.where(xc < -1.0, 1.0 - xc.exp(), -torch.expm1(xc)) / a
    return g, torch.where(x > exp_max, 0.0, xc.exp())


def loss_shape(m: torch.Tensor, beta: float | torch.Tensor, loss: str, eps: float, lam: float,
               m_lo: float, m_hi: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, dloss/dm) of the margins m for one loss shape (docs/math.md 3 and 4)."""
    if loss == "sigmoid":
        # The derivative as a sum of two sigmoids: sigmoid(m) - (1 - eps) cancels for large m.
        return (1 - eps) * F.softplus(-m) + eps * F.softplus(m), eps * torch.sigmoid(m) - (1 - eps) * torch.sigmoid(-m)
    if loss == "robust":
        value = ((1 - eps) * F.softplus(-m) - eps * F.softplus(m)) / (1 - 2 * eps)
        return value, (-(1 - eps) * torch.sigmoid(-m) - eps * torch.sigmoid(m)) / (1 - 2 * eps)
    if loss == "hinge":
        # relu, not clamp: its autograd derivative at m = 1 is 0, like the hand-written one ("reference").
        return F.relu(1 - m), torch.where(m >= 1, 0.0, torch.where(m < 1, -1.0, m))
    if loss == "ipo":
        t = m - 0.5 / beta
        return t * t, 2 * t
    mc = torch.where(m < m_lo, m_lo, torch.where(m > m_hi, m_hi, m))
    e_neg, e_pos = torch.exp(-(lam + 1) * mc), torch.exp(lam * mc)
    value = e_neg / (4 * (lam + 1)) - (mc if lam == 0 else e_pos / lam) / 4
    return value, torch.where((m < m_lo) | (m > m_hi), 0.0, -(e_neg + e_pos) / 4)


def preference_loss_forward(
    policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
    spec: PairLossSpec,
) -> dict[str, torch.Tensor]:
    """Same outputs as `fdpo.kernels.preference_loss_forward`, from float32 [P] inputs."""
    beta, loss, chosen_lengths, rejected_lengths = spec.beta, spec.loss, spec.chosen_lengths, spec.rejected_lengths
    r_w, r_l = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    if loss == "ipo":
        r_w, r_l = r_w / chosen_lengths, r_l / rejected_lengths
    g_w, dg_w = divergence_score(r_w, spec.divergence, spec.alpha, spec.exp_max)
    g_l, dg_l = divergence_score(r_l, spec.divergence, spec.alpha, spec.exp_max)
    if loss == "ipo":
        m, scale_w, scale_l = g_w - g_l, dg_w / chosen_lengths, dg_l / rejected_lengths
    else:
        m, scale_w, scale_l = beta * (g_w - g_l), beta * dg_w, beta * dg_l
    pair_losses, dm = loss_shape(m, beta, loss, spec.label_smoothing, spec.bpo_lambda, spec.margin_min, spec.margin_max)
    chosen_rewards, rejected_rewards = beta * g_w, beta * g_l
    margins = chosen_rewards - rejected_rewards
    nll = (-policy_chosen / chosen_lengths).mean() if chosen_lengths is not None else m.new_zeros(())
    return {
        "loss": pair_losses.mean() + spec.nll_weight * nll,
        "nll": nll,
        "accuracy": (margins > 0).float().mean(),
        "pair_losses": pair_losses,
        "chosen_rewards": chosen_rewards,
        "rejected_rewards": rejected_rewards,
        "margins": margins,
        "grad_chosen_ratio": dm * scale_w,
        "grad_rejected_ratio": -dm * scale_l,
    }


def preference_loss_backward(
    grad_loss: torch.Tensor, grad_chosen_ratio: torch.Tensor, grad_rejected_ratio: torch.Tensor, spec: PairLossSpec,
    *, need_ref: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Same outputs as `fdpo.kernels.preference_loss_backward`."""
    nll_weight, chosen_lengths = spec.nll_weight, spec.chosen_lengths
    g = grad_loss / grad_chosen_ratio.numel()
    d_w, d_l = grad_chosen_ratio * g, grad_rejected_ratio * g
    d_a_w = d_w - nll_weight * g / chosen_lengths if nll_weight != 0.0 else d_w
    return d_a_w, d_l, (-d_w if need_ref else None), (-d_l if need_ref else None)
