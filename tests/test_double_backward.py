"""Second-order gradients: refused loudly on the fused backends, exact on the reference backend.

The "triton" and "torch" backends have hand-written backwards that are not themselves
differentiable: a graph requested through them (create_graph=True) must raise a RuntimeError that
names the function, never return a gradient without its second-order terms (a gradient penalty
would silently add 0). The "reference" backend is plain autograd and must give the float64
second derivative.
"""

import math

import pytest
import torch

import fdpo

from float64_reference import assert_close, leaf64, token_logprobs64, token_stats64
from preference_reference import preference

FUSED = ("triton", "torch")
B, T, D, V = 2, 5, 8, 13
P = 3


def head_inputs(device: torch.device, seed: int = 0):
    """(hidden [2P, T, D], weight [V, D], ref_hidden, ref_weight, labels [2P, T] with ignored prompts), on `device`."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * P, T, D, generator=gen)
    weight = torch.randn(V, D, generator=gen) * 0.5
    ref_hidden = torch.randn(2 * P, T, D, generator=gen)
    ref_weight = torch.randn(V, D, generator=gen) * 0.5
    labels = torch.randint(0, V, (2 * P, T), generator=gen)
    labels[:, :2] = -100
    return tuple(t.to(device) for t in (hidden, weight, ref_hidden, ref_weight, labels))


def pair_sums(device: torch.device, seed: int = 1):
    """(policy_chosen, policy_rejected, ref_chosen, ref_rejected) sums of P pairs, on `device`."""
    gen = torch.Generator().manual_seed(seed)
    ref = -torch.rand(2, P, generator=gen) * 20 - 5
    sums = ref[0] + torch.randn(P, generator=gen), ref[1] + torch.randn(P, generator=gen), ref[0], ref[1]
    return tuple(t.to(device) for t in sums)


def _loss(name: str, backend: str, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A scalar through the public entry `name`, differentiable in hidden and weight."""
    _, _, ref_hidden, ref_weight, labels = head_inputs(hidden.device)
    if name == "token_logprobs":
        return fdpo.token_logprobs(hidden, weight, labels, backend=backend).sum()
    if name == "sequence_logprobs":
        return fdpo.sequence_logprobs(hidden, weight, labels, backend=backend).sum()
    if name == "token_kl":
        lp, _, kl = fdpo.token_kl(hidden, weight, ref_hidden, ref_weight, labels, backend=backend)
        return lp.sum() + kl.sum()
    if name == "token_entropy":
        return fdpo.token_entropy(hidden, weight, labels, backend=backend).sum()
    if name == "FusedLMHead":
        return fdpo.FusedLMHead(weight, backend=backend)(hidden, labels, per_sequence=True).sum()
    if name == "PreferenceLoss":
        ref = (torch.full((P,), -30.0, device=hidden.device), torch.full((P,), -30.0, device=hidden.device))
        return fdpo.PreferenceLoss(backend=backend)(hidden, labels, weight, ref_logprobs=ref).loss
    if name == "TDPOLoss":
        return fdpo.TDPOLoss(backend=backend)(hidden, labels, weight, ref_hidden=ref_hidden, ref_head=ref_weight).loss
    assert name == "EpsilonDPOLoss"
    loss_fn = fdpo.EpsilonDPOLoss(fdpo.EpsilonDPO(beta=0.1, eps=0.1), backend=backend).eval()
    return loss_fn(hidden, labels, weight, ref_hidden=ref_hidden, ref_head=ref_weight).loss


HEAD_ENTRIES = ("token_logprobs", "sequence_logprobs", "token_kl", "token_entropy", "FusedLMHead", "PreferenceLoss",
                "TDPOLoss", "EpsilonDPOLoss")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("name", HEAD_ENTRIES)
@pytest.mark.parametrize("wrt", ["hidden", "weight"])
def test_fused_backends_refuse_create_graph(device, name, backend, wrt):
    """create_graph=True through a fused backward raises, naming the function; plain backward works."""
    hidden, weight, *_ = head_inputs(device)
    inputs = {"hidden": hidden.requires_grad_(wrt == "hidden"), "weight": weight.requires_grad_(wrt == "weight")}
    with pytest.raises(RuntimeError, match=rf"fdpo\.{name}\b.*double backward.*backend='reference'"):
        torch.autograd.grad(_loss(name, backend, hidden, weight), inputs[wrt], create_graph=True)
    (grad,) = torch.autograd.grad(_loss(name, backend, hidden, weight), inputs[wrt])
    (want,) = torch.autograd.grad(_loss(name, "reference", hidden, weight), inputs[wrt])
    assert_close(grad, want, 1e-4, f"{name} first-order gradient")


@pytest.mark.parametrize("backend", FUSED)
def test_preference_loss_refuses_create_graph(device, backend):
    sums = [t.requires_grad_(i < 2) for i, t in enumerate(pair_sums(device))]
    with pytest.raises(RuntimeError, match=r"fdpo\.preference_loss\b.*double backward.*backend='reference'"):
        torch.autograd.grad(fdpo.preference_loss(*sums, backend=backend).loss, sums[0], create_graph=True)
    (grad,) = torch.autograd.grad(fdpo.preference_loss(*sums, backend=backend).loss, sums[0])
    assert torch.isfinite(grad).all() and (grad != 0).all()


@pytest.mark.parametrize("backend", (*FUSED, "reference"))
def test_perturbed_logprobs_are_constants(device, backend):
    """perturbed_logprobs has no gradient at all (documented): nothing to differentiate twice."""
    hidden, weight, ref_hidden, ref_weight, labels = head_inputs(device)
    hidden.requires_grad_()
    plus, minus = fdpo.perturbed_logprobs(hidden, weight, ref_hidden, ref_weight, labels, 0.1, backend=backend)
    assert not plus.requires_grad and not minus.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        torch.autograd.grad(plus.sum(), hidden, create_graph=True)


def _gradient_penalty(first, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d/dy of ||d first(x, y) / dx||^2, the second-order quantity a gradient penalty needs."""
    (dx,) = torch.autograd.grad(first(x, y), x, create_graph=True)
    (dy,) = torch.autograd.grad((dx * dx).sum(), y)
    return dy


@pytest.mark.parametrize(("name", "softcap"), [("token_logprobs", None), ("token_logprobs", 3.0),
                                               ("token_kl", None), ("token_entropy", None)])
def test_reference_backend_double_backward(device, name, softcap):
    """backend='reference' differentiates twice: d/dW ||dL/dh||^2 equals float64 autograd."""
    hidden, weight, ref_hidden, ref_weight, labels = head_inputs(device, seed=3)

    def first(h, w):
        if name == "token_logprobs":
            return fdpo.token_logprobs(h, w, labels, softcap=softcap, backend="reference").sum()
        if name == "token_kl":
            return fdpo.token_kl(h, w, ref_hidden, ref_weight, labels, backend="reference")[2].sum()
        return fdpo.token_entropy(h, w, labels, backend="reference").sum()

    def first64(h, w):
        if name == "token_logprobs":
            return token_logprobs64(h, w, labels, softcap=softcap).sum()
        stats = token_stats64(h, w, labels, ref_hidden=ref_hidden, ref_weight=ref_weight)
        return stats["kl" if name == "token_kl" else "entropy"].sum()

    got = _gradient_penalty(first, hidden.clone().requires_grad_(), weight.clone().requires_grad_())
    want = _gradient_penalty(first64, leaf64(hidden), leaf64(weight))
    assert want.abs().max() > 1e-3
    assert_close(got, want, 1e-4, f"{name} second derivative")


@pytest.mark.parametrize(("divergence", "loss"), [("reverse_kl", "sigmoid"), ("js", "robust"),
                                                  ("forward_kl", "ipo"), ("alpha", "bpo")])
def test_reference_preference_loss_double_backward(device, divergence, loss):
    """backend='reference' gives the float64 Hessian-vector product of the pair loss."""
    sums = pair_sums(device, seed=4)
    lengths = torch.tensor([3.0, 7.0, 2.0]).to(device), torch.tensor([5.0, 1.0, 4.0]).to(device)
    options = dict(beta=0.7, divergence=divergence, alpha=0.4, loss=loss, bpo_lambda=0.5)
    smoothing = 0.2 if loss in ("sigmoid", "robust") else 0.0
    ref_options = {k: v for k, v in options.items() if k != "bpo_lambda"}

    def first(a_w, a_l):
        return fdpo.preference_loss(a_w, a_l, sums[2], sums[3], chosen_lengths=lengths[0], rejected_lengths=lengths[1],
                                    label_smoothing=smoothing, backend="reference", **options).loss

    def first64(a_w, a_l):
        return preference(a_w, a_l, sums[2].double(), sums[3].double(), len_w=lengths[0].double(),
                          len_l=lengths[1].double(), eps=smoothing, lam=0.5, clamp=True, **ref_options)["loss"]

    got = _gradient_penalty(first, sums[0].clone().requires_grad_(), sums[1].clone().requires_grad_())
    want = _gradient_penalty(first64, leaf64(sums[0]), leaf64(sums[1]))
    assert want.abs().max() > 1e-6 and math.isfinite(want.abs().max())
    assert_close(got, want, 1e-4, f"{divergence} {loss} second derivative")
