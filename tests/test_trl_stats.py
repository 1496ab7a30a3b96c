"""TRL's per-token statistics and head options (docs/math.md 13) on every backend, against float64.

`fdpo.token_statistics` returns the log-prob, entropy, mean logit, top-1 flag and log sum p^2 from
one pass; `LMHead.scale` multiplies the logits before the soft cap; heads may mix dtypes with their
hidden states; `LMHead.gather` is entered around every use of the weight, backward included. Every
value is checked against float64 computed from materialized logits, every gradient against float64
autograd. Shapes are small and odd (N = 37 tokens, V = 211 spans two interpreter vocabulary tiles,
D = 48), 20% of the tokens are ignored, and half the labels are the float64 argmax so that is_top1
is True often enough to be tested. Tolerances follow test_token_stats.py.
"""

from contextlib import contextmanager

import pytest
import torch

import fdpo
from fdpo.head_stats import head_stats
from fdpo.heads import HeadInput, HeadStats, LMHead, StatsRequest

from float64_reference import assert_close, leaf64
from partitioned import Partitioned

N, V, D = 37, 211, 48
BACKENDS = ("triton", "torch", "reference")
FUSED = ("triton", "torch")
EVERYTHING = ("logprob", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")
HEADS = {
    "scale": dict(logit_scale=2.5),
    "scale+softcap+temperature": dict(logit_scale=1.6, softcap=4.0, temperature=0.8),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Every hand-written backward: triton's fused one with atomics, its ordered one, its split one (a dz
# buffer of 16 fp32 rows: several chunks), and torch's; then the reference's autograd.
BACKWARDS = {"triton": {}, "triton-ordered": dict(deterministic=True),
             "triton-split": dict(backward_buffer_bytes=16 * V * 4), "torch": {}, "reference": {}}


@pytest.fixture
def split_calls(monkeypatch):
    """How many times the triton backend ran the split backward."""
    import fdpo.kernels as kernels

    calls, split = [], kernels.head_stats_split_backward
    monkeypatch.setattr(kernels, "head_stats_split_backward", lambda *a, **k: calls.append(1) or split(*a, **k))
    return calls


def run_backward(backward, split_calls):
    """(backend, options) of a BACKWARDS key, and a check to run after the backward."""
    backend, options = backward.split("-")[0], BACKWARDS[backward]

    def ran():
        assert bool(split_calls) == ("backward_buffer_bytes" in options), "the backward asked for ran"
    return backend, options, ran


def logits64(hidden, weight, bias=None, softcap=None, temperature=1.0, logit_scale=1.0):
    """float64 z = capped(scale (h W^T + b)) / T."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    z = logit_scale * z
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def stats64(hidden, weight, labels, bias=None, **head):
    """float64 statistics of `fdpo.token_statistics` (is_top1: torch.argmax's first maximum), 0 / False
    at ignored tokens."""
    z = logits64(hidden, weight, bias, **head)
    logp = torch.log_softmax(z, dim=-1)
    ignored = labels == -100
    safe = labels.masked_fill(ignored, 0)
    out = {"logprob": logp.gather(-1, safe[..., None]).squeeze(-1),
           "entropy": -(logp.exp() * logp).sum(-1),
           "mean_logits": z.mean(-1),
           "is_top1": z.argmax(-1) == safe,
           "log_sum_sq_probs": torch.logsumexp(2 * logp, dim=-1)}
    return {k: v.masked_fill(ignored, 0) for k, v in out.items()}


def make_inputs(dtype=torch.float32, weight_dtype=None, seed=0, device="cpu", **head):
    """hidden [N, D], weight [V, D], bias [V] and labels [N]: 20% ignored, half of the rest the argmax.

    Drawn on the CPU (the same values on every device), then moved to `device`; the float64 references
    are computed from them where they are.
    """
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g).to(dtype)
    weight = (0.3 * torch.randn(V, D, generator=g)).to(weight_dtype or dtype)
    bias = torch.randn(V, generator=g).to(weight_dtype or dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    top = logits64(hidden, weight, bias, **head).argmax(-1)
    labels = torch.where(torch.rand(N, generator=g) < 0.5, top, labels)
    labels[torch.rand(N, generator=g) < 0.2] = -100
    return tuple(t.to(device) for t in (hidden, weight, bias, labels))


def value_tol(backend, dtype):
    return 3e-2 if backend == "reference" and dtype != torch.float32 else 1e-5


def grad_tol(backend, dtype):
    if dtype == torch.float32:
        return 2e-5
    return 3e-2 if backend == "reference" else 1e-2


def check_values(got, want, labels, tol, exact_top1=True):
    assert set(got) == set(want)
    scored = labels != -100
    for name in want:
        assert got[name].shape == labels.shape, name
        assert got[name].dtype == (torch.bool if name == "is_top1" else torch.float32), name
        assert not got[name][~scored].any(), f"{name} must be 0 (False) at ignored tokens"
        if name != "is_top1":
            assert_close(got[name], want[name], tol, name)
    top1, want_top1 = got["is_top1"][scored], want["is_top1"][scored]
    assert want_top1.sum() >= 5 and (~want_top1).sum() >= 5, "the inputs test both outcomes"
    agreement = (top1 == want_top1).float().mean().item()
    assert agreement == 1.0 if exact_top1 else agreement >= 0.9, f"is_top1 agrees on {agreement:.0%} of tokens"


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_output_against_float64(device, backend, dtype, heads):
    dtype, head = DTYPES[dtype], HEADS[heads]
    hidden, weight, bias, labels = make_inputs(dtype, device=device, **head)
    got = fdpo.token_statistics(hidden, weight, labels, outputs=EVERYTHING, bias=bias, backend=backend, **head)
    want = stats64(hidden, weight, labels, bias, **head)
    # The reference backend in bf16 rounds its logits to bf16: near-ties of the top-1 may flip.
    exact_top1 = backend != "reference" or dtype == torch.float32
    check_values(got, want, labels, value_tol(backend, dtype), exact_top1)
    assert (got["log_sum_sq_probs"] <= 1e-6).all() and (got["log_sum_sq_probs"] >= -got["entropy"] - 1e-4).all(), \
        "-H <= log sum p^2 <= 0 (Renyi-2 entropy is at most the Shannon entropy)"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backward", BACKWARDS)
def test_logprob_and_entropy_gradients_with_scale_and_softcap(device, backward, dtype, split_calls):
    backend, options, ran = run_backward(backward, split_calls)
    dtype, head = DTYPES[dtype], HEADS["scale+softcap+temperature"]
    hidden, weight, bias, labels = make_inputs(dtype, seed=1, device=device, **head)
    g = torch.Generator().manual_seed(2)
    up_lp, up_ent = torch.randn(N, generator=g).to(device), torch.randn(N, generator=g).to(device)
    leaves = [t.detach().requires_grad_(True) for t in (hidden, weight, bias)]
    got = fdpo.token_statistics(leaves[0], leaves[1], labels, outputs=EVERYTHING, bias=leaves[2], backend=backend,
                                **head, **options)
    assert got["logprob"].requires_grad and got["entropy"].requires_grad
    assert not any(got[k].requires_grad for k in ("mean_logits", "is_top1", "log_sum_sq_probs")), "constants"
    (got["logprob"] * up_lp + got["entropy"] * up_ent).sum().backward()
    ran()
    leaves64 = [leaf64(t) for t in (hidden, weight, bias)]
    want = stats64(*leaves64[:2], labels, leaves64[2], **head)
    (want["logprob"] * up_lp.double() + want["entropy"] * up_ent.double()).sum().backward()
    for t, t64, name in zip(leaves, leaves64, ("dHidden", "dWeight", "dBias"), strict=True):
        assert t.grad.dtype == dtype
        assert_close(t.grad, t64.grad, grad_tol(backend, dtype), name)
    assert not leaves[0].grad[labels == -100].any(), "ignored tokens get no gradient"


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)],
                         ids=["fp32 hidden, bf16 head", "bf16 hidden, fp32 head"])
@pytest.mark.parametrize("backward", BACKWARDS)
def test_mixed_dtype_heads_compute_in_float32(device, backward, dtypes, split_calls):
    """Values and gradients as tight as fp32 (a bf16 product would miss by ~1e-2), gradients in each input's dtype."""
    backend, options, ran = run_backward(backward, split_calls)
    hidden_dtype, head_dtype = dtypes
    head = HEADS["scale+softcap+temperature"]
    hidden, weight, bias, labels = make_inputs(hidden_dtype, head_dtype, seed=3, device=device, **head)
    leaves = [t.detach().requires_grad_(True) for t in (hidden, weight, bias)]
    got = fdpo.token_statistics(leaves[0], leaves[1], labels, outputs=EVERYTHING, bias=leaves[2], backend=backend,
                                **head, **options)
    want = stats64(hidden, weight, labels, bias, **head)
    check_values({k: v.detach() for k, v in got.items()}, want, labels, 1e-5)
    g = torch.Generator().manual_seed(4)
    up_lp, up_ent = torch.randn(N, generator=g).to(device), torch.randn(N, generator=g).to(device)
    (got["logprob"] * up_lp + got["entropy"] * up_ent).sum().backward()
    ran()
    leaves64 = [leaf64(t) for t in (hidden, weight, bias)]
    want = stats64(*leaves64[:2], labels, leaves64[2], **head)
    (want["logprob"] * up_lp.double() + want["entropy"] * up_ent.double()).sum().backward()
    for t, t64, name in zip(leaves, leaves64, ("dHidden", "dWeight", "dBias"), strict=True):
        assert t.grad.dtype == t.dtype, f"{name} comes back in its input's dtype"
        assert_close(t.grad, t64.grad, 2e-5 if t.dtype == torch.float32 else 1e-2, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_is_top1_is_the_first_argmax(device, backend):
    """Exact ties (integer-valued inputs: every sum is exact in any order): a tie before the label
    makes it not the first argmax, a tie after it does not; the tied columns sit in different
    vocabulary tiles of the interpreter (128 wide)."""
    g = torch.Generator().manual_seed(5)
    half = D // 2
    hidden = torch.randint(1, 3, (4, D), generator=g).float()
    hidden[:2, half:] = 0.0                     # rows 0, 1 live on the first half of the dims,
    hidden[2:, :half] = 0.0                     # rows 2, 3 on the second
    weight = torch.randint(-2, 3, (V, D), generator=g).float()
    weight[[20, 150]] = torch.cat([torch.full((half,), 3.0), torch.zeros(D - half)])  # rows 0, 1: max, tied
    weight[[60, 61]] = torch.cat([torch.zeros(half), torch.full((D - half,), 3.0)])   # rows 2, 3: max, tied
    labels = torch.tensor([150, 20, 60, 61])
    z = logits64(hidden, weight)
    assert all(z[r, 20] == z[r, 150] == z[r].max() > z[r, 60] for r in (0, 1))
    assert all(z[r, 60] == z[r, 61] == z[r].max() > z[r, 20] for r in (2, 3))
    got = fdpo.token_statistics(hidden.to(device), weight.to(device), labels.to(device), outputs=("is_top1",),
                                backend=backend, logit_scale=0.5, softcap=50.0)["is_top1"]
    assert got.tolist() == [False, True, True, False]


@pytest.mark.parametrize("backward", BACKWARDS)
def test_gather_is_entered_in_the_backward(device, backward, split_calls):
    backend, options, ran = run_backward(backward, split_calls)
    hidden, weight, bias, labels = make_inputs(seed=6, device=device)
    head = dict(logit_scale=1.3, softcap=5.0, **options)
    part_w, part_b = Partitioned(weight), Partitioned(bias)

    @contextmanager
    def gather():
        with part_w.gather(), part_b.gather():
            yield

    h = hidden.clone().requires_grad_(True)
    out = fdpo.token_statistics(h, part_w.param, labels, outputs=("entropy",), bias=part_b.param, gather=gather,
                                backend=backend, **head)
    assert part_w.param.numel() == 0, "the weight is partitioned again after the forward"
    grads = torch.autograd.grad((out["logprob"] + out["entropy"]).sum(), [h, part_w.param, part_b.param])
    assert part_w.entries == 2, "the backward entered the gather once"
    ran()

    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    plain = fdpo.token_statistics(leaves[0], leaves[1], labels, outputs=("entropy",), bias=leaves[2],
                                  backend=backend, **head)
    want = torch.autograd.grad((plain["logprob"] + plain["entropy"]).sum(), leaves)
    for got, expected, name in zip(grads, want, ("dHidden", "dWeight", "dBias"), strict=True):
        assert torch.allclose(got, expected, rtol=1e-6, atol=1e-7), name


def test_a_backward_outside_the_gather_reads_the_empty_weight():
    """The control of the test above: its partitioning really bites when only the forward gathers."""
    hidden, weight, _, labels = make_inputs(seed=6)
    part = Partitioned(weight, forward_only=True)
    h = hidden.clone().requires_grad_(True)
    out = fdpo.token_statistics(h, part.param, labels, gather=part.gather, backend="torch")
    with pytest.raises((RuntimeError, IndexError, ValueError)):  # the empty weight has no [V, D] shape
        torch.autograd.grad(out["logprob"].sum(), [h, part.param])


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_head_carries_its_own_scale_and_gather(device, backend):
    """Policy and reference scales differ; the KL's gradient recomputes the reference inside its gather."""
    hidden, weight, bias, labels = make_inputs(seed=7, device=device)
    g = torch.Generator().manual_seed(8)
    ref_hidden = hidden + 0.3 * torch.randn(N, D, generator=g).to(device)
    ref_weight = 0.3 * torch.randn(V, D, generator=g).to(device)
    ref_part = Partitioned(ref_weight)
    leaves = [t.detach().requires_grad_(True) for t in (hidden, weight, bias)]
    policy = HeadInput(leaves[0], LMHead(leaves[1], leaves[2], 6.0, 0.9, scale=1.5))
    ref = HeadInput(ref_hidden, LMHead(ref_part.param, None, None, 0.9, scale=0.7, gather=ref_part.gather))
    out = head_stats(policy, labels, ref=ref, request=StatsRequest(kl=True), backend=backend)
    up = torch.randn(N, generator=g).to(device)
    (out.kl * up + out.logprob).sum().backward()
    assert backend == "reference" or ref_part.entries == 2, "the KL's backward gathered the reference"

    leaves64 = [leaf64(t) for t in (hidden, weight, bias)]
    z = logits64(*leaves64[:2], leaves64[2], softcap=6.0, temperature=0.9, logit_scale=1.5)
    z_ref = logits64(ref_hidden, ref_weight, temperature=0.9, logit_scale=0.7)
    logp, ref_logp = z.log_softmax(-1), z_ref.log_softmax(-1)
    scored = labels != -100
    safe = labels.masked_fill(~scored, 0)[:, None]
    kl = ((ref_logp.exp() * (ref_logp - logp)).sum(-1) * scored)
    want = {"kl": kl, "logprob": logp.gather(-1, safe).squeeze(-1) * scored,
            "ref_logprob": ref_logp.gather(-1, safe).squeeze(-1) * scored}
    for name, value in want.items():
        assert_close(getattr(out, name).detach(), value.detach(), 1e-5, name)
    (kl * up.double() + want["logprob"]).sum().backward()
    for t, t64, name in zip(leaves, leaves64, ("dHidden", "dWeight", "dBias"), strict=True):
        assert_close(t.grad, t64.grad, 2e-5, name)


def test_only_the_requested_outputs_and_logprob_always(device):
    hidden, weight, _, labels = make_inputs(seed=9, device=device)
    assert set(fdpo.token_statistics(hidden, weight, labels, outputs=())) == {"logprob"}
    got = fdpo.token_statistics(hidden, weight, labels, outputs=["is_top1", "mean_logits"], backend="torch")
    assert list(got) == ["logprob", "mean_logits", "is_top1"]
    assert list(fdpo.token_statistics(hidden, weight, labels, outputs=("logprob", "entropy"))) == ["logprob", "entropy"]


def test_head_stats_carries_the_new_fields():
    """HeadStats lists the constants after the older fields; as_dict and split_pairs keep them."""
    stats = HeadStats(torch.zeros(4), mean_logits=torch.ones(4), is_top1=torch.tensor([True, False, True, True]),
                      log_sum_sq_probs=-torch.ones(4))
    assert list(stats.as_dict()) == ["logprob", "mean_logits", "is_top1", "log_sum_sq_probs"]
    chosen, rejected = stats.split_pairs(2)
    assert chosen.is_top1.tolist() == [True, False] and rejected.mean_logits.tolist() == [1.0, 1.0]


@pytest.mark.parametrize("changes, error, message", [
    (dict(outputs=("logprob", "logits")), ValueError,
     r"outputs must be names among \('logprob', 'entropy', 'mean_logits', 'is_top1', 'log_sum_sq_probs'\); "
     r"unknown: \['logits'\]"),
    (dict(outputs="entropy"), TypeError, "outputs must be a tuple of names"),
    (dict(logit_scale=0.0), ValueError, "logit_scale .* must be a positive finite number, got 0.0"),
    (dict(logit_scale=float("inf")), ValueError, "logit_scale .* must be a positive finite number"),
    (dict(logit_scale=float("nan")), ValueError, "logit_scale .* must be a positive finite number"),
    (dict(logit_scale="2"), TypeError, "logit_scale .* must be a number, got str"),
    (dict(gather=object()), TypeError, "gather must be None or a zero-argument callable"),
    (dict(weight=torch.ones(V, D, dtype=torch.int32)), TypeError, "weight dtype torch.int32 is not float16"),
    (dict(bias=torch.ones(V, dtype=torch.int64)), TypeError, "bias dtype torch.int64 is not float16"),
])
def test_token_statistics_rejects(changes, error, message):
    hidden, weight, _, labels = make_inputs(seed=10)
    args = dict(hidden=hidden, weight=weight, labels=labels)
    args.update({k: changes.pop(k) for k in list(changes) if k in args})
    with pytest.raises(error, match=message):
        fdpo.token_statistics(args["hidden"], args["weight"], args["labels"], backend="torch", **changes)


@pytest.mark.parametrize("request_", [StatsRequest(mean_logits=True), StatsRequest(top1=True),
                                      StatsRequest(log_sum_sq_probs=True)], ids=["mean", "top1", "sq"])
def test_per_sequence_sums_of_the_constants_are_refused(request_):
    hidden, weight, _, labels = make_inputs(seed=11)
    with pytest.raises(ValueError, match="per-token statistics: per-sequence sums"):
        head_stats(HeadInput(hidden.view(1, N, D), LMHead(weight)), labels.view(1, N), request=request_,
                   per_sequence=True, backend="torch")


def test_kernels_that_do_not_take_scales_or_mixed_heads_refuse_them(device):
    """A launcher that does not pass scaled_mixed=True gets errors, never a silently unscaled head."""
    from fdpo.heads import ScoredTokens
    from fdpo.kernels.validate import check_head_inputs

    hidden, weight, _, labels = make_inputs(seed=12, device=device)
    tokens = ScoredTokens(torch.arange(N, device=device), labels.clamp(min=0).int())
    with pytest.raises(ValueError, match=r"logit_scale 2\.0 is not taken by this kernel"):
        check_head_inputs(HeadInput(hidden.view(1, N, D), LMHead(weight, scale=2.0)), tokens)
    with pytest.raises(TypeError, match=r"must match hidden dtype torch\.float32 for this kernel"):
        check_head_inputs(HeadInput(hidden.view(1, N, D), LMHead(weight.bfloat16())), tokens)
    check_head_inputs(HeadInput(hidden.view(1, N, D), LMHead(weight.bfloat16(), scale=2.0)), tokens,
                      scaled_mixed=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_scored_token(device, backend):
    """Every label ignored: zeros and False of the labels' shape, and zero gradients."""
    hidden, weight, _, labels = make_inputs(seed=13, device=device)
    h = hidden.clone().requires_grad_(True)
    got = fdpo.token_statistics(h, weight, torch.full_like(labels, -100), outputs=EVERYTHING, backend=backend,
                                logit_scale=3.0)
    assert set(got) == set(EVERYTHING) and all(v.shape == labels.shape and not v.any() for v in got.values())
    assert got["is_top1"].dtype == torch.bool
    (got["logprob"] + got["entropy"]).sum().backward()
    assert h.grad is not None and not h.grad.any()
