"""The head's compute dtype (`fdpo.LMHead.compute_dtype`, docs/math.md 13) and torch.autocast.

float32 hidden states and weight with compute_dtype bfloat16 (or float16) are multiplied as the
tensor cores of a GPU multiply them: each operand rounded to the compute dtype (tile by tile, never
a copy of the weight), products accumulated in float32, the bias added in float32 as given. Every
backend must then match float64 on the rounded operands to float32-accumulation precision, and
differ from the float32 products. Gradients come back in float32; the fused backends round dz to
the compute dtype before their two GEMMs, so their gradients are checked against float64 GEMMs of
the rounded dz (the reference backend, plain autograd, against the exact float64 gradients).
Without an explicit compute_dtype, an active torch.autocast picks it, the reference head's too;
an explicit one wins.
"""

from contextlib import nullcontext

import pytest
import torch
import triton
import triton.language as tl

import fdpo
from fdpo.heads import HeadInput, LMHead, autocast_compute_dtype, head_compute_dtype
from fdpo.integrations.trl.head import HeadCall, HeadSettings
from fdpo.kernels.tiles import compute_cast, interpreter_round

from float64_reference import assert_close, leaf64, relative_error, token_stats64

BACKENDS = ("torch", "triton", "reference")
COMPUTE = (torch.bfloat16, torch.float16)
# Norm-wise relative error of fp32 accumulation (values), and of the rounded-dz GEMMs' summation (gradients).
VALUE_TOL = 1e-5
GRAD_TOL = 1e-4
# The triton backend's backwards: fused (atomics, no scratch), ordered (fused, fixed-order sums) and
# split (a dz buffer of a few rows).
TRITON_BACKWARDS = {"fused": {"backward_buffer_bytes": 0},
                    "ordered": {"backward_buffer_bytes": 0, "deterministic": True},
                    "split": {"backward_buffer_bytes": 4096}}
# (backend, triton backward): every backward there is.
BACKWARDS = [("torch", None), ("reference", None), *(("triton", name) for name in TRITON_BACKWARDS)]


def make_head(device: torch.device, seed: int = 0, lead=(3, 29), dim: int = 72, vocab: int = 200, *,
              scale: float = 2.0):
    """float32 hidden [*lead, D], weight [V, D], bias [V] and labels [*lead] with ignored tokens, on `device`.

    Odd sizes, each larger than one interpreter block (64 rows, 128 columns, 64 of D), so that masks
    and loops run; values large enough that rounding to 16 bits changes the logits measurably. Drawn
    on the CPU (the same values on every device), then moved; the float64 references are computed
    from them where they are.
    """
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, dim, generator=g) * scale
    weight = torch.randn(vocab, dim, generator=g) / dim ** 0.5 * scale
    bias = torch.randn(vocab, generator=g)
    labels = torch.randint(0, vocab, lead, generator=g)
    labels[0, :4] = -100
    labels[-1, -3:] = -100
    return tuple(t.to(device) for t in (hidden, weight, bias, labels))


def rounded64(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A float64 leaf holding t rounded to `dtype` (the operand a product in `dtype` reads)."""
    return leaf64(t.to(dtype))


def backward_options(backend: str, backward: str | None) -> dict:
    """The keyword arguments that pick the triton backend's `backward` (none on the other backends)."""
    return TRITON_BACKWARDS[backward] if backend == "triton" else {}


def fused_grads64(hidden, weight, bias, labels, dtype, softcap, temperature, exact: bool):
    """float64 log-probs on the rounded operands and their gradients (hidden, weight, bias).

    exact: autograd's; else as the fused backends form them: dz = dL/d(raw logits) rounded to `dtype`,
    then dH = dz W and dW = dz^T H (float64 GEMMs of the rounded operands), dBias the sum of dz.
    """
    h, w, b = rounded64(hidden, dtype), rounded64(weight, dtype), leaf64(bias)
    raw = h @ w.T + b
    raw.retain_grad()
    z = softcap * torch.tanh(raw / softcap) / temperature
    ignored = labels == -100
    logp = torch.log_softmax(z, dim=-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    logp = logp.masked_fill(ignored, 0.0)
    logp.sum().backward()
    if exact:
        return logp.detach(), h.grad, w.grad, b.grad
    dz = raw.grad.to(dtype).double().reshape(-1, raw.shape[-1])
    return (logp.detach(), (dz @ w.detach()).view_as(h), dz.T @ h.detach().reshape(-1, h.shape[-1]),
            raw.grad.reshape(-1, raw.shape[-1]).sum(0))


@pytest.mark.parametrize("dtype", COMPUTE)
@pytest.mark.parametrize("backend,backward", BACKWARDS)
def test_float32_operands_multiplied_in_the_compute_dtype(device, backend, backward, dtype):
    hidden, weight, bias, labels = make_head(device, seed=1)
    head = dict(bias=bias, softcap=30.0, temperature=0.7)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    got = fdpo.token_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], softcap=30.0, temperature=0.7,
                             backend=backend, compute_dtype=dtype, **backward_options(backend, backward))
    got.sum().backward()
    want = fused_grads64(hidden, weight, bias, labels, dtype, 30.0, 0.7, exact=backend == "reference")
    assert_close(got, want[0], VALUE_TOL, "log-probs against float64 on the rounded operands")
    # The cast happens: float32 products are measurably further from the rounded operands' float64 values.
    fp32 = fdpo.token_logprobs(hidden, weight, labels, **head, backend=backend)
    assert relative_error(fp32, want[0]) > 50 * max(relative_error(got, want[0]), VALUE_TOL / 50)
    # dBias sums the float32 dz, except in the split backward, which sums dz as stored in the compute dtype.
    bias_tol = 4e-3 if backward == "split" else GRAD_TOL
    for name, leaf, expected, tol in zip(("hidden", "weight", "bias"), leaves, want[1:], (GRAD_TOL, GRAD_TOL, bias_tol),
                                         strict=True):
        assert leaf.grad.dtype == torch.float32, f"d{name} must come back in float32"
        assert_close(leaf.grad, expected.float(), tol, f"d{name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_sums_and_bf16_hidden_states_with_an_fp32_weight(device, backend):
    """A bfloat16 model with a float32 head (TRL's cast_lm_head_to_fp32 the other way round) asked for
    bfloat16 products: the weight is rounded tile by tile; per-sequence sums follow."""
    hidden, weight, bias, labels = make_head(device, seed=2)
    hidden = hidden.bfloat16()
    got = fdpo.sequence_logprobs(hidden, weight, labels, bias=bias, backend=backend, compute_dtype=torch.bfloat16)
    want = token_stats64(hidden.double(), weight.bfloat16().double(), labels, bias=bias.double())["logprob"].sum(-1)
    assert_close(got, want, VALUE_TOL, "per-sequence sums")


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_head_statistics_each_in_its_compute_dtype(device, backend):
    """KL, entropy and the reference's log-probs with a bfloat16-products policy and a reference in
    float16, then in float32 products (two different compute dtypes in one pass)."""
    hidden, weight, bias, labels = make_head(device, seed=3)
    ref_hidden, ref_weight, ref_bias, _ = make_head(device, seed=4, dim=40)
    policy = fdpo.FusedLMHead(weight, bias, backend=backend, compute_dtype=torch.bfloat16)
    for ref_dtype in (torch.float16, torch.float32):
        ref_head = LMHead(ref_weight, ref_bias, compute_dtype=ref_dtype)
        got = policy(hidden, labels, ref_hidden=ref_hidden, ref_head=ref_head, kl=True, entropy=True)
        want = token_stats64(hidden.bfloat16().double(), weight.bfloat16().double(), labels, bias=bias.double(),
                             ref_hidden=ref_hidden.to(ref_dtype).double(), ref_weight=ref_weight.to(ref_dtype).double(),
                             ref_bias=ref_bias.double())
        for name in ("logprob", "ref_logprob", "kl", "entropy"):
            assert_close(got[name], want[name], VALUE_TOL, f"{name} (reference in {ref_dtype})")


@pytest.mark.parametrize("backend,backward", BACKWARDS)
def test_kl_and_entropy_gradients_in_the_compute_dtype(device, backend, backward):
    hidden, weight, _, labels = make_head(device, seed=5)
    ref_hidden, ref_weight, _, _ = make_head(device, seed=6)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    options = dict(backend=backend, compute_dtype=torch.bfloat16, **backward_options(backend, backward))
    _, _, kl = fdpo.token_kl(h, w, ref_hidden, ref_weight, labels, **options)
    entropy = fdpo.token_entropy(h, w, labels, **options)
    (kl.sum() + 0.5 * entropy.sum()).backward()
    h64, w64 = rounded64(hidden, torch.bfloat16), rounded64(weight, torch.bfloat16)
    want = token_stats64(h64, w64, labels, ref_hidden=ref_hidden.bfloat16().double(),
                         ref_weight=ref_weight.bfloat16().double())
    assert_close(kl, want["kl"], VALUE_TOL, "kl")
    assert_close(entropy, want["entropy"], VALUE_TOL, "entropy")
    (want["kl"].sum() + 0.5 * want["entropy"].sum()).backward()
    # dz rounded to bfloat16 before the GEMMs (not on the reference backend): 2^-9 per element at most.
    tol = 1e-5 if backend == "reference" else 4e-3
    assert_close(h.grad, h64.grad.float(), tol, "dHidden")
    assert_close(w.grad, w64.grad.float(), tol, "dWeight")


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_divergence_in_the_compute_dtype(device, backend):
    hidden, weight, _, labels = make_head(device, seed=7)
    ref_hidden, ref_weight, _, _ = make_head(device, seed=8)
    got = fdpo.token_divergence(hidden, weight, ref_hidden, ref_weight, labels, divergence="forward_kl",
                                backend=backend, compute_dtype=torch.bfloat16)
    want = token_stats64(hidden.bfloat16().double(), weight.bfloat16().double(), labels,
                         ref_hidden=ref_hidden.bfloat16().double(), ref_weight=ref_weight.bfloat16().double())
    assert_close(got, want["kl"], VALUE_TOL, "forward KL")


def logprobs_and_grads(device: torch.device, backend: str, context, **options):
    """(log-probs, dHidden, dWeight) of make_head()'s head on `device` computed inside `context`, backward outside."""
    hidden, weight, bias, labels = make_head(device, seed=9)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with context:
        lp = fdpo.token_logprobs(h, w, labels, bias=bias, backend=backend, **options)
    lp.sum().backward()
    return lp.detach(), h.grad, w.grad


def bf16_autocast(device: torch.device):
    """bfloat16 autocast for `device`'s type (the one whose state the entries read for tensors there)."""
    return torch.autocast(device.type, dtype=torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_picks_the_compute_dtype_and_an_explicit_one_wins(device, backend):
    autocast = logprobs_and_grads(device, backend, bf16_autocast(device))
    explicit = logprobs_and_grads(device, backend, nullcontext(), compute_dtype=torch.bfloat16)
    fp32 = logprobs_and_grads(device, backend, nullcontext())
    # The backward runs outside autocast, yet in the dtype the forward was resolved to.
    for got, want in zip(autocast, explicit, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert relative_error(autocast[0], fp32[0]) > 1e-4
    forced = logprobs_and_grads(device, backend, bf16_autocast(device), compute_dtype=torch.float32)
    for got, want in zip(forced, fp32, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_reaches_the_reference_head(device, backend):
    hidden, weight, _, labels = make_head(device, seed=10)
    ref_hidden, ref_weight, _, _ = make_head(device, seed=11)
    with bf16_autocast(device):
        got = fdpo.token_kl(hidden, weight, ref_hidden, ref_weight, labels, backend=backend)
        divergence = fdpo.token_divergence(hidden, weight, ref_hidden, ref_weight, labels, divergence="js",
                                           backend=backend)
    want = fdpo.token_kl(hidden, weight, ref_hidden, ref_weight, labels, backend=backend, compute_dtype=torch.bfloat16)
    for name, a, b in zip(("logprob", "ref_logprob", "kl"), got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(divergence, fdpo.token_divergence(
        hidden, weight, ref_hidden, ref_weight, labels, divergence="js", backend=backend,
        compute_dtype=torch.bfloat16), rtol=0, atol=0)


def test_modules_under_autocast(device):
    """PreferenceLoss with nn.Linear heads under autocast computes what explicit bfloat16 heads compute."""
    hidden, _, _, labels = make_head(device, seed=12, lead=(4, 11))
    ref_hidden, _, _, _ = make_head(device, seed=13, lead=(4, 11))
    policy, reference = torch.nn.Linear(72, 200).to(device), torch.nn.Linear(72, 200).to(device)
    loss_fn = fdpo.PreferenceLoss(beta=0.1, backend="torch")
    with bf16_autocast(device):
        got = loss_fn(hidden, labels, policy, ref_hidden=ref_hidden, ref_head=reference)
    explicit = [LMHead(m.weight, m.bias, compute_dtype=torch.bfloat16) for m in (policy, reference)]
    want = loss_fn(hidden, labels, explicit[0], ref_hidden=ref_hidden, ref_head=explicit[1])
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=0)
    torch.testing.assert_close(got.policy_chosen, want.policy_chosen, rtol=0, atol=0)
    plain = loss_fn(hidden, labels, policy, ref_hidden=ref_hidden, ref_head=reference)
    assert not torch.equal(plain.policy_chosen, got.policy_chosen)


def test_autocast_compute_dtype_resolves_only_heads_without_one(device):
    hidden, weight, _, _ = make_head(device)
    bare, pinned = HeadInput(hidden, LMHead(weight)), HeadInput(hidden, LMHead(weight, compute_dtype=torch.float32))
    assert head_compute_dtype(autocast_compute_dtype(bare)) == torch.float32
    with bf16_autocast(device):
        assert autocast_compute_dtype(bare).head.compute_dtype == torch.bfloat16
        assert autocast_compute_dtype(pinned) is pinned
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=False):
        assert autocast_compute_dtype(bare) is bare


@pytest.mark.parametrize("cast_fp32", [True, False])
def test_trl_head_cast_lm_head_to_fp32_keeps_float32_products_under_autocast(device, cast_fp32):
    hidden, weight, bias, labels = make_head(device, seed=14)
    settings = HeadSettings(temperature=1.0, softcap=None, scale=1.0, cast_fp32=cast_fp32,
                            outputs=("log_probs", "entropy"), backend="torch")
    call = HeadCall(hidden, labels, weight, bias, settings, nullcontext)
    with bf16_autocast(device):
        got = call.statistics(settings.outputs)
    want = fdpo.token_statistics(hidden, weight, labels, outputs=("entropy",), bias=bias, backend="torch",
                                 compute_dtype=torch.float32 if cast_fp32 else torch.bfloat16)
    torch.testing.assert_close(got["log_probs"], want["logprob"], rtol=0, atol=0)
    torch.testing.assert_close(got["entropy"], want["entropy"], rtol=0, atol=0)


@pytest.mark.parametrize("value,error,match", [
    (torch.float64, ValueError, "compute_dtype must be None, torch.float16, torch.bfloat16 or torch.float32"),
    (torch.int32, ValueError, "compute_dtype must be None"),
    ("bfloat16", TypeError, "compute_dtype must be None or a torch.dtype"),
])
def test_invalid_compute_dtype_raises(device, value, error, match):
    hidden, weight, _, labels = make_head(device)
    with pytest.raises(error, match=match):
        LMHead(weight, compute_dtype=value)
    with pytest.raises(error, match=match):
        fdpo.FusedLMHead(weight, compute_dtype=value)
    with pytest.raises(error, match=match):
        fdpo.token_logprobs(hidden, weight, labels, compute_dtype=value)


def test_a_kl_backward_recomputes_the_reference_at_the_forwards_matmul_precision(monkeypatch):
    """A bf16-products policy with an fp32-products reference under TF32 ("high"): the forward forms
    the reference's tiles (and saves its LSE) at one tl.dot precision; the fused and split KL
    backwards must recompute them at the same one, or p_ref = exp(z_ref - LSE_ref) no longer sums
    to 1. Launches on meta tensors with the GPU's tiles and precisions (not run)."""
    from fdpo.heads import ScoredTokens, StatsGrad, StatsRequest
    from fdpo.kernels import launch
    from fdpo.kernels.head_stats_bwd import head_stats_backward_launches
    from fdpo.kernels.head_stats_fwd import head_stats_forward_launch
    from fdpo.kernels.head_stats_split_bwd import head_stats_dz_launch

    monkeypatch.setattr(launch, "interpreting", lambda: False)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        op = launch.meta_operands(torch.float32, batch=2, seq=64, vocab=1024, dim=256)
        policy = HeadInput(op["hidden"], LMHead(op["weight"], compute_dtype=torch.bfloat16))
        ref = HeadInput(op["hidden"], LMHead(op["weight"], compute_dtype=torch.float32), "ref_")
        tokens = ScoredTokens(op["rows"], op["labels"])
        forward, _ = head_stats_forward_launch(policy, tokens, ref, StatsRequest(kl=True))
        grad = StatsGrad(op["f32"], op["f32"], ref=ref, ref_lse=op["f32"], kl_grad=op["f32"])
        (fused,), _ = head_stats_backward_launches(policy, tokens, grad)
        dz = torch.empty(op["rows"].numel(), 1024, dtype=torch.bfloat16, device="meta")
        split = head_stats_dz_launch(policy, tokens, grad, dz)
    finally:
        torch.set_float32_matmul_precision(previous)
    assert forward.constexprs["INPUT_PRECISION"] == "tf32"
    assert fused.constexprs["INPUT_PRECISION"] == "tf32"
    assert split.constexprs["INPUT_PRECISION"] == "tf32"



@triton.jit
def _round_kernel(x_ptr, rounded_ptr, cast_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    x = tl.load(x_ptr + offs)
    tl.store(rounded_ptr + offs, interpreter_round(x, tl.bfloat16))
    tl.store(cast_ptr + offs, compute_cast(x, tl.bfloat16))


@triton.jit
def _widen_kernel(x_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, interpreter_round(tl.load(x_ptr + offs), tl.float32))


def test_the_interpreters_rounding_is_torchs_for_every_bfloat16_and_nan_pattern(device):
    """`tiles.interpreter_round` / `compute_cast` (the interpreter's stand-ins for the GPU's
    conversions) against torch's round-to-nearest-even: every bfloat16 bit pattern widened, and
    float32 patterns (random, bf16 subnormals, NaNs with a payload only in the low bits) rounded.
    A NaN must stay NaN; everything else bit for bit. Run where the kernels run: on a GPU the kernels are
    compiled, so `compute_cast` is the GPU's own conversion and `interpreter_round` the same bit arithmetic."""

    def same(got: torch.Tensor, want: torch.Tensor) -> bool:
        got, want = got.float(), want.float()
        nan = want.isnan()
        return bool((got.isnan() == nan).all() and (got[~nan].view(torch.int32) == want[~nan].view(torch.int32)).all())

    every_bf16 = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).to(device)
    widened = torch.empty(every_bf16.numel(), device=device)
    _widen_kernel[(1,)](every_bf16, widened, every_bf16.numel())
    assert same(widened, every_bf16.float()), "bfloat16 widened"

    generator = torch.Generator().manual_seed(0)
    patterns = torch.randint(-2**31, 2**31 - 1, (2**16,), generator=generator, dtype=torch.int64).to(torch.int32)
    patterns[:6] = torch.tensor([0x7F800001, -0x007FFFFF, 0x7FFFFFFF, -1, 0x005E565A, 0x00008000], dtype=torch.int32)
    x = patterns.view(torch.float32).to(device)
    rounded, cast = torch.empty_like(x), torch.empty(x.numel(), dtype=torch.bfloat16, device=device)
    _round_kernel[(1,)](x, rounded, cast, x.numel())
    assert same(rounded, x.to(torch.bfloat16)), "interpreter_round"
    assert same(cast, x.to(torch.bfloat16)), "compute_cast"
