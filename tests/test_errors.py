"""Bad input raises ValueError/TypeError naming the argument and what is allowed."""

import pytest
import torch

import fdpo
import fdpo.kernels as kernels
from fdpo.backends import resolve_backend

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
    (dict(weight=torch.randn(V, D, dtype=torch.bfloat16)), TypeError, "weight dtype torch.bfloat16 must match"),
    (dict(bias=torch.randn(V + 1)), ValueError, r"bias must have shape \[V\] = \[11\]"),
    (dict(bias=torch.randn(V, dtype=torch.float16)), TypeError, "bias dtype"),
    (dict(labels=torch.rand(N)), TypeError, "labels must be an integer tensor"),
    (dict(labels=torch.ones(N, dtype=torch.bool)), TypeError, "labels must be an integer tensor"),
    (dict(labels=torch.zeros(N + 1, dtype=torch.long)), ValueError, "labels shape"),
    (dict(labels=torch.tensor([0, 1, 2, 3, 4, V])), ValueError, r"labels must be in \[0, 11\) or equal ignore_index"),
    (dict(labels=torch.tensor([0, 1, -5, 3, 4, 5])), ValueError, "found -5 at index"),
    (dict(weight=torch.randn(V, D, device="meta")), ValueError, "weight is on meta but hidden is on cpu"),
    (dict(softcap=0.0), ValueError, "softcap must be a positive number"),
    (dict(temperature=-1.0), ValueError, "temperature must be a positive number"),
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
    (torch.tensor([6]), TypeError, "cu_seqlens must be a 1-D integer tensor"),
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
    monkeypatch.setattr(kernels, "interpreting", lambda: False)
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        resolve_backend("triton", torch.device("cpu"))
    assert resolve_backend("auto", torch.device("cpu")) == "torch"


def test_launchers_check_their_operands():
    hidden, weight = torch.randn(1, N, D), torch.randn(V, D)
    rows, labels = torch.arange(N), torch.zeros(N, dtype=torch.int32)
    with pytest.raises(TypeError, match="rows must be a 1-D int64 tensor"):
        kernels.logprob_forward(hidden, weight, rows.int(), labels)
    with pytest.raises(TypeError, match=r"labels must be int32 of shape \(6,\)"):
        kernels.logprob_forward(hidden, weight, rows, labels.long())
    with pytest.raises(ValueError, match=r"hidden must be \[B, T, D\]"):
        kernels.logprob_forward(hidden[0], weight, rows, labels)
    with pytest.raises(ValueError, match="num_seqs must be >= 1"):
        kernels.logprob_forward(hidden, weight, rows, labels, seq_ids=labels, num_seqs=0)
    with pytest.raises(ValueError, match=r"grad must be float32 of shape \(6,\)"):
        kernels.logprob_backward(hidden, weight, rows, labels, torch.zeros(N), torch.zeros(N - 1))
    with pytest.raises(ValueError, match="need_bias=True but bias is None"):
        kernels.logprob_backward(hidden, weight, rows, labels, torch.zeros(N), torch.zeros(N), need_bias=True)
