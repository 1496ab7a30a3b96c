"""Two-head token statistics (fdpo.token_kl, token_entropy, perturbed_logprobs) against float64.

The reference materializes both logit tensors in float64 and follows docs/math.md 5-7 literally
(`float64_reference.token_stats64`); gradients are float64 autograd through it. Shapes are odd
(N, V, D and the reference's D' = 72 are not multiples of any block) and 20% of tokens are ignored.
Tolerances are those of test_logprobs.py and for the same reasons: fp32 accumulation everywhere
(~1e-6; KL and entropy are differences of O(1) terms, so 1e-5 is kept for values), 16-bit
gradients rounded by the tensor-core operand cast and the cast back to the input dtype (1e-2), the
naive reference backend in bf16 rounding its logits to bf16 (3e-2).
"""

import pytest
import torch

import fdpo
import fdpo.backends.chunked as chunked
import fdpo.kernels as kernels
from fdpo.head_stats import head_stats
from fdpo.heads import HeadInput, LMHead, ScoredTokens, StatsRequest
from fdpo.options import BackwardOptions
from fdpo.profiling import AllocationTracker

from float64_reference import assert_close, assert_close_extended, leaf64, logits64, token_stats64

B, T, V, D, D_REF = 3, 37, 300, 100, 72
FUSED = ("triton", "torch")
BACKENDS = (*FUSED, "reference")
GRADED = ("logprob", "entropy", "kl")
EPS = 0.1


def value_tol(backend, dtype):
    return 3e-2 if backend == "reference" and dtype != torch.float32 else 1e-5


def grad_tol(backend, dtype):
    if dtype == torch.float32:
        return 2e-5
    return 3e-2 if backend == "reference" else 1e-2


def make_inputs(device, dtype=torch.float32, shared_head=False, bias=True, seed=0, lead=(B, T), vocab=V, dim=D,
                dim_ref=D_REF):
    """Policy (hidden, weight, bias), reference (hidden, weight, bias) and labels, ~20% ignored.

    With shared_head the reference uses the policy's weight and bias tensors (and hidden size).
    """
    g = torch.Generator().manual_seed(seed)
    d_ref = dim if shared_head else dim_ref
    hidden = torch.randn(*lead, dim, generator=g).to(device, dtype)
    weight = (0.2 * torch.randn(vocab, dim, generator=g)).to(device, dtype)
    b = torch.randn(vocab, generator=g).to(device, dtype) if bias else None
    # A reference close to the policy, as after some training: the KL is O(0.1), not O(10).
    ref_hidden = (hidden.float()[..., :d_ref] + 0.3 * torch.randn(*lead, d_ref, generator=g).to(device)).to(dtype)
    if shared_head:
        ref_weight, ref_bias = weight, b
    else:
        ref_weight = (0.2 * torch.randn(vocab, d_ref, generator=g)).to(device, dtype)
        ref_bias = torch.randn(vocab, generator=g).to(device, dtype) if bias else None
    labels = torch.randint(0, vocab, lead, generator=g)
    labels[torch.rand(lead, generator=g) < 0.2] = -100
    return (hidden, weight, b), (ref_hidden, ref_weight, ref_bias), labels.to(device)


def upstreams(shape, names=GRADED, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) for name in names}


def run_stats(policy, ref, labels, backend, upstream, **options):
    """All statistics through head_stats, and gradients of sum_k out_k * upstream_k."""
    hidden, weight, bias = (t.detach().requires_grad_(True) if t is not None else None for t in policy)
    ref_hidden, ref_weight, ref_bias = ref
    head = LMHead(weight, bias, options.get("softcap"), options.get("temperature", 1.0))
    ref_head = LMHead(ref_weight, ref_bias, options.get("ref_softcap"), options.get("temperature", 1.0))
    out = head_stats(HeadInput(hidden, head), labels, ref=HeadInput(ref_hidden, ref_head, "ref_"),
                     request=StatsRequest(entropy=True, kl=True, eps=EPS), backend=backend,
                     backward=BackwardOptions(options.get("deterministic", False)),
                     cu_seqlens=options.get("cu_seqlens"), per_sequence=options.get("per_sequence", False)).as_dict()
    sum((out[k] * upstream[k].to(out[k].device)).sum() for k in upstream).backward()
    return {k: v.detach() for k, v in out.items()}, [t.grad if t is not None else None for t in (hidden, weight, bias)]


def reference64(policy, ref, labels, upstream, reduce=None, **options):
    h64, w64, b64 = (leaf64(t) for t in policy)
    rh, rw, rb = (None if t is None else t.double() for t in ref)
    out = token_stats64(h64, w64, labels, b64, rh, rw, rb, softcap=options.get("softcap"),
                        ref_softcap=options.get("ref_softcap"), temperature=options.get("temperature", 1.0), eps=EPS)
    if reduce is not None:
        out = {k: reduce(v) for k, v in out.items()}
    if upstream:
        sum((out[k] * upstream[k].double().to(out[k].device)).sum() for k in upstream).backward()
    return {k: v.detach() for k, v in out.items()}, [t.grad if t is not None else None for t in (h64, w64, b64)]


HEADS = {
    "distinct heads": dict(shared_head=False),
    "shared head": dict(shared_head=True),
    "softcap+temperature": dict(shared_head=False, softcap=5.0, ref_softcap=7.0, temperature=0.7),
}


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_statistic_and_policy_gradient(device, backend, dtype, heads):
    options = dict(HEADS[heads])
    policy, ref, labels = make_inputs(device, dtype, shared_head=options.pop("shared_head"))
    upstream = upstreams(labels.shape)
    got, grads = run_stats(policy, ref, labels, backend, upstream, **options)
    want, want_grads = reference64(policy, ref, labels, upstream, **options)
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == torch.float32 and got[name].shape == labels.shape
        assert (got[name][labels == -100] == 0).all(), f"{name} must be 0 at ignored tokens"
        assert_close(got[name], want[name], value_tol(backend, dtype), name)
    assert (got["kl"] >= -1e-5).all(), "KL is non-negative"
    for g, w, name in zip(grads, want_grads, ("dHidden", "dWeight", "dBias"), strict=True):
        assert g.dtype == dtype
        assert_close(g, w, grad_tol(backend, dtype), name)
    assert (grads[0][labels == -100] == 0).all(), "ignored tokens get zero gradient"


@pytest.mark.parametrize("term", GRADED)
@pytest.mark.parametrize("backend", FUSED)
def test_each_gradient_term_alone(device, backend, term):
    """The log-prob, KL and entropy terms of the backward are each right on their own."""
    policy, ref, labels = make_inputs(device, seed=3)
    upstream = upstreams(labels.shape, names=(term,))
    _, grads = run_stats(policy, ref, labels, backend, upstream)
    _, want_grads = reference64(policy, ref, labels, upstream)
    for g, w, name in zip(grads, want_grads, ("dHidden", "dWeight", "dBias"), strict=True):
        assert_close(g, w, 2e-5, f"{term}: {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_sums_padded_and_packed(device, backend):
    policy, ref, labels = make_inputs(device, seed=5)
    labels[1] = -100                                   # a sequence with every token ignored
    upstream = upstreams((B,))
    got, grads = run_stats(policy, ref, labels, backend, upstream, per_sequence=True, softcap=6.0)
    want, want_grads = reference64(policy, ref, labels, upstream, reduce=lambda x: x.sum(-1), softcap=6.0)
    for name in want:
        assert got[name].shape == (B,) and got[name][1] == 0
        assert_close(got[name], want[name], 1e-5, f"padded {name}")
    for g, w, name in zip(grads, want_grads, ("dHidden", "dWeight", "dBias"), strict=True):
        assert_close(g, w, 2e-5, name)

    flat = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731
    packed_policy = (flat(policy[0]), policy[1], policy[2])
    packed_ref = (flat(ref[0]), ref[1], ref[2])
    cu = torch.tensor([0, T, 2 * T, 3 * T], device=device)
    packed, packed_grads = run_stats(packed_policy, packed_ref, labels.reshape(-1), backend, upstream,
                                     cu_seqlens=cu, softcap=6.0)
    for name in want:
        assert_close(packed[name], got[name], 1e-6, f"packed vs padded {name}")
    assert_close(packed_grads[0], flat(grads[0]), 1e-6, "packed vs padded dHidden")
    assert_close(packed_grads[1], grads[1], 1e-6, "packed vs padded dWeight")


def test_public_functions(device):
    policy, ref, labels = make_inputs(device, seed=7)
    (hidden, weight, bias), (ref_hidden, ref_weight, ref_bias) = policy, ref
    want, _ = reference64(policy, ref, labels, {})
    lp, ref_lp, kl = fdpo.token_kl(hidden, weight, ref_hidden, ref_weight, labels, bias=bias, ref_bias=ref_bias)
    for got, name in ((lp, "logprob"), (ref_lp, "ref_logprob"), (kl, "kl")):
        assert_close(got, want[name], 1e-5, f"token_kl {name}")
    assert_close(lp, fdpo.token_logprobs(hidden, weight, labels, bias=bias), 1e-6, "token_kl vs token_logprobs")
    plus, minus = fdpo.perturbed_logprobs(hidden, weight, ref_hidden, ref_weight, labels, EPS, bias=bias,
                                          ref_bias=ref_bias)
    assert_close(plus, want["logprob_plus"], 1e-5, "logprob_plus")
    assert_close(minus, want["logprob_minus"], 1e-5, "logprob_minus")
    assert not plus.requires_grad
    entropy = fdpo.token_entropy(hidden, weight, labels, bias=bias)
    assert_close(entropy, want["entropy"], 1e-5, "entropy")
    every = fdpo.token_entropy(hidden, weight, bias=bias)       # no labels: every token is scored
    full, _ = reference64(policy, ref, torch.zeros_like(labels), {})
    assert_close(every, full["entropy"], 1e-5, "entropy without labels")
    # ... whatever ignore_index says (0 is a label like any other there, not a reason to skip a token).
    assert_close(fdpo.token_entropy(hidden, weight, bias=bias, ignore_index=0), full["entropy"], 1e-5,
                 "entropy without labels, ignore_index=0")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_index_is_compared_as_an_integer_not_in_the_labels_dtype(device, backend):
    """uint8 labels with the default ignore_index -100: label 156 (-100 as a uint8) is a real token."""
    (hidden, _, _), _, _ = make_inputs(device, seed=7)
    labels = torch.tensor([[3, 156, 7], [156, 0, 200]], dtype=torch.uint8, device=device)
    hidden, weight = hidden[:2, :3].contiguous(), torch.randn(257, hidden.shape[-1], device=device)
    got = fdpo.token_logprobs(hidden, weight, labels, backend=backend)
    want = torch.log_softmax(hidden.double() @ weight.double().T, dim=-1).gather(-1, labels.long()[..., None])[..., 0]
    assert_close(got, want, 1e-5, "uint8 labels")
    with pytest.raises(ValueError, match="labels must be in"):
        fdpo.token_logprobs(hidden, weight[:100], labels, backend=backend)


@pytest.mark.parametrize("backend", FUSED)
def test_changing_the_reference_in_place_before_backward_raises(device, backend):
    """The KL's backward recomputes the reference's logits: a reference changed in place since the
    forward (a shared weight stepped by the optimizer, a reused buffer) would give another gradient."""
    policy, ref, labels = make_inputs(device, seed=9)
    hidden = policy[0].clone().requires_grad_(True)
    ref_hidden, ref_weight = ref[0].clone(), ref[1].clone()
    _, _, kl = fdpo.token_kl(hidden, policy[1], ref_hidden, ref_weight, labels, backend=backend)
    ref_weight.mul_(3.0)
    with pytest.raises(RuntimeError, match="modified in place between the forward and the backward"):
        kl.sum().backward()
    _, _, kl = fdpo.token_kl(hidden, policy[1], ref_hidden, ref_weight, labels, backend=backend)
    kl.sum().backward()  # changed before the forward: fine
    assert hidden.grad.abs().sum() > 0


def test_reference_gets_no_gradient(device):
    policy, ref, labels = make_inputs(device, seed=9)
    ref_hidden = ref[0].clone().requires_grad_(True)
    ref_weight = ref[1].clone().requires_grad_(True)
    hidden = policy[0].clone().requires_grad_(True)
    _, _, kl = fdpo.token_kl(hidden, policy[1], ref_hidden, ref_weight, labels)
    kl.sum().backward()
    assert ref_hidden.grad is None and ref_weight.grad is None
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0


def test_deterministic_backward_is_bitwise_repeatable(device):
    """See test_logprobs.py: meaningful on a GPU (large shapes, several runs); on the interpreter it
    checks that the deterministic path gives the atomic path's values."""
    shape = {"lead": (8, 512), "vocab": 4096, "dim": 256, "dim_ref": 192} if device.type == "cuda" else {}
    policy, ref, labels = make_inputs(device, seed=11, **shape)
    upstream = upstreams(labels.shape)
    repeats = 5 if device.type == "cuda" else 2
    runs = [run_stats(policy, ref, labels, "triton", upstream, deterministic=det)[1]
            for det in (*[True] * repeats, False)]
    for run in runs[1:-1]:
        for a, b in zip(runs[0], run, strict=True):
            assert torch.equal(a, b)
    for a, b in zip(runs[0], runs[-1], strict=True):
        assert_close(a, b, 1e-6, "deterministic vs atomic")


@pytest.mark.parametrize("backend", FUSED)
def test_never_allocates_tokens_times_vocab(device, backend):
    """KL + entropy forward and backward of both heads stay below N x V elements per tensor.

    As in test_logprobs.py: N x V exceeds the torch backend's chunks; the hidden sizes are small so
    that no weight-sized buffer (V x D, which Triton's interpreter also copies as raw bytes) reaches N x V.
    """
    n, vocab = (2048, 5000) if backend == "torch" else (300, 700)
    policy, ref, labels = make_inputs(device, lead=(n,), vocab=vocab, dim=16, dim_ref=12)
    upstream = upstreams(labels.shape)
    for name in (backend, "reference"):
        with AllocationTracker() as tracker:
            run_stats(policy, ref, labels, name, upstream)
        if name == "reference":
            assert tracker.stats.largest_numel >= n * vocab, "the tracker must see the naive logits"
        else:
            assert tracker.stats.largest_numel < n * vocab, tracker.stats


@pytest.mark.parametrize("backend", FUSED)
def test_kernel_entry_points_agree(device, backend):
    """The launchers' contract directly: rows/labels in, per-row float32 statistics out."""
    (hidden, weight, bias), (ref_hidden, ref_weight, ref_bias), labels = make_inputs(device, seed=13)
    flat = labels.reshape(-1)
    rows = (flat != -100).nonzero().squeeze(1)
    forward = kernels.head_stats_forward if backend == "triton" else chunked.stats_forward
    out = forward(HeadInput(hidden, LMHead(weight, bias)), ScoredTokens(rows, flat[rows].to(torch.int32)),
                  HeadInput(ref_hidden, LMHead(ref_weight, ref_bias), "ref_"),
                  StatsRequest(entropy=True, kl=True, eps=EPS))
    want = token_stats64(hidden, weight, labels, bias, ref_hidden, ref_weight, ref_bias, eps=EPS)
    for name, value in want.items():
        assert_close(out[name], value.reshape(-1)[rows], 1e-5, name)
    assert_close(out["lse"], torch.logsumexp((hidden.double() @ weight.double().T + bias.double()).reshape(-1, V)[rows],
                                             -1), 1e-6, "lse")


@pytest.mark.parametrize("changes, error, message", [
    (dict(ref_weight=torch.randn(V + 1, D_REF)), ValueError, "ref_weight has 301 vocabulary rows"),
    (dict(ref_hidden=torch.randn(B, T + 1, D_REF)), ValueError, "ref_hidden must have hidden's leading shape"),
    (dict(ref_weight=torch.randn(V, D_REF + 1)), ValueError, r"ref_weight must be a \[V, D\] tensor with D = 72"),
    (dict(ref_weight=torch.randn(V, D_REF, dtype=torch.float64)), TypeError, "ref_weight dtype"),
])
def test_bad_reference_inputs(changes, error, message):
    (hidden, weight, _), (ref_hidden, ref_weight, _), labels = make_inputs("cpu", bias=False)
    args = dict(ref_hidden=ref_hidden, ref_weight=ref_weight)
    args.update(changes)
    with pytest.raises(error, match=message):
        fdpo.token_kl(hidden, weight, args["ref_hidden"], args["ref_weight"], labels)


def test_bad_eps_and_missing_reference():
    (hidden, weight, _), (ref_hidden, ref_weight, _), labels = make_inputs("cpu", bias=False)
    for eps in (0.0, 1.0, -0.1, "0.1"):
        with pytest.raises(ValueError, match=r"eps must be a number in the open interval \(0, 1\)"):
            fdpo.perturbed_logprobs(hidden, weight, ref_hidden, ref_weight, labels, eps)
    with pytest.raises(ValueError, match="need the reference"):
        head_stats(HeadInput(hidden, LMHead(weight)), labels, request=StatsRequest(kl=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_temperature(device, backend):
    """ref_temperature divides the reference's logits only; the policy keeps `temperature`."""
    (hidden, weight, bias), (ref_hidden, ref_weight, ref_bias), labels = make_inputs(device, seed=17)
    common = dict(bias=bias, ref_bias=ref_bias, temperature=1.3, ref_temperature=0.6, backend=backend)
    lp, ref_lp, kl = fdpo.token_kl(hidden, weight, ref_hidden, ref_weight, labels, **common)
    plus, minus = fdpo.perturbed_logprobs(hidden, weight, ref_hidden, ref_weight, labels, EPS, **common)
    z = logits64(hidden, weight, bias, temperature=1.3)
    z_ref = logits64(ref_hidden, ref_weight, ref_bias, temperature=0.6)
    scored = labels != -100
    safe = labels.masked_fill(~scored, 0).unsqueeze(-1)

    def pick(logits):
        return torch.log_softmax(logits, -1).gather(-1, safe).squeeze(-1) * scored

    logp, ref_logp = torch.log_softmax(z, -1), torch.log_softmax(z_ref, -1)
    want_kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1) * scored
    for got, want, name in ((lp, pick(z), "logprob"), (ref_lp, pick(z_ref), "ref_logprob"), (kl, want_kl, "kl"),
                            (plus, pick((1 + EPS) * z - EPS * z_ref), "logprob_plus"),
                            (minus, pick((1 - EPS) * z + EPS * z_ref), "logprob_minus")):
        assert_close(got, want, 1e-5, name)


def test_perturbed_logprobs_are_constants_on_every_backend(device):
    policy, ref, labels = make_inputs(device, seed=5)
    hidden = policy[0].clone().requires_grad_(True)
    for backend in BACKENDS:
        out = head_stats(HeadInput(hidden, LMHead(policy[1])), labels, ref=HeadInput(ref[0], LMHead(ref[1])),
                         request=StatsRequest(eps=EPS), backend=backend)
        assert out.logprob.requires_grad, backend
        assert not out.logprob_plus.requires_grad and not out.logprob_minus.requires_grad, backend


# A vocabulary mask: bias entries of -inf (docs/math.md 8). Masked logits follow 0 log 0 = 0: an entry
# masked in both heads adds nothing; one the policy alone masks makes KL(ref || policy) +inf, a
# constant with zero gradient. The backward strategies of the triton backend are checked one by one.

MASK_BACKENDS = {
    "triton fused": ("triton", BackwardOptions()),
    "triton ordered": ("triton", BackwardOptions(deterministic=True)),
    "triton split": ("triton", BackwardOptions(buffer_bytes=7 * V * 4)),
    "torch": ("torch", BackwardOptions()),
    "reference": ("reference", BackwardOptions()),
}
# (which heads mask, what they mask, head options): a few entries spread over the vocabulary tiles, or
# all but a few entries of the last tile (the interpreter's and the torch backend's first tiles then hold
# nothing but -inf, below patched to 128 columns).
MASKS = {
    "both heads, a few": ("both", "few", {}),
    "policy, a few": ("policy", "few", {}),
    "reference, a few": ("reference", "few", {}),
    "both heads, all but a few": ("both", "most", {}),
    "policy, a few, softcap+temperature": ("policy", "few", dict(softcap=5.0, ref_softcap=7.0, temperature=0.7)),
    "both heads, all but a few, softcap+temperature": ("both", "most",
                                                       dict(softcap=5.0, ref_softcap=7.0, temperature=0.7)),
}


def masked_vocabulary_inputs(device, dtype, heads, extent):
    """make_inputs with -inf bias entries, never at a scored label: "few" masks 9 columns spread over
    every tile, "most" keeps only 6 columns of the last tile (the labels drawn among them)."""
    policy, ref, labels = make_inputs(device, dtype, seed=11)
    g = torch.Generator().manual_seed(12)
    if extent == "few":
        free = sorted(set(range(V)) - set(labels[labels != -100].tolist()))
        masked = torch.tensor([free[i] for i in torch.linspace(0, len(free) - 1, 9).long()])
    else:
        keep = torch.tensor([258, 263, 271, 280, 291, 299])
        scored = labels != -100
        labels[scored] = keep[torch.randint(0, len(keep), (int(scored.sum()),), generator=g)].to(device)
        masked = torch.tensor(sorted(set(range(V)) - set(keep.tolist())))
    masked = masked.to(device)
    for i, (head, side) in enumerate(((policy, "policy"), (ref, "reference"))):
        if heads in ("both", side):
            bias = head[2].clone()
            bias[masked] = float("-inf")
            head = (head[0], head[1], bias)
        policy, ref = (head, ref) if i == 0 else (policy, head)
    return policy, ref, labels, masked


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", MASK_BACKENDS)
def test_a_vocabulary_mask_gives_0_log_0_values_and_finite_gradients(device, backend, dtype, mask, monkeypatch):
    """Entropy, KL and perturbed log-probs of heads with -inf bias entries, and the gradients of log-prob,
    entropy and KL, against the float64 reference with the same convention; the masked bias entries get
    exactly zero gradient, and the log-probs are those of the masked softmax. Where the reference alone
    masks, (1 + eps) z - eps z_ref is +inf on paper: the perturbed log-probs (lp+) are -inf."""
    monkeypatch.setattr(chunked, "CPU_CHUNK_VOCAB", 128)
    name, backward = MASK_BACKENDS[backend]
    heads, extent, options = MASKS[mask]
    policy, ref, labels, masked = masked_vocabulary_inputs(device, dtype, heads, extent)
    upstream = upstreams(labels.shape, seed=4)
    hidden, weight, bias = (t.detach().requires_grad_(True) for t in policy)
    head = LMHead(weight, bias, options.get("softcap"), options.get("temperature", 1.0))
    ref_head = LMHead(ref[1], ref[2], options.get("ref_softcap"), options.get("temperature", 1.0))
    out = head_stats(HeadInput(hidden, head), labels, ref=HeadInput(ref[0], ref_head, "ref_"),
                     request=StatsRequest(entropy=True, kl=True, eps=EPS), backend=name, backward=backward).as_dict()
    sum((out[k] * upstream[k].to(out[k].device)).sum() for k in upstream).backward()
    want, want_grads = reference64(policy, ref, labels, upstream, **options)
    scored = labels != -100
    plain = "softcap" not in options
    if heads == "policy" and plain:
        assert torch.isposinf(want["kl"][scored]).all(), "the reference weighs the policy's masked entries"
    for key in want:
        got = out[key].detach()
        assert (got[~scored] == 0).all(), f"{key} must be 0 at ignored tokens"
        assert_close_extended(got, want[key], value_tol(name, dtype), f"{mask}: {key}")
    for g, w, what in zip((hidden.grad, weight.grad, bias.grad), want_grads, ("dHidden", "dWeight", "dBias"),
                          strict=True):
        assert g.dtype == dtype
        assert_close(g, w, grad_tol(name, dtype), f"{mask}: {what}")
    if heads != "reference":
        # With a soft cap the masked logit is -c / T, whose factor 1 - tanh^2 = 0 the backward reads off
        # the recomputed logit (tanh = z T / c): to rounding, not exactly (docs/math.md 1).
        limit = 0.0 if plain else 1e-6 * bias.grad.abs().max().item()
        assert (bias.grad[masked].abs() <= limit).all(), "a masked (-inf) bias entry gets zero gradient"
