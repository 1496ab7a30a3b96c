"""Token-level divergences between two heads (fdpo.token_divergence, docs/math.md 12) against float64.

The float64 oracle here materializes both logit tensors and evaluates each divergence as its
definition reads (`divergence64`: KL sums, the JS mixture, the alpha power sum, |p - q|); gradients
are float64 autograd through it, independent of the fused code. Shapes are odd (N = 29 tokens,
V = 173, D = 40, the reference's D' = 24 read through a strided view), 20% of tokens are ignored,
each head has its own bias, soft cap and temperature.
Tolerances: fp32 accumulation everywhere (values 3e-6, gradients 1e-5; KL-type values are
differences of O(1) terms); 16-bit inputs give the fused backends exact fp32 logits (values 1e-5)
but gradients rounded by the operand cast and the cast back to the input dtype (1e-2); the naive
reference backend in bf16 rounds its logits' GEMM output to bf16 (values 1e-2, gradients 6e-2).
"""

import math

import pytest
import torch

import fdpo
import fdpo.backends.chunked as chunked
from fdpo.divergences import TOKEN_DIVERGENCES, DivergenceSpec
from fdpo.kernels.token_divergence_fwd import check_spec
from fdpo.token_divergence import TokenDivergenceLoss, token_divergence

from float64_reference import assert_close, assert_close_extended, kl64, leaf64, logits64
from float64_reference import entropy64 as entropy_of_logp
from partitioned import Partitioned

N, V, D, D_REF = 29, 173, 40, 24
SOFTCAP, REF_SOFTCAP, TEMPERATURE, REF_TEMPERATURE = 8.0, 12.0, 0.7, 1.3
BACKENDS = ("triton", "torch", "reference")
FUSED = ("triton", "torch")
# (divergence, alpha, beta): every divergence, with parameters away from 1/2 so that a swapped
# p and q shows, and alpha on both sides of 1/2 (the two stable sums of docs/math.md 12).
CASES = (("forward_kl", 0.5, 0.5), ("reverse_kl", 0.5, 0.5), ("js", 0.5, 0.3), ("alpha", 0.3, 0.5),
         ("alpha", 0.8, 0.5), ("tv", 0.5, 0.5))


def divergence64(z, z_ref, divergence, alpha=0.5, beta=0.5):
    """float64 [...] divergence of p = softmax(z) from q = softmax(z_ref), as docs/math.md 12 defines it, with
    0 log 0 = 0 for masked (-inf) logits (`float64_reference.kl64`: a KL is +inf, with zero gradient, where
    one distribution is 0 and the other not)."""
    logp, logq = torch.log_softmax(z, -1), torch.log_softmax(z_ref, -1)
    p, q = logp.exp(), logq.exp()
    if divergence == "js" and beta in (0.0, 1.0):
        divergence = "forward_kl" if beta == 0.0 else "reverse_kl"
    if divergence == "forward_kl":
        return kl64(logq, logp)
    if divergence == "reverse_kl":
        return kl64(logp, logq)
    if divergence == "js":
        mix = (1 - beta) * p + beta * q
        empty = mix == 0   # an entry both heads mask: log m = -inf, with no 0 / 0 in log's gradient
        log_m = torch.log(mix.masked_fill(empty, 1.0)).masked_fill(empty, -math.inf)
        return beta * kl64(logq, log_m) + (1 - beta) * kl64(logp, log_m)
    if divergence == "alpha":
        # p^alpha q^(1-alpha) through the logs: the power's derivative at an underflowed p = 0 is 0 * inf.
        return (1 - torch.exp(alpha * logp + (1 - alpha) * logq).sum(-1)) / (alpha * (1 - alpha))
    return 0.5 * (p - q).abs().sum(-1)


def make_inputs(dtype=torch.float32, seed=0, scale=1.0, device="cpu"):
    """Policy (bias, soft cap) and reference (bias, own hidden size through a strided view) of one vocabulary."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(device)

    hidden = rand(N, D, s=scale)
    weight = rand(V, D, s=0.4)
    bias = rand(V, s=0.5)
    ref_hidden = rand(N, D_REF + 5, s=scale)[:, 2:2 + D_REF]
    ref_weight = rand(V, D_REF, s=0.4)
    ref_bias = rand(V, s=0.5)
    labels = torch.randint(0, V, (N,), generator=g).to(device)
    labels[torch.randperm(N, generator=g)[: N // 5].to(device)] = -100
    tensors = (hidden, weight, bias, ref_hidden, ref_weight, ref_bias)
    return tuple(t.to(dtype) for t in tensors), labels


def call(backend, tensors, labels, divergence, alpha=0.5, beta=0.5, **options):
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias = tensors
    kwargs = dict(bias=bias, ref_bias=ref_bias, softcap=SOFTCAP, ref_softcap=REF_SOFTCAP, temperature=TEMPERATURE,
                  ref_temperature=REF_TEMPERATURE)
    kwargs.update(options)
    return token_divergence(hidden, weight, ref_hidden, ref_weight, labels, divergence=divergence, alpha=alpha,
                            beta=beta, backend=backend, **kwargs)


def oracle(tensors, labels, divergence, alpha=0.5, beta=0.5, softcap=SOFTCAP, ref_softcap=REF_SOFTCAP,
           temperature=TEMPERATURE, ref_temperature=REF_TEMPERATURE):
    """float64 values and the policy leaves (hidden, weight, bias) to differentiate."""
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias = tensors
    leaves = [leaf64(t) for t in (hidden, weight, bias)]
    z = logits64(*leaves[:2], leaves[2], softcap, temperature)
    z_ref = logits64(ref_hidden, ref_weight, ref_bias, ref_softcap, ref_temperature)
    value = divergence64(z, z_ref, divergence, alpha, beta).masked_fill(labels == -100, 0.0)
    return value, leaves


def value_and_grads(backend, tensors, labels, divergence, alpha=0.5, beta=0.5, upstream=None, **options):
    hidden, weight, bias, *ref = tensors
    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias)]
    out = call(backend, (*leaves, *ref), labels, divergence, alpha, beta, **options)
    (out * upstream).sum().backward()
    return out.detach(), [t.grad for t in leaves]


def upstream_grad(seed=1):
    return torch.rand(N, generator=torch.Generator().manual_seed(seed)) + 0.5


def tolerances(backend, dtype):
    """(value, gradient) norm-wise relative tolerances; measured on CPU: fp32 values <= 4e-7 and gradients
    <= 2.3e-6; bf16 fused gradients <= 3.9e-3, reference values <= 1.9e-3 and gradients <= 3.2e-2 (TV's
    sign-based gradient flips where the bf16-rounded logits put p on the other side of q)."""
    if dtype == torch.float32:
        return 3e-6, 1e-5
    return (1e-2, 6e-2) if backend == "reference" else (1e-5, 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("divergence,alpha,beta", CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_values_and_policy_gradients_match_float64(backend, divergence, alpha, beta, dtype):
    tensors, labels = make_inputs(dtype, scale=1.5)
    upstream = upstream_grad()
    value, grads = value_and_grads(backend, tensors, labels, divergence, alpha, beta, upstream=upstream)
    want, leaves = oracle(tensors, labels, divergence, alpha, beta)
    (want * upstream.double()).sum().backward()
    value_tol, grad_tol = tolerances(backend, dtype)
    assert value.dtype == torch.float32 and value.shape == labels.shape
    assert torch.all(value[labels == -100] == 0)
    assert want[labels != -100].min() > 1e-3, "the heads must differ for the comparison to mean anything"
    assert_close(value, want, value_tol, f"{backend} {divergence} value")
    for name, got, leaf in zip(("hidden", "weight", "bias"), grads, leaves, strict=True):
        assert got.dtype == dtype
        assert_close(got, leaf.grad, grad_tol, f"{backend} {divergence} d{name}")
    assert torch.all(grads[0][labels == -100] == 0)


@pytest.mark.parametrize("backend", FUSED)
def test_alpha_limits_are_the_kls_and_stay_accurate_near_them(backend):
    tensors, labels = make_inputs(scale=1.5)
    upstream = upstream_grad()
    # 1 - 1e-9 is 1.0 in float32: the kernels must not form 1 - alpha themselves.
    for alpha, kl in ((1e-5, "forward_kl"), (1 - 1e-5, "reverse_kl"), (1e-9, "forward_kl"), (1 - 1e-9, "reverse_kl")):
        value, grads = value_and_grads(backend, tensors, labels, "alpha", alpha=alpha, upstream=upstream)
        kl_value, kl_grads = value_and_grads(backend, tensors, labels, kl, upstream=upstream)
        # Within O(min(alpha, 1 - alpha)) of the KL, and to float32 precision of the exact alpha value.
        assert_close(value, kl_value, 1e-4, f"alpha={alpha} vs {kl}")
        for got, want in zip(grads, kl_grads, strict=True):
            assert_close(got, want, 1e-4, f"alpha={alpha} gradient vs {kl}")
        want, _ = oracle(tensors, labels, "alpha", alpha)
        assert_close(value, want, 1e-5, f"alpha={alpha} vs float64")
    for alpha, kl in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        want, _ = oracle(tensors, labels, kl)
        assert_close(call(backend, tensors, labels, "alpha", alpha=alpha), want, 1e-5, f"alpha={alpha} is {kl}")


@pytest.mark.parametrize("backend", FUSED)
def test_js_endpoints_are_the_kls_and_the_mixture_weight_is_the_reference_share(backend):
    tensors, labels = make_inputs(scale=1.5)
    for beta, kl in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        want, _ = oracle(tensors, labels, kl)
        assert_close(call(backend, tensors, labels, "js", beta=beta), want, 1e-5, f"js beta={beta} is {kl}")
    # Inside (0, 1) the divergence tends to 0 at both ends (the endpoints jump to the KLs), accurately.
    for beta, kl in ((1e-4, "forward_kl"), (1 - 1e-4, "reverse_kl")):
        near = call(backend, tensors, labels, "js", beta=beta)
        want, _ = oracle(tensors, labels, "js", beta=beta)
        endpoint, _ = oracle(tensors, labels, kl)
        assert_close(near, want, 1e-3, f"js beta={beta} vs float64")
        assert near.max() < 1e-2 * endpoint.max()
    # 1 - 1e-9 is 1.0 in float32: finite and absolutely accurate (the value, ~1e-9, is below the float32
    # rounding of its O(1) log terms, so no relative accuracy is possible).
    for beta in (1e-9, 1 - 1e-9):
        near = call(backend, tensors, labels, "js", beta=beta)
        want, _ = oracle(tensors, labels, "js", beta=beta)
        assert torch.isfinite(near).all() and (near.double() - want).abs().max() < 1e-6, beta
    # A swapped mixture weight gives a different value: beta = 0.2 is not beta = 0.8.
    assert not torch.allclose(call(backend, tensors, labels, "js", beta=0.2), call(backend, tensors, labels, "js",
                                                                                    beta=0.8), rtol=1e-2)


def test_forward_kl_is_token_kl():
    (hidden, weight, bias, ref_hidden, ref_weight, ref_bias), labels = make_inputs(scale=1.5)
    options = dict(bias=bias, ref_bias=ref_bias, softcap=SOFTCAP, temperature=TEMPERATURE,
                   ref_temperature=REF_TEMPERATURE, backend="torch")
    _, _, kl = fdpo.token_kl(hidden, weight, ref_hidden, ref_weight, labels, **options)
    got = token_divergence(hidden, weight, ref_hidden, ref_weight, labels, divergence="forward_kl", **options)
    torch.testing.assert_close(got, kl, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_identical_heads_give_zero_divergence_and_gradient(backend):
    (hidden, weight, bias, *_), labels = make_inputs(scale=1.5)
    for divergence, alpha, beta in CASES:
        leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
        out = token_divergence(leaves[0], leaves[1], hidden, weight, labels, divergence=divergence, alpha=alpha,
                               beta=beta, bias=leaves[2], ref_bias=bias, temperature=0.9, backend=backend)
        out.sum().backward()
        assert out.abs().max() < 2e-6, f"{backend} {divergence}: {out.abs().max():.2e}"
        for t in leaves:
            assert t.grad.abs().max() < 1e-5, f"{backend} {divergence}: gradient {t.grad.abs().max():.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_divergence_is_positive_where_heads_differ_slightly(backend):
    """Heads a small perturbation apart: every scored value is > 0 (the clamp at 0 must not hide a sign
    error) and matches float64, and 0 at ignored tokens."""
    (hidden, weight, *_), labels = make_inputs(scale=1.5)
    near = weight + 0.02 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(5))
    scored = labels != -100
    for divergence, alpha, beta in CASES:
        got = token_divergence(hidden, weight, hidden, near, labels, divergence=divergence, alpha=alpha,
                               beta=beta, backend=backend)
        want = divergence64(logits64(hidden, weight), logits64(hidden, near), divergence, alpha, beta)
        assert torch.all(got[scored] > 0), f"{backend} {divergence}: min {got[scored].min():.2e}"
        assert torch.all(got[~scored] == 0)
        assert_close(got[scored], want[scored], 3e-3, f"{backend} {divergence} (small values)")


@pytest.mark.parametrize("backend", FUSED)
def test_extreme_logits_stay_finite_and_accurate(backend):
    """|z| about 1e3, two ways: offsets of +-1000 on every logit (the LSEs must not overflow or lose
    the O(1) differences more than float32 rounding of z does), and logits of spread ~1e3 (nearly
    one-hot distributions: most probabilities underflow to 0, the gradients are ~0)."""
    upstream = upstream_grad()
    (hidden, weight, bias, ref_hidden, ref_weight, ref_bias), labels = make_inputs(scale=1.5)
    shifted = (hidden, weight, bias + 1000.0, ref_hidden, ref_weight, ref_bias - 1000.0)
    for divergence, alpha, beta in CASES:
        value, grads = value_and_grads(backend, shifted, labels, divergence, alpha, beta, upstream=upstream,
                                       softcap=None, ref_softcap=None)
        want, leaves = oracle(shifted, labels, divergence, alpha, beta, softcap=None, ref_softcap=None)
        (want * upstream.double()).sum().backward()
        assert_close(value, want, 2e-3, f"{backend} {divergence} with logits offset by 1e3")
        for got, leaf in zip(grads, leaves, strict=True):
            assert_close(got, leaf.grad, 2e-3, f"{backend} {divergence} gradient with logits offset by 1e3")
    spread, labels = make_inputs(scale=60.0)
    assert logits64(*spread[:2]).abs().max() > 500
    for divergence, alpha, beta in CASES:
        value, grads = value_and_grads(backend, spread, labels, divergence, alpha, beta, upstream=upstream,
                                       softcap=None, ref_softcap=None)
        want, leaves = oracle(spread, labels, divergence, alpha, beta, softcap=None, ref_softcap=None)
        (want * upstream.double()).sum().backward()
        assert torch.isfinite(value).all() and all(torch.isfinite(g).all() for g in grads)
        # Absolute errors, against the size of the values and the natural scale of each gradient: dz is
        # at most max(1, D) per entry (reverse KL and alpha: p (d - D), D up to ~2e3 here), so dH ~ |W|,
        # dW ~ |H|, db ~ sqrt(N) times that. Some exact gradients are ~0 at one-hot distributions, where
        # the float32 rounding of z ~ 1e3 (6e-5) is all that is left of them.
        size = max(1.0, want.abs().max().item())
        assert (value.double() - want).abs().max() <= 1e-3 * size, divergence
        scales = (spread[1].norm(), spread[0].norm(), math.sqrt(N))
        for got, leaf, scale in zip(grads, leaves, scales, strict=True):
            assert (got.double() - leaf.grad).norm() <= 1e-5 * scale * size, divergence


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_js_agrees_with_trl_generalized_jsd(beta):
    """TRL 1.16's ChunkedDivergenceFunction (CPU path, the policy as its student) at its three regimes."""
    chunked_divergence = pytest.importorskip("trl.kernels.chunked_divergence")
    (hidden, weight, _, ref_hidden, ref_weight, _), labels = make_inputs(scale=1.5)
    scored = labels != -100
    h = hidden[scored].clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    trl, _ = chunked_divergence.ChunkedDivergenceFunction.apply(h, w, None, ref_hidden[scored], ref_weight, None,
                                                               beta, TEMPERATURE, 1.0, SOFTCAP, 1.0, None)
    trl.sum().backward()
    for backend in FUSED:
        hh, ww = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        ours = token_divergence(hh, ww, ref_hidden, ref_weight, labels, divergence="js", beta=beta,
                                softcap=SOFTCAP, temperature=TEMPERATURE, backend=backend)
        ours.sum().backward()
        assert_close(ours[scored], trl.detach(), 1e-5, f"{backend} js beta={beta} vs TRL")
        assert_close(hh.grad[scored], h.grad, 1e-4, f"{backend} d hidden vs TRL")
        assert_close(ww.grad, w.grad, 1e-4, f"{backend} d weight vs TRL")


def test_triton_backwards_agree():
    """The fused backward with atomics, its fixed-order variant and the split backward give one gradient."""
    tensors, labels = make_inputs(scale=1.5)
    upstream = upstream_grad()
    results = [value_and_grads("triton", tensors, labels, "js", beta=0.3, upstream=upstream, **options)[1]
               for options in ({}, {"deterministic": True}, {"backward_buffer_bytes": 7 * V * 4})]
    for other in results[1:]:
        for got, want in zip(other, results[0], strict=True):
            assert_close(got, want, 1e-6, "triton backward strategies")


def test_per_sequence_module_and_mean():
    (hidden, weight, bias, ref_hidden, ref_weight, ref_bias), labels = make_inputs(scale=1.5)
    hidden3, ref3, labels3 = hidden[:28].view(4, 7, D), ref_hidden[:28].reshape(4, 7, D_REF), labels[:28].view(4, 7)
    head, ref_head = fdpo.LMHead(weight, bias), fdpo.LMHead(ref_weight, ref_bias)
    per_token = token_divergence(hidden3, weight, ref3, ref_weight, labels3, divergence="tv", bias=bias,
                                 ref_bias=ref_bias, backend="torch")
    sums = TokenDivergenceLoss("tv", reduction="sequence", backend="torch")(hidden3, labels3, head, ref_hidden=ref3,
                                                                            ref_head=ref_head)
    torch.testing.assert_close(sums, per_token.sum(1), rtol=1e-6, atol=1e-6)
    mean = TokenDivergenceLoss("tv", backend="torch")(hidden3, labels3, head, ref_hidden=ref3, ref_head=ref_head)
    torch.testing.assert_close(mean, per_token.sum() / (labels3 != -100).sum(), rtol=1e-6, atol=1e-6)
    packed = TokenDivergenceLoss("tv", reduction="sequence", backend="torch")(
        hidden[:28], labels[:28], head, ref_hidden=ref_hidden[:28], ref_head=ref_head,
        cu_seqlens=torch.tensor([0, 7, 14, 21, 28]))
    torch.testing.assert_close(packed, sums, rtol=1e-6, atol=1e-6)


def test_double_backward_is_refused_on_fused_backends():
    tensors, labels = make_inputs()
    hidden = tensors[0].clone().requires_grad_(True)
    out = call("torch", (hidden, *tensors[1:]), labels, "tv")
    (grad,) = torch.autograd.grad(out.sum(), hidden, create_graph=False)
    assert grad.shape == hidden.shape
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(call("torch", (hidden, *tensors[1:]), labels, "tv").sum(), hidden, create_graph=True)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(divergence="kl"), ValueError, "divergence must be one of"),
    (dict(divergence="alpha", alpha=1.5), ValueError, "alpha must be a number in \\[0, 1\\]"),
    (dict(divergence="js", beta=-0.1), ValueError, "beta must be a number in \\[0, 1\\]"),
    (dict(divergence="js", beta=math.nan), ValueError, "beta must be"),
    (dict(divergence="tv", alpha=True), ValueError, "alpha must be"),
])
def test_bad_parameters_are_refused(kwargs, error, match):
    (hidden, weight, _, ref_hidden, ref_weight, _), labels = make_inputs()
    with pytest.raises(error, match=match):
        token_divergence(hidden, weight, ref_hidden, ref_weight, labels, backend="torch", **kwargs)
    if "divergence" in kwargs and kwargs["divergence"] == "kl":
        with pytest.raises(error, match=match):
            TokenDivergenceLoss("kl")


def test_bad_shapes_are_refused():
    (hidden, weight, _, ref_hidden, ref_weight, _), labels = make_inputs()
    with pytest.raises(ValueError, match="ref_hidden must have hidden's leading shape"):
        token_divergence(hidden, weight, ref_hidden[:-1], ref_weight, labels, divergence="tv")
    with pytest.raises(ValueError, match="vocabulary rows"):
        token_divergence(hidden, weight, ref_hidden, ref_weight[:-1], labels, divergence="tv")
    with pytest.raises(ValueError, match="labels shape"):
        token_divergence(hidden, weight, ref_hidden, ref_weight, labels[:-1], divergence="tv")
    with pytest.raises(TypeError, match="ref_weight dtype"):
        token_divergence(hidden, weight, ref_hidden, ref_weight.double(), labels, divergence="tv")
    with pytest.raises(ValueError, match="reduction must be one of"):
        TokenDivergenceLoss("tv", reduction="sum")
    with pytest.raises(ValueError, match="the endpoints are the KLs"):
        check_spec(DivergenceSpec("js", 1.0))


def test_names():
    assert TOKEN_DIVERGENCES == ("forward_kl", "reverse_kl", "js", "alpha", "tv")
    assert DivergenceSpec.of("js", beta=0.0) == DivergenceSpec("forward_kl")
    assert DivergenceSpec.of("alpha", alpha=1.0) == DivergenceSpec("reverse_kl")


@pytest.mark.parametrize("backend", BACKENDS)
def test_logit_scale_of_each_head(backend):
    """Heads with a logit scale (docs/math.md 13: z = capped(s (h W^T + b)) / T), through the module's
    fdpo.LMHead arguments, per-sequence sums of a packed layout, against float64 with s folded into W, b."""
    (hidden, weight, bias, ref_hidden, ref_weight, ref_bias), labels = make_inputs(scale=1.5)
    scale, ref_scale = 1.7, 0.6
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    head = fdpo.LMHead(leaves[1], leaves[2], SOFTCAP, TEMPERATURE, scale=scale)
    ref_head = fdpo.LMHead(ref_weight, ref_bias, None, REF_TEMPERATURE, scale=ref_scale)
    cu_seqlens = torch.tensor([0, 10, 11, 29])
    loss_fn = TokenDivergenceLoss("js", beta=0.3, reduction="sequence", backend=backend)
    sums = loss_fn(leaves[0], labels, head, ref_hidden=ref_hidden, ref_head=ref_head, cu_seqlens=cu_seqlens)
    upstream = torch.tensor([0.5, 2.0, 1.0])
    (sums * upstream).sum().backward()
    h64, w64, b64 = (leaf64(t) for t in (hidden, weight, bias))
    z = logits64(h64, w64 * scale, b64 * scale, SOFTCAP, TEMPERATURE)
    z_ref = logits64(ref_hidden, ref_weight * ref_scale, ref_bias * ref_scale, None, REF_TEMPERATURE)
    per_token = divergence64(z, z_ref, "js", beta=0.3).masked_fill(labels == -100, 0.0)
    want = torch.stack([per_token[a:b].sum() for a, b in ((0, 10), (10, 11), (11, 29))])
    (want * upstream.double()).sum().backward()
    assert_close(sums, want, 1e-5, f"{backend} scaled heads, per-sequence sums")
    for name, got, leaf in zip(("hidden", "weight", "bias"), (t.grad for t in leaves), (h64, w64, b64), strict=True):
        assert_close(got, leaf.grad, 3e-5, f"{backend} scaled heads d{name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_logit_scale_keywords_of_token_divergence(backend):
    """token_divergence(logit_scale=, ref_logit_scale=) against float64 with each scale folded into W, b."""
    (hidden, weight, bias, ref_hidden, ref_weight, ref_bias), labels = make_inputs(scale=1.5)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    got = token_divergence(leaves[0], leaves[1], ref_hidden, ref_weight, labels, divergence="alpha", alpha=0.3,
                           bias=leaves[2], ref_bias=ref_bias, softcap=SOFTCAP, temperature=TEMPERATURE,
                           ref_temperature=REF_TEMPERATURE, logit_scale=1.7, ref_logit_scale=0.6, backend=backend)
    got.sum().backward()
    h64, w64, b64 = (leaf64(t) for t in (hidden, weight, bias))
    z = logits64(h64, w64 * 1.7, b64 * 1.7, SOFTCAP, TEMPERATURE)
    z_ref = logits64(ref_hidden, ref_weight * 0.6, ref_bias * 0.6, None, REF_TEMPERATURE)
    want = divergence64(z, z_ref, "alpha", alpha=0.3).masked_fill(labels == -100, 0.0)
    want.sum().backward()
    assert_close(got, want, 1e-5, f"{backend} logit_scale keywords")
    for name, grad, leaf in zip(("hidden", "weight", "bias"), (t.grad for t in leaves), (h64, w64, b64), strict=True):
        assert_close(grad, leaf.grad, 3e-5, f"{backend} logit_scale keywords d{name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_tdpo_with_another_token_divergence(backend):
    """TDPOLoss(token_divergence="js"): K is the sum of the per-token JS divergence (an extension beyond
    the paper); the default stays the paper's KL(ref || policy) through the unchanged one-pass statistics."""
    (hidden, weight, bias, ref_hidden, ref_weight, ref_bias), labels = make_inputs(scale=1.5)
    hidden4, ref4, labels4 = hidden[:28].view(4, 7, D), ref_hidden[:28].reshape(4, 7, D_REF), labels[:28].view(4, 7)
    head, ref_head = fdpo.LMHead(weight, bias), fdpo.LMHead(ref_weight, ref_bias)
    leaf = hidden4.clone().requires_grad_(True)
    loss_fn = fdpo.TDPOLoss(beta=0.5, variant="tdpo1", backend=backend, token_divergence="js", token_beta=0.3)
    out = loss_fn(leaf, labels4, head, ref_hidden=ref4, ref_head=ref_head)
    out.loss.backward()

    manual_leaf = hidden4.clone().requires_grad_(True)
    k = token_divergence(manual_leaf, weight, ref4, ref_weight, labels4, divergence="js", beta=0.3, bias=bias,
                         ref_bias=ref_bias, backend="torch").sum(1)
    a = fdpo.sequence_logprobs(manual_leaf, weight, labels4, bias=bias, backend="torch")
    b = fdpo.sequence_logprobs(ref4, ref_weight, labels4, bias=ref_bias, backend="torch")
    want = fdpo.tdpo_loss(a[:2], a[2:], b[:2], b[2:], k[:2], k[2:], beta=0.5, variant="tdpo1")
    want.loss.backward()
    torch.testing.assert_close(out.extras["kl_chosen"], k[:2].detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-5, atol=1e-6)
    assert_close(leaf.grad, manual_leaf.grad, 1e-4, f"{backend} TDPO(js) d hidden")
    # The KL and JS sums differ, so the option does change the loss.
    kl_out = fdpo.TDPOLoss(beta=0.5, variant="tdpo1", backend=backend)(hidden4, labels4, head, ref_hidden=ref4,
                                                                       ref_head=ref_head)
    assert not torch.allclose(kl_out.extras["kl_chosen"], out.extras["kl_chosen"], rtol=1e-2)
    explicit = fdpo.TDPOLoss(beta=0.5, variant="tdpo1", backend=backend, token_divergence="forward_kl")
    assert torch.equal(explicit(hidden4, labels4, head, ref_hidden=ref4, ref_head=ref_head).loss, kl_out.loss)


def test_tdpo_token_divergence_is_validated():
    with pytest.raises(ValueError, match="divergence must be one of"):
        fdpo.TDPOLoss(token_divergence="hellinger")
    with pytest.raises(ValueError, match="beta must be a number in"):
        fdpo.TDPOLoss(token_divergence="js", token_beta=2.0)
    assert "token_divergence" not in repr(fdpo.TDPOLoss())


def test_benchmark_divergence_workload_checks_every_implementation():
    """The "divergence" benchmark workload: its float64 reference is checked against the float64 oracle
    here, and naive, fdpo-torch and TRL pass its check; cut-cross-entropy and Liger are reported unavailable."""
    workloads = pytest.importorskip("benchmarks.workloads")
    inputs = workloads.make_inputs("divergence", 64, 301, 24, dtype=torch.float32, device=torch.device("cpu"))
    expected = workloads.float64_reference(inputs)
    hidden, ref_hidden, labels = workloads._rows(inputs)
    want = divergence64(logits64(hidden, inputs.weight), logits64(ref_hidden, inputs.ref_weight), "js",
                        beta=workloads.JS_BETA).masked_fill(labels == -100, 0.0)
    torch.testing.assert_close(expected[0], want)
    assert want.max() > 1e-2
    for name in ("naive", "fdpo-torch", "trl"):
        errors = workloads.check(workloads.REGISTRY[name].build(), inputs, expected)
        assert max(errors.values()) < 1e-4, (name, errors)
    for name in ("cce", "liger"):
        assert workloads.unavailable(name, torch.device("cpu"), "divergence") is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_scored_token_gives_zeros_and_zero_gradients(backend):
    tensors, labels = make_inputs()
    ignored = torch.full_like(labels, -100)
    value, grads = value_and_grads(backend, tensors, ignored, "js", beta=0.3, upstream=upstream_grad())
    assert torch.equal(value, torch.zeros(N))
    assert all(torch.count_nonzero(g) == 0 for g in grads)


def test_reference_backend_differentiates_twice():
    """Only the naive backend builds a graph of its gradient (a gradient penalty), as for fdpo.token_kl."""
    tensors, labels = make_inputs()
    hidden = tensors[0].clone().requires_grad_(True)
    out = call("reference", (hidden, *tensors[1:]), labels, "alpha", alpha=0.3)
    (grad,) = torch.autograd.grad(out.sum(), hidden, create_graph=True)
    (second,) = torch.autograd.grad(grad.square().sum(), hidden)
    assert torch.isfinite(second).all() and second.abs().max() > 0


@pytest.mark.parametrize("backend,options", [("torch", {}), ("reference", {}), ("triton", {}),
                                             ("triton", {"backward_buffer_bytes": 7 * V * 4})])
def test_mixed_dtype_heads(backend, options):
    """A head whose weight dtype differs from its hidden states' (docs/math.md 13) is multiplied in float32
    on every backend (both triton backwards), the policy's and the reference's."""
    (hidden, weight, bias, ref_hidden, ref_weight, ref_bias), labels = make_inputs(scale=1.5)
    tensors = (hidden, weight.bfloat16(), bias.bfloat16(), ref_hidden.bfloat16(), ref_weight, ref_bias)
    upstream = upstream_grad()
    value, grads = value_and_grads(backend, tensors, labels, "js", beta=0.3, upstream=upstream, **options)
    want, leaves = oracle(tensors, labels, "js", beta=0.3)
    (want * upstream.double()).sum().backward()
    assert_close(value, want, 3e-6, f"{backend} mixed heads value")
    for name, got, leaf in zip(("hidden", "weight", "bias"), grads, leaves, strict=True):
        assert got.dtype == (torch.float32 if name == "hidden" else torch.bfloat16)
        assert_close(got, leaf.grad, 1e-5 if name == "hidden" else 1e-2, f"{backend} mixed heads d{name}")


# ---------------------------------------------------------------------------------------------
# with_entropy: the policy's entropy from the divergence's first vocabulary pass (docs/math.md 7, 12).


def entropy64(z: torch.Tensor) -> torch.Tensor:
    """float64 [...] entropy -sum_v p_v log p_v of softmax(z), z [..., V] materialized (0 log 0 = 0)."""
    return entropy_of_logp(torch.log_softmax(z, -1))


def entropy_tolerance(backend, dtype):
    """Norm-wise relative tolerance of the entropy against float64: fp32 accumulation (measured on CPU
    <= 1e-7 on every backend in fp32, and on the fused ones in bf16, whose fp32 logits of bf16 inputs
    are exact); the reference backend in bf16 rounds its logits to bf16 (measured 2.9e-4)."""
    return 1e-2 if backend == "reference" and dtype == torch.bfloat16 else 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("divergence,alpha,beta", CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_from_the_first_pass_matches_float64(backend, divergence, alpha, beta, dtype):
    """Both heads with bias, soft cap, temperature and logit scale, odd N, V, D, ignored tokens: the entropy
    against float64, and the divergence and its gradients exactly those of the call without the entropy."""
    tensors, labels = make_inputs(dtype, scale=1.5)
    hidden, weight, bias, *_ = tensors
    options = dict(logit_scale=1.7, ref_logit_scale=0.6, deterministic=True)
    upstream = upstream_grad()
    value, grads = value_and_grads(backend, tensors, labels, divergence, alpha, beta, upstream=upstream, **options)
    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias)]
    with_entropy, entropy = call(backend, (*leaves, *tensors[3:]), labels, divergence, alpha, beta,
                                 with_entropy=True, **options)
    (with_entropy * upstream).sum().backward()
    assert torch.equal(with_entropy.detach(), value), f"{backend} {divergence}: the flag changed the divergence"
    for name, got, want in zip(("hidden", "weight", "bias"), (t.grad for t in leaves), grads, strict=True):
        assert torch.equal(got, want), f"{backend} {divergence}: the flag changed d{name}"
    z = logits64(hidden, weight.double() * 1.7, bias.double() * 1.7, SOFTCAP, TEMPERATURE)
    want = entropy64(z).masked_fill(labels == -100, 0)
    assert entropy.dtype == torch.float32 and entropy.shape == labels.shape
    assert not entropy.requires_grad and torch.all(entropy[labels == -100] == 0)
    assert want[labels != -100].min() > 0.5, "the entropies must not be trivially small"
    assert_close(entropy, want, entropy_tolerance(backend, dtype), f"{backend} {divergence} entropy")


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_has_no_gradient(backend):
    """The entropy is a constant for autograd on every backend: asking for its gradient raises, and adding it
    to the divergence leaves the divergence's gradient as it is."""
    tensors, labels = make_inputs(scale=1.5)
    hidden = tensors[0].clone().requires_grad_(True)
    value, entropy = call(backend, (hidden, *tensors[1:]), labels, "js", beta=0.3, with_entropy=True)
    assert value.requires_grad and not entropy.requires_grad and entropy.grad_fn is None
    with pytest.raises(RuntimeError, match="does not require grad"):
        torch.autograd.grad(entropy.sum(), hidden)
    (together,) = torch.autograd.grad((value + entropy).sum(), hidden)
    (alone,) = torch.autograd.grad(call(backend, (hidden, *tensors[1:]), labels, "js", beta=0.3).sum(), hidden)
    assert_close(together, alone, 1e-6, f"{backend} gradient of divergence + entropy")


@pytest.mark.parametrize("backend", FUSED)
def test_entropy_stays_accurate_at_extreme_logits(backend):
    """Logits offset by 1e3 (an LSE - E_p[z] form would cancel them to ~6e-5) and nearly one-hot
    distributions (logits of spread ~1e3, entropies near 0): absolutely accurate to float32 rounding of z."""
    (hidden, weight, bias, ref_hidden, ref_weight, ref_bias), labels = make_inputs(scale=1.5)
    shifted = (hidden, weight, bias + 1000.0, ref_hidden, ref_weight, ref_bias - 1000.0)
    spread, spread_labels = make_inputs(scale=60.0)
    for tensors, labels_ in ((shifted, labels), (spread, spread_labels)):
        _, entropy = call(backend, tensors, labels_, "reverse_kl", softcap=None, ref_softcap=None, with_entropy=True)
        want = entropy64(logits64(*tensors[:3], None, TEMPERATURE)).masked_fill(labels_ == -100, 0)
        assert torch.all(entropy >= 0) and (entropy.double() - want).abs().max() < 2e-3, backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_entropy_is_reduced_as_the_loss(backend):
    """TokenDivergenceLoss(..., with_entropy=True): the mean over scored tokens, per-sequence sums of padded and
    packed layouts, each the per-token entropy of token_divergence reduced the same way."""
    (hidden, weight, bias, ref_hidden, ref_weight, ref_bias), labels = make_inputs(scale=1.5)
    head, ref_head = fdpo.LMHead(weight, bias, SOFTCAP, TEMPERATURE), fdpo.LMHead(ref_weight, ref_bias)
    _, per_token = call(backend, (hidden, weight, bias, ref_hidden, ref_weight, ref_bias), labels, "tv",
                        ref_softcap=None, ref_temperature=TEMPERATURE, with_entropy=True)
    mean_fn = TokenDivergenceLoss("tv", backend=backend)
    loss, mean_entropy = mean_fn(hidden, labels, head, ref_hidden=ref_hidden, ref_head=ref_head, with_entropy=True)
    assert torch.equal(loss, mean_fn(hidden, labels, head, ref_hidden=ref_hidden, ref_head=ref_head))
    torch.testing.assert_close(mean_entropy, per_token.sum() / (labels != -100).sum(), rtol=1e-6, atol=0)
    sums_fn = TokenDivergenceLoss("tv", reduction="sequence", backend=backend)
    hidden3, ref3, labels3 = hidden[:28].view(4, 7, D), ref_hidden[:28].reshape(4, 7, D_REF), labels[:28].view(4, 7)
    _, padded = sums_fn(hidden3, labels3, head, ref_hidden=ref3, ref_head=ref_head, with_entropy=True)
    _, packed = sums_fn(hidden[:28], labels[:28], head, ref_hidden=ref_hidden[:28], ref_head=ref_head,
                        cu_seqlens=torch.tensor([0, 7, 14, 21, 28]), with_entropy=True)
    torch.testing.assert_close(padded, per_token[:28].view(4, 7).sum(1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(packed, padded, rtol=1e-6, atol=1e-6)


def test_with_entropy_must_be_a_bool():
    tensors, labels = make_inputs()
    for flag in ("yes", 1, None):
        with pytest.raises(TypeError, match="with_entropy must be True or False"):
            call("torch", tensors, labels, "tv", with_entropy=flag)


@pytest.mark.parametrize("backend", BACKENDS)
def test_partitioned_heads_are_checked_read_and_differentiated_inside_their_gathers(backend):
    """ZeRO-3 partitions both heads' weights (empty outside their gathers): the divergence is checked,
    computed and differentiated inside the gathers, as unpartitioned heads give it. A reference detached
    before its gather would keep the empty data that the gather never refills."""
    tensors, labels = make_inputs()
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias = tensors
    loss = TokenDivergenceLoss("js", beta=0.3, reduction="sequence", backend=backend)
    upstream = upstream_grad()[None]

    def value_and_grads(weight_leaf, ref_weight_leaf, gather=None, ref_gather=None):
        h = hidden.detach().clone().requires_grad_(True)
        policy = fdpo.LMHead(weight_leaf, bias, SOFTCAP, TEMPERATURE, gather=gather)
        ref = fdpo.LMHead(ref_weight_leaf, ref_bias, REF_SOFTCAP, REF_TEMPERATURE, gather=ref_gather)
        value = loss(h[None], labels[None], policy, ref_hidden=ref_hidden[None], ref_head=ref)
        return value.detach(), torch.autograd.grad((value * upstream.sum()).sum(), [h, weight_leaf])

    want, want_grads = value_and_grads(weight.detach().clone().requires_grad_(True), ref_weight)
    part, ref_part = Partitioned(weight), Partitioned(ref_weight)
    got, grads = value_and_grads(part.param, ref_part.param, part.gather, ref_part.gather)
    assert part.param.numel() == ref_part.param.numel() == 0, "both partitioned again after the backward"
    assert_close(got, want, 1e-6, "partitioned heads: value")
    for g, w, name in zip(grads, want_grads, ("d hidden", "d weight"), strict=True):
        assert_close(g, w, 1e-5, f"partitioned heads: {name}")


@pytest.mark.parametrize("backend", FUSED)
def test_changing_the_reference_in_place_before_backward_raises(backend):
    tensors, labels = make_inputs()
    hidden, weight, _, ref_hidden, ref_weight, _ = tensors
    hidden = hidden.detach().clone().requires_grad_(True)
    ref_hidden = ref_hidden.clone()
    out = token_divergence(hidden, weight, ref_hidden, ref_weight, labels, divergence="forward_kl", backend=backend)
    ref_hidden.mul_(3.0)
    with pytest.raises(RuntimeError, match="modified in place between the forward and the backward"):
        out.sum().backward()


def test_an_alpha_below_float32_range_is_the_forward_kl():
    """alpha * d in float32 would be denormal (a few % off) or 0 (NaN): such an alpha is its limit."""
    assert DivergenceSpec.of("alpha", alpha=1e-300) == DivergenceSpec.of("alpha", alpha=1e-44) \
        == DivergenceSpec("forward_kl")
    assert DivergenceSpec.of("alpha", alpha=1e-20) == DivergenceSpec("alpha", 1e-20)
    assert DivergenceSpec.of("js", beta=1e-300) == DivergenceSpec("js", 1e-300), "js has no such limit"
    tensors, labels = make_inputs()
    want, _ = oracle(tensors, labels, "forward_kl")
    assert_close(call("torch", tensors, labels, "alpha", alpha=1e-44), want, 1e-5, "alpha=1e-44")


def test_mean_counts_the_scored_tokens_of_uint8_labels():
    """-100 as a uint8 is 156: a label 156 is scored, and counted by the mean."""
    tensors, _ = make_inputs()
    hidden, weight, _, ref_hidden, ref_weight, _ = tensors
    labels = torch.full((N,), 156, dtype=torch.uint8)
    labels[::3] = 7
    per_token = token_divergence(hidden, weight, ref_hidden, ref_weight, labels.long(), divergence="forward_kl",
                                 backend="torch")
    mean = TokenDivergenceLoss("forward_kl", backend="torch")(hidden, labels, fdpo.LMHead(weight),
                                                               ref_hidden=ref_hidden, ref_head=fdpo.LMHead(ref_weight))
    assert_close(mean, per_token.mean(), 1e-6, "mean over uint8 labels")


def test_torch_deterministic_mode_orders_the_triton_backward(monkeypatch):
    """torch.use_deterministic_algorithms(True) (TRL's full_determinism) makes the fused backward add in
    a fixed order, as deterministic=True does."""
    import fdpo.kernels as kernels

    seen = []
    original = kernels.token_divergence_backward

    def spy(*args, deterministic, **kwargs):
        seen.append(deterministic)
        return original(*args, deterministic=deterministic, **kwargs)

    monkeypatch.setattr(kernels, "token_divergence_backward", spy)
    tensors, labels = make_inputs()
    hidden, weight, _, ref_hidden, ref_weight, _ = tensors
    hidden = hidden.detach().clone().requires_grad_(True)
    for mode in (False, True):
        torch.use_deterministic_algorithms(mode)
        try:
            out = token_divergence(hidden, weight, ref_hidden, ref_weight, labels, divergence="js", backend="triton",
                                   backward_buffer_bytes=0)
            out.sum().backward()
        finally:
            torch.use_deterministic_algorithms(False)
    assert seen == [False, True]


def nan_row_inputs(side: str, row: int = 3):
    """make_inputs with one NaN in the `side` ("policy" or "reference") hidden state of scored row `row`."""
    tensors, labels = make_inputs()
    tensors = [t.clone() for t in tensors]
    tensors[0 if side == "policy" else 3][row, 1] = math.nan
    labels[row] = 0
    return tuple(tensors), labels


def assert_only_row_is_nan(value, grads, row, where):
    """value[row] and the row's hidden-state gradient NaN (weight and bias gradients NaN too: the row
    feeds them), every other row finite."""
    others = torch.arange(N) != row
    assert torch.isnan(value[row]), f"{where}: divergence of the NaN row is {value[row].item()}"
    assert torch.isfinite(value[others]).all(), f"{where}: a NaN leaked into other rows' divergences"
    d_hidden, d_weight, d_bias = grads
    assert torch.isnan(d_hidden[row]).all(), f"{where}: finite hidden-state gradient of the NaN row"
    assert torch.isfinite(d_hidden[others]).all(), f"{where}: a NaN leaked into other rows' gradients"
    assert torch.isnan(d_weight).any() and torch.isnan(d_bias).any(), f"{where}: finite weight / bias gradients"


@pytest.mark.parametrize("backend,options", [
    ("torch", {}), ("reference", {}), ("triton", dict(backward_buffer_bytes=0)),
    ("triton", dict(deterministic=True, backward_buffer_bytes=0)), ("triton", dict(backward_buffer_bytes=7 * V * 4))],
    ids=["torch", "reference", "triton-fused", "triton-ordered", "triton-split"])
def test_tv_with_a_nan_reference_gives_nan_gradients(backend, options):
    """TV's gradient p (sign(p - q) - E_p[sign]) / 2 with a NaN q: a sign that maps NaN to 0 (torch.sign, or
    comparisons) gave a finite policy gradient (0) for a NaN divergence; NaN in, NaN out on every backend."""
    tensors, labels = nan_row_inputs("reference")
    value, grads = value_and_grads(backend, tensors, labels, "tv", upstream=upstream_grad(), **options)
    assert_only_row_is_nan(value, grads, 3, backend)


@pytest.fixture
def gpu_min_max(monkeypatch):
    """Triton's interpreter with the compiled kernels' float min / max: tl.minimum / tl.maximum without
    propagate_nan return the other operand of a NaN (PTX min.f32 / max.f32, numpy's fmin / fmax), where
    the stock interpreter's np.minimum / np.maximum propagate it and hide a NaN-dropping site. (Its
    tl.max / tl.min reductions already drop NaN, as on the GPU.)"""
    import numpy as np
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    monkeypatch.setattr(builder, "create_minnumf", lambda self, lhs, rhs: self.binary_op(lhs, rhs, np.fmin))
    monkeypatch.setattr(builder, "create_maxnumf", lambda self, lhs, rhs: self.binary_op(lhs, rhs, np.fmax))


@pytest.mark.parametrize("divergence,alpha,beta", CASES)
@pytest.mark.parametrize("side", ["policy", "reference"])
def test_a_nan_hidden_state_gives_nan_under_the_gpu_min_max(gpu_min_max, side, divergence, alpha, beta):
    """A NaN in one row's policy or reference hidden state gives that row a NaN divergence and NaN gradients
    with the GPU's NaN-dropping min / max (tests/test_aot.py checks the compiled kernels have none left but the
    online maxima): a NaN log-prob clamped by a plain min became 0 (p = 1), a finite JS of 15 > log 2."""
    tensors, labels = nan_row_inputs(side)
    for options in (dict(backward_buffer_bytes=0), dict(backward_buffer_bytes=7 * V * 4)):
        value, grads = value_and_grads("triton", tensors, labels, divergence, alpha, beta, upstream=upstream_grad(),
                                       **options)
        assert_only_row_is_nan(value, grads, 3, f"{divergence}, NaN {side} hidden state, {options}")


# A vocabulary mask: bias entries of -inf (docs/math.md 8, 12). Every divergence follows 0 log 0 = 0; the
# forward KL is +inf where the policy alone masks an entry, the reverse KL where the reference alone
# does, both constants with zero gradient. Each backward strategy of the triton backend is checked.

MASK_BACKENDS = {
    "triton fused": ("triton", {}),
    "triton ordered": ("triton", {"deterministic": True}),
    "triton split": ("triton", {"backward_buffer_bytes": 7 * V * 4}),
    "torch": ("torch", {}),
    "reference": ("reference", {}),
}
# (which heads mask, what): 7 columns spread over the vocabulary, or all but 5 columns of the last
# interpreter tile (the first tile, and the torch backend's first chunk below patched to 128 columns,
# then hold nothing but -inf).
MASKS = {"both heads, a few": ("both", "few"), "policy, a few": ("policy", "few"),
         "reference, a few": ("reference", "few"), "both heads, all but a few": ("both", "most")}
MASK_CASES = [(mask, torch.float32) for mask in MASKS] + [
    ("policy, a few", torch.bfloat16), ("both heads, all but a few", torch.bfloat16)]


def masked_vocabulary_inputs(dtype, heads, extent):
    """make_inputs with -inf bias entries in one head or both, never at a scored label."""
    tensors, labels = make_inputs(dtype, scale=1.5)
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias = tensors
    if extent == "few":
        free = sorted(set(range(V)) - set(labels[labels != -100].tolist()))
        masked = torch.tensor([free[i] for i in torch.linspace(0, len(free) - 1, 7).long()])
    else:
        keep = torch.tensor([130, 141, 150, 166, 172])
        scored = labels != -100
        labels[scored] = keep[torch.randint(0, len(keep), (int(scored.sum()),),
                                            generator=torch.Generator().manual_seed(3))]
        masked = torch.tensor(sorted(set(range(V)) - set(keep.tolist())))
    if heads in ("both", "policy"):
        bias = bias.clone()
        bias[masked] = float("-inf")
    if heads in ("both", "reference"):
        ref_bias = ref_bias.clone()
        ref_bias[masked] = float("-inf")
    return (hidden, weight, bias, ref_hidden, ref_weight, ref_bias), labels, masked


@pytest.mark.parametrize("mask,dtype", MASK_CASES, ids=[f"{m}-{str(d)[6:]}" for m, d in MASK_CASES])
@pytest.mark.parametrize("divergence,alpha,beta", CASES)
@pytest.mark.parametrize("backend", MASK_BACKENDS)
def test_a_vocabulary_mask_gives_0_log_0_values_and_finite_gradients(backend, divergence, alpha, beta, mask, dtype,
                                                                     monkeypatch):
    """Values (+inf exactly where the float64 reference is), the policy's entropy and every gradient
    against float64 with the same convention, no soft cap (it would turn -inf into a finite -c); the
    masked bias entries get exactly zero gradient."""
    monkeypatch.setattr(chunked, "CPU_CHUNK_VOCAB", 128)
    name, options = MASK_BACKENDS[backend]
    heads, extent = MASKS[mask]
    tensors, labels, masked = masked_vocabulary_inputs(dtype, heads, extent)
    plain = dict(softcap=None, ref_softcap=None)
    upstream = upstream_grad()
    hidden, weight, bias, *ref = tensors
    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias)]
    value, entropy = call(name, (*leaves, *ref), labels, divergence, alpha, beta, with_entropy=True, **plain,
                          **options)
    (value * upstream).sum().backward()
    want, want_leaves = oracle(tensors, labels, divergence, alpha, beta, **plain)
    (want * upstream.double()).sum().backward()
    scored = labels != -100
    infinite = (divergence, heads) in (("forward_kl", "policy"), ("reverse_kl", "reference"))
    assert torch.isposinf(want[scored]).all() == infinite
    value_tol, grad_tol = tolerances(name, dtype)
    assert_close_extended(value.detach(), want, value_tol, f"{backend} {divergence} value")
    assert torch.all(value[~scored] == 0)
    z = logits64(hidden, weight, bias, temperature=TEMPERATURE)
    assert_close(entropy, entropy64(z).masked_fill(~scored, 0),
                 entropy_tolerance(name, dtype), f"{backend} {divergence} entropy")
    for what, leaf, want_leaf in zip(("hidden", "weight", "bias"), leaves, want_leaves, strict=True):
        assert leaf.grad.dtype == dtype
        assert_close(leaf.grad, want_leaf.grad, grad_tol, f"{backend} {divergence} d{what}")
    if heads != "reference":
        assert torch.all(leaves[2].grad[masked] == 0), "a masked (-inf) bias entry gets zero gradient"


@pytest.mark.parametrize("backend", FUSED)
def test_the_kl_of_nearly_equal_heads_with_large_logits_is_as_exact_as_the_naive_log_softmax(device, backend):
    """Logits around 30-60 (LSE ~ 55: one float32 ulp 4e-6) and a reference 1e-4 away from the policy
    (KL ~ 6e-7 per token): `token_kl`'s and `token_divergence`'s KLs take the difference of the two LSEs
    from their maxima and sums (docs/math.md 6), not from the two rounded LSEs, which put 1e-5 of noise on
    every token. Bound: the naive float32 log-softmax difference's own error, doubled, and at most 1e-6."""
    g = torch.Generator().manual_seed(0)
    rows, vocab, dim = 256, 300, 32
    hidden = 4 * torch.randn(1, rows, dim, generator=g)
    weight = 0.6 * torch.randn(vocab, dim, generator=g)
    ref_weight = weight + 1e-4 * torch.randn(vocab, dim, generator=g)
    bias = torch.full((vocab,), 30.0)
    labels = torch.randint(0, vocab, (1, rows), generator=g)
    lp, lq = (torch.log_softmax(logits64(hidden, w, bias), -1)[0] for w in (weight, ref_weight))
    want = {"forward_kl": (lq.exp() * (lq - lp)).sum(-1), "reverse_kl": (lp.exp() * (lp - lq)).sum(-1)}
    lp32, lq32 = (torch.log_softmax(hidden[0] @ w.T + bias, -1).double() for w in (weight, ref_weight))
    naive = (lq32.exp() * (lq32 - lp32)).sum(-1)
    bound = min(1e-6, 2 * (naive - want["forward_kl"]).abs().max().item())
    assert want["forward_kl"].mean() < 1e-6
    on = {"bias": bias.to(device), "ref_bias": bias.to(device), "backend": backend}
    hidden, weight, ref_weight, labels = (t.to(device) for t in (hidden, weight, ref_weight, labels))
    kl = fdpo.token_kl(hidden, weight, hidden, ref_weight, labels, **on)[2][0]
    assert (kl.double().cpu() - want["forward_kl"]).abs().max() <= bound
    for name, value in want.items():
        got = token_divergence(hidden, weight, hidden, ref_weight, labels, divergence=name, **on)[0]
        assert (got.double().cpu() - value).abs().max() <= bound, name
