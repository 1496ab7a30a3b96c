"""Bad input raises ValueError/TypeError naming the argument and what is allowed."""

import math
import sys

import pytest
import torch

import fdpo
import fdpo.kernels as kernels
from fdpo.backends import resolve_backend
from fdpo.heads import HeadInput, LMHead, ScoredTokens, StatsGrad

N, V, D = 6, 11, 8


def good(device="cpu"):
    return dict(hidden=torch.randn(N, D, device=device), weight=torch.randn(V, D, device=device),
                labels=torch.randint(0, V, (N,), device=device))


def call(fn=fdpo.token_logprobs, **changes):
    args = good()
    options = {k: changes.pop(k) for k in list(changes) if k not in args}
    args.update(changes)
    return fn(args["hidden"], args["weight"], args["labels"], **options)


@pytest.mark.parametrize("changes, error, message", [
    (dict(hidden=torch.randint(0, 3, (N, D))), TypeError, "hidden must be a float16, bfloat16 or float32"),
    (dict(hidden=torch.randn(N, D, dtype=torch.float64)), TypeError, "hidden must be"),
    (dict(weight=torch.randn(V, D + 1)), ValueError, r"weight must be a \[V, D\] tensor with D = 8"),
    (dict(weight=torch.randn(V)), ValueError, "weight must be"),
    (dict(weight=torch.randn(V, D, dtype=torch.float64)), TypeError, "weight dtype torch.float64 is not float16"),
    (dict(bias=torch.randn(V + 1)), ValueError, r"bias must have shape \[V\] = \[11\]"),
    (dict(bias=torch.ones(V, dtype=torch.int32)), TypeError, "bias dtype torch.int32 is not float16"),
    (dict(labels=torch.rand(N)), TypeError, "labels must be an integer tensor"),
    (dict(labels=torch.ones(N, dtype=torch.bool)), TypeError, "labels must be an integer tensor"),
    (dict(labels=torch.zeros(N + 1, dtype=torch.long)), ValueError, "labels shape"),
    (dict(labels=torch.tensor([0, 1, 2, 3, 4, V])), ValueError, r"labels must be in \[0, 11\) or equal ignore_index"),
    (dict(labels=torch.tensor([0, 1, -5, 3, 4, 5])), ValueError, "found -5 at index"),
    (dict(weight=torch.randn(V, D, device="meta")), ValueError, "weight is on meta but hidden is on cpu"),
    (dict(softcap=0.0), ValueError, "softcap must be a positive finite number"),
    (dict(temperature=-1.0), ValueError, "temperature must be a positive finite number"),
    (dict(temperature=True), ValueError, "temperature must be a positive finite number, got True"),
    (dict(softcap=True), ValueError, "softcap must be a positive finite number or None, got True"),
    (dict(backend="cuda"), ValueError, r"backend must be one of \('auto', 'triton', 'torch', 'reference'\)"),
])
def test_token_logprobs_rejects(changes, error, message):
    with pytest.raises(error, match=message):
        call(**changes)


def test_ignore_index_may_be_any_value():
    labels = torch.tensor([0, 1, 7, 7, 4, 5])
    out = call(labels=labels, ignore_index=7, backend="torch")
    assert out[2] == 0 and out[3] == 0 and (out[[0, 1, 4, 5]] < 0).all()


@pytest.mark.parametrize("cu, error, message", [
    (torch.tensor([0.0, 6.0]), TypeError, "cu_seqlens must be a 1-D integer tensor"),
    (torch.tensor([6]), ValueError, r"cu_seqlens must start at 0, never decrease and end at N = 6; got \[6\]"),
    (torch.tensor([], dtype=torch.long), TypeError, "cu_seqlens must be a 1-D integer tensor"),
    (torch.tensor([1, 6]), ValueError, "cu_seqlens must start at 0, never decrease and end at N = 6"),
    (torch.tensor([0, 4, 2, 6]), ValueError, "never decrease"),
    (torch.tensor([0, 5]), ValueError, "end at N = 6"),
])
def test_sequence_logprobs_rejects_bad_cu_seqlens(cu, error, message):
    with pytest.raises(error, match=message):
        call(fdpo.sequence_logprobs, cu_seqlens=cu)


def test_sequence_logprobs_needs_a_layout():
    with pytest.raises(ValueError, match=r"needs padded hidden \[B, T, D\]"):
        call(fdpo.sequence_logprobs)
    with pytest.raises(ValueError, match=r"packed layout \(cu_seqlens given\) needs hidden \[N, D\]"):
        fdpo.sequence_logprobs(torch.randn(2, 3, D), torch.randn(V, D), torch.zeros(2, 3, dtype=torch.long),
                               cu_seqlens=torch.tensor([0, 6]))


def test_triton_backend_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.setattr(kernels.launch, "interpreting", lambda: False)
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        resolve_backend("triton", torch.device("cpu"))
    assert resolve_backend("auto", torch.device("cpu")).name == "torch"


def test_launchers_check_their_operands():
    hidden, weight = torch.randn(1, N, D), torch.randn(V, D)
    rows, labels = torch.arange(N), torch.zeros(N, dtype=torch.int32)
    head, tokens = HeadInput(hidden, LMHead(weight)), ScoredTokens(rows, labels)
    with pytest.raises(TypeError, match="rows must be a 1-D int64 tensor"):
        kernels.head_logprob_forward(head, ScoredTokens(rows.int(), labels))
    with pytest.raises(TypeError, match=r"labels must be int32 of shape \(6,\)"):
        kernels.head_logprob_forward(head, ScoredTokens(rows, labels.long()))
    with pytest.raises(ValueError, match=r"hidden must be \[B, T, D\]"):
        kernels.head_logprob_forward(HeadInput(hidden[0], LMHead(weight)), tokens)
    with pytest.raises(ValueError, match="num_seqs must be >= 1"):
        kernels.head_logprob_forward(head, ScoredTokens(rows, labels, seq_ids=labels, num_seqs=0))
    with pytest.raises(ValueError, match=r"logprob_grad must be float32 of shape \(6,\)"):
        kernels.head_stats_backward(head, tokens, StatsGrad(torch.zeros(N), torch.zeros(N - 1)))
    with pytest.raises(ValueError, match="need_bias=True but bias is None"):
        kernels.head_stats_backward(head, tokens, StatsGrad(torch.zeros(N), torch.zeros(N), need_bias=True))
    # The kernels read per-row tensors at ptr + r: a strided view would be read as other rows' values.
    strided = torch.zeros(N, 2)[:, 0]
    with pytest.raises(ValueError, match=r"logprob_grad must be contiguous .* pass logprob_grad.contiguous\(\)"):
        kernels.head_stats_split_backward(head, tokens, StatsGrad(torch.zeros(N), strided), buffer_bytes=1 << 20)
    with pytest.raises(ValueError, match="lse must be contiguous"):
        kernels.head_stats_backward(head, tokens, StatsGrad(strided, torch.zeros(N)))
    with pytest.raises(ValueError, match="rows must be contiguous"):
        kernels.head_logprob_forward(head, ScoredTokens(torch.arange(2 * N)[::2], labels))
    with pytest.raises(ValueError, match="labels must be contiguous"):
        kernels.head_logprob_forward(head, ScoredTokens(rows, torch.zeros(N, 2, dtype=torch.int32)[:, 0]))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_cu_seqlens_order_is_checked_without_wrap_around(dtype):
    """[0, 4, 2, 6] decreases whatever its integer dtype (uint8 differences must not wrap to 254)."""
    with pytest.raises(ValueError, match="never decrease"):
        call(fdpo.sequence_logprobs, cu_seqlens=torch.tensor([0, 4, 2, 6], dtype=dtype), backend="torch")


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_small_integer_cu_seqlens_are_accepted_when_valid(backend):
    args = good()
    wide = fdpo.sequence_logprobs(**args, cu_seqlens=torch.tensor([0, 2, 6]), backend=backend)
    narrow = fdpo.sequence_logprobs(**args, cu_seqlens=torch.tensor([0, 2, 6], dtype=torch.uint8), backend=backend)
    assert torch.equal(wide, narrow)


def _zero_sequences(name: str, backend: str, hidden: torch.Tensor, weight: torch.Tensor,
                    labels: torch.Tensor) -> torch.Tensor:
    if name == "sequence_logprobs":
        return fdpo.sequence_logprobs(hidden, weight, labels, backend=backend)
    if name == "token_logprobs":
        return fdpo.token_logprobs(hidden, weight, labels, backend=backend)
    if name == "token_kl":
        return fdpo.token_kl(hidden, weight, hidden.detach(), weight, labels, backend=backend)[2]
    if name == "token_entropy":
        return fdpo.token_entropy(hidden, weight, labels, backend=backend)
    head = fdpo.FusedLMHead(weight, backend=backend)
    return head(hidden, labels, per_sequence=True, ref_hidden=hidden.detach(), ref_head=fdpo.LMHead(weight),
                kl=True)["kl"]


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
@pytest.mark.parametrize(("name", "out_shape"), [("sequence_logprobs", (0,)), ("token_logprobs", (0, 4)),
                                                 ("token_kl", (0, 4)), ("token_entropy", (0, 4)),
                                                 ("FusedLMHead two-head sums", (0,))])
def test_zero_sequences_give_empty_results(name, out_shape, backend):
    """B = 0 sequences: an empty float32 result and an all-zero gradient of hidden's shape, on every backend."""
    hidden = torch.randn(0, 4, D, requires_grad=True)
    weight = torch.randn(V, D)
    out = _zero_sequences(name, backend, hidden, weight, torch.zeros(0, 4, dtype=torch.long))
    assert out.shape == out_shape and out.dtype == torch.float32
    out.sum().backward()
    assert hidden.grad.shape == hidden.shape


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_a_packed_batch_of_zero_sequences_gives_an_empty_result(backend):
    """cu_seqlens = [0] (S = 0, N = 0), as a padded batch of B = 0 rows: [0] sums, not an error."""
    hidden = torch.randn(0, D, requires_grad=True)
    out = fdpo.sequence_logprobs(hidden, torch.randn(V, D), torch.zeros(0, dtype=torch.long),
                                 cu_seqlens=torch.tensor([0]), backend=backend)
    assert out.shape == (0,) and out.dtype == torch.float32
    out.sum().backward()
    assert hidden.grad.shape == hidden.shape


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_all_ignored_tokens_give_zero_sums(backend):
    hidden, weight = torch.randn(2, 3, D, requires_grad=True), torch.randn(V, D)
    out = fdpo.sequence_logprobs(hidden, weight, torch.full((2, 3), -100), backend=backend)
    assert torch.equal(out, torch.zeros(2))
    out.sum().backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("name", ["softcap", "temperature", "ref_softcap"])
def test_non_finite_softcap_and_temperature_are_refused(name, value):
    """inf / nan scales would turn every logit into NaN: refused by the functions, modules and launchers."""
    args = good()
    ref = dict(ref_hidden=torch.randn(N, D), ref_weight=torch.randn(V, D))
    with pytest.raises(ValueError, match=rf"{name} must be a positive finite number"):
        fdpo.token_kl(args["hidden"], args["weight"], ref["ref_hidden"], ref["ref_weight"], args["labels"],
                      **{name: value})
    if name == "ref_softcap":
        with pytest.raises(ValueError, match=r"ref_softcap must be a positive finite number"):
            fdpo.FusedLMHead(args["weight"])(args["hidden"], args["labels"], ref_hidden=ref["ref_hidden"],
                                             ref_head=fdpo.LMHead(ref["ref_weight"], softcap=value))
        with pytest.raises(ValueError, match=r"ref_softcap must be a positive finite number"):
            kernels.head_stats_forward(HeadInput(args["hidden"][None], LMHead(args["weight"])),
                                       ScoredTokens(torch.arange(N), args["labels"].int()),
                                       HeadInput(ref["ref_hidden"][None], LMHead(ref["ref_weight"], softcap=value),
                                                 "ref_"))
        return
    packed = dict(cu_seqlens=torch.tensor([0, N]))
    for fn, extra in ((fdpo.token_logprobs, {}), (fdpo.sequence_logprobs, packed), (fdpo.token_entropy, {})):
        with pytest.raises(ValueError, match=rf"{name} must be a positive finite number"):
            call(fn, **{name: value}, **extra)
    with pytest.raises(ValueError, match=rf"{name} must be a positive finite number"):
        fdpo.perturbed_logprobs(args["hidden"], args["weight"], ref["ref_hidden"], ref["ref_weight"], args["labels"],
                                0.1, **{name: value})
    with pytest.raises(ValueError, match=rf"{name} must be a positive finite number"):
        fdpo.FusedLMHead(args["weight"], **{name: value})
    with pytest.raises(ValueError, match=rf"{name} must be a positive finite number"):
        kernels.head_logprob_forward(HeadInput(args["hidden"][None], LMHead(args["weight"], **{name: value})),
                                     ScoredTokens(torch.arange(N), args["labels"].int()))


@pytest.mark.parametrize("make", [
    lambda: fdpo.PreferenceLoss(backend="cuda"),
    lambda: fdpo.FusedLMHead(torch.randn(V, D), backend="cuda"),
    lambda: fdpo.TDPOLoss(backend="cuda"),
    lambda: fdpo.EpsilonDPOLoss(fdpo.EpsilonDPO(), backend="cuda"),
], ids=["PreferenceLoss", "FusedLMHead", "TDPOLoss", "EpsilonDPOLoss"])
def test_modules_refuse_an_unknown_backend_at_construction(make):
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton', 'torch', 'reference'\)"):
        make()


@pytest.mark.parametrize("options", [dict(loss="ipo"), dict(nll_weight=0.5)])
def test_missing_lengths_message_says_or(options):
    sums = [torch.randn(3) for _ in range(4)]
    with pytest.raises(ValueError, match=r"required for loss='ipo' or nll_weight > 0"):
        fdpo.preference_loss(*sums, **options)


def test_broken_triton_on_a_cuda_machine_raises(monkeypatch):
    """Where CUDA is present a failing kernel import is an error, not a silent fall back to backend='torch'."""
    monkeypatch.delattr(fdpo, "kernels")
    monkeypatch.setitem(sys.modules, "fdpo.kernels", None)          # `from fdpo import kernels` raises ImportError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_backend("auto", torch.device("cpu")).name == "torch"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ImportError, match=r"the Triton kernels .* failed to import on a machine with CUDA") as raised:
        resolve_backend("auto", torch.device("cpu"))
    assert isinstance(raised.value.__cause__, ImportError)
