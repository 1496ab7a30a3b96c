"""Which head backward the triton backend runs (`backward_buffer_bytes`), and that both are right.

`fdpo.options.BackwardOptions` picks, per backward: the fused-atomics kernel (`head_stats_backward`)
or the split-K one (`head_stats_split_backward`: dz chunks in a buffer of at most the budget, then
GEMMs). Calls of both launchers are counted, so every test names the path it exercised:

- an explicit budget on a device the cost model does not know (the CPU here; forced on a GPU by
  patching `fdpo.cost.known_device`) runs the split backward, and the public functions and modules
  then match float64 values and gradients (log-probs with ignored tokens, bias, soft cap and
  temperature; the two-head KL and entropy; PreferenceLoss), fp32 and bf16;
- budget 0, a budget below one row of dz, and the default None off known GPUs run the fused one;
- on a known GPU (patched in) the dispatch follows `fdpo.cost.choose_backward`'s own answer;
- the largest allocation of a split backward through the public API is the dz buffer, within the
  budget, everything else besides the gradients being O(C D + V);
- the benchmarks' pinned variants and the trainer's --backward-buffer-bytes reach the backward;
- the torch backend's CUDA path for 16-bit heads (16-bit GEMM operands, fp32 accumulation) is
  right, its CUDA-only GEMMs emulated exactly on CPU.

Tolerances as in test_split_backward.py (norm-wise relative error against float64 on the same,
already-rounded inputs): fp32 2e-5; bf16 1e-2 (dz is rounded to bf16 before the GEMMs).
"""

import pytest
import torch
from test_split_backward import NewStorages
from torch import nn

import fdpo
import fdpo.kernels as kernels
from fdpo import cost, options
from fdpo.options import BackwardOptions

from float64_reference import assert_close, leaf64, token_logprobs64, token_stats64

B, T, V, D, D_REF = 2, 29, 203, 24, 20
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HEAD = dict(softcap=4.0, temperature=0.7)


def tol(dtype: torch.dtype) -> float:
    return 2e-5 if dtype == torch.float32 else 1e-2


def rows_budget(rows: int, dtype: torch.dtype, vocab: int = V) -> int:
    """A budget of `rows` rows of dz [rows, vocab] and a few spare bytes."""
    return rows * vocab * dtype.itemsize + dtype.itemsize - 1


@pytest.fixture
def calls(monkeypatch) -> dict[str, int]:
    """Counts of the fused and the split launcher's calls (both still run)."""
    counts = {"fused": 0, "split": 0}
    for name, launcher in (("fused", kernels.head_stats_backward), ("split", kernels.head_stats_split_backward)):
        def counted(*args, _name=name, _launcher=launcher, **kwargs):
            counts[_name] += 1
            return _launcher(*args, **kwargs)
        monkeypatch.setattr(kernels, launcher.__name__, counted)
    return counts


@pytest.fixture
def unknown_device(monkeypatch) -> None:
    """The cost model knows no device (as on the CPU, or an unlisted GPU), and the dispatch takes
    torch's 16-bit GEMMs to accumulate into fp32 (so that an explicit budget runs the split on a GPU
    with torch 2.8 or 2.9 too; the split itself still asks `fdpo.gemm` how to multiply)."""
    monkeypatch.setattr(cost, "known_device", lambda device: None)
    monkeypatch.setattr(options, "accumulating_16bit_gemm", lambda device, dtype: True)


def make_inputs(device, dtype, seed=0, lead=(B, T), vocab=V, dim=D):
    """hidden (a strided view), weight, bias, ref_hidden, ref_weight, labels (~20% ignored)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(lead[0], lead[1] + 1, dim, generator=g).to(device, dtype)[:, 1:]
    weight = (0.3 * torch.randn(vocab, dim, generator=g)).to(device, dtype)
    bias = torch.randn(vocab, generator=g).to(device, dtype)
    ref_hidden = torch.randn(*lead, D_REF, generator=g).to(device, dtype)
    ref_weight = (0.3 * torch.randn(vocab, D_REF, generator=g)).to(device, dtype)
    labels = torch.randint(0, vocab, lead, generator=g)
    labels[torch.rand(lead, generator=g) < 0.2] = -100
    return hidden, weight, bias, ref_hidden, ref_weight, labels.to(device)


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_token_logprobs_split_matches_float64(device, dtype, calls, unknown_device):
    hidden, weight, bias, _, _, labels = make_inputs(device, dtype)
    h, w, b = leaves(hidden, weight, bias)
    upstream = torch.randn(labels.shape, generator=torch.Generator().manual_seed(1)).to(device)
    lp = fdpo.token_logprobs(h, w, labels, bias=b, backend="triton", backward_buffer_bytes=rows_budget(7, dtype),
                             **HEAD)
    (lp * upstream).sum().backward()
    assert calls == {"fused": 0, "split": 1}
    h64, w64, b64 = leaf64(hidden), leaf64(weight), leaf64(bias)
    want = token_logprobs64(h64, w64, labels, b64, **HEAD)
    (want * upstream.double()).sum().backward()
    assert_close(lp.detach(), want.detach(), 1e-5 if dtype == torch.float32 else 1e-3, "logprob")
    assert not lp[labels == -100].any() and not h.grad[labels == -100].any(), "ignored tokens"
    for got, ref, name in ((h.grad, h64.grad, "dHidden"), (w.grad, w64.grad, "dWeight"), (b.grad, b64.grad, "dBias")):
        assert got.dtype == dtype
        assert_close(got, ref, tol(dtype), name)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_two_head_kl_and_entropy_split_match_float64(device, dtype, calls, unknown_device):
    hidden, weight, bias, ref_hidden, ref_weight, labels = make_inputs(device, dtype, seed=2)
    h, w, b = leaves(hidden, weight, bias)
    g = torch.Generator().manual_seed(3)
    g_lp, g_kl, g_ent = (torch.randn(labels.shape, generator=g).to(device) for _ in range(3))
    budget = rows_budget(11, dtype)
    lp, ref_lp, kl = fdpo.token_kl(h, w, ref_hidden, ref_weight, labels, bias=b, backend="triton",
                                   backward_buffer_bytes=budget, **HEAD)
    entropy = fdpo.token_entropy(h, w, labels, bias=b, backend="triton", backward_buffer_bytes=budget, **HEAD)
    ((lp * g_lp).sum() + (kl * g_kl).sum() + (entropy * g_ent).sum()).backward()
    assert calls == {"fused": 0, "split": 2}
    h64, w64, b64 = leaf64(hidden), leaf64(weight), leaf64(bias)
    want = token_stats64(h64, w64, labels, b64, ref_hidden.double(), ref_weight.double(), **HEAD)
    loss = sum((want[k] * u.double()).sum() for k, u in (("logprob", g_lp), ("kl", g_kl), ("entropy", g_ent)))
    loss.backward()
    for got, name in ((lp, "logprob"), (ref_lp, "ref_logprob"), (kl, "kl"), (entropy, "entropy")):
        assert_close(got.detach(), want[name].detach(), 1e-5 if dtype == torch.float32 else 2e-3, name)
    for got, ref, name in ((h.grad, h64.grad, "dHidden"), (w.grad, w64.grad, "dWeight"), (b.grad, b64.grad, "dBias")):
        assert_close(got, ref, tol(dtype), name)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_preference_loss_module_split_matches_float64(device, dtype, calls, unknown_device):
    """PreferenceLoss with an nn.Linear head (the loss's budget applies) against float64 sums through
    `fdpo.preference_loss` (backend='reference', differentiated by autograd)."""
    hidden, weight, bias, _, _, labels = make_inputs(device, dtype, seed=4)
    options = dict(beta=0.5, divergence="js", nll_weight=0.3)
    ref_chosen, ref_rejected = torch.tensor([-40.0], device=device), torch.tensor([-42.0], device=device)
    linear = nn.Linear(D, V, device=device, dtype=dtype)
    linear.weight, linear.bias = nn.Parameter(weight.clone()), nn.Parameter(bias.clone())
    h = hidden.detach().requires_grad_(True)
    loss_fn = fdpo.PreferenceLoss(backend="triton", backward_buffer_bytes=rows_budget(9, dtype), **options)
    loss = loss_fn(h, labels, linear, ref_logprobs=(ref_chosen, ref_rejected)).loss
    loss.backward()
    assert calls == {"fused": 0, "split": 1}

    h64, w64, b64 = leaf64(hidden), leaf64(weight), leaf64(bias)
    sums = token_logprobs64(h64, w64, labels, b64).sum(-1)
    lengths = (labels != -100).sum(-1).double()
    want = fdpo.preference_loss(sums[:1], sums[1:], ref_chosen.double(), ref_rejected.double(), backend="reference",
                                chosen_lengths=lengths[:1], rejected_lengths=lengths[1:], **options).loss
    want.backward()
    assert_close(loss.detach().double(), want.detach().double(), 1e-5 if dtype == torch.float32 else 1e-3, "loss")
    for got, ref, name in ((h.grad, h64.grad, "dHidden"), (linear.weight.grad, w64.grad, "dWeight"),
                           (linear.bias.grad, b64.grad, "dBias")):
        assert_close(got, ref, tol(dtype), name)


def test_split_and_fused_paths_agree_through_every_module(device, calls, unknown_device):
    """FusedLMHead, TDPOLoss and EpsilonDPOLoss take the option too: split (budget) vs fused (0), fp32."""
    hidden, weight, bias, _, _, labels = make_inputs(device, torch.float32, seed=6)
    budget = rows_budget(5, torch.float32)

    def grads(budget_bytes: int, kind: str):
        h, w, b = leaves(hidden, weight, bias)
        if kind == "head":
            head = fdpo.FusedLMHead(w, b, backend="triton", backward_buffer_bytes=budget_bytes, **HEAD)
            head(h, labels, per_sequence=True).sum().backward()
        else:
            loss_cls = {"tdpo": fdpo.TDPOLoss, "epsilon_dpo": lambda **o: fdpo.EpsilonDPOLoss(fdpo.EpsilonDPO(), **o)}
            loss_fn = loss_cls[kind](backend="triton", backward_buffer_bytes=budget_bytes)
            loss_fn(h, labels, fdpo.LMHead(w, b, **HEAD), ref_hidden=hidden.detach()).loss.backward()
        return h.grad, w.grad, b.grad

    for kind in ("head", "tdpo", "epsilon_dpo"):
        split = grads(budget, kind)
        assert calls == {"fused": 0, "split": 1}, kind
        fused = grads(0, kind)
        assert calls == {"fused": 1, "split": 1}, kind
        for s, f, name in zip(split, fused, ("dHidden", "dWeight", "dBias"), strict=True):
            assert_close(s, f, 1e-5, f"{kind}: {name}")
        calls.update(fused=0, split=0)


@pytest.mark.parametrize("budget", [0, 1, V * 4 - 1], ids=["zero", "one-byte", "below-one-row"])
def test_budget_zero_or_below_one_row_runs_the_fused_backward(device, calls, unknown_device, budget):
    hidden, weight, _, _, _, labels = make_inputs(device, torch.float32, seed=7)
    h, w = leaves(hidden, weight)
    fdpo.sequence_logprobs(h, w, labels, backend="triton", backward_buffer_bytes=budget).sum().backward()
    assert calls == {"fused": 1, "split": 0}


def test_default_budget_off_known_gpus_runs_the_fused_backward(device, calls, unknown_device):
    hidden, weight, _, _, _, labels = make_inputs(device, torch.float32, seed=8)
    h, w = leaves(hidden, weight)
    fdpo.token_logprobs(h, w, labels, backend="triton").sum().backward()
    assert calls == {"fused": 1, "split": 0}
    assert BackwardOptions().split_buffer_bytes(16384, 128256, 4096, torch.bfloat16, torch.device("cpu")) == 0


def test_the_cpu_is_not_a_known_device():
    assert cost.known_device(torch.device("cpu")) is None


@pytest.mark.parametrize("budget", [None, 1 << 20], ids=["default", "explicit"])
def test_known_gpu_follows_the_cost_model(device, calls, monkeypatch, budget):
    """On an H100 (patched in) the strategy is choose_backward's own answer: for a small shape run
    through the public API (fused), and for the issue's large shape (N = 16384, V = 128256,
    D = 4096, bf16) asked of the dispatch directly (split with the default 1 GiB and with 2 GiB,
    fused with 1 MiB, whose 4-row chunks are below MIN_SPLIT_ROWS)."""
    asked = []
    choose = cost.choose_backward

    def spy(*args):
        asked.append((args, choose(*args)))
        return asked[-1][1]

    monkeypatch.setattr(cost, "known_device", lambda device: cost.H100_SXM)
    monkeypatch.setattr(cost, "choose_backward", spy)
    monkeypatch.setattr(options, "accumulating_16bit_gemm", lambda device, dtype: True)
    hidden, weight, _, _, _, labels = make_inputs(device, torch.float32, seed=9)
    h, w = leaves(hidden, weight)
    fdpo.token_logprobs(h, w, labels, backend="triton", backward_buffer_bytes=budget).sum().backward()
    used = cost.DEFAULT_BACKWARD_BUFFER_BYTES if budget is None else budget
    rows = int((labels != -100).sum())
    assert asked == [((rows, V, D, torch.float32, cost.H100_SXM, used), "fused")]
    assert calls == {"fused": 1, "split": 0}

    large, cuda, answers = (16384, 128256, 4096, torch.bfloat16), torch.device("cuda"), []
    for given in (None, 1 << 20, 2 << 30):
        used = cost.DEFAULT_BACKWARD_BUFFER_BYTES if given is None else given
        answers.append(choose(*large, cost.H100_SXM, used))
        assert BackwardOptions(buffer_bytes=given).split_buffer_bytes(*large, cuda) == (
            used if answers[-1] == "split" else 0)
    assert answers == ["split", "fused", "split"]


def test_without_accumulating_16bit_gemms_cuda_runs_the_fused_backward(monkeypatch):
    """Where torch has no 16-bit GEMM accumulating into fp32 on the GPU (torch 2.8 and 2.9; patched in
    here) the split backward would multiply fp32 copies, about 10x slower than the cost model's split
    and beyond the budget: a 16-bit head on CUDA runs the fused backward with the default budget and
    with an explicit one, on a known GPU and on an unknown one. A pinned split still runs; float32
    heads (which never use 16-bit GEMMs) and the CPU are decided as before."""
    large, cuda, budget = (16384, 128256, 4096, torch.bfloat16), torch.device("cuda"), 2 << 30
    asked = []

    def without_gemm(device: torch.device, dtype: torch.dtype) -> bool:
        asked.append((device, dtype))
        return False

    monkeypatch.setattr(options, "accumulating_16bit_gemm", without_gemm)
    for spec in (cost.H100_SXM, None):
        monkeypatch.setattr(cost, "known_device", lambda device, spec=spec: spec)
        for given in (None, budget):
            assert BackwardOptions(buffer_bytes=given).split_buffer_bytes(*large, cuda) == 0
    assert asked == [(cuda, torch.bfloat16)] * 4
    assert BackwardOptions(buffer_bytes=budget, strategy="split").split_buffer_bytes(*large, cuda) == budget
    assert BackwardOptions(buffer_bytes=budget).split_buffer_bytes(*large, torch.device("cpu")) == budget
    monkeypatch.setattr(cost, "known_device", lambda device: cost.H100_SXM)
    fp32 = (16384, 128256, 4096, torch.float32)
    assert BackwardOptions(buffer_bytes=budget).split_buffer_bytes(*fp32, cuda) == (
        budget if cost.choose_backward(*fp32, cost.H100_SXM, budget) == "split" else 0)
    assert asked == [(cuda, torch.bfloat16)] * 4
    # With the GEMMs, the same 16-bit head on the H100 runs the split the cost model picks.
    monkeypatch.setattr(options, "accumulating_16bit_gemm", lambda device, dtype: True)
    assert cost.choose_backward(*large, cost.H100_SXM, budget) == "split"
    assert BackwardOptions(buffer_bytes=budget).split_buffer_bytes(*large, cuda) == budget


@pytest.mark.parametrize("bad, error", [(-1, ValueError), (1.5, TypeError), (True, TypeError), ("1024", TypeError)])
def test_invalid_budgets_raise(device, bad, error):
    hidden, weight, _, ref_hidden, ref_weight, labels = make_inputs(device, torch.float32, seed=10)
    match = "backward_buffer_bytes must be"
    for call in (
        lambda: fdpo.token_logprobs(hidden, weight, labels, backward_buffer_bytes=bad),
        lambda: fdpo.sequence_logprobs(hidden, weight, labels, backward_buffer_bytes=bad),
        lambda: fdpo.token_kl(hidden, weight, ref_hidden, ref_weight, labels, backward_buffer_bytes=bad),
        lambda: fdpo.token_entropy(hidden, weight, backward_buffer_bytes=bad),
        lambda: fdpo.FusedLMHead(weight, backward_buffer_bytes=bad),
        lambda: fdpo.PreferenceLoss(backward_buffer_bytes=bad),
        lambda: fdpo.TDPOLoss(backward_buffer_bytes=bad),
        lambda: fdpo.EpsilonDPOLoss(fdpo.EpsilonDPO(), backward_buffer_bytes=bad),
    ):
        with pytest.raises(error, match=match):
            call()


def test_fused_head_keeps_its_own_options():
    weight = torch.zeros(V, D)
    head = fdpo.FusedLMHead(weight, deterministic=True, backward_buffer_bytes=0)
    assert head.deterministic and head.backward_buffer_bytes == 0
    assert head.backward_options == BackwardOptions(deterministic=True, buffer_bytes=0)
    loss_fn = fdpo.PreferenceLoss(backward_buffer_bytes=1 << 20)
    assert loss_fn.backward_options.buffer_bytes == 1 << 20


def test_split_buffer_stays_within_the_budget(device, calls, unknown_device):
    """Through sequence_logprobs' backward the largest new storage besides the gradients is the dz
    buffer, within the budget; everything else is O(C D + V) or a gradient's own size."""
    n_lead, vocab, dim = (1, 150), 300, 8
    hidden, weight, bias, _, _, labels = make_inputs(device, torch.float32, seed=11, lead=n_lead, vocab=vocab,
                                                     dim=dim)
    budget = 10 * vocab * 4 + 100
    h, w, b = leaves(hidden, weight, bias)
    out = fdpo.sequence_logprobs(h, w, labels, bias=b, backend="triton", backward_buffer_bytes=budget)
    rows = int((labels != -100).sum())
    with NewStorages([h, w, b, labels, out]) as new:
        out.sum().backward()
    assert calls == {"fused": 0, "split": 1}
    for grad in (h.grad, w.grad, b.grad):
        new.sizes.pop(grad.untyped_storage().data_ptr())
    chunk = cost.split_rows(vocab, torch.float32, budget)
    assert chunk == 10
    largest = sorted(new.sizes.values())
    assert largest[-1] == chunk * vocab * 4 <= budget, new.sizes
    # A gradient's own size (the per-row dHidden [R, D] before its scatter, dWeight should autograd
    # copy it), or O(C D + V) scratch.
    other = max(rows * dim * 4, vocab * dim * 4, chunk * (dim * 4 + 4 * 8) + 2 * vocab * 4)
    assert largest[-2] <= other, new.sizes


def test_a_pinned_strategy_overrides_the_choice(device, calls, monkeypatch):
    """BackwardOptions(strategy=...) (what the benchmarks' fdpo-triton-fused / -split set) pins the path
    on every device, known or not; a split whose budget holds no row still runs fused."""
    large, cuda = (16384, 128256, 4096, torch.bfloat16), torch.device("cuda")
    monkeypatch.setattr(cost, "known_device", lambda device: cost.H100_SXM)
    assert BackwardOptions(strategy="fused").split_buffer_bytes(*large, cuda) == 0
    assert BackwardOptions(buffer_bytes=1 << 20, strategy="split").split_buffer_bytes(*large, cuda) == 1 << 20
    assert BackwardOptions(buffer_bytes=8, strategy="split").split_buffer_bytes(*large, cuda) == 0
    with pytest.raises(ValueError, match="strategy must be None or one of"):
        BackwardOptions(strategy="atomic")


@pytest.mark.parametrize("workload", ["logprobs", "tdpo"])
def test_benchmark_implementations_run_the_strategy_they_name(device, calls, workload):
    """benchmarks' fdpo-triton-fused and fdpo-triton-split (CUDA-only there) dispatch as named and agree."""
    from benchmarks.workloads import REGISTRY, make_inputs, step

    inputs = make_inputs(workload, 64, 300, 16, dtype=torch.float32, device=device)
    grads = {}
    for name, path in (("fdpo-triton-fused", "fused"), ("fdpo-triton-split", "split")):
        step(REGISTRY[name].build(), inputs)
        assert calls[path] == 1 and sum(calls.values()) == 1, (name, calls)
        grads[path] = (inputs.hidden.grad.clone(), inputs.weight.grad.clone())
        calls.update(fused=0, split=0)
    for s, f, what in zip(grads["split"], grads["fused"], ("dHidden", "dWeight"), strict=True):
        assert_close(s, f, 1e-5, what)


def test_trainer_flag_is_parsed_validated_and_reaches_the_policy_head(tmp_path, calls, unknown_device):
    """--backward-buffer-bytes: parsed, validated, documented in --help, not part of the run's identity,
    and given to the policy's fused head, whose backward then runs split (one triton step on CPU)."""
    from fdpo.train import Trainer, parse_args
    from fdpo.train.config import build_parser
    from fdpo.train.rundir import IDENTITY_FIELDS

    from train_setup import small_config, write_data

    assert parse_args([]).backward_buffer_bytes is None
    assert parse_args(["--backward-buffer-bytes", "0"]).backward_buffer_bytes == 0
    with pytest.raises(ValueError, match="backward_buffer_bytes must be None or an integer >= 0"):
        parse_args(["--backward-buffer-bytes", "-1"])
    help_text = " ".join(build_parser().format_help().split())
    assert "0: the fused backward, no scratch; default: 1 GiB" in help_text
    assert "backward_buffer_bytes" not in IDENTITY_FIELDS

    budget = 1 << 20
    trainer = Trainer(small_config(write_data(tmp_path, train=8, evaluation=8), tmp_path / "run", backend="triton",
                                   backward_buffer_bytes=budget, max_steps=1, sample_prompts=0))
    head = trainer.module.policy.head()
    assert head.backward_buffer_bytes == budget and head.backend == "triton"
    trainer.train()
    assert calls["split"] >= 1 and calls["fused"] == 0, calls


@pytest.mark.parametrize("stats", ["logprob", "kl+entropy"])
def test_torch_backend_16bit_gemm_path(monkeypatch, stats):
    """The torch backend's CUDA path for 16-bit heads, on CPU: torch's out_dtype GEMMs (CUDA only) are
    emulated by exact fp32 products of the same 16-bit operands. Every GEMM gets 16-bit operands (the
    weight is never upcast), dz is rounded to bf16 before its products, and values and gradients
    match float64 within the bf16 bound."""
    import fdpo.backends.chunked as chunked

    operands = []

    def emulated(out, a, b, *, accumulate, mixed):
        operands.append((a.dtype, b.dtype, mixed))
        product = a.float() @ b.float()
        if accumulate:
            out += product
        else:
            out.copy_(product)

    monkeypatch.setattr(chunked, "accumulating_16bit_gemm", lambda device, dtype: dtype != torch.float32)
    monkeypatch.setattr(chunked, "gemm_into", emulated)
    hidden, weight, bias, ref_hidden, ref_weight, labels = make_inputs("cpu", torch.bfloat16, seed=12)
    h, w, b = leaves(hidden, weight, bias)
    g = torch.Generator().manual_seed(13)
    h64, w64, b64 = leaf64(hidden), leaf64(weight), leaf64(bias)
    want = token_stats64(h64, w64, labels, b64, ref_hidden.double(), ref_weight.double(), **HEAD)
    if stats == "logprob":
        names = ("logprob",)
        got = {"logprob": fdpo.token_logprobs(h, w, labels, bias=b, backend="torch", **HEAD)}
    else:
        names = ("logprob", "kl", "entropy")
        lp, _, kl = fdpo.token_kl(h, w, ref_hidden, ref_weight, labels, bias=b, backend="torch", **HEAD)
        got = {"logprob": lp, "kl": kl,
               "entropy": fdpo.token_entropy(h, w, labels, bias=b, backend="torch", **HEAD)}
    upstream = {name: torch.randn(labels.shape, generator=g) for name in names}
    sum((got[n] * upstream[n]).sum() for n in names).backward()
    sum((want[n] * upstream[n].double()).sum() for n in names).backward()
    assert operands and all(a == b_ == torch.bfloat16 and mixed for a, b_, mixed in operands), set(operands)
    for name in names:
        assert_close(got[name].detach(), want[name].detach(), 2e-3, name)
    for got_grad, ref, name in ((h.grad, h64.grad, "dHidden"), (w.grad, w64.grad, "dWeight"),
                                (b.grad, b64.grad, "dBias")):
        assert_close(got_grad, ref, tol(torch.bfloat16), name)
