"""fdpo.token_logprobs / sequence_logprobs against an independent float64 reference.

Shapes are odd on purpose: N, V and D are not multiples of any block size (the interpreter tiles
are 64 x 128 x 64, the GPU ones 128 x 128 x 64/32), and each spans more than one tile, so every
mask and loop of the kernels runs.

Tolerances (norm-wise relative error against float64 on the same, already-rounded inputs):
- values, every dtype, fused backends: products of 16-bit inputs are exact in fp32 and the kernels
  accumulate in fp32, so the only error is fp32 rounding over D terms and the log-sum-exp: ~1e-6.
- fp32 gradients: the same fp32 accumulation: ~1e-6. Bound 2e-5.
- 16-bit gradients: the triton backend casts dz to the input dtype for the tensor-core matmuls
  (relative rounding 2^-9 per element for bf16) and the gradient is returned in the input dtype
  (another 2^-9): ~4e-3 norm-wise. Bound 1e-2 (fp16 rounds 8x finer).
- the naive reference backend in bf16 rounds the logits themselves to bf16 before log_softmax, an
  error of ~2^-9 |z| per logit: bound 3e-2.
"""

import math

import pytest
import torch
import triton
import triton.language as tl

import fdpo
import fdpo.backends.chunked as chunked
import fdpo.kernels as kernels
from fdpo.head_stats import head_stats
from fdpo.heads import HeadInput, LMHead, ScoredTokens, StatsRequest
from fdpo.kernels.tiles import tanh
from fdpo.profiling import AllocationTracker

from float64_reference import assert_close, leaf64, logits64, token_logprobs64

B, T, V, D = 3, 37, 300, 100
FUSED = ("triton", "torch")
BACKENDS = (*FUSED, "reference")
HEADS = {
    "plain": dict(),
    "bias": dict(bias=True),
    "softcap+temperature": dict(bias=True, softcap=5.0, temperature=0.7),
}


def value_tol(backend: str, dtype: torch.dtype) -> float:
    return 3e-2 if backend == "reference" and dtype != torch.float32 else 1e-5


def grad_tol(backend: str, dtype: torch.dtype) -> float:
    if dtype == torch.float32:
        return 2e-5
    return 3e-2 if backend == "reference" else 1e-2


def make_inputs(device, dtype=torch.float32, lead=(B, T), vocab=V, dim=D, bias=False, seed=0, ignore=0.2):
    """Random hidden [*lead, dim], head weight [vocab, dim] (+bias) and labels with ~20% ignored."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, dim, generator=g).to(device, dtype)
    weight = (0.2 * torch.randn(vocab, dim, generator=g)).to(device, dtype)
    b = torch.randn(vocab, generator=g).to(device, dtype) if bias else None
    labels = torch.randint(0, vocab, lead, generator=g)
    labels[torch.rand(lead, generator=g) < ignore] = -100
    return hidden, weight, b, labels.to(device)


def run_fused(fn, hidden, weight, labels, bias=None, upstream=None, **options):
    """fn(...) and the gradients of sum(out * upstream) w.r.t. hidden, weight, bias."""
    # detach() keeps the storage and strides: strided inputs reach the kernels as they are.
    leaves = [t.detach().requires_grad_(True) if t is not None else None for t in (hidden, weight, bias)]
    out = fn(leaves[0], leaves[1], labels, bias=leaves[2], **options)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)) if upstream is None else upstream
    (out * upstream.to(out.device)).sum().backward()
    return out.detach(), [t.grad if t is not None else None for t in leaves], upstream


def reference_grads(hidden, weight, labels, bias, upstream, reduce=None, **head):
    """float64 values and gradients of sum(f64(out) * upstream)."""
    h64, w64, b64 = leaf64(hidden), leaf64(weight), leaf64(bias)
    out = token_logprobs64(h64, w64, labels, b64, **head)
    if reduce is not None:
        out = reduce(out)
    (out * upstream.double().to(out.device)).sum().backward()
    return out.detach(), [t.grad if t is not None else None for t in (h64, w64, b64)]


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_values_and_grads(device, backend, dtype, head):
    options = dict(HEADS[head])
    hidden, weight, bias, labels = make_inputs(device, dtype, bias=options.pop("bias", False))
    out, grads, upstream = run_fused(fdpo.token_logprobs, hidden, weight, labels, bias, backend=backend, **options)
    want, want_grads = reference_grads(hidden, weight, labels, bias, upstream, **options)
    assert out.dtype == torch.float32 and out.shape == labels.shape
    assert (out[labels == -100] == 0).all()
    assert_close(out, want, value_tol(backend, dtype), "log-probs")
    for got, ref, name in zip(grads, want_grads, ("dHidden", "dWeight", "dBias"), strict=True):
        if ref is not None:
            assert got.dtype == dtype
            assert_close(got, ref, grad_tol(backend, dtype), name)
    assert (grads[0][labels == -100] == 0).all(), "ignored tokens must get zero gradient"


@pytest.mark.parametrize("dtype", [torch.float16], ids=["fp16"])
@pytest.mark.parametrize("backend", FUSED)
def test_float16(device, backend, dtype):
    hidden, weight, bias, labels = make_inputs(device, dtype, bias=True)
    out, grads, upstream = run_fused(fdpo.token_logprobs, hidden, weight, labels, bias, backend=backend, softcap=8.0)
    want, want_grads = reference_grads(hidden, weight, labels, bias, upstream, softcap=8.0)
    assert_close(out, want, 1e-5, "log-probs")
    for got, ref, name in zip(grads, want_grads, ("dHidden", "dWeight", "dBias"), strict=True):
        assert_close(got, ref, 1e-2, name)


def _layouts(device):
    """(hidden, weight, labels) with the same logical values in different memory layouts."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(B, T + 1, 2 * D, generator=g).to(device)
    weight_t = (0.2 * torch.randn(D, V, generator=g)).to(device)
    labels = torch.randint(0, V, (B, T + 1), generator=g).to(device)
    labels[:, :5] = -100
    contiguous_w = weight_t.T.contiguous()
    sliced = base[:, :-1, :D]                                  # hidden[:, :-1], row stride 2D
    return {
        "2d contiguous": (sliced.reshape(-1, D).contiguous(), contiguous_w, labels[:, 1:].reshape(-1)),
        "3d contiguous": (sliced.contiguous(), contiguous_w, labels[:, 1:]),
        "3d sliced hidden[:, :-1]": (sliced, contiguous_w, labels[:, 1:]),
        "hidden dim stride 2": (base[:, :-1, ::2][..., :D], contiguous_w, labels[:, 1:]),
        "4d leading shape": (sliced.contiguous().view(B, 1, T, D), contiguous_w, labels[:, 1:].reshape(B, 1, T)),
        "non-mergeable leading dims": (sliced.permute(1, 0, 2)[::2], contiguous_w, labels[:, 1:].T[::2]),
        "transposed weight": (sliced, weight_t.T, labels[:, 1:]),
    }


@pytest.mark.parametrize("layout", ["2d contiguous", "3d contiguous", "3d sliced hidden[:, :-1]",
                                    "hidden dim stride 2", "4d leading shape", "non-mergeable leading dims",
                                    "transposed weight"])
@pytest.mark.parametrize("backend", FUSED)
def test_layouts_are_read_correctly(device, backend, layout):
    hidden, weight, labels = _layouts(device)[layout]
    out, grads, upstream = run_fused(fdpo.token_logprobs, hidden, weight, labels, backend=backend)
    want, want_grads = reference_grads(hidden, weight, labels, None, upstream)
    assert_close(out, want, 1e-5, "log-probs")
    assert grads[0].shape == hidden.shape
    assert_close(grads[0], want_grads[0], 2e-5, "dHidden")
    assert_close(grads[1], want_grads[1], 2e-5, "dWeight")


@pytest.mark.parametrize("backend", FUSED)
def test_strided_hidden_is_not_copied(device, backend):
    """hidden[:, :-1] reaches the kernels as a view of the caller's storage."""
    base = torch.randn(B, T + 1, D, device=device)
    hidden = base[:, :-1]
    seen = []
    ops, name = (kernels, "head_logprob_forward") if backend == "triton" else (chunked, "stats_forward")
    original = getattr(ops, name)

    def spy(policy, *args, **kwargs):
        seen.append((policy.hidden.untyped_storage().data_ptr(), policy.hidden.stride()))
        return original(policy, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ops, name, spy)
        fdpo.token_logprobs(hidden, torch.randn(V, D, device=device), torch.zeros(B, T, dtype=torch.long,
                                                                                    device=device), backend=backend)
    assert seen == [(base.untyped_storage().data_ptr(), ((T + 1) * D, D, 1))]


def _packed(labels_list, hidden_list):
    return torch.cat(hidden_list), torch.cat(labels_list)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_logprobs_padded_and_packed(device, backend, deterministic):
    hidden, weight, bias, labels = make_inputs(device, bias=True, seed=5)
    labels[1] = -100                                            # a sequence with every token ignored
    padded, padded_grads, upstream = run_fused(fdpo.sequence_logprobs, hidden, weight, labels, bias,
                                               backend=backend, softcap=6.0, deterministic=deterministic)
    want, want_grads = reference_grads(hidden, weight, labels, bias, upstream, reduce=lambda x: x.sum(-1),
                                       softcap=6.0)
    assert padded.shape == (B,) and padded[1] == 0
    assert_close(padded, want, 1e-5, "padded sums")
    for got, ref, name in zip(padded_grads, want_grads, ("dHidden", "dWeight", "dBias"), strict=True):
        assert_close(got, ref, 2e-5, name)
    assert (padded_grads[0][1] == 0).all(), "an all-ignored sequence gets zero gradient"

    # The same tokens packed back to back: variable lengths, an empty sequence, T tokens each
    # otherwise; sequence s of the packed batch is row s of the padded one (the empty one is 0).
    lengths = [T, 0, T, T]
    rows = [0, None, 1, 2]
    hidden_packed = torch.cat([hidden[r] for r in rows if r is not None])
    labels_packed = torch.cat([labels[r] for r in rows if r is not None])
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=device, dtype=torch.int32)
    upstream_packed = torch.stack([upstream[0], torch.tensor(0.7), upstream[1], upstream[2]])
    packed, packed_grads, _ = run_fused(fdpo.sequence_logprobs, hidden_packed, weight, labels_packed, bias,
                                        upstream=upstream_packed, cu_seqlens=cu, backend=backend, softcap=6.0,
                                        deterministic=deterministic)
    assert packed.shape == (4,) and packed[1] == 0
    assert_close(packed[[0, 2, 3]], padded, 1e-6, "packed vs padded sums")
    assert_close(packed_grads[0], padded_grads[0].reshape(-1, D), 1e-6, "packed vs padded dHidden")
    assert_close(packed_grads[1], padded_grads[1], 1e-6, "packed vs padded dWeight")


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_tokens(device, backend):
    hidden = torch.randn(0, D, device=device, requires_grad=True)
    weight = torch.randn(V, D, device=device, requires_grad=True)
    labels = torch.zeros(0, dtype=torch.long, device=device)
    out = fdpo.token_logprobs(hidden, weight, labels, backend=backend)
    assert out.shape == (0,) and out.dtype == torch.float32
    out.sum().backward()
    assert hidden.grad.shape == (0, D) and (weight.grad == 0).all()
    seq = fdpo.sequence_logprobs(hidden, weight, labels, cu_seqlens=torch.tensor([0, 0], device=device),
                                 backend=backend)
    assert seq.tolist() == [0.0]


@pytest.mark.parametrize("backend", FUSED)
def test_every_token_ignored(device, backend):
    hidden, weight, _, labels = make_inputs(device, ignore=1.0)
    out, grads, _ = run_fused(fdpo.sequence_logprobs, hidden, weight, labels, backend=backend)
    assert (out == 0).all() and (grads[0] == 0).all() and (grads[1] == 0).all()


@pytest.mark.parametrize("frozen", ["weight", "hidden", "bias"])
@pytest.mark.parametrize("backend", FUSED)
def test_frozen_inputs_skip_their_gradient(device, backend, frozen):
    hidden, weight, bias, labels = make_inputs(device, bias=True)
    leaves = {"hidden": hidden.clone(), "weight": weight.clone(), "bias": bias.clone()}
    for name, t in leaves.items():
        t.requires_grad_(name != frozen)
    calls = []
    ops, name = (kernels, "head_stats_backward") if backend == "triton" else (chunked, "stats_backward")
    original = getattr(ops, name)

    def spy(policy, tokens, grad, **kwargs):
        calls.append({k: getattr(grad, k) for k in ("need_hidden", "need_weight", "need_bias")})
        return original(policy, tokens, grad, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ops, name, spy)
        out = fdpo.token_logprobs(leaves["hidden"], leaves["weight"], labels, bias=leaves["bias"], backend=backend)
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device)
        (out * upstream).sum().backward()
    assert calls == [{f"need_{name}": name != frozen for name in ("hidden", "weight", "bias")}]
    assert leaves[frozen].grad is None
    _, want_grads = reference_grads(hidden, weight, labels, bias, upstream)
    for (name, t), ref in zip(leaves.items(), want_grads, strict=True):
        if name != frozen:
            assert_close(t.grad, ref, 2e-5, f"d{name}")


# On a GPU, the atomic backward's fp32 additions land in whatever order the programs finish, so
# repeated runs may differ in the last bits; the deterministic one must not. Shapes with many row
# and vocabulary tiles (and several runs) give the GPU's scheduler room to reorder. Under Triton's
# CPU interpreter the programs run one after another, so the atomic path is repeatable too: there
# these tests check only that the deterministic path gives the atomic path's values.
REPEATS_ON_GPU = 5


def repeatability_shape(device) -> dict:
    return {"lead": (8, 512), "vocab": 4096, "dim": 256} if device.type == "cuda" else {}


def test_deterministic_backward_is_bitwise_repeatable(device):
    hidden, weight, bias, labels = make_inputs(device, bias=True, seed=7, **repeatability_shape(device))
    repeats = REPEATS_ON_GPU if device.type == "cuda" else 2
    runs = [run_fused(fdpo.token_logprobs, hidden, weight, labels, bias, backend="triton", deterministic=det)
            for det in (*[True] * repeats, False)]
    for run in runs[1:-1]:
        for a, b in zip(runs[0][1], run[1], strict=True):
            assert torch.equal(a, b)
    for a, b in zip(runs[0][1], runs[-1][1], strict=True):
        assert_close(a, b, 1e-6, "deterministic vs atomic")


@pytest.mark.parametrize("masked", [False, True], ids=["", "masked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("splits", [2, 3])
def test_vocabulary_split_forward(device, splits, dtype, masked):
    """The split-vocabulary forward (used on GPUs when there are few row tiles; the interpreter runs one
    split unless told) and its combine kernel; `masked`: -inf bias over the first 130 vocabulary entries
    (a whole 128-column split, whose partial LSE is -inf) and on every 7th entry, the labels on unmasked
    entries."""
    hidden, weight, bias, labels = make_inputs(device, dtype, bias=True, seed=11)
    if masked:
        off = torch.zeros(V, dtype=torch.bool)
        off[:130] = True
        off[::7] = True
        bias = bias.masked_fill(off.to(device), float("-inf"))
        kept = (~off).nonzero().squeeze(1)
        labels = torch.where(labels == -100, labels, kept.to(device)[labels % kept.numel()])
    flat = labels.reshape(-1)
    rows = (flat != -100).nonzero().squeeze(1)
    seq_ids = (rows // T).to(torch.int32)
    softcap = None if masked else 4.0  # a soft cap would turn the -inf logits into -4
    policy = HeadInput(hidden, LMHead(weight, bias, softcap=softcap))
    tokens = ScoredTokens(rows, flat[rows].to(torch.int32), seq_ids, B)
    logprob, lse, sums = kernels.head_logprob_forward(policy, tokens, num_splits=splits)
    z = logits64(hidden, weight, bias, softcap=softcap).reshape(-1, V)[rows]
    want_lp = torch.log_softmax(z, -1).gather(1, flat[rows, None]).squeeze(1)
    assert_close(lse, torch.logsumexp(z, -1), 1e-6, "lse")
    assert_close(logprob, want_lp, 1e-6, "log-probs")
    assert_close(sums, torch.zeros(B, dtype=torch.float64).index_add(0, seq_ids.long().cpu(), want_lp.cpu()),
                 1e-6, "sequence sums")


def test_backends_agree(device):
    hidden, weight, bias, labels = make_inputs(device, bias=True, seed=13)
    results = {backend: run_fused(fdpo.token_logprobs, hidden, weight, labels, bias, backend=backend,
                                  softcap=3.0, temperature=1.3) for backend in BACKENDS}
    for backend in FUSED:
        assert_close(results[backend][0], results["reference"][0], 1e-5, f"{backend} log-probs")
        for got, ref in zip(results[backend][1], results["reference"][1], strict=True):
            assert_close(got, ref, 2e-5, f"{backend} gradient")


@pytest.mark.parametrize("backend", FUSED)
def test_never_allocates_tokens_times_vocab(device, backend):
    """The largest tensor of forward + backward stays below N x V; the naive path reaches it.

    N = 2048 and V = 5000 exceed the torch backend's CPU chunks (1024 x 2048), so a chunk is smaller
    than the full logits; the triton backend's scratch is O(N + V D).
    """
    n, vocab, dim = (2048, 5000, 16) if backend == "torch" else (300, 700, 16)
    hidden, weight, _, labels = make_inputs(device, lead=(n,), vocab=vocab, dim=dim)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    for name in (backend, "reference"):
        with AllocationTracker() as tracker:
            fdpo.token_logprobs(hidden, weight, labels, backend=name).sum().backward()
        if name == "reference":
            assert tracker.stats.largest_numel >= n * vocab, "the tracker must see the naive logits"
        else:
            assert tracker.stats.largest_numel < n * vocab, tracker.stats


@pytest.mark.parametrize("terms", ["logprob", "logprob+kl+entropy"])
def test_torch_backend_holds_few_chunk_buffers(terms):
    """The torch backend's [CHUNK_ROWS, chunk_vocab] float32 buffers on the CPU: the backward holds at most two
    besides the gradients (the logits and dz, formed in place), three with a reference KL and an
    entropy gradient; the forward two (the logits and their exponentials), four with a reference KL
    and the entropy (both heads' logits, the exponentials and the KL's or the entropy's factor). A
    chunk's buffers are freed before the next chunk's logits are allocated.

    N = 2048 rows and V = 5000 span two row chunks and three vocabulary chunks; D = 16 keeps the
    gradients and the gathered rows small next to one 8 MiB buffer (the 1 MiB of slack).
    """
    n, vocab, dim = 2048, 5000, 16
    hidden, weight, _, labels = make_inputs("cpu", lead=(n,), vocab=vocab, dim=dim)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    policy = HeadInput(hidden, LMHead(weight, softcap=20.0, temperature=0.8))
    with AllocationTracker() as forward:
        if terms == "logprob":
            out = head_stats(policy, labels, backend="torch").logprob.sum()
        else:
            ref = HeadInput(torch.randn(n, dim), LMHead(0.2 * torch.randn(vocab, dim)))
            stats = head_stats(policy, labels, ref=ref, request=StatsRequest(entropy=True, kl=True), backend="torch")
            out = (stats.logprob + stats.kl + stats.entropy).sum()
    with AllocationTracker() as backward:
        out.backward()
    chunk = chunked.CHUNK_ROWS * chunked.chunk_vocab(torch.device("cpu")) * 4
    gradients = 2 * (n + vocab) * dim * 4  # the final gradients and their float32 accumulators
    for tracker, buffers in ((forward, 2 if terms == "logprob" else 4), (backward, 2 if terms == "logprob" else 3)):
        assert (buffers - 1) * chunk < tracker.stats.peak_bytes <= gradients + buffers * chunk + 2**20, \
            (tracker.stats.peak_bytes, buffers)


def test_offsets_past_int32(device):
    """Row offsets of hidden and weight beyond 2**31 elements (int64 pointer arithmetic).

    Three tokens whose hidden rows sit 2**30 + 64 elements apart (row 2 starts past 2**31 although
    index and stride both fit in int32), and a head whose rows are 2**23 elements apart (row 299
    starts past 2**31): bf16 storages of ~4 GB and ~5 GB that are reserved but barely touched (only
    the rows read are ever paged in).
    """
    dim, vocab = 64, 300
    row_stride, w_stride = 2**30 + 64, 2**23
    h_store = torch.empty(2 * row_stride + dim, dtype=torch.bfloat16, device=device)
    w_store = torch.empty((vocab - 1) * w_stride + dim, dtype=torch.bfloat16, device=device)
    g = torch.Generator().manual_seed(17)
    h_vals = torch.randn(3, dim, generator=g).to(device, torch.bfloat16)
    w_vals = (0.2 * torch.randn(vocab, dim, generator=g)).to(device, torch.bfloat16)
    hidden = h_store.as_strided((3, dim), (row_stride, 1))
    weight = w_store.as_strided((vocab, dim), (w_stride, 1))
    hidden.copy_(h_vals)
    weight.copy_(w_vals)
    labels = torch.tensor([5, 17, vocab - 1], device=device)
    out, grads, upstream = run_fused(fdpo.token_logprobs, hidden, weight, labels, backend="triton")
    want, want_grads = reference_grads(h_vals, w_vals, labels, None, upstream)
    assert_close(out, want, 1e-5, "log-probs")
    assert_close(grads[0], want_grads[0], 1e-2, "dHidden")
    assert_close(grads[1], want_grads[1], 1e-2, "dWeight")


def test_fused_lm_head_module_shares_the_linear(device):
    linear = torch.nn.Linear(D, V, bias=True).to(device)
    head = fdpo.FusedLMHead.from_linear(linear, softcap=10.0)
    assert head.weight is linear.weight and head.bias is linear.bias
    hidden, _, _, labels = make_inputs(device)
    hidden.requires_grad_(True)
    seq = head(hidden, labels, per_sequence=True)
    seq.sum().backward()
    want, want_grads = reference_grads(hidden, linear.weight, labels, linear.bias, torch.ones(B),
                                       reduce=lambda x: x.sum(-1), softcap=10.0)
    assert_close(seq, want, 1e-5, "sequence sums")
    assert_close(linear.weight.grad, want_grads[1], 2e-5, "dWeight reaches the Linear")
    assert_close(linear.bias.grad, want_grads[2], 2e-5, "dBias reaches the Linear")
    tokens = head(hidden, labels)
    assert tokens.shape == labels.shape


def test_fused_lm_head_keeps_a_plain_tensor(device):
    """A computed (non-Parameter) weight stays in the autograd graph of whatever produced it."""
    base = torch.randn(V, D, device=device, requires_grad=True)
    head = fdpo.FusedLMHead(base * 2.0)
    hidden, _, _, labels = make_inputs(device)
    head(hidden, labels).sum().backward()
    assert base.grad is not None and base.grad.abs().sum() > 0
    assert list(head.parameters()) == []


def test_vocabulary_splits_of_no_rows_on_a_gpu(monkeypatch):
    """An all-ignored micro-batch (no scored row) on a GPU: one split, not a division by zero tiles."""
    import fdpo.kernels.head_logprob_fwd as fwd
    from fdpo.kernels.launch import tiles_for

    class Properties:
        multi_processor_count = 132

    monkeypatch.setattr(fwd, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Properties())
    tiles, cuda = tiles_for("forward", torch.bfloat16), torch.device("cuda")
    assert fwd._vocab_splits(0, 128256, tiles, cuda) == 1
    assert fwd._vocab_splits(tiles.block_n, 128256, tiles, cuda) == 264  # one row tile: 2 programs per SM
    assert fwd._vocab_splits(1 << 20, 128256, tiles, cuda) == 1


@pytest.mark.parametrize("temperature", [1.0, 1e-3])
@pytest.mark.parametrize("softcap", [30.0, 1e3, 1e4])
@pytest.mark.parametrize("backend", FUSED)
def test_soft_cap_keeps_the_precision_of_the_logits(device, backend, softcap, temperature):
    """c tanh(z / c) is ~z for |z| << c: its error must be float32 rounding of the logits, not of c. tanh as
    1 - 2 / (exp(2x) + 1) has an absolute error of ~6e-8 whatever x, so the capped logit was off by ~c 1e-7:
    log-probs off by 1.2e-3 at c = 1e4 (0.93 at temperature 1e-3), 800 times the float32 rounding of the
    logits. Bound: a few ulps of the row's largest float64 logit, for values and (norm-wise) gradients."""
    hidden, weight, _, labels = make_inputs(device, lead=(2, 8), vocab=256, dim=16, ignore=0.0)
    weight = weight * 5.0  # logits of a few units to ~20
    out, grads, upstream = run_fused(fdpo.token_logprobs, hidden, weight, labels, backend=backend,
                                     softcap=softcap, temperature=temperature)
    want, want_grads = reference_grads(hidden, weight, labels, None, upstream, softcap=softcap,
                                       temperature=temperature)
    ulp = 2.0 ** -24 * logits64(hidden, weight, None, softcap, temperature).abs().amax(-1)
    err = (out.double() - want).abs()
    assert (err <= 16 * ulp).all(), f"log-prob errors {(err / ulp).max().item():.1f} ulps of the largest logit"
    for got, ref, name in zip(grads[:2], want_grads[:2], ("dHidden", "dWeight"), strict=True):
        assert_close(got, ref, 16 * ulp.max().item(), name)


@triton.jit
def _tanh_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tanh(tl.load(x_ptr + offs, mask=mask, other=0.0)), mask=mask)


def test_the_kernels_tanh_is_odd_and_within_a_few_ulps():
    """`tiles.tanh` (the soft cap's) against float64 over [-20, 20] (both sides of the branch at
    |x| = 0.4 densely), tiny and huge arguments, +-inf and NaN: exactly odd, within 4 ulps."""
    grid = torch.cat([torch.linspace(-20, 20, 40001), torch.linspace(-0.45, 0.45, 20001),
                      10.0 ** torch.arange(-38.0, 38.0, 0.5)]).float()
    x = torch.cat([grid, -grid, torch.tensor([0.0, float("inf"), -float("inf"), float("nan")])])
    out = torch.empty_like(x)
    _tanh_kernel[(1,)](x, out, x.numel(), triton.next_power_of_2(x.numel()))
    finite = x[:-1]
    want = torch.tanh(finite.double())
    ulp = torch.where(want == 0, 0.0, 2.0 ** (torch.frexp(want.float()).exponent.double() - 24))
    err = (out[:-1].double() - want).abs()
    assert (err <= 4 * ulp + 1e-45).all(), f"{(err / ulp.clamp(min=1e-45)).max().item():.2f} ulps"
    half = grid.numel()
    assert torch.equal(out[half:2 * half], -out[:half]), "tanh(-x) == -tanh(x)"
    assert out[-1].isnan()


@pytest.mark.parametrize("deterministic", [False, True])
def test_deterministic_routes_the_sums_and_the_backward_to_the_ordered_kernels(monkeypatch, deterministic):
    """The interpreter runs a launch's programs one after another, so the atomic paths are bitwise
    repeatable there too and the repeatability tests cannot tell them from the ordered ones: the routing
    is checked instead. deterministic=True keeps the per-sequence sums out of the forward kernel's
    atomics and gives the fused backward deterministic=True; False uses the atomics."""
    seen = {}
    forward, backward = kernels.head_logprob_forward, kernels.head_stats_backward

    def spy_forward(policy, tokens, **options):
        seen["atomic_sums"] = tokens.seq_ids is not None
        return forward(policy, tokens, **options)

    def spy_backward(*args, deterministic, **options):
        seen["ordered_backward"] = deterministic
        return backward(*args, deterministic=deterministic, **options)

    monkeypatch.setattr(kernels, "head_logprob_forward", spy_forward)
    monkeypatch.setattr(kernels, "head_stats_backward", spy_backward)
    hidden, weight, _, labels = make_inputs("cpu")
    run_fused(fdpo.sequence_logprobs, hidden, weight, labels, backend="triton", deterministic=deterministic,
              backward_buffer_bytes=0)
    assert seen == {"atomic_sums": not deterministic, "ordered_backward": deterministic}


@pytest.mark.parametrize("deterministic", [False, True])
def test_a_long_sequences_sum_is_exact_to_float32_rounding(device, deterministic):
    """One 4096-token sequence (sum about -2.4e4, one float32 ulp 2e-3): the triton backend's sum is
    within one ulp of float64, whether added by atomics (fp64 accumulators) or in a fixed order. A
    float32 accumulator adding one token at a time drifts by several ulps at this length."""
    tokens = 4096
    hidden, weight, _, labels = make_inputs(device, lead=(1, tokens), dim=16, seed=5, ignore=0.0)
    got = fdpo.sequence_logprobs(hidden, weight, labels, backend="triton", deterministic=deterministic)
    want = token_logprobs64(leaf64(hidden), leaf64(weight), labels).sum()
    ulp = torch.finfo(torch.float32).eps * 2.0 ** math.floor(math.log2(abs(want.item())))
    assert abs(want.item()) > 2e4
    assert abs(got.double().cpu().item() - want.item()) <= ulp
