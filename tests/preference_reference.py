"""Independent float64 reference of the f-DPO preference losses, written from docs/math.md 2-4.

Scores are computed in probability-ratio space, u = exp(r), from the f' of each divergence
(the f-DPO paper's Table), not from the log-space forms the library implements; gradients come
from float64 autograd. Clamps are applied only when `clamp=True`, exactly as documented in
`fdpo.losses` (torch.clamp: constant beyond, zero gradient).
"""

import math

import torch
import torch.nn.functional as F

EXP_MAX = 30.0  # the documented clamp of the forward-KL / alpha exponent


def f_prime(u: torch.Tensor, divergence: str, alpha: float) -> torch.Tensor:
    """f'(u) of each divergence (docs/math.md 2), u = pi / pi_ref."""
    if divergence == "reverse_kl":
        return torch.log(u) + 1
    if divergence == "forward_kl":
        return -1 / u
    if divergence == "js":
        return torch.log(2 * u / (1 + u))
    return (1 - u ** (-alpha)) / alpha


def score(r: torch.Tensor, divergence: str, alpha: float, clamp: bool = False) -> torch.Tensor:
    """f'(exp r) - f'(1) in float64; with clamp=True the power exponent is clamped at EXP_MAX."""
    if clamp and divergence in ("forward_kl", "alpha"):
        a = 1.0 if divergence == "forward_kl" else alpha
        r = -torch.clamp(-a * r, max=EXP_MAX) / a
    one = torch.ones((), dtype=r.dtype)
    return f_prime(torch.exp(r), divergence, alpha) - f_prime(one, divergence, alpha)


def shape(m: torch.Tensor, loss: str, beta, eps: float, lam: float, m_range=(-math.inf, math.inf)) -> torch.Tensor:
    """Per-pair loss of the margin m (docs/math.md 3, 4); for ipo, m is the unscaled score gap d."""
    if loss == "sigmoid":
        return -(1 - eps) * F.logsigmoid(m) - eps * F.logsigmoid(-m)
    if loss == "robust":
        return (-(1 - eps) * F.logsigmoid(m) + eps * F.logsigmoid(-m)) / (1 - 2 * eps)
    if loss == "hinge":
        return torch.relu(1 - m)
    if loss == "ipo":
        return (m - 1 / (2 * beta)) ** 2
    m = torch.clamp(m, *m_range)
    if lam == 0:
        return (torch.exp(-m) - m) / 4
    return (torch.exp(-(lam + 1) * m) - (lam + 1) / lam * torch.exp(lam * m)) / (4 * (lam + 1))


def bpo_range(lam: float, min_ratio: float = 0.01) -> tuple[float, float]:
    """The documented BPO clamp of m: ratio clip R >= min_ratio, both exponents <= EXP_MAX."""
    lo, hi = -EXP_MAX / (lam + 1), -math.log(min_ratio)
    if lam > 0:
        hi = min(hi, EXP_MAX / lam)
    if lam < 0:
        lo = max(lo, EXP_MAX / lam)
    return lo, hi


def preference(
    a_w, a_l, b_w, b_l, *, beta=0.1, divergence="reverse_kl", alpha=0.5, loss="sigmoid", eps=0.0, lam=-0.5,
    len_w=None, len_l=None, nll_weight=0.0, clamp=False,
) -> dict[str, torch.Tensor]:
    """Loss (mean pair loss + NLL term) and metrics, all float64, differentiable in the inputs."""
    r_w, r_l = a_w - b_w, a_l - b_l
    if loss == "ipo":
        r_w, r_l = r_w / len_w, r_l / len_l
    g_w = score(r_w, divergence, alpha, clamp)
    g_l = score(r_l, divergence, alpha, clamp)
    m = g_w - g_l if loss == "ipo" else beta * (g_w - g_l)
    m_range = bpo_range(lam) if clamp else (-math.inf, -math.log(0.01))
    pair = shape(m, loss, beta, eps, lam, m_range)
    total = pair.mean()
    if nll_weight:
        total = total + nll_weight * (-a_w / len_w).mean()
    rewards_w, rewards_l = beta * g_w, beta * g_l
    return {"loss": total, "pair_losses": pair, "chosen_rewards": rewards_w, "rejected_rewards": rewards_l,
            "margins": rewards_w - rewards_l, "accuracy": (rewards_w > rewards_l).double().mean()}
