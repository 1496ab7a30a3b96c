"""Public API inputs that used to crash obscurely or be read wrongly: inference-mode references,
nn.Linear subclasses, every head type as FusedLMHead's reference, ignore_index types, printing a
partitioned head, the epsilon-DPO loss module's state_dict."""

import numpy as np
import pytest
import torch
from torch import nn

import fdpo

from partitioned import Partitioned

P, T, D, V = 2, 5, 8, 30
BACKENDS = ["reference", "torch", "triton"]


def inputs(seed: int = 0, device: torch.device | str = "cpu"):
    """(hidden [2P, T, D] and weight [V, D], both leaves that require grad, labels [2P, T], ref_hidden), on
    `device`: drawn on the CPU (the same values on every device), then moved."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(V, D, generator=generator)
    hidden = torch.randn(2 * P, T, D, generator=generator)
    labels = torch.randint(0, V, (2 * P, T), generator=generator)
    labels[0, :2] = -100
    ref_hidden = torch.randn(2 * P, T, D, generator=generator)
    hidden, weight, labels, ref_hidden = (t.to(device) for t in (hidden, weight, labels, ref_hidden))
    return hidden.requires_grad_(), weight.requires_grad_(), labels, ref_hidden


TWO_HEAD_CALLS = {
    "token_kl": lambda h, w, lab, ref, be: fdpo.token_kl(h, w, ref, w.detach(), lab, backend=be)[2].sum(),
    "token_divergence": lambda h, w, lab, ref, be: fdpo.token_divergence(h, w, ref, w.detach(), lab,
                                                                          divergence="js", backend=be).sum(),
    "TDPOLoss": lambda h, w, lab, ref, be: fdpo.TDPOLoss(backend=be)(h, lab, w, ref_hidden=ref).loss,
    "EpsilonDPOLoss": lambda h, w, lab, ref, be: fdpo.EpsilonDPOLoss(fdpo.EpsilonDPO(), backend=be)(
        h, lab, w, ref_hidden=ref).loss,
}


@pytest.mark.parametrize("name", list(TWO_HEAD_CALLS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_reference_computed_under_inference_mode_gives_the_same_loss_and_gradients(device, backend, name):
    """Reference models often run under torch.inference_mode(); its tensors have no version counter."""
    hidden, weight, labels, ref_hidden = inputs(device=device)
    call = TWO_HEAD_CALLS[name]
    expected = call(hidden, weight, labels, ref_hidden, backend)
    grads = torch.autograd.grad(expected, (hidden, weight))
    with torch.inference_mode():
        ref_inference = ref_hidden.clone()
    assert ref_inference.is_inference()
    got = call(hidden, weight, labels, ref_inference, backend)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for g, e in zip(torch.autograd.grad(got, (hidden, weight)), grads, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


class ScaledReadout(nn.Linear):
    """A readout that scales its input (as mup's MuReadout does): not h W^T + b."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x / 4)


def test_an_nn_linear_with_its_own_forward_is_refused():
    readout = ScaledReadout(D, V)
    hidden, _, labels, ref_hidden = inputs()
    with pytest.raises(TypeError, match=r"head is a ScaledReadout, an nn\.Linear with its own forward"):
        fdpo.PreferenceLoss(backend="torch")(hidden, labels, readout, ref_logprobs=(torch.zeros(P), torch.zeros(P)))
    with pytest.raises(TypeError, match="ref_head is a ScaledReadout"):
        fdpo.TDPOLoss(backend="torch")(hidden, labels, nn.Linear(D, V), ref_hidden=ref_hidden, ref_head=readout)
    plain = nn.modules.linear.NonDynamicallyQuantizableLinear(D, V)  # a subclass that keeps Linear's forward
    fdpo.TDPOLoss(backend="torch")(hidden, labels, plain, ref_hidden=ref_hidden)


@pytest.mark.parametrize("kind", ["LMHead", "FusedLMHead", "Linear", "tensor"])
def test_fused_lm_head_takes_every_head_type_as_its_reference(kind):
    hidden, weight, labels, ref_hidden = inputs()
    ref_weight, ref_bias = torch.randn(V, D), torch.randn(V)
    linear = nn.Linear(D, V)
    with torch.no_grad():
        linear.weight.copy_(ref_weight)
        linear.bias.copy_(ref_bias)
    ref_head = {"LMHead": fdpo.LMHead(ref_weight, ref_bias), "FusedLMHead": fdpo.FusedLMHead(ref_weight, ref_bias),
                "Linear": linear, "tensor": ref_weight}[kind]
    head = fdpo.FusedLMHead(weight, backend="torch")
    got = head(hidden, labels, ref_hidden=ref_hidden, ref_head=ref_head, kl=True)
    logits = ref_hidden.double() @ ref_weight.double().T + (0 if kind == "tensor" else ref_bias.double())
    expected = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0] * (labels != -100)
    torch.testing.assert_close(got["ref_logprob"].double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("value", [None, 1.5, True, "-100", torch.tensor(-100)])
def test_ignore_index_must_be_an_integer(value):
    hidden, weight, labels, _ = inputs()
    message = "ignore_index must be an integer"
    with pytest.raises(TypeError, match=message):
        fdpo.token_logprobs(hidden, weight, labels, ignore_index=value, backend="torch")
    with pytest.raises(TypeError, match=message):
        fdpo.FusedLMHead(weight, ignore_index=value)
    with pytest.raises(TypeError, match=message):
        fdpo.PreferenceLoss(ignore_index=value)
    with pytest.raises(TypeError, match=message):
        fdpo.TokenDivergenceLoss(ignore_index=value)


def test_a_numpy_integer_ignore_index_is_an_integer():
    hidden, weight, labels, _ = inputs()
    got = fdpo.token_logprobs(hidden, weight, labels, ignore_index=np.int64(-100), backend="torch")
    torch.testing.assert_close(got, fdpo.token_logprobs(hidden, weight, labels, backend="torch"))


def test_a_partitioned_head_prints_its_full_shape():
    partitioned = Partitioned(torch.randn(V, D))
    head = fdpo.FusedLMHead(partitioned.param, gather=partitioned.gather, backend="torch")
    assert partitioned.param.numel() == 0, "outside its gather the weight is empty"
    assert f"vocab={V}, dim={D}" in repr(head)


def test_the_epsilon_dpo_loss_modules_state_dict_stays_empty():
    """beta lives in the controller and travels as `controller.state_dict()` (README); the module's own
    state_dict stays empty, so state dicts of models holding the loss load across versions (an extra
    state added once made every earlier epsilon-DPO checkpoint of the trainer fail to resume)."""
    loss_fn = fdpo.EpsilonDPOLoss(fdpo.EpsilonDPO(beta=0.1, eps=0.2), backend="torch")
    assert loss_fn.state_dict() == {}
    loss_fn.load_state_dict({})


@pytest.mark.parametrize("function", ["head_stats", "token_divergence"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nan_hidden_state_at_an_ignored_token_reaches_no_gradient(device, backend, function):
    """Ignored tokens get zero gradient (docs/math.md 0) even when their hidden state is NaN (a
    padding row of a fully masked attention row): the same sums and gradients as with zeros there."""
    hidden, weight, labels, ref_hidden = inputs(device=device)
    labels[1, 0] = -100

    def run(fill: float):
        h = hidden.detach().clone()
        h[1, 0] = fill
        h.requires_grad_()
        ref = ref_hidden.clone()
        ref[1, 0] = fill
        if function == "head_stats":
            out = fdpo.FusedLMHead(weight, backend=backend)(h, labels, ref_hidden=ref, ref_head=weight.detach(),
                                                            entropy=True, kl=True)
            loss = sum(t.sum() for t in out.values())
        else:
            loss = fdpo.token_divergence(h, weight, ref, weight.detach(), labels, divergence="js",
                                         backend=backend).sum()
        return loss, torch.autograd.grad(loss, (h, weight))

    loss, (d_hidden, d_weight) = run(float("nan"))
    want_loss, (want_hidden, want_weight) = run(0.0)
    assert torch.isfinite(d_weight).all() and torch.isfinite(d_hidden).all()
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=0)
    torch.testing.assert_close(d_hidden, want_hidden, rtol=0, atol=0)
    torch.testing.assert_close(d_weight, want_weight, rtol=0, atol=0)
