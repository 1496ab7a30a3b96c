"""fdpo.preference_loss in float32 against float64 over dense grids of log-ratios r and margins m in
[-200, 200] (the documented range), on every backend.

Each value is compared elementwise: |got - want| <= ulps * 2^-24 * scale + FLT_MIN, where `scale`
is the float64 sum of the magnitudes of the terms that the formula adds (so a true zero crossing
of a difference, inherent to the definition, is not mistaken for an error, while a cancellation
that a better form avoids is), and `ulps` grows with the exponent of any exp() involved: a float32
exponent x is itself rounded, which moves exp(x) by up to |x| ulps. FLT_MIN (the smallest normal
float32) is the absolute floor where the true value underflows.
"""

import math

import pytest
import torch

import fdpo

from preference_reference import bpo_range, preference, score, shape

BACKENDS = ("triton", "torch", "reference")
ULP = 2.0 ** -24
TINY = torch.finfo(torch.float32).tiny
BASE_ULPS = 8.0
EXP_MAX = 30.0


def grid() -> torch.Tensor:
    """float32 points of [-200, 200]: a dense sweep, a finer one over [-20, 20], and +-10^k down to 1e-5."""
    tiny = 10.0 ** torch.arange(-5.0, 0.0, 0.25)
    values = torch.cat([torch.linspace(-200, 200, 2001), torch.linspace(-20, 20, 801), tiny, -tiny,
                        torch.zeros(1)])
    return torch.unique(values.float())


def assert_ulps(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor, ulps, at: torch.Tensor,
                what: str) -> None:
    """Elementwise |got - want| <= ulps * 2^-24 * scale + FLT_MIN; NaN never passes (compared on the CPU)."""
    got = got.detach().double().cpu()
    want, scale, at = want.detach().cpu(), scale.cpu(), at.cpu()
    ulps = ulps.cpu() if isinstance(ulps, torch.Tensor) else ulps
    bound = ulps * ULP * scale + TINY
    ratio = (got - want).abs() / bound
    ratio = torch.where(torch.isnan(ratio), math.inf, ratio)
    worst = int(ratio.argmax())
    assert ratio[worst] <= 1.0, (f"{what}: {int((ratio > 1).sum())} of {ratio.numel()} points out of bounds; worst "
                                 f"at {float(at[worst])!r}: got {float(got[worst])!r}, want {float(want[worst])!r} "
                                 f"({float(ratio[worst]):.3g} x the bound)")


def run(backend: str, chosen: torch.Tensor, **options) -> tuple[fdpo.PreferenceLossOutput, torch.Tensor]:
    """The loss of pairs with log-ratios r_w = chosen, r_l = 0, and the gradient of policy_chosen."""
    policy_chosen = chosen.clone().requires_grad_()
    zeros = torch.zeros_like(chosen)
    out = fdpo.preference_loss(policy_chosen, zeros, zeros, zeros, backend=backend, **options)
    out.loss.backward()
    return out, policy_chosen.grad


def reference_gradient(chosen: torch.Tensor, **options) -> tuple[dict, torch.Tensor]:
    """The float64 reference (with the documented clamps) and its gradient in policy_chosen."""
    a_w = chosen.double().requires_grad_()
    zeros = torch.zeros_like(a_w)
    ref = preference(a_w, zeros, zeros, zeros, clamp=True, **options)
    ref["loss"].backward()
    return ref, a_w.grad


def log_space_score(r: torch.Tensor, divergence: str, alpha: float) -> torch.Tensor:
    """float64 g(r) in log space (clamped as documented), whose autograd derivative is accurate everywhere."""
    if divergence == "reverse_kl":
        return r
    if divergence == "js":
        return math.log(2.0) + torch.nn.functional.logsigmoid(r)
    a = 1.0 if divergence == "forward_kl" else alpha
    return (1 - torch.exp((-a * r).clamp(max=EXP_MAX))) / a  # not expm1: its backward uses expm1(x) + 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("divergence", "alpha"), [("reverse_kl", 0.5), ("forward_kl", 0.5), ("js", 0.5),
                                                   ("alpha", 0.5), ("alpha", 0.9)])
def test_divergence_scores_and_gradients(device, backend, divergence, alpha):
    """Rewards g(r) (beta = 1) and d loss / d r through the sigmoid loss, over r in [-200, 200].

    The points are made on the CPU and the loss runs on `device`; the float64 references stay on the CPU."""
    r = grid()
    a = {"forward_kl": 1.0, "alpha": alpha}.get(divergence)
    if a is not None:  # keep off the exponent clamp, where the gradient jumps to 0
        r = r[((-a * r) - EXP_MAX).abs() > 1e-3]
    out, grad = run(backend, r.to(device), beta=1.0, divergence=divergence, alpha=alpha)
    r64 = r.double()
    g = score(r64, divergence, alpha, clamp=True)
    exponent = (-a * r64).clamp(max=EXP_MAX).abs() if a is not None else torch.zeros_like(r64)
    score_ulps = BASE_ULPS + 2 * exponent
    assert_ulps(out.chosen_rewards, g, g.abs(), score_ulps, r, f"{divergence} score")
    if a is not None:  # g = (1 - exp(-a r)) / a < 1 / a
        assert (out.chosen_rewards.detach().cpu() <= torch.tensor(1.0 / a)).all(), f"{divergence} score above 1/alpha"

    ref, _ = reference_gradient(r, beta=1.0, divergence=divergence, alpha=alpha, loss="sigmoid")
    assert_ulps(out.extras["pair_losses"], ref["pair_losses"], ref["pair_losses"].abs(),
                score_ulps * (2 + g.abs()), r, f"{divergence} sigmoid loss")
    # The probability-space reference differentiates f'(exp r), whose float64 derivative cancels for
    # large r (JS: 1/u - 1/(1 + u)); the gradient comes from the log-space score instead, checked
    # against it first.
    r_leaf = r64.clone().requires_grad_()
    g_log = log_space_score(r_leaf, divergence, alpha)
    torch.testing.assert_close(g_log.detach(), g, rtol=1e-9, atol=1e-300)
    shape(g_log, "sigmoid", 1.0, 0.0, 0.0).mean().backward()
    want = r_leaf.grad
    # d loss_i / d r = -sigmoid(-m) g'(r) / P with m = g(r): the rounding of m is amplified by
    # m sigmoid(m), the condition number of sigmoid(-m).
    grad_ulps = score_ulps * (2 + g.abs() * torch.sigmoid(g))
    assert_ulps(grad, want, want.abs(), grad_ulps, r, f"{divergence} gradient")


def shape_scales(m: torch.Tensor, loss: str, beta: float, eps: float, lam: float):
    """(value scale, gradient scale, ulps) of a loss shape at float64 margins m (see the module doc)."""
    sp_pos, sp_neg = torch.nn.functional.softplus(m), torch.nn.functional.softplus(-m)
    sig_pos, sig_neg = torch.sigmoid(m), torch.sigmoid(-m)
    if loss == "sigmoid":
        return (1 - eps) * sp_neg + eps * sp_pos, eps * sig_pos + (1 - eps) * sig_neg, BASE_ULPS
    if loss == "robust":
        return (((1 - eps) * sp_neg + eps * sp_pos) / (1 - 2 * eps),
                ((1 - eps) * sig_neg + eps * sig_pos) / (1 - 2 * eps), BASE_ULPS)
    if loss == "hinge":
        return (1 - m).clamp(min=0), torch.ones_like(m), BASE_ULPS
    if loss == "ipo":
        c = 0.5 / beta
        t = m - c
        return 2 * t.abs() * (m.abs() + c) + t * t, 2 * (m.abs() + c), BASE_ULPS
    lo, hi = bpo_range(lam)
    mc = m.clamp(lo, hi)
    e_neg, e_pos = torch.exp(-(lam + 1) * mc), torch.exp(lam * mc)
    linear = mc.abs() if lam == 0 else e_pos / abs(lam)
    exponent = torch.maximum(((lam + 1) * mc).abs(), (lam * mc).abs())
    return e_neg / (4 * (lam + 1)) + linear / 4, (e_neg + e_pos) / 4, BASE_ULPS + 2 * exponent


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("loss", "eps", "lam"), [
    ("sigmoid", 0.0, 0.0), ("sigmoid", 0.1, 0.0), ("sigmoid", 0.3, 0.0), ("sigmoid", 0.45, 0.0),
    ("robust", 0.0, 0.0), ("robust", 0.1, 0.0), ("robust", 0.3, 0.0),
    ("hinge", 0.0, 0.0), ("ipo", 0.0, 0.0),
    ("bpo", 0.0, -0.5), ("bpo", 0.0, 0.0), ("bpo", 0.0, 0.5),
])
def test_loss_shapes_and_gradients(device, backend, loss, eps, lam):
    """Pair losses and d loss / d m over margins m in [-200, 200] (reverse KL, beta = 1: m = r_w).

    The margins are made on the CPU and the loss runs on `device`; the float64 references stay on the CPU."""
    m = grid()
    if loss == "bpo":  # keep off the margin clamp, where the gradient jumps to 0
        lo, hi = bpo_range(lam)
        m = m[((m - lo).abs() > 1e-3) & ((m - hi).abs() > 1e-3)]
    beta = 0.1 if loss == "ipo" else 1.0
    m_device = m.to(device)
    lengths = (dict(chosen_lengths=torch.ones_like(m_device), rejected_lengths=torch.ones_like(m_device))
               if loss == "ipo" else {})
    out, grad = run(backend, m_device, beta=beta, loss=loss, label_smoothing=eps, bpo_lambda=lam, **lengths)
    m64 = m.double()
    value_scale, grad_scale, ulps = shape_scales(m64, loss, beta, eps, lam)
    want = shape(m64, loss, beta, eps, lam, bpo_range(lam))
    what = f"{loss} (eps={eps}, lambda={lam})"
    assert_ulps(out.extras["pair_losses"], want, value_scale, ulps, m, f"{what} loss")

    ones = torch.ones_like(m64) if loss == "ipo" else None
    _, want_grad = reference_gradient(m, beta=beta, loss=loss, eps=eps, lam=lam, len_w=ones, len_l=ones)
    assert_ulps(grad, want_grad, grad_scale / m.numel(), ulps, m, f"{what} gradient")


# Not the reference backend's hinge: autograd of relu gives a NaN input the finite gradient -1.
NAN_CASES = [(backend, divergence, loss) for backend in BACKENDS
             for divergence in ("reverse_kl", "forward_kl", "alpha", "js")
             for loss in ("sigmoid", "robust", "hinge", "ipo", "bpo")
             if (backend, loss) != ("reference", "hinge")]


@pytest.mark.parametrize(("backend", "divergence", "loss"), NAN_CASES)
@pytest.mark.parametrize("nan_input", [0, 2])
def test_a_nan_sum_gives_its_pair_nan_gradients_and_leaves_the_others_alone(device, backend, divergence, loss,
                                                                             nan_input):
    """A NaN policy (or reference) sum makes the loss NaN and its pair's gradient NaN, on every shape:
    a finite gradient would let a step with a NaN pair pass as finite (GradScaler, grad-norm checks).
    The other pairs' gradients are those of the same inputs without the NaN."""
    inputs = [torch.tensor([-10.0, -11.5, -12.0]), torch.tensor([-11.0, -11.0, -13.0]),
              torch.tensor([-10.5, -10.5, -12.5]), torch.tensor([-10.7, -10.7, -12.9])]
    inputs = [t.to(device) for t in inputs]
    options = dict(divergence=divergence, loss=loss, backend=backend)
    if divergence == "alpha":
        options.update(alpha=0.5)
    if loss == "ipo":
        options.update(chosen_lengths=torch.tensor([3, 4, 5]).to(device),
                       rejected_lengths=torch.tensor([4, 4, 6]).to(device))

    def grads(values):
        leaves = [v.clone().requires_grad_() for v in values]
        out = fdpo.preference_loss(*leaves, **options)
        out.loss.backward()
        return out.loss, [leaf.grad for leaf in leaves]

    _, clean = grads(inputs)
    poisoned = [v.clone() for v in inputs]
    poisoned[nan_input][1] = math.nan
    value, got = grads(poisoned)
    assert value.isnan()
    policy = got[:2]
    assert all(g[1].isnan() for g in policy), f"pair 1's policy gradients: {[float(g[1]) for g in policy]}"
    for g, want in zip(got, clean, strict=True):
        torch.testing.assert_close(g[[0, 2]], want[[0, 2]], rtol=0, atol=0)
