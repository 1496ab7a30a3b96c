"""The backwards run no operation that makes a CUDA host wait for the device.

On CUDA a boolean-mask index, `nonzero`, `bincount` or a tensor read into Python (`.item()`,
`bool(t)`) blocks the host until the device has caught up, and a backward that does so per chunk
leaves the GPU idle between its launches. The forward sizes its launch from the number of scored
tokens (one read); the backwards know every size already. Recorded on CPU with a dispatch mode
that sees each ATen operation the backward runs.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fdpo

# ATen operations that read device data on the host: a value (_local_scalar_dense, behind .item(),
# int(), bool()) or a data-dependent output size.
SYNCING = {"_local_scalar_dense", "nonzero", "bincount", "masked_select", "unique", "_unique2", "is_nonzero"}


class HostReads(TorchDispatchMode):
    """Records the syncing operations run under it, and every index / index_put_ with a bool mask."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        indices = args[1] if name in ("index", "index_put", "index_put_") and len(args) > 1 else ()
        if name in SYNCING or any(i is not None and i.dtype == torch.bool for i in indices):
            self.found.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("backend", "buffer"), [("torch", None), ("triton", 0), ("triton", 1 << 20)])
@pytest.mark.parametrize("stats", ["logprobs", "kl_entropy", "js"])
def test_backward_reads_nothing_on_the_host(backend, buffer, stats, device):
    """Every backward (torch; triton fused and split) of the log-probs, of the KL to a reference with
    the entropy, and of a token-level divergence, runs without a host read."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 19, 32, device=device, requires_grad=True)
    weight = torch.randn(300, 32, device=device, requires_grad=True)
    labels = torch.randint(0, 300, (2, 19), device=device)
    labels[0, :4] = -100
    options = {"backend": backend, "backward_buffer_bytes": buffer}
    if stats == "logprobs":
        outputs = [fdpo.token_logprobs(hidden, weight, labels, **options)]
    elif stats == "js":
        outputs = [fdpo.token_divergence(hidden, weight, hidden.detach(), torch.randn(300, 32, device=device), labels,
                                         divergence="js", **options)]
    else:
        ref_weight = torch.randn(300, 32, device=device)
        outputs = [*fdpo.token_kl(hidden, weight, hidden.detach(), ref_weight, labels, **options)[:2],
                   fdpo.token_entropy(hidden, weight, labels, **options)]
    loss = sum((o * torch.randn_like(o)).sum() for o in outputs)
    with HostReads() as reads:
        loss.backward()
    assert reads.found == []
    assert hidden.grad.isfinite().all() and weight.grad.isfinite().all()


def test_the_recorder_sees_a_boolean_mask_and_an_item():
    """The check above can fail: a boolean-mask update and a scalar read are recorded."""
    x, mask = torch.zeros(4), torch.tensor([True, False, True, False])
    with HostReads() as reads:
        x[mask] += 1.0
        x.sum().item()
    assert "index_put_" in reads.found or "index_put" in reads.found
    assert "_local_scalar_dense" in reads.found


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("call", ["token_logprobs", "sequence_logprobs", "deterministic_sums", "token_kl",
                                  "token_divergence", "packed_sums"])
def test_forward_reads_the_host_twice(backend, call, device):
    """A forward on padded inputs reads the host twice: the labels' range check and the number of scored
    tokens (which sizes the launch); the per-sequence sums and the reference's check read nothing more.
    Packed inputs add one read, the check of cu_seqlens (the torch backend's packed sums also read
    the sequences' lengths)."""
    torch.manual_seed(0)
    hidden = torch.randn(4, 19, 32, device=device)
    weight = torch.randn(300, 32, device=device)
    labels = torch.randint(0, 300, (4, 19), device=device)
    labels[0, :4] = -100
    ref_weight = torch.randn(300, 32, device=device)
    calls = {
        "token_logprobs": lambda: fdpo.token_logprobs(hidden, weight, labels, backend=backend),
        "sequence_logprobs": lambda: fdpo.sequence_logprobs(hidden, weight, labels, backend=backend),
        "deterministic_sums": lambda: fdpo.sequence_logprobs(hidden, weight, labels, backend=backend,
                                                             deterministic=True),
        "token_kl": lambda: fdpo.token_kl(hidden, weight, hidden, ref_weight, labels, backend=backend),
        "token_divergence": lambda: fdpo.token_divergence(hidden, weight, hidden, ref_weight, labels,
                                                          divergence="js", backend=backend),
        "packed_sums": lambda: fdpo.sequence_logprobs(hidden.reshape(-1, 32), weight, labels.reshape(-1),
                                                      cu_seqlens=torch.tensor([0, 10, 30, 50, 76], device=device),
                                                      backend=backend),
    }
    with HostReads() as reads:
        calls[call]()
    expected = ["_local_scalar_dense", "nonzero"]
    if call == "packed_sums":
        expected = ["_local_scalar_dense", *expected]
        if backend == "torch":
            expected += ["bincount", "_local_scalar_dense", "_local_scalar_dense"]
    assert reads.found == expected
