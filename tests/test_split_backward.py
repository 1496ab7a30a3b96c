"""The split-K backward (kernels/head_stats_split_bwd.py) against float64 and against the fused backward.

Per chunk of C scored rows a Triton kernel writes dz [C, V] in the head's dtype and torch GEMMs
form dH[chunk] = dz W and dW += dz^T H[chunk] (on CPU: fp32 matmuls, the kernel interpreted).
Shapes are odd (V = 203, D = 24, D_ref = 20, R = 89 scored rows out of 3 x 37 tokens) and span
several interpreter tiles in rows and vocabulary; chunk sizes include 1 row, 7 rows (not dividing
R), all rows and more than all rows.

Tolerances (norm-wise relative error against float64 on the same, already-rounded inputs), as in
test_logprobs.py: fp32 gradients ~1e-6 (bound 2e-5); bf16 ones see dz rounded to bf16 before the
GEMMs (2^-9 per element, as the fused backward does), bound 1e-2. Against the fused backward on
the same inputs both multiply the same rounded dz and products of bf16 values are exact in fp32:
only the fp32 summation order differs (bound 1e-6), except dBias, which the fused kernel sums from
the unrounded fp32 dz (bf16 bound 1e-2).
"""

import math
from dataclasses import replace

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import fdpo
import fdpo.kernels as kernels
import fdpo.kernels.head_stats_split_bwd as split_bwd
from fdpo.heads import HeadInput, LMHead, ScoredTokens, StatsGrad
from fdpo.kernels.head_stats_split_bwd import chunk_rows, head_stats_dz_launch, head_stats_split_backward
from fdpo.profiling import AllocationTracker

from float64_reference import assert_close, leaf64, logits64, token_stats64

B, T, V, D, D_REF = 3, 37, 203, 24, 20
TERMS = ("logprob", "kl", "entropy")
HEADS = {
    "plain": dict(bias=False),
    "bias": dict(bias=True),
    "bias+softcap+temperature": dict(bias=True, softcap=4.0, ref_softcap=6.0, temperature=0.7),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def grad_tol(dtype: torch.dtype) -> float:
    return 2e-5 if dtype == torch.float32 else 1e-2


def make_problem(device, dtype=torch.float32, bias=True, softcap=None, ref_softcap=None, temperature=1.0,
                 terms=TERMS, seed=0, lead=(B, T), vocab=V, dim=D, dim_ref=D_REF):
    """Policy and reference heads, scored tokens (~20% ignored), the forward's saved float32 [R]
    statistics (from float64 logits) and random per-row gradients of the `terms`.

    The policy's hidden states are a strided view (hidden[:, 1:] of a longer tensor), read in place.
    Returns (policy, ref, tokens, labels, saved, grads): saved holds lse, ref_lse and entropy; grads
    the per-row gradient of each term, as the backends pass them.
    """
    g = torch.Generator().manual_seed(seed)
    longer = torch.randn(lead[0], lead[1] + 1, dim, generator=g).to(device, dtype)
    hidden = longer[:, 1:]
    weight = (0.3 * torch.randn(vocab, dim, generator=g)).to(device, dtype)
    b = torch.randn(vocab, generator=g).to(device, dtype) if bias else None
    ref_hidden = (hidden.float()[..., :dim_ref] + 0.3 * torch.randn(*lead, dim_ref, generator=g).to(device)).to(dtype)
    ref_weight = (0.3 * torch.randn(vocab, dim_ref, generator=g)).to(device, dtype)
    ref_b = torch.randn(vocab, generator=g).to(device, dtype) if bias else None
    labels = torch.randint(0, vocab, lead, generator=g)
    labels[torch.rand(lead, generator=g) < 0.2] = -100
    labels = labels.to(device)
    flat = labels.reshape(-1)
    rows = (flat != -100).nonzero().squeeze(1)
    tokens = ScoredTokens(rows, flat[rows].to(torch.int32))
    policy = HeadInput(hidden, LMHead(weight, b, softcap, temperature))
    ref = HeadInput(ref_hidden, LMHead(ref_weight, ref_b, ref_softcap, temperature), "ref_")

    def per_row(t):
        return t.reshape(-1)[rows].float().contiguous()

    stats = token_stats64(hidden, weight, labels, b, ref_hidden, ref_weight, ref_b, softcap=softcap,
                          ref_softcap=ref_softcap, temperature=temperature)
    saved = {"lse": per_row(torch.logsumexp(logits64(hidden, weight, b, softcap, temperature), -1)),
             "ref_lse": per_row(torch.logsumexp(logits64(ref_hidden, ref_weight, ref_b, ref_softcap, temperature), -1)),
             "entropy": per_row(stats["entropy"])}
    grads = {term: torch.randn(rows.numel(), generator=g).to(device) for term in terms}
    return policy, ref, tokens, labels, saved, grads


def stats_grad(ref, saved, grads, **need) -> StatsGrad:
    """The terms of head_stats_backward / head_stats_split_backward for the given per-row gradients
    (logprob's zero when not given) and need_* flags."""
    options = {}
    if "kl" in grads:
        options.update(ref=ref, ref_lse=saved["ref_lse"], kl_grad=grads["kl"])
    if "entropy" in grads:
        options.update(entropy=saved["entropy"], entropy_grad=grads["entropy"])
    return StatsGrad(saved["lse"], grads.get("logprob", torch.zeros_like(saved["lse"])), **options, **need)


def run_split(policy, ref, tokens, saved, grads, chunk, **need):
    """head_stats_split_backward with a budget of `chunk` rows of dz plus a few spare bytes."""
    budget = chunk * V * policy.hidden.dtype.itemsize + policy.hidden.dtype.itemsize - 1
    return head_stats_split_backward(policy, tokens, stats_grad(ref, saved, grads, **need), buffer_bytes=budget)


def reference_grads(policy, ref, labels, tokens, grads):
    """float64 (dHidden of the scored rows [R, D], dWeight, dBias) of sum_terms sum_r grads[term]_r term_r."""
    h64, w64, b64 = leaf64(policy.hidden), leaf64(policy.weight), leaf64(policy.bias)
    head, ref_head = policy.head, ref.head
    stats = token_stats64(h64, w64, labels, b64, ref.hidden.double(), ref.weight.double(),
                          None if ref.bias is None else ref.bias.double(), softcap=head.softcap,
                          ref_softcap=ref_head.softcap, temperature=head.temperature)
    loss = sum((stats[term].reshape(-1)[tokens.rows] * g.double()).sum() for term, g in grads.items())
    loss.backward()
    d_hidden = h64.grad.reshape(-1, h64.shape[-1])[tokens.rows]
    return d_hidden, w64.grad, None if b64 is None else b64.grad


def check_against_float64(got, want, dtype, what):
    for g, w, name in zip(got, want, ("dHidden", "dWeight", "dBias"), strict=True):
        if w is None:
            assert g is None, f"{what}: {name} was not asked for"
            continue
        assert g.dtype == torch.float32 and g.shape == w.shape, f"{what}: {name} {g.dtype} {tuple(g.shape)}"
        assert_close(g, w, grad_tol(dtype), f"{what}: {name}")


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_logprob_gradients(device, dtype, head):
    policy, ref, tokens, labels, saved, grads = make_problem(device, dtype, terms=("logprob",), **HEADS[head])
    assert tokens.rows.numel() % 7 != 0, "chunks of 7 rows must leave a partial chunk"
    got = run_split(policy, ref, tokens, saved, grads, chunk=7, need_bias=policy.bias is not None)
    check_against_float64(got, reference_grads(policy, ref, labels, tokens, grads), dtype, head)


@pytest.mark.parametrize("terms", [("kl",), ("entropy",), TERMS], ids=["kl", "entropy", "all"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_two_head_kl_and_entropy_terms(device, dtype, terms):
    policy, ref, tokens, labels, saved, grads = make_problem(device, dtype, terms=terms,
                                                             **HEADS["bias+softcap+temperature"])
    got = run_split(policy, ref, tokens, saved, grads, chunk=7, need_bias=True)
    check_against_float64(got, reference_grads(policy, ref, labels, tokens, grads), dtype, "+".join(terms))


@pytest.mark.parametrize("chunk", [1, 2, 64, 88, 89, 1000])
def test_chunk_sizes(device, chunk):
    """One row per chunk, chunks that leave a remainder, exactly R rows (R = 89), and more than R."""
    policy, ref, tokens, labels, saved, grads = make_problem(device, **HEADS["bias+softcap+temperature"])
    assert tokens.rows.numel() == 89
    got = run_split(policy, ref, tokens, saved, grads, chunk, need_bias=True)
    check_against_float64(got, reference_grads(policy, ref, labels, tokens, grads), torch.float32, f"C={chunk}")


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_matches_the_fused_backward(device, dtype):
    policy, ref, tokens, _, saved, grads = make_problem(device, dtype, **HEADS["bias+softcap+temperature"])
    fused = kernels.head_stats_backward(policy, tokens, stats_grad(ref, saved, grads, need_bias=True))
    split = run_split(policy, ref, tokens, saved, grads, chunk=13, need_bias=True)
    for s, f, name in zip(split, fused, ("dHidden", "dWeight", "dBias"), strict=True):
        assert s.dtype == f.dtype == torch.float32 and s.shape == f.shape
        assert_close(s, f, 1e-2 if name == "dBias" and dtype != torch.float32 else 1e-6, name)


@pytest.mark.parametrize("need", [(True, False, False), (False, True, False), (False, False, True),
                                  (False, False, False)], ids=["hidden", "weight", "bias", "none"])
def test_only_the_requested_gradients(device, need):
    policy, ref, tokens, _, saved, grads = make_problem(device, seed=2)
    everything = run_split(policy, ref, tokens, saved, grads, chunk=30, need_bias=True)
    got = run_split(policy, ref, tokens, saved, grads, chunk=30, need_hidden=need[0], need_weight=need[1],
                    need_bias=need[2])
    for g, full, wanted in zip(got, everything, need, strict=True):
        assert (g is None) != wanted
        if wanted:
            assert torch.equal(g, full)


def test_repeatable_and_no_rows(device):
    """No atomics: two runs agree bitwise. Zero scored rows: zero gradients, nothing launched."""
    policy, ref, tokens, _, saved, grads = make_problem(device, seed=4)
    first, second = (run_split(policy, ref, tokens, saved, grads, chunk=16, need_bias=True) for _ in range(2))
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    none = ScoredTokens(tokens.rows[:0], tokens.labels[:0])
    empty = head_stats_split_backward(policy, none, StatsGrad(saved["lse"][:0], saved["lse"][:0], need_bias=True),
                                      buffer_bytes=V * 4)
    assert [tuple(t.shape) for t in empty] == [(0, D), (V, D), (V,)]
    assert not empty[1].any() and not empty[2].any()


class NewStorages(TorchDispatchMode):
    """The bytes of every storage an operator creates inside the block (storages in `known` excluded).

    Views of existing storages (as Triton's interpreter makes of every tensor argument) are not
    allocations and are not counted; a reused address keeps the largest size seen there.
    """

    def __init__(self, known: list[torch.Tensor]) -> None:
        super().__init__()
        self.known = {t.untyped_storage().data_ptr() for t in known if t is not None}
        self.sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                if storage.data_ptr() not in self.known:
                    self.sizes[storage.data_ptr()] = max(self.sizes.get(storage.data_ptr(), 0), storage.nbytes())
        return out


def test_scratch_stays_within_the_budget(device):
    """The largest allocation besides the three gradients is the dz buffer: C rows, within the budget.

    Everything else is O(C D + V): the gathered H[chunk] and its row indices (with aten's indexing
    temporaries), and dz's column sums. The allocator's own peak (torch.profiler memory events, on
    CPU) confirms it: at most the gradients, the buffer and that O(C D + V).
    """
    policy, ref, tokens, _, saved, grads = make_problem(device, seed=5)
    budget = 10 * V * 4 + 100  # 10 rows and change
    chunk = chunk_rows(V, torch.float32, budget)
    assert chunk == 10
    grad = stats_grad(ref, saved, grads, need_bias=True)
    inputs = [policy.hidden, policy.weight, policy.bias, ref.hidden, ref.weight, ref.bias, tokens.rows,
              tokens.labels, *saved.values(), *grads.values()]
    with NewStorages(inputs) as new:
        outputs = head_stats_split_backward(policy, tokens, grad, buffer_bytes=budget)
    for t in outputs:
        new.sizes.pop(t.untyped_storage().data_ptr())
    other_bytes = chunk * (D * 4 + 4 * 8) + 2 * V * 4
    assert max(new.sizes.values()) == chunk * V * 4 <= budget, new.sizes
    assert sorted(new.sizes.values())[-2] <= other_bytes, new.sizes
    if device.type == "cpu":
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            outputs = head_stats_split_backward(policy, tokens, grad, buffer_bytes=budget)
        live = peak = 0
        for event in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                            key=lambda e: e.start_ns()):
            live += event.nbytes()
            peak = max(peak, live)
        assert peak <= sum(t.nbytes for t in outputs) + budget + other_bytes, peak


def test_never_allocates_tokens_times_vocab(device):
    """N x V = 300 x 700 logits: no tensor of forward size ever exists (D = 16 keeps V x D below N x V)."""
    n, vocab, dim = 300, 700, 16
    policy, ref, tokens, _, saved, grads = make_problem(device, lead=(1, n), vocab=vocab, dim=dim, dim_ref=12)
    with AllocationTracker() as tracker:
        head_stats_split_backward(policy, tokens, stats_grad(ref, saved, grads, need_bias=True),
                                  buffer_bytes=40 * vocab * 4)
    assert tracker.stats.largest_numel < n * vocab, tracker.stats


def test_bad_arguments():
    policy, _, tokens, _, saved, grads = make_problem("cpu", bias=False, seed=6)
    grad = StatsGrad(saved["lse"], grads["logprob"])
    for budget in (0, V * 4 - 1):
        with pytest.raises(ValueError, match=r"holds no row of dz.*fused backward"):
            head_stats_split_backward(policy, tokens, grad, buffer_bytes=budget)
    with pytest.raises(TypeError, match="buffer_bytes must be an int"):
        head_stats_split_backward(policy, tokens, grad, buffer_bytes=1e9)
    with pytest.raises(ValueError, match="need_bias=True but bias is None"):
        head_stats_split_backward(policy, tokens, replace(grad, need_bias=True), buffer_bytes=1 << 20)
    with pytest.raises(ValueError, match="kl_grad needs the reference head"):
        head_stats_split_backward(policy, tokens, replace(grad, kl_grad=grads["kl"]), buffer_bytes=1 << 20)
    with pytest.raises(ValueError, match="ref and ref_lse are read only for the KL's gradient"):
        head_stats_split_backward(policy, tokens, replace(grad, ref_lse=saved["ref_lse"]), buffer_bytes=1 << 20)
    with pytest.raises(ValueError, match="entropy_grad needs the forward's per-row entropy"):
        head_stats_split_backward(policy, tokens, replace(grad, entropy_grad=grads["entropy"]), buffer_bytes=1 << 20)
    with pytest.raises(ValueError, match="entropy is read only for the entropy's gradient"):
        head_stats_split_backward(policy, tokens, replace(grad, entropy=saved["entropy"]), buffer_bytes=1 << 20)
    with pytest.raises(ValueError, match="lse must be float32"):
        head_stats_split_backward(policy, tokens, replace(grad, lse=saved["lse"][1:]), buffer_bytes=1 << 20)
    rows = tokens.rows.numel()
    with pytest.raises(TypeError, match=r"dz must be a torch\.float32 tensor"):
        head_stats_dz_launch(policy, tokens, grad, torch.empty(rows, V, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=rf"dz must be \[C, V\] with C >= {rows}"):
        head_stats_dz_launch(policy, tokens, grad, torch.empty(rows - 1, V))


def test_terms_are_checked_once_per_backward(device, monkeypatch):
    """The operands are validated once per backward, not once per chunk of dz."""
    policy, ref, tokens, _, saved, grads = make_problem(device, seed=7)
    checks, check = [], StatsGrad.check
    monkeypatch.setattr(StatsGrad, "check", lambda self, *args: checks.append(1) or check(self, *args))
    assert tokens.rows.numel() > 2 * 30, "several chunks"
    run_split(policy, ref, tokens, saved, grads, chunk=30, need_bias=True)
    assert checks == [1]


def test_token_divergence_split_backward_casts_a_mixed_weight_in_blocks(monkeypatch):
    """The token divergence's split backward runs the head statistics' GEMM loop (`split_gemms`): a
    bfloat16 policy weight on float32 hidden states is cast WEIGHT_CAST_ROWS rows at a time (64 here,
    so V = 203 takes four blocks), never as one float32 copy of the whole [V, D] weight, and the hidden
    gradient matches float64 (JS with beta = 0.3: beta KL(q || m) + (1 - beta) KL(p || m),
    m = (1 - beta) p + beta q)."""
    monkeypatch.setattr(split_bwd, "WEIGHT_CAST_ROWS", 64)
    g = torch.Generator().manual_seed(5)
    n, beta = 29, 0.3
    hidden = torch.randn(n, D, generator=g).requires_grad_(True)
    weight = (0.4 * torch.randn(V, D, generator=g)).bfloat16()
    ref_hidden, ref_weight = torch.randn(n, D_REF, generator=g), 0.4 * torch.randn(V, D_REF, generator=g)
    labels = torch.randint(0, V, (n,), generator=g)
    labels[::5] = -100
    upstream = torch.rand(n, generator=g) + 0.5
    with NewStorages([hidden, weight, ref_hidden, ref_weight, labels, upstream]) as new:
        out = fdpo.token_divergence(hidden, weight, ref_hidden, ref_weight, labels, divergence="js", beta=beta,
                                    backend="triton", backward_buffer_bytes=8 * V * 4)
        (out * upstream).sum().backward()
    assert 8 * V * 4 <= max(new.sizes.values()) < V * D * 4, new.sizes  # the dz buffer, no [V, D] float32 weight

    h64 = leaf64(hidden)
    logp = torch.log_softmax(h64 @ weight.double().T, dim=-1)
    logq = torch.log_softmax(ref_hidden.double() @ ref_weight.double().T, dim=-1)
    log_m = torch.logaddexp(logp + math.log(1 - beta), logq + math.log(beta))
    js = beta * (logq.exp() * (logq - log_m)).sum(-1) + (1 - beta) * (logp.exp() * (logp - log_m)).sum(-1)
    js = js.masked_fill(labels == -100, 0.0)
    (js * upstream.double()).sum().backward()
    assert_close(out.detach(), js.detach(), 3e-6, "split backward, mixed weight: value")
    assert_close(hidden.grad, h64.grad, 1e-5, "split backward, mixed weight: d hidden")


@pytest.mark.parametrize("budget", [2 * V, 4 * V - 1], ids=["one-bf16-row", "just-under-one-fp32-row"])
def test_token_divergence_mixed_head_budget_below_one_compute_row_runs_fused(budget):
    """A bfloat16 weight on float32 hidden states forms its products, and its dz, in float32: a budget that
    holds a bfloat16 row of dz but no float32 row falls back to the fused backward (as the head statistics
    do), where sizing the budget by the weight's dtype sent it to the split backward, which raised."""
    g = torch.Generator().manual_seed(7)
    n = 9
    hidden = torch.randn(n, D, generator=g).requires_grad_(True)
    weight = (0.4 * torch.randn(V, D, generator=g)).bfloat16()
    ref_hidden, ref_weight = torch.randn(n, D_REF, generator=g), 0.4 * torch.randn(V, D_REF, generator=g)
    labels = torch.randint(0, V, (n,), generator=g)
    out = fdpo.token_divergence(hidden, weight, ref_hidden, ref_weight, labels, divergence="forward_kl",
                                backend="triton", backward_buffer_bytes=budget)
    out.sum().backward()

    h64 = leaf64(hidden)
    logp = torch.log_softmax(h64 @ weight.double().T, dim=-1)
    logq = torch.log_softmax(ref_hidden.double() @ ref_weight.double().T, dim=-1)
    (logq.exp() * (logq - logp)).sum().backward()
    assert_close(hidden.grad, h64.grad, 1e-5, f"budget {budget}: d hidden")


@pytest.mark.parametrize("budget", [0, 1 << 20], ids=["fused", "split"])
def test_a_strided_bias_is_read_as_its_values(budget):
    """A bias that is a strided view (a column of a packed parameter, stride 2) gives the log-probs and
    gradients of its values on the triton backend, in the forward and either backward, as on the others."""
    g = torch.Generator().manual_seed(3)
    n = 9
    hidden = torch.randn(n, D, generator=g, dtype=torch.float64).float().requires_grad_(True)
    weight = (0.4 * torch.randn(V, D, generator=g)).requires_grad_(True)
    packed = torch.randn(V, 2, generator=g).requires_grad_(True)
    labels = torch.randint(0, V, (n,), generator=g)
    bias = packed[:, 0]
    assert bias.stride() == (2,)
    out = fdpo.token_logprobs(hidden, weight, labels, bias=bias, backend="triton", backward_buffer_bytes=budget)
    out.sum().backward()

    h64, w64, b64 = leaf64(hidden), leaf64(weight), leaf64(bias.detach())
    want = torch.log_softmax(h64 @ w64.T + b64, dim=-1).gather(1, labels[:, None]).squeeze(1)
    want.sum().backward()
    assert_close(out.detach(), want.detach(), 1e-6, "strided bias: log-probs")
    assert_close(hidden.grad, h64.grad, 1e-5, "strided bias: d hidden")
    assert_close(weight.grad, w64.grad, 1e-5, "strided bias: d weight")
    assert_close(packed.grad[:, 0], b64.grad, 1e-5, "strided bias: d bias")
    assert packed.grad[:, 1].abs().max() == 0

    # The token divergence's kernels take the same head arguments (KL(p || q), the policy's bias strided).
    hidden.grad = None
    ref_hidden, ref_weight = torch.randn(n, D_REF, generator=g), 0.4 * torch.randn(V, D_REF, generator=g)
    kl = fdpo.token_divergence(hidden, weight.detach(), ref_hidden, ref_weight, labels, divergence="reverse_kl",
                               bias=bias.detach(), backend="triton", backward_buffer_bytes=budget)
    kl.sum().backward()
    h64 = leaf64(hidden)
    logp = torch.log_softmax(h64 @ w64.detach().T + b64.detach(), dim=-1)
    logq = torch.log_softmax(ref_hidden.double() @ ref_weight.double().T, dim=-1)
    want = (logp.exp() * (logp - logq)).sum(-1)
    want.sum().backward()
    assert_close(kl.detach(), want.detach(), 1e-6, "strided bias: divergence")
    assert_close(hidden.grad, h64.grad, 1e-5, "strided bias: divergence d hidden")
