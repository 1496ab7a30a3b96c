"""Numerical robustness of the fused heads on every backend, against independent float64 references.

- A non-finite hidden state (NaN or inf) at one scored token makes exactly its own sequence's sums
  non-finite, as naive PyTorch does, and leaves every other sequence equal to float64: per-sequence
  sums of the one-head path (`sequence_logprobs`, atomic and deterministic) and of the two-head
  statistics (`FusedLMHead` with a reference: the sums TDPO and epsilon-DPO use), padded and packed.
- Entropy at large logits (|z| from ~1e2 to ~1e5) does not cancel. Any fp32 computation starts
  from logits rounded by at most u Z, with u = 2^-24 and Z = max_v sum_d |h_d w_vd| + |b_v| per row
  (up to the accumulation order over D); perturbing each logit by dz_v moves the entropy by
  -sum_v p_v (log p_v + H) dz_v, at most 2 H max|dz|, and log(s) near 1 rounds by u. So per row
  |H - H64| <= u (8 Z H64 + 1), which naive fp32 log_softmax meets; `lse - E_p[z]` does not on
  peaked rows (an absolute error ~u |z| where H ~ 0). The gradient is checked at the same scales.
- Under an outer torch.autocast(bfloat16), every backend forms its products in bfloat16, as an
  nn.Linear does (docs/math.md 13): values and gradients of fp32 and bf16 inputs match float64 on
  the hidden states and weights rounded to bfloat16, within the tolerances of test_logprobs.py
  (those of bf16 heads for the gradients, whose GEMMs read dz rounded to bfloat16).
"""

import itertools

import pytest
import torch
import torch.nn.functional as F

import fdpo
import fdpo.backends.chunked as chunked
from fdpo.head_stats import head_stats
from fdpo.heads import HeadInput, LMHead, StatsRequest, segment_sums

from float64_reference import assert_close, leaf64, logits64, relative_error, token_logprobs64, token_stats64
from preference_reference import preference

FUSED = ("triton", "torch")
BACKENDS = (*FUSED, "reference")
# (backend, deterministic); the reference backend has no deterministic variant of its own.
MODES = [("triton", False), ("triton", True), ("torch", False), ("torch", True), ("reference", False)]
MODE_IDS = ["triton", "triton-deterministic", "torch", "torch-deterministic", "reference"]
DTYPES = [torch.float32, torch.bfloat16]
DTYPE_IDS = ["fp32", "bf16"]
V, D, D_REF = 150, 40, 24
IGNORE = -100
EPS = 0.1
U32 = 2.0**-24


def value_tol(backend: str, dtype: torch.dtype) -> float:
    """test_logprobs.py's value tolerances: fp32 accumulation; the reference in bf16 rounds its logits."""
    return 3e-2 if backend == "reference" and dtype != torch.float32 else 1e-5


def grad_tol(backend: str, dtype: torch.dtype) -> float:
    """test_logprobs.py's gradient tolerances: fp32 accumulation, 16-bit operand and output casts."""
    if dtype == torch.float32:
        return 2e-5
    return 3e-2 if backend == "reference" else 1e-2


def head_inputs(device, dtype, lead, seed=0):
    """Policy (hidden, weight, bias), reference (hidden, weight, bias) and labels with ~20% ignored."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, D, generator=g)
    ref_hidden = hidden[..., :D_REF] + 0.3 * torch.randn(*lead, D_REF, generator=g)
    weight = 0.2 * torch.randn(V, D, generator=g)
    ref_weight = 0.2 * torch.randn(V, D_REF, generator=g)
    bias, ref_bias = torch.randn(V, generator=g), torch.randn(V, generator=g)
    labels = torch.randint(0, V, lead, generator=g)
    labels[torch.rand(lead, generator=g) < 0.2] = IGNORE
    policy = tuple(t.to(device, dtype) for t in (hidden, weight, bias))
    ref = tuple(t.to(device, dtype) for t in (ref_hidden, ref_weight, ref_bias))
    return policy, ref, labels.to(device)


def leaves(tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


# --- 6. a non-finite token stays in its sequence -------------------------------------------------

# The interpreter's numpy warns about the NaN it is fed on purpose.
NON_FINITE_INPUTS = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
# Packed layout: four sequences, the second one empty.
CU_SEQLENS = [0, 5, 5, 12, 21]


def poisoned_batch(device, layout: str, bad: float):
    """Inputs of four sequences whose first token (scored) has `bad` in its policy and reference hidden states.

    Padded: hidden [4, 7, D]; packed: hidden [21, D] with cu_seqlens CU_SEQLENS (None when padded).
    The poisoned token is the very first row, so a prefix sum over rows would carry it into every
    later sequence.
    """
    lead = (4, 7) if layout == "padded" else (CU_SEQLENS[-1],)
    policy, ref, labels = head_inputs(device, torch.float32, lead, seed=4)
    first = (0,) * len(lead)
    labels[first] = 3
    policy[0][(*first, 5)] = bad
    ref[0][(*first, 2)] = bad
    cu = None if layout == "padded" else torch.tensor(CU_SEQLENS, device=device)
    return policy, ref, labels, cu


def per_sequence64(values: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """float64 per-sequence sums of per-token values: rows when padded, cu_seqlens segments when packed."""
    if cu_seqlens is None:
        return values.sum(-1)
    return torch.stack([values[a:b].sum() for a, b in itertools.pairwise(cu_seqlens.tolist())])


def assert_only_first_sequence_non_finite(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert not torch.isfinite(got[0]), f"{what}: the poisoned sequence is finite ({got[0].item()})"
    assert_close(got[1:], want[1:], 1e-5, f"{what} of the other sequences")


@NON_FINITE_INPUTS
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize(("backend", "deterministic"), MODES, ids=MODE_IDS)
def test_a_non_finite_token_poisons_only_its_sequence_logprobs(device, backend, deterministic, layout, bad):
    (hidden, weight, bias), _, labels, cu = poisoned_batch(device, layout, bad)

    def run():
        return fdpo.sequence_logprobs(hidden, weight, labels, bias=bias, cu_seqlens=cu, backend=backend,
                                      deterministic=deterministic)

    got = run()
    want = per_sequence64(token_logprobs64(hidden, weight, labels, bias), cu)
    assert_only_first_sequence_non_finite(got, want, "sequence log-probs")
    if deterministic:
        torch.testing.assert_close(run(), got, rtol=0, atol=0, equal_nan=True, msg="not bitwise repeatable")


@NON_FINITE_INPUTS
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize(("backend", "deterministic"), MODES, ids=MODE_IDS)
def test_a_non_finite_token_poisons_only_its_sequence_statistics(device, backend, deterministic, layout, bad):
    """FusedLMHead's per-sequence two-head statistics (what TDPO and epsilon-DPO sum)."""
    (hidden, weight, bias), (ref_hidden, ref_weight, ref_bias), labels, cu = poisoned_batch(device, layout, bad)
    head = fdpo.FusedLMHead(weight, bias, backend=backend, deterministic=deterministic)
    got = head(hidden, labels, cu_seqlens=cu, per_sequence=True, ref_hidden=ref_hidden,
               ref_head=LMHead(ref_weight, ref_bias), entropy=True, kl=True, eps=EPS)
    want = token_stats64(hidden, weight, labels, bias, ref_hidden, ref_weight, ref_bias, eps=EPS)
    assert set(got) == set(want)
    for name, values in want.items():
        assert_only_first_sequence_non_finite(got[name], per_sequence64(values, cu), name)


def test_segment_sums_isolate_non_finite_values_and_keep_float64_accuracy():
    """Segments longer than any internal block, empty segments, and NaN / inf / inf - inf segments."""
    lengths = [0, 1, 700, 0, 70_000, 3, 257, 4]
    g = torch.Generator().manual_seed(0)
    values = torch.randn(sum(lengths), generator=g) * torch.logspace(-3, 3, sum(lengths))
    seq_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(torch.int32)
    bounds = [0, *itertools.accumulate(lengths)]
    want = torch.stack([values[a:b].double().sum() for a, b in itertools.pairwise(bounds)])
    clean = segment_sums(values, seq_ids, len(lengths))
    assert clean.dtype == torch.float32
    assert_close(clean, want, 1e-7, "segment sums")
    poisoned = values.clone()
    poisoned[bounds[2] + 699] = float("nan")
    poisoned[bounds[4] + 5] = float("inf")
    poisoned[bounds[5]], poisoned[bounds[5] + 2] = float("inf"), float("-inf")
    got = segment_sums(poisoned, seq_ids, len(lengths))
    assert torch.isnan(got[2]) and got[4] == float("inf") and torch.isnan(got[5])
    others = [0, 1, 3, 6, 7]
    assert torch.equal(got[others], clean[others])
    torch.testing.assert_close(segment_sums(poisoned, seq_ids, len(lengths)), got, rtol=0, atol=0,
                               equal_nan=True)


# --- 9. entropy at large logits ------------------------------------------------------------------

SCALES = (1e2, 1e3, 1e4)
ROWS_PER_CASE = 4
V_LARGE, D_LARGE = 300, 64


def large_logit_inputs(device, dtype, seed=0):
    """hidden [N, D], weight [V, D], bias [V] whose logits reach |z| ~ 1e2 .. 1e5.

    Column 0 of the weight is all ones, so hidden[:, 0] shifts every logit of a row by the same
    amount. For each scale s: "peaked" rows are random hidden states times s (logit gaps ~ s, nearly
    one-hot, H tiny: where lse - E_p[z] cancels worst), "offset" rows get +-s in hidden[:, 0] (an O(1)
    spread around a common +-s, H of a few nats).
    """
    g = torch.Generator().manual_seed(seed)
    weight = 0.2 * torch.randn(V_LARGE, D_LARGE, generator=g)
    weight[:, 0] = 1.0
    bias = torch.randn(V_LARGE, generator=g)
    hidden = torch.randn(2 * len(SCALES) * ROWS_PER_CASE, D_LARGE, generator=g)
    for i, scale in enumerate(SCALES):
        peaked = slice(2 * i * ROWS_PER_CASE, (2 * i + 1) * ROWS_PER_CASE)
        offset = slice((2 * i + 1) * ROWS_PER_CASE, (2 * i + 2) * ROWS_PER_CASE)
        hidden[peaked] *= scale
        hidden[offset, 0] = scale * torch.tensor([1.0, -1.0]).repeat(ROWS_PER_CASE // 2)
    return tuple(t.to(device, dtype) for t in (hidden, weight, bias))


def entropy64(z: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(z, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def documented_logits64(hidden, weight, bias, backend):
    """float64 logits of the precision a backend documents, differentiable in float64 copies of the inputs.

    Fused backends: exact products accumulated in fp32, modelled by exact float64 logits. The reference
    backend runs the matmul in the inputs' dtype: for bf16 its logits are F.linear's bf16 ones, the
    rounding applied as a constant offset so that gradients still flow through the exact logits.
    """
    leaves64 = [leaf64(t) for t in (hidden, weight, bias)]
    z = logits64(leaves64[0], leaves64[1], leaves64[2])
    if backend == "reference" and hidden.dtype != torch.float32:
        z = z + (F.linear(hidden, weight, bias).double() - z).detach()
    return z, leaves64


def logit_scales(hidden, weight, bias):
    """Z per row: max_v sum_d |h_d w_vd| + |b_v|, the magnitude fp32 logits are rounded relative to."""
    return (hidden.double().abs() @ weight.double().abs().T + bias.double().abs()).amax(-1)


def entropy_bound(hidden, weight, bias, want):
    """Per row u (8 Z H64 + 1): how far the rounding of fp32 logits may move the entropy (module docstring)."""
    return U32 * (8 * logit_scales(hidden, weight, bias) * want + 1)


def assert_entropy_within_bound(got, want, bound, what):
    assert got.dtype == torch.float32 and torch.isfinite(got).all(), f"{what}: non-finite entropy"
    assert (got >= 0).all(), f"{what}: negative entropy {got.min().item():.3e}"
    ratio = (got.double().cpu() - want.cpu()).abs() / bound.cpu()
    row = int(ratio.argmax())
    assert ratio[row] <= 1, (f"{what}: row {row} entropy {got[row].item():.6e} vs float64 {want[row].item():.6e}, "
                             f"{ratio[row].item():.1f}x the fp32 rounding bound {bound[row].item():.1e}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_does_not_cancel_at_large_logits(device, backend, dtype, monkeypatch):
    monkeypatch.setattr(chunked, "CHUNK_VOCAB", 128)   # the torch backend rescales across chunks too
    hidden, weight, bias = large_logit_inputs(device, dtype)
    z64, _ = documented_logits64(hidden, weight, bias, backend)
    want = entropy64(z64).detach()
    bound = entropy_bound(hidden, weight, bias, want)
    got = fdpo.token_entropy(hidden, weight, bias=bias, backend=backend)
    assert_entropy_within_bound(got, want, bound, "entropy")
    # The two-head pass (entropy next to the KL) accumulates it the same way.
    labels = torch.zeros(hidden.shape[0], dtype=torch.long, device=device)
    head = LMHead(weight, bias)
    both = head_stats(HeadInput(hidden, head), labels, ref=HeadInput(hidden, head, "ref_"),
                      request=StatsRequest(entropy=True, kl=True), backend=backend)
    assert_entropy_within_bound(both.entropy, want, bound, "two-head entropy")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_gradient_at_large_logits(device, backend, dtype, monkeypatch):
    """d(sum g H)/d(hidden, weight, bias) against float64 autograd, at the scales of the test above.

    Recomputing the logits in fp32 moves dH/dz = -p (z - lse + H) by ~u Z p per entry, as it moves naive
    fp32 autograd: the norm-wise bound is 8 u Z over the rows that carry gradient (H > 1e-6; the
    nearly one-hot rows have none), plus the usual 16-bit tolerance.
    """
    monkeypatch.setattr(chunked, "CHUNK_VOCAB", 128)
    hidden, weight, bias = large_logit_inputs(device, dtype)
    upstream = torch.randn(hidden.shape[0], generator=torch.Generator().manual_seed(1)).to(device)
    z64, leaves64 = documented_logits64(hidden, weight, bias, backend)
    want = entropy64(z64)
    (want * upstream.double()).sum().backward()
    inputs = leaves((hidden, weight, bias))
    (fdpo.token_entropy(*inputs[:2], bias=inputs[2], backend=backend) * upstream).sum().backward()
    z_scale = logit_scales(hidden, weight, bias)[want.detach() > 1e-6].max().item()
    tol = 8 * U32 * z_scale + (0.0 if dtype == torch.float32 else grad_tol(backend, dtype))
    for got, want, name in zip(inputs, leaves64, ("dHidden", "dWeight", "dBias"), strict=True):
        assert_close(got.grad, want.grad, tol, name)


# --- 11. autocast picks the products' dtype -------------------------------------------------------


def autocast(device):
    """The outer autocast of TRL / accelerate training loops, on the tests' device."""
    return torch.autocast(device.type, dtype=torch.bfloat16)


def autocast_leaves64(head):
    """float64 leaves of the operands a head multiplies under bfloat16 autocast: (hidden, weight)
    rounded to bfloat16, and the bias as given (added in float32)."""
    hidden, weight, bias = head
    return [leaf64(hidden.bfloat16()), leaf64(weight.bfloat16()), leaf64(bias)]


def forward_and_backward(device, backend, forward):
    """Under autocast: loss, values = forward(), then loss.backward(); returns values.

    The fused backends' backward is also run under autocast (a loop may call backward inside the
    context); the reference's is autograd's, which follows the autocast state it runs under, so it
    runs after the context, as PyTorch recommends.
    """
    with autocast(device):
        loss, values = forward()
        if backend in FUSED:
            loss.backward()
    if backend not in FUSED:
        loss.backward()
    return values


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_sequence", [False, True], ids=["token_logprobs", "sequence_logprobs"])
def test_logprobs_under_autocast(device, backend, dtype, per_sequence):
    policy, _, labels = head_inputs(device, dtype, (3, 9), seed=1)
    fn = fdpo.sequence_logprobs if per_sequence else fdpo.token_logprobs
    hidden, weight, bias = inputs = leaves(policy)
    upstream = torch.randn(labels.shape[:1] if per_sequence else labels.shape,
                           generator=torch.Generator().manual_seed(2)).to(device)
    def forward():
        out = fn(hidden, weight, labels, bias=bias, backend=backend)
        return (out * upstream).sum(), out

    got = forward_and_backward(device, backend, forward)
    leaves64 = autocast_leaves64(policy)
    want = token_logprobs64(*leaves64[:2], labels, leaves64[2])
    want = want.sum(-1) if per_sequence else want
    (want * upstream.double()).sum().backward()
    assert got.dtype == torch.float32
    assert_close(got.detach(), want.detach(), value_tol(backend, dtype), "log-probs")
    for t, t64, name in zip(inputs, leaves64, ("dHidden", "dWeight", "dBias"), strict=True):
        assert t.grad.dtype == dtype
        assert_close(t.grad, t64.grad, grad_tol(backend, torch.bfloat16), name)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_token_statistics_under_autocast(device, backend, dtype):
    """token_kl, token_entropy and perturbed_logprobs, and the gradient of the differentiable ones."""
    policy, ref, labels = head_inputs(device, dtype, (3, 9), seed=2)
    hidden, weight, bias = inputs = leaves(policy)
    ref_hidden, ref_weight, ref_bias = ref
    g = torch.Generator().manual_seed(3)
    up = {name: torch.randn(labels.shape, generator=g).to(device) for name in ("logprob", "kl", "entropy")}
    def forward():
        logprob, ref_logprob, kl = fdpo.token_kl(hidden, weight, ref_hidden, ref_weight, labels, bias=bias,
                                                 ref_bias=ref_bias, backend=backend)
        entropy = fdpo.token_entropy(hidden, weight, labels, bias=bias, backend=backend)
        plus, minus = fdpo.perturbed_logprobs(hidden, weight, ref_hidden, ref_weight, labels, EPS, bias=bias,
                                              ref_bias=ref_bias, backend=backend)
        loss = (up["logprob"] * logprob + up["kl"] * kl + up["entropy"] * entropy).sum()
        return loss, dict(logprob=logprob, ref_logprob=ref_logprob, kl=kl, entropy=entropy, logprob_plus=plus,
                          logprob_minus=minus)

    got = forward_and_backward(device, backend, forward)
    leaves64 = autocast_leaves64(policy)
    want = token_stats64(*leaves64[:2], labels, leaves64[2], *autocast_leaves64(ref), eps=EPS)
    sum((up[name].double() * want[name]).sum() for name in up).backward()
    for name, values in got.items():
        assert values.dtype == torch.float32, name
        assert_close(values.detach(), want[name].detach(), value_tol(backend, dtype), name)
    for t, t64, name in zip(inputs, leaves64, ("dHidden", "dWeight", "dBias"), strict=True):
        assert_close(t.grad, t64.grad, grad_tol(backend, torch.bfloat16), name)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_preference_loss_from_hidden_states_under_autocast(device, backend, dtype):
    """fdpo.PreferenceLoss: 2 pairs, the reference model's hidden states through the policy's head."""
    pairs = 2
    policy, _, labels = head_inputs(device, dtype, (2 * pairs, 9), seed=3)
    labels[:, 0] = 7                                             # every sequence has a scored token
    ref_hidden = (policy[0].float() + 0.3 * torch.randn(policy[0].shape, generator=torch.Generator().manual_seed(5))
                  .to(device)).to(dtype)
    hidden, weight, bias = inputs = leaves(policy)
    def forward():
        out = fdpo.PreferenceLoss(beta=0.1, backend=backend)(hidden, labels, LMHead(weight, bias),
                                                             ref_hidden=ref_hidden)
        return out.loss, out

    out = forward_and_backward(device, backend, forward)
    leaves64 = autocast_leaves64(policy)
    sums = token_logprobs64(*leaves64[:2], labels, leaves64[2]).sum(-1)
    ref_sums = token_logprobs64(ref_hidden.bfloat16(), leaves64[1].detach(), labels, policy[2]).sum(-1)
    want = preference(sums[:pairs], sums[pairs:], ref_sums[:pairs], ref_sums[pairs:], beta=0.1)["loss"]
    want.backward()
    assert out.loss.dtype == torch.float32
    assert_close(out.loss.detach(), want.detach(), value_tol(backend, dtype), "loss")
    assert relative_error(out.policy_chosen, sums[:pairs]) <= value_tol(backend, dtype)
    for t, t64, name in zip(inputs, leaves64, ("dHidden", "dWeight", "dBias"), strict=True):
        assert_close(t.grad, t64.grad, grad_tol(backend, torch.bfloat16), name)
