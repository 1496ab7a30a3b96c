"""fdpo.preference_loss: every divergence x loss shape against the float64 reference, clamps, errors.

Tolerances: the library computes in float32 from float32 inputs; the reference takes the same
float32 inputs to float64. Each fp32 op rounds at 6e-8 relative and a pair loss is a chain of
about ten of them (exp/log/expm1/softplus are accurate to a few ulps), with condition numbers of
order one for the moderate log-ratios used here: 2e-5 relative to the largest entry of a compared
tensor leaves a margin of ~30x over the worst case seen while still failing on any formula error
(a wrong constant, sign, clamp or missing factor changes results at the 1e-2 level or more).
"""

import math

import pytest
import torch
import torch.nn.functional as F

import fdpo
from fdpo.losses import DIVERGENCES, LOSS_SHAPES

from preference_reference import preference

RTOL = 2e-5
BACKENDS = ("triton", "torch")
P = 150  # more than one block of pairs in the interpreter (64) and not a multiple of it


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> None:
    """|actual - expected| <= rtol * max|expected| (+ a tiny floor for all-zero tensors)."""
    expected = expected.detach().double().cpu()
    actual = actual.detach().double().cpu()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=rtol * scale + 1e-12)


def make_pairs(device, num_pairs=P, spread=2.0, seed=0):
    """float32 [P] log-prob sums with log-ratios r ~ N(0, spread), and token counts in [1, 40]."""
    gen = torch.Generator().manual_seed(seed)
    b_w = -torch.rand(num_pairs, generator=gen) * 60 - 5
    b_l = -torch.rand(num_pairs, generator=gen) * 60 - 5
    a_w = b_w + torch.randn(num_pairs, generator=gen) * spread
    a_l = b_l + torch.randn(num_pairs, generator=gen) * spread
    len_w = torch.randint(1, 41, (num_pairs,), generator=gen)
    len_l = torch.randint(1, 41, (num_pairs,), generator=gen)
    return [t.to(device) for t in (a_w, a_l, b_w, b_l)], len_w.to(device), len_l.to(device)


def run_both(sums, lens, grad_scale=2.5, ref_grad=False, clamp=False, **options):
    """(fdpo output, input grads) and (reference dict, reference grads) for the same inputs and options."""
    sums = [t.detach().clone().requires_grad_(i < 2 or ref_grad) for i, t in enumerate(sums)]
    len_w, len_l = lens
    out = fdpo.preference_loss(*sums, chosen_lengths=len_w, rejected_lengths=len_l, **options)
    (out.loss * grad_scale).backward()
    grads = [t.grad for t in sums]

    ref_in = [t.detach().double().cpu().requires_grad_() for t in sums]
    beta = options.get("beta", 0.1)
    if isinstance(beta, torch.Tensor):
        beta = beta.double().cpu()
    ref = preference(*ref_in, beta=beta, divergence=options.get("divergence", "reverse_kl"),
                     alpha=options.get("alpha", 0.5), loss=options.get("loss", "sigmoid"),
                     eps=options.get("label_smoothing", 0.0), lam=options.get("bpo_lambda", -0.5),
                     len_w=len_w.double().cpu(), len_l=len_l.double().cpu(),
                     nll_weight=options.get("nll_weight", 0.0), clamp=clamp)
    (ref["loss"] * grad_scale).backward()
    return out, grads, ref, [t.grad for t in ref_in]


def check_against_reference(out, grads, ref, ref_grads, check_ref_grads=False):
    assert_close(out.loss, ref["loss"])
    for name in ("chosen_rewards", "rejected_rewards", "margins"):
        assert_close(getattr(out, name), ref[name])
    assert_close(out.extras["pair_losses"], ref["pair_losses"])
    assert out.accuracy.item() == pytest.approx(ref["accuracy"].item(), abs=1e-6)
    count = 4 if check_ref_grads else 2
    for actual, expected in zip(grads[:count], ref_grads[:count], strict=True):
        assert_close(actual, expected)
    for metric in (out.chosen_rewards, out.rejected_rewards, out.margins, out.accuracy, *out.extras.values()):
        assert not metric.requires_grad and metric.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", LOSS_SHAPES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_matches_reference(device, divergence, loss, backend):
    """Values, metrics and input gradients of every divergence x loss shape; no clamp is active here,
    so this is also the agreement with the unclamped formulas."""
    sums, len_w, len_l = make_pairs(device)
    options = dict(beta=0.2, divergence=divergence, alpha=0.3, loss=loss, backend=backend,
                   label_smoothing=0.15 if loss in ("sigmoid", "robust") else 0.0)
    check_against_reference(*run_both(sums, (len_w, len_l), **options))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("divergence", "loss"), [("alpha", "sigmoid"), ("js", "ipo"), ("forward_kl", "bpo"),
                                                  ("reverse_kl", "robust")])
def test_per_pair_beta_nll_and_reference_gradients(device, divergence, loss, backend):
    """A [P] beta tensor (epsilon-DPO), the RPO NLL term and gradients reaching reference inputs."""
    sums, len_w, len_l = make_pairs(device, seed=1)
    beta = (torch.rand(P, generator=torch.Generator().manual_seed(2)) * 0.45 + 0.05).to(device)
    out, grads, ref, ref_grads = run_both(sums, (len_w, len_l), ref_grad=True, clamp=True, beta=beta,
                                          divergence=divergence, loss=loss, nll_weight=0.7, backend=backend)
    check_against_reference(out, grads, ref, ref_grads, check_ref_grads=True)
    expected_nll = (-sums[0].double().cpu() / len_w.double().cpu()).mean()
    assert_close(out.extras["nll"], expected_nll)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lam", [-0.9, -0.5, 0.0, 0.7])
def test_bpo_lambdas(device, lam, backend):
    """BPO at several lambda, including the lambda = 0 limit form and lambda = -0.5 = exp(-m/2)."""
    sums, len_w, len_l = make_pairs(device, seed=3)
    options = dict(divergence="reverse_kl", loss="bpo", bpo_lambda=lam, beta=0.5, backend=backend)
    out, grads, ref, ref_grads = run_both(sums, (len_w, len_l), **options)
    check_against_reference(out, grads, ref, ref_grads)
    if lam == -0.5:
        m = 0.5 * ((sums[0] - sums[2]) - (sums[1] - sums[3])).double().cpu()
        assert_close(out.extras["pair_losses"], torch.exp(-m.clamp(max=-math.log(0.01)) / 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_reverse_kl_sigmoid_is_dpo(device, backend):
    """The textbook DPO loss and rewards: -log sigma(beta ((a_w - a_l) - (b_w - b_l))), beta (a - b)."""
    (a_w, a_l, b_w, b_l), _, _ = make_pairs(device, seed=4)
    a_w.requires_grad_()
    out = fdpo.preference_loss(a_w, a_l, b_w, b_l, beta=0.1, backend=backend)
    out.loss.backward()
    x = [t.detach().double().cpu() for t in (a_w, a_l, b_w, b_l)]
    x[0].requires_grad_()
    dpo = -F.logsigmoid(0.1 * ((x[0] - x[1]) - (x[2] - x[3]))).mean()
    dpo.backward()
    assert_close(out.loss, dpo)
    assert_close(a_w.grad, x[0].grad)
    assert_close(out.chosen_rewards, 0.1 * (x[0] - x[2]))
    assert_close(out.rejected_rewards, 0.1 * (x[1] - x[3]))
    assert out.accuracy.item() == pytest.approx(((x[0] - x[2]) > (x[1] - x[3])).double().mean().item())


@pytest.mark.parametrize("trl_coef", [0.2, 0.7])
def test_trl_alpha_convention(device, trl_coef):
    """TRL >= 0.29 scores the alpha-divergence as exp((a - 1) r) / (a - 1) with a =
    f_alpha_divergence_coef, i.e. f'(u) = (u^(a-1) - 1) / (a - 1): our paper-convention alpha is 1 - a.
    Passing TRL's coefficient unchanged as alpha gives a different loss."""
    (a_w, a_l, b_w, b_l), _, _ = make_pairs(device, seed=5)
    x = [t.double().cpu() for t in (a_w, a_l, b_w, b_l)]

    def trl_score(r):
        return torch.exp((trl_coef - 1) * r) / (trl_coef - 1)

    trl = -F.logsigmoid(0.1 * (trl_score(x[0] - x[2]) - trl_score(x[1] - x[3]))).mean()
    converted = fdpo.preference_loss(a_w, a_l, b_w, b_l, divergence="alpha", alpha=1 - trl_coef)
    assert_close(converted.loss, trl)
    unconverted = fdpo.preference_loss(a_w, a_l, b_w, b_l, divergence="alpha", alpha=trl_coef)
    assert abs(unconverted.loss.item() - trl.item()) > 1e-3 * abs(trl.item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_ipo_is_trls_for_reverse_kl_and_scores_the_mean_log_ratio_otherwise(device, backend):
    """IPO with reverse KL is TRL's `ipo` loss, (r_w / n_w - r_l / n_l - 1 / (2 beta))^2 averaged over
    pairs; with JS the gap is g(r / n) of the per-token mean log-ratio, not TRL's g(r) / n
    (docs/math.md 10), which differs."""
    (a_w, a_l, b_w, b_l), len_w, len_l = make_pairs(device, spread=10.0, seed=7)
    x = [t.double().cpu() for t in (a_w, a_l, b_w, b_l)]
    n_w, n_l = len_w.double().cpu(), len_l.double().cpu()
    r_w, r_l = x[0] - x[2], x[1] - x[3]
    target = 1 / (2 * 1.0)
    options = dict(loss="ipo", beta=1.0, chosen_lengths=len_w, rejected_lengths=len_l, backend=backend)
    plain = fdpo.preference_loss(a_w, a_l, b_w, b_l, **options)
    assert_close(plain.loss, ((r_w / n_w - r_l / n_l - target) ** 2).mean())

    def js(r):
        return F.logsigmoid(r) + math.log(2)

    ours = fdpo.preference_loss(a_w, a_l, b_w, b_l, divergence="js", **options)
    assert_close(ours.loss, ((js(r_w / n_w) - js(r_l / n_l) - target) ** 2).mean())
    trl = ((js(r_w) / n_w - js(r_l) / n_l - target) ** 2).mean()
    assert abs(ours.loss.item() - trl.item()) > 0.01 * trl.item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_alpha_limits(device, backend):
    """alpha -> 0 tends to reverse KL and alpha -> 1 to forward KL (docs/math.md 2); near alpha = 0 the
    score (1 - exp(-alpha r)) / alpha needs expm1, which this checks at alpha = 1e-6."""
    sums, _, _ = make_pairs(device, seed=6)

    def loss(divergence, alpha=0.5):
        return fdpo.preference_loss(*sums, divergence=divergence, alpha=alpha, backend=backend)

    assert_close(loss("alpha", 1e-6).chosen_rewards, loss("reverse_kl").chosen_rewards, rtol=1e-4)
    assert_close(loss("alpha", 1 - 1e-6).chosen_rewards, loss("forward_kl").chosen_rewards, rtol=1e-4)


def extreme_pairs(device):
    """Log-ratios of +-200 on either side, in every sign combination, plus zeros."""
    values = torch.tensor([200.0, -200.0, 0.0])
    r_w, r_l = torch.cartesian_prod(values, values).T
    b_w = torch.full_like(r_w, -300.0)
    b_l = torch.full_like(r_l, -250.0)
    return [t.to(device) for t in (b_w + r_w, b_l + r_l, b_w, b_l)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", LOSS_SHAPES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_extreme_log_ratios_stay_finite(device, divergence, loss, backend):
    sums = [t.clone().requires_grad_() for t in extreme_pairs(device)]
    ones = torch.ones(sums[0].shape[0], device=device)
    out = fdpo.preference_loss(*sums, divergence=divergence, loss=loss, beta=0.5, alpha=0.3, nll_weight=0.1,
                               chosen_lengths=ones, rejected_lengths=ones, backend=backend)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    for t in (out.chosen_rewards, out.rejected_rewards, out.margins, out.extras["pair_losses"],
              *(s.grad for s in sums)):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("backend", ("reference", *BACKENDS))
@pytest.mark.parametrize(("divergence", "loss"), [("reverse_kl", "hinge"), ("reverse_kl", "bpo"),
                                                  ("forward_kl", "sigmoid"), ("alpha", "ipo"), ("js", "robust")])
def test_a_nan_sum_gives_a_nan_loss(device, divergence, loss, backend):
    """A NaN log-prob sum (NaN hidden states upstream) is a NaN loss, never a plausible finite one: the
    clamps of the hinge, BPO and the exponent pass NaN through (on a GPU too: tests/test_aot.py checks
    the compiled kernel's min / max)."""
    sums, _, _ = make_pairs(device, spread=5.0, seed=9)
    sums[0] = sums[0].clone()
    sums[0][1] = float("nan")
    ones = torch.ones(P, device=device)
    out = fdpo.preference_loss(*sums, divergence=divergence, loss=loss, beta=0.5, alpha=0.3, chosen_lengths=ones,
                               rejected_lengths=ones, backend=backend)
    assert out.loss.isnan()
    assert out.extras["pair_losses"].isnan().tolist() == [i == 1 for i in range(P)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("divergence", "loss"), [("forward_kl", "sigmoid"), ("alpha", "hinge"),
                                                  ("forward_kl", "ipo"), ("alpha", "bpo")])
def test_clamps_match_documented_formula(device, divergence, loss, backend):
    """With log-ratios reaching past the exponent clamp (r < -30 / alpha), values and gradients equal
    the reference with the documented clamps (constant score and zero gradient beyond)."""
    gen = torch.Generator().manual_seed(7)
    r = torch.rand(2, P, generator=gen) * 130 - 120  # r in [-120, 10]: both sides of -30 and -100
    r = torch.where((r + 30).abs() < 0.01, r + 0.1, r)
    r = torch.where((r + 100).abs() < 0.01, r + 0.1, r)
    b_w, b_l = -torch.rand(2, P, generator=gen) * 100 - 150
    sums = [t.to(device) for t in (b_w + r[0], b_l + r[1], b_w, b_l)]
    ones = torch.ones(P, dtype=torch.int64, device=device)
    out, grads, ref, ref_grads = run_both(sums, (ones, ones), clamp=True, divergence=divergence, loss=loss,
                                          alpha=0.3, beta=0.1, backend=backend)
    check_against_reference(out, grads, ref, ref_grads)
    clamped = -(1.0 if divergence == "forward_kl" else 0.3) * r[0] > 30
    assert clamped.any() and (~clamped).any()
    if loss != "bpo":
        assert (grads[0].cpu()[clamped] == 0).all()
    # extras["clamped"] flags exactly the pairs with a clamped score, and (bpo) a clamped margin, where
    # both policy gradients are 0.
    flagged = clamped | (-(1.0 if divergence == "forward_kl" else 0.3) * r[1] > 30)
    if loss == "bpo":
        flagged |= (grads[0].cpu() == 0) & (grads[1].cpu() == 0)
    assert out.extras["clamped"].cpu().tolist() == flagged.float().tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bpo_ratio_clip(device, backend):
    """BPO clips R = exp(-m) at 0.01: beyond m = log(100) the loss is constant and the gradient 0."""
    sums, _, _ = make_pairs(device, spread=5.0, seed=8)
    sums = [t.clone().requires_grad_() for t in sums]
    out = fdpo.preference_loss(*sums, loss="bpo", beta=1.0, backend=backend)
    out.loss.backward()
    m = ((sums[0] - sums[2]) - (sums[1] - sums[3])).detach().cpu()
    clipped = m > math.log(100)
    assert clipped.any() and (~clipped).any() and (m > -60).all()  # -60: the exponent clamp at lambda = -0.5
    assert (sums[0].grad.cpu()[clipped] == 0).all() and (sums[0].grad.cpu()[~clipped] != 0).all()
    assert out.extras["clamped"].cpu().tolist() == clipped.float().tolist()
    edge = math.exp(0.5 * math.log(0.01))  # the lambda = -0.5 loss exp(-m/2) at m = log(100)
    torch.testing.assert_close(out.extras["pair_losses"].cpu()[clipped],
                               torch.full((int(clipped.sum()),), edge), rtol=1e-6, atol=0)


def test_backends_agree(device):
    """"reference" and "torch" run the same PyTorch path; "triton" the kernels: all three agree."""
    sums, len_w, len_l = make_pairs(device, seed=9)
    losses = {b: fdpo.preference_loss(*sums, divergence="js", loss="ipo", chosen_lengths=len_w,
                                      rejected_lengths=len_l, backend=b).loss for b in ("triton", "torch", "reference")}
    assert_close(losses["triton"], losses["reference"])
    assert losses["torch"].item() == losses["reference"].item()


@pytest.mark.parametrize("backend", ("reference", *BACKENDS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_accepts_other_float_dtypes(device, dtype, backend):
    """float64 / bfloat16 / float16 sums are computed in float32; each gradient comes back in its input's dtype."""
    sums, _, _ = make_pairs(device, seed=10)
    cast = [t.to(dtype).requires_grad_() for t in sums]
    out = fdpo.preference_loss(*cast, divergence="js", backend=backend)
    out.loss.backward()
    # the same values (after rounding to `dtype`) given as float32: what the loss must compute
    as32 = [t.detach().float().requires_grad_() for t in cast]
    expected = fdpo.preference_loss(*as32, divergence="js", backend=backend)
    expected.loss.backward()

    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-6, atol=1e-7)
    for given, reference in zip(cast, as32, strict=True):
        assert given.grad is not None and given.grad.dtype == dtype
        assert reference.grad.abs().max() > 0
        torch.testing.assert_close(given.grad, reference.grad.to(dtype), rtol=1e-6, atol=0.0)


def _bad(device, **overrides):
    sums, _, _ = make_pairs(device, num_pairs=5)
    args = dict(policy_chosen=sums[0], policy_rejected=sums[1], ref_chosen=sums[2], ref_rejected=sums[3])
    args.update(overrides)
    positional = [args.pop(k) for k in ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")]
    fdpo.preference_loss(*positional, **args)


@pytest.mark.parametrize(("overrides", "match"), [
    (dict(divergence="kl"), "divergence must be one of"),
    (dict(loss="dpo"), "loss must be one of"),
    (dict(divergence="alpha", alpha=0.0), r"alpha must be in the open interval \(0, 1\)"),
    (dict(divergence="alpha", alpha=1.0), r"alpha must be in the open interval \(0, 1\)"),
    (dict(alpha=-0.5), "alpha must be"),
    (dict(beta=0.0), "beta must be a float > 0"),
    (dict(beta=-0.1), "beta must be a float > 0"),
    (dict(beta=torch.tensor([0.1, 0.1, 0.0, 0.1, 0.1])), "beta must be > 0"),
    (dict(beta=torch.full((4,), 0.1)), r"beta as a tensor must be \[P\] = \[5\]"),
    (dict(label_smoothing=0.5), r"label_smoothing must be in \[0, 0.5\)"),
    (dict(label_smoothing=-0.1), r"label_smoothing must be in \[0, 0.5\)"),
    (dict(loss="hinge", label_smoothing=0.1), "label_smoothing applies to loss in"),
    (dict(loss="bpo", bpo_lambda=-1.0), "bpo_lambda must be a finite number > -1"),
    (dict(bpo_lambda=-3.0), "bpo_lambda must be"),
    (dict(nll_weight=-1.0), "nll_weight must be"),
    (dict(loss="ipo"), "chosen_lengths and rejected_lengths"),
    (dict(nll_weight=0.5), "chosen_lengths and rejected_lengths"),
    (dict(loss="ipo", chosen_lengths=torch.tensor([1, 2, 0, 3, 4]), rejected_lengths=torch.ones(5)),
     "chosen_lengths must be >= 1"),
    (dict(loss="ipo", chosen_lengths=torch.ones(4), rejected_lengths=torch.ones(5)), r"chosen_lengths must be"),
    (dict(loss="bpo", bpo_min_ratio=-1.0), "bpo_min_ratio"),
    (dict(loss="bpo", bpo_max_ratio=0.001), "bpo_max_ratio"),
    (dict(loss="bpo", bpo_lambda=2.0, bpo_min_ratio=1e-12, bpo_max_ratio=math.exp(-20)), "leaves no margin range"),
    (dict(backend="cuda"), "backend must be one of"),
])
def test_invalid_arguments(device, overrides, match):
    overrides = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in overrides.items()}
    with pytest.raises(ValueError, match=match):
        _bad(device, **overrides)


def test_bpo_clip_without_margin_raises_at_construction():
    with pytest.raises(ValueError, match="leaves no margin range"):
        fdpo.PreferenceLoss(loss="bpo", bpo_lambda=2.0, bpo_min_ratio=1e-12, bpo_max_ratio=math.exp(-20))


@pytest.mark.parametrize("name", ["policy_rejected", "ref_chosen", "ref_rejected"])
def test_mismatched_pair_counts(device, name):
    with pytest.raises(ValueError, match=f"{name} has 4 pairs but policy_chosen has 5"):
        _bad(device, **{name: torch.zeros(4, device=device)})


def test_kernel_launcher_checks(device):
    """The launchers themselves refuse what they cannot run, naming the argument."""
    from fdpo.kernels import preference_loss_forward
    from fdpo.options import PairLossSpec

    sums, _, _ = make_pairs(device, num_pairs=5)
    options = dict(beta=0.1, divergence="reverse_kl", loss="sigmoid", alpha=0.5, label_smoothing=0.0,
                   bpo_lambda=-0.5, margin_min=-math.inf, margin_max=math.inf, exp_max=30.0, nll_weight=0.0)
    with pytest.raises(TypeError, match="ref_chosen must be a contiguous 1-D float32"):
        preference_loss_forward(sums[0], sums[1], sums[2].double(), sums[3], PairLossSpec(**options))
    with pytest.raises(ValueError, match="loss must be one of"):
        preference_loss_forward(*sums, PairLossSpec(**{**options, "loss": "kto"}))
    with pytest.raises(ValueError, match="need chosen_lengths"):
        preference_loss_forward(*sums, PairLossSpec(**{**options, "loss": "ipo"}))


@pytest.mark.parametrize("backend", BACKENDS)
def test_clamped_flags_agree_with_the_gradient_at_the_bpo_clamp_edge(device, backend):
    """Pairs whose margin beta (r_w - r_l) sits within float32 rounding of BPO's clip (m = log 100 at beta 0.1)
    where beta r_w - beta r_l falls on the other side: a pair is flagged clamped exactly where its gradient
    is 0, as the backends decide it."""
    gen = torch.Generator().manual_seed(0)
    m_hi = torch.tensor(math.log(100.0))
    r_w = torch.rand(200_000, generator=gen) * 100 + 10
    r_l = (r_w - m_hi / 0.1) + torch.randint(-40, 41, (200_000,), generator=gen).float() * 1e-6 * r_w
    straddling = ((0.1 * (r_w - r_l) > m_hi) != (0.1 * r_w - 0.1 * r_l > m_hi)).nonzero().flatten()[:64]
    assert straddling.numel() == 64
    chosen = r_w[straddling].to(device).requires_grad_()
    zeros = torch.zeros_like(chosen)
    out = fdpo.preference_loss(chosen, r_l[straddling].to(device), zeros, zeros, beta=0.1, loss="bpo",
                               backend=backend)
    out.loss.backward()
    flags = out.extras["clamped"].cpu()
    assert 0 < flags.sum() < 64
    assert flags.tolist() == (chosen.grad.cpu() == 0).float().tolist()
