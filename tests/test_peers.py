"""The peers of the benchmark on CPU (tiny shapes): Liger-Kernel's fused DPO loss (compiled and eager),
cut-cross-entropy's torch_compile implementation and TRL's chunked log-prob function are available on
CPU, are checked against the float64 reference before they are timed, and a wrong one is refused."""

import dataclasses
import importlib.util

import pytest
import torch

from benchmarks import __main__ as cli
from benchmarks import workloads
from benchmarks.workloads import REGISTRY, tolerance, unavailable

CPU = torch.device("cpu")
PEERS = ("liger", "liger-eager", "cce", "trl")
# The peers' torch.compile runs use inductor (they compile internally); tiny shapes keep that short.
TOKENS, VOCAB, HIDDEN = 64, 512, 16


def require(name: str) -> None:
    package = REGISTRY[name].package
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (pip install -e '.[bench]')")


def workloads_of(name: str) -> list[str]:
    return ["dpo-reverse_kl"] if name.startswith("liger") else ["logprobs", "dpo-reverse_kl"]


def measure(name: str, workload: str) -> dict[str, dict]:
    args = cli.parse_args(["--quick", "--tokens", str(TOKENS), "--vocab", str(VOCAB), "--hidden", str(HIDDEN),
                           "--repeats", "1", "--workloads", workload, "--impls", "naive", name])
    shape = {"workload": workload, "tokens": TOKENS, "vocab": VOCAB, "hidden": HIDDEN, "dtype": "float32"}
    records = cli.measure_shape(args, cli.Runner(args, CPU), shape, torch.float32, CPU)
    return {r["implementation"]: r for r in records}


@pytest.mark.parametrize("name", PEERS)
def test_peer_runs_on_cpu_checked_against_float64_then_timed(name):
    require(name)
    for workload in workloads_of(name):
        assert unavailable(name, CPU, workload) is None
        r = measure(name, workload)[name]
        assert r["status"] == "ok", r
        assert set(r["errors"]) == {"value", "grad_hidden", "grad_weight"}
        assert max(r["errors"].values()) <= tolerance(workload, torch.float32)
        assert r["seconds"] > 0 and r["peak_bytes"] > 0 and 0 < r["largest_bytes"] <= r["peak_bytes"]


@pytest.mark.parametrize("name", PEERS)
def test_a_wrong_peer_is_refused_and_not_timed(monkeypatch, name):
    require(name)
    build = REGISTRY[name].build

    def one_percent_off(**options):
        impl = build(**options)
        return lambda inputs: impl(inputs) * 1.01

    broken = dataclasses.replace(REGISTRY[name], description="broken", build=one_percent_off)
    monkeypatch.setitem(REGISTRY, name, broken)
    r = measure(name, "dpo-reverse_kl")[name]
    assert r["status"] == "wrong" and "differs from the float64 reference" in r["reason"], r
    assert r["errors"]["value"] == pytest.approx(0.01, rel=1e-2)
    assert r["seconds"] is None and r["peak_bytes"] is None and r["time_vs_naive"] is None


def test_liger_per_token_log_probs_need_cuda():
    require("liger")
    for name in ("liger", "liger-eager"):
        assert "needs CUDA" in unavailable(name, CPU, "logprobs")
        assert unavailable(name, CPU, "dpo-js") is not None


def test_trl_log_probs_and_gradients_equal_naive():
    require("trl")
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(80, HIDDEN, generator=gen, requires_grad=True)
    # A vocabulary wider than one TRL tile, so that its online log-sum-exp folds several tiles.
    weight = torch.randn(workloads.TRL_CHUNK_SIZE + 700, HIDDEN, generator=gen).mul_(HIDDEN**-0.5).requires_grad_()
    labels = torch.randint(0, weight.shape[0], (80,), generator=gen)
    labels[::5] = -100
    labels[1] = weight.shape[0] - 1   # a label in the last, partial tile
    upstream = torch.randn(80, generator=gen)

    results = []
    for fn in (workloads.trl_logprobs, workloads.naive_logprobs):
        out = fn(hidden, weight, labels)
        d_hidden, d_weight = torch.autograd.grad((out * upstream).sum(), (hidden, weight))
        results.append((out.detach(), d_hidden, d_weight))
    want64 = workloads._float64_pass(hidden, weight, labels, upstream[:, None])
    (trl, *trl_grads), (naive, *naive_grads) = results
    assert trl.dtype == torch.float32 and trl.shape == (80,)
    assert torch.all(trl[labels == -100] == 0) and torch.all(trl[labels != -100] < 0)
    torch.testing.assert_close(trl, naive, rtol=1e-5, atol=1e-5)
    for got, want in zip(trl_grads, naive_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert workloads.relative_error(trl, want64[0][:, 0]) < 1e-5
    for got, want in zip(trl_grads, want64[1:], strict=True):
        assert workloads.relative_error(got, want) < 1e-4


def test_trl_on_a_triton_device_scores_the_valid_rows_only(monkeypatch):
    require("trl")
    from trl.kernels import chunked_logprob

    assert workloads.trl_compacts(CPU) is chunked_logprob._use_triton(CPU) is False
    rows = []
    apply = chunked_logprob.ChunkedLogProbFunction.apply

    def recording_apply(hidden, weight, bias, labels, *rest):
        rows.append((hidden.shape[0], int(labels.min())))
        return apply(hidden, weight, bias, labels, *rest)

    monkeypatch.setattr(chunked_logprob.ChunkedLogProbFunction, "apply", recording_apply)
    monkeypatch.setattr(workloads, "trl_compacts", lambda device: True)
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(40, HIDDEN, generator=gen, requires_grad=True)
    weight = torch.randn(VOCAB, HIDDEN, generator=gen).mul_(HIDDEN**-0.5).requires_grad_()
    labels = torch.randint(0, VOCAB, (40,), generator=gen)
    labels[::4] = -100
    upstream = torch.randn(40, generator=gen)
    results = []
    for fn in (workloads.trl_logprobs, workloads.naive_logprobs):
        out = fn(hidden, weight, labels)
        results.append((out.detach(), *torch.autograd.grad((out * upstream).sum(), (hidden, weight))))
    assert rows == [(30, int(labels[labels != -100].min()))], "TRL's head passes hidden[mask], labels[mask]"
    assert torch.all(results[0][0][labels == -100] == 0)
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
