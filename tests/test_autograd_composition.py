"""The fused backends' autograd Functions composed with the rest of autograd.

The "triton" and "torch" backends differentiate through hand-written autograd Functions; their
outputs must behave as those of plain PyTorch ops: in-place changes of the per-token outputs
(`logps[~mask] = 0`, as preference-loss code writes it) give the float64 gradient of the changed
values, and an output that is not differentiated (a KL only logged) costs the backward nothing: the
reference's logits are not recomputed, so the reference may change in place (an EMA update) before
the backward. The hidden states reach the backward only as saved tensors, so activation
checkpointing and saved-tensor hooks free the activation fed to fdpo after the forward. Gradients
are checked against float64 autograd through the materialized logits.
"""

import gc
import weakref
from collections.abc import Callable

import pytest
import torch
import torch.utils.checkpoint

import fdpo
from fdpo.backends import resolve_backend
from fdpo.heads import StatsGrad

from float64_reference import assert_close, leaf64, token_logprobs64, token_stats64

FUSED = ("torch", "triton")
B, T, D, V = 2, 5, 8, 11
GRAD_TOL = 2e-5


def make_inputs(device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Policy and reference hidden states and heads, labels with ignored tokens, a token mask and weights,
    on `device` (the float64 references are computed there too)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[:, 0] = -100
    inputs = {
        "hidden": torch.randn(B, T, D, generator=gen),
        "weight": 0.5 * torch.randn(V, D, generator=gen),
        "ref_hidden": torch.randn(B, T, D, generator=gen),
        "ref_weight": 0.5 * torch.randn(V, D, generator=gen),
        "labels": labels,
        "mask": torch.rand(B, T, generator=gen) > 0.3,
        "dropped": torch.rand(B, T, generator=gen) > 0.8,
        "scale": torch.rand(B, T, generator=gen) + 0.5,
    }
    return {name: value.to(device) for name, value in inputs.items()}


def per_token_outputs(entry: str, hidden: torch.Tensor, weight: torch.Tensor, x: dict[str, torch.Tensor],
                      backend: str) -> dict[str, torch.Tensor]:
    """The per-token outputs of the public entry `entry`, by their `token_stats64` names."""
    labels, ref_hidden, ref_weight = x["labels"], x["ref_hidden"], x["ref_weight"]
    if entry == "token_logprobs":
        return {"logprob": fdpo.token_logprobs(hidden, weight, labels, backend=backend)}
    if entry == "token_kl":
        logprob, ref_logprob, kl = fdpo.token_kl(hidden, weight, ref_hidden, ref_weight, labels, backend=backend)
        return {"logprob": logprob, "ref_logprob": ref_logprob, "kl": kl}
    if entry == "token_entropy":
        return {"entropy": fdpo.token_entropy(hidden, weight, labels, backend=backend)}
    if entry == "token_statistics":
        return fdpo.token_statistics(hidden, weight, labels, outputs=("entropy", "mean_logits"), backend=backend)
    if entry == "token_divergence":
        return {"kl": fdpo.token_divergence(hidden, weight, ref_hidden, ref_weight, labels, divergence="forward_kl",
                                            backend=backend)}
    head = fdpo.FusedLMHead(weight, backend=backend)
    if entry == "FusedLMHead":
        return {"logprob": head(hidden, labels)}
    return head(hidden, labels, ref_hidden=ref_hidden, ref_head=ref_weight, entropy=True, kl=True)


PER_TOKEN_ENTRIES = ("token_logprobs", "token_kl", "token_entropy", "token_statistics", "token_divergence",
                     "FusedLMHead", "FusedLMHead(ref, entropy, kl)")
DIFFERENTIABLE = ("logprob", "entropy", "kl")


@pytest.mark.parametrize("entry", PER_TOKEN_ENTRIES)
@pytest.mark.parametrize("backend", FUSED)
def test_in_place_changes_of_per_token_outputs(device: torch.device, backend: str, entry: str) -> None:
    """Index assignment, masked_fill_ and mul_ on every per-token output, then the float64 gradient."""
    x = make_inputs(device)
    hidden, weight = x["hidden"].clone().requires_grad_(), x["weight"].clone().requires_grad_()
    out = per_token_outputs(entry, hidden, weight, x, backend)
    for value in out.values():
        value[~x["mask"]] = 0.0
        value.masked_fill_(x["dropped"], 0.0)
        value.mul_(x["scale"])
    keep = x["mask"] & ~x["dropped"]
    graded = [name for name in DIFFERENTIABLE if name in out]
    sum(out[name].sum() for name in graded).backward()

    hidden64, weight64 = leaf64(x["hidden"]), leaf64(x["weight"])
    want = token_stats64(hidden64, weight64, x["labels"], ref_hidden=x["ref_hidden"], ref_weight=x["ref_weight"])
    for name, value in out.items():
        if name in want:
            assert_close(value, torch.where(keep, want[name], 0.0) * x["scale"], 1e-5, f"{entry} {name}")
    sum((torch.where(keep, want[name], 0.0) * x["scale"]).sum() for name in graded).backward()
    assert_close(hidden.grad, hidden64.grad, GRAD_TOL, f"{entry} dHidden")
    assert_close(weight.grad, weight64.grad, GRAD_TOL, f"{entry} dWeight")


def spy_stats_backward(monkeypatch: pytest.MonkeyPatch, backend: str, device: torch.device) -> list[StatsGrad]:
    """The `StatsGrad` of every head backward the backend runs from now on (the list fills as they run)."""
    cls = type(resolve_backend(backend, device))
    original = cls.stats_backward
    seen: list[StatsGrad] = []

    def recording(self, policy, tokens, grad):
        seen.append(grad)
        return original(self, policy, tokens, grad)

    monkeypatch.setattr(cls, "stats_backward", recording)
    return seen


@pytest.mark.parametrize("backend", FUSED)
def test_logged_kl_allows_changing_the_reference_before_backward(device: torch.device, backend: str) -> None:
    """token_kl's KL only logged, the loss from the log-probs, the reference updated in place (an EMA
    step of its head and a changed hidden state) before the backward: the log-probs' float64 gradient."""
    x = make_inputs(device)
    hidden, weight = x["hidden"].clone().requires_grad_(), x["weight"].clone().requires_grad_()
    ref_hidden, ref_weight = x["ref_hidden"].clone(), x["ref_weight"].clone()
    logprob, _, kl = fdpo.token_kl(hidden, weight, ref_hidden, ref_weight, x["labels"], backend=backend)
    logged = kl.detach().mean().item()
    ref_weight.mul_(0.99).add_(0.01 * x["weight"])
    ref_hidden.add_(1.0)
    (logprob * x["scale"]).sum().backward()

    hidden64, weight64 = leaf64(x["hidden"]), leaf64(x["weight"])
    want = token_stats64(hidden64, weight64, x["labels"], ref_hidden=x["ref_hidden"], ref_weight=x["ref_weight"])
    assert logged == pytest.approx(want["kl"].mean().item(), rel=1e-5)
    (want["logprob"] * x["scale"]).sum().backward()
    assert_close(hidden.grad, hidden64.grad, GRAD_TOL, "dHidden")
    assert_close(weight.grad, weight64.grad, GRAD_TOL, "dWeight")


@pytest.mark.parametrize("per_sequence", (False, True))
@pytest.mark.parametrize("backend", FUSED)
def test_undifferentiated_kl_leaves_the_reference_out_of_the_backward(monkeypatch: pytest.MonkeyPatch,
                                                                       device: torch.device, backend: str,
                                                                       per_sequence: bool) -> None:
    """Log-probs (per token or per-sequence sums) differentiated, KL and entropy not: the head backward
    gets neither the reference nor a KL or entropy term, so it does not recompute the reference's logits."""
    x = make_inputs(device)
    hidden = x["hidden"].clone().requires_grad_()
    seen = spy_stats_backward(monkeypatch, backend, device)
    head = fdpo.FusedLMHead(x["weight"], backend=backend)
    out = head(hidden, x["labels"], per_sequence=per_sequence, ref_hidden=x["ref_hidden"], ref_head=x["ref_weight"],
               entropy=True, kl=True)
    out["logprob"].sum().backward()
    assert len(seen) == 1
    assert seen[0].ref is None and seen[0].ref_lse is None and seen[0].kl_grad is None
    assert seen[0].entropy is None and seen[0].entropy_grad is None


@pytest.mark.parametrize("used", DIFFERENTIABLE)
@pytest.mark.parametrize("per_sequence", (False, True))
@pytest.mark.parametrize("backend", FUSED)
def test_each_output_alone_gets_the_float64_gradient(device: torch.device, backend: str, per_sequence: bool,
                                                     used: str) -> None:
    """One of logprob, entropy and kl differentiated, the other two not (their gradients are None in
    the backward): the float64 gradient of that one, per token and as per-sequence sums."""
    x = make_inputs(device)
    hidden, weight = x["hidden"].clone().requires_grad_(), x["weight"].clone().requires_grad_()
    head = fdpo.FusedLMHead(weight, backend=backend)
    out = head(hidden, x["labels"], per_sequence=per_sequence, ref_hidden=x["ref_hidden"], ref_head=x["ref_weight"],
               entropy=True, kl=True)
    upstream = x["scale"][:, 0] if per_sequence else x["scale"]
    (out[used] * upstream).sum().backward()

    hidden64, weight64 = leaf64(x["hidden"]), leaf64(x["weight"])
    want = token_stats64(hidden64, weight64, x["labels"], ref_hidden=x["ref_hidden"], ref_weight=x["ref_weight"])
    value = want[used].sum(-1) if per_sequence else want[used]
    assert_close(out[used], value, 1e-5, used)
    (value * upstream).sum().backward()
    assert_close(hidden.grad, hidden64.grad, GRAD_TOL, f"{used} dHidden")
    assert_close(weight.grad, weight64.grad, GRAD_TOL, f"{used} dWeight")


def head_loss(entry: str, hidden: torch.Tensor, weight: torch.Tensor, x: dict[str, torch.Tensor],
              backend: str) -> torch.Tensor:
    """A scalar through `entry` ("sequence_logprobs" or "token_divergence"); backend "float64" is the
    float64 reference of the same scalar."""
    labels, ref_hidden, ref_weight = x["labels"], x["ref_hidden"], x["ref_weight"]
    if entry == "sequence_logprobs":
        if backend == "float64":
            return (token_logprobs64(hidden, weight, labels).sum(-1) * x["scale"][:, 0]).sum()
        return (fdpo.sequence_logprobs(hidden, weight, labels, backend=backend) * x["scale"][:, 0]).sum()
    if backend == "float64":
        kl = token_stats64(hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight)["kl"]
    else:
        kl = fdpo.token_divergence(hidden, weight, ref_hidden, ref_weight, labels, divergence="forward_kl",
                                   backend=backend)
    return (kl * x["scale"]).sum()


def offloaded(block: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
    """`block(inputs)` under saved-tensor hooks that keep a copy of each saved tensor, as offloading does."""
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.detach().clone(), lambda t: t):
        return block(inputs)


def checkpointed(block: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
    """`block(inputs)` under non-reentrant activation checkpointing."""
    return torch.utils.checkpoint.checkpoint(block, inputs, use_reentrant=False)


@pytest.mark.parametrize("mode", (checkpointed, offloaded), ids=("checkpoint", "saved_tensors_hooks"))
@pytest.mark.parametrize("entry", ("sequence_logprobs", "token_divergence"))
@pytest.mark.parametrize("backend", FUSED)
def test_activation_is_freed_after_the_forward(device: torch.device, backend: str, entry: str, mode: Callable) -> None:
    """The hidden states fed to fdpo, an activation of a checkpointed or offloaded block, are freed
    once the forward is done; the backward (recomputing or unpacking them) gives the float64 gradients."""
    x = make_inputs(device)
    inputs, weight = x["hidden"].clone().requires_grad_(), x["weight"].clone().requires_grad_()
    activations: list[weakref.ref] = []

    def block(inputs: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(inputs) * 2.0
        activations.append(weakref.ref(hidden))
        return head_loss(entry, hidden, weight, x, backend)

    loss = mode(block, inputs)
    gc.collect()
    assert activations[0]() is None, "the hidden states outlived the forward"
    loss.backward()

    inputs64, weight64 = leaf64(x["hidden"]), leaf64(x["weight"])
    want = head_loss(entry, torch.tanh(inputs64) * 2.0, weight64, x, "float64")
    assert_close(loss, want, 1e-5, "loss")
    want.backward()
    assert_close(inputs.grad, inputs64.grad, GRAD_TOL, "dInputs")
    assert_close(weight.grad, weight64.grad, GRAD_TOL, "dWeight")
