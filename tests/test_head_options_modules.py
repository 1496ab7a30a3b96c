"""The logit scale and the gather hook of `fdpo.LMHead` survive the modules (docs/math.md 13).

`fdpo.FusedLMHead(logit_scale=, gather=)` and the pairwise losses, which wrap any head in a
FusedLMHead, must compute with the head's scale and enter its gather: dropping either gives
plausible numbers computed from the wrong logits (or from a partitioned, empty weight).
"""

from contextlib import contextmanager

import pytest
import torch

import fdpo
from fdpo.heads import LMHead

P, T, V, D = 2, 5, 67, 16


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * P, T, D, generator=g)
    weight = 0.4 * torch.randn(V, D, generator=g)
    labels = torch.randint(0, V, (2 * P, T), generator=g)
    labels[:, 0] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_fused_lm_head_applies_its_logit_scale(backend):
    hidden, weight, labels = inputs()
    head = fdpo.FusedLMHead(weight, softcap=3.0, logit_scale=1.7, backend=backend)
    want = fdpo.token_statistics(hidden, weight, labels, softcap=3.0, logit_scale=1.7, backend=backend)["logprob"]
    unscaled = fdpo.token_statistics(hidden, weight, labels, softcap=3.0, backend=backend)["logprob"]
    got = head(hidden, labels)
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got, unscaled, atol=1e-3), "the scale changes the log-probs of these inputs"
    assert head.spec.scale == 1.7 and "logit_scale=1.7" in repr(head)


def test_fused_lm_head_checks_its_options():
    weight = torch.zeros(V, D)
    with pytest.raises(ValueError, match="logit_scale"):
        fdpo.FusedLMHead(weight, logit_scale=0.0)
    with pytest.raises(TypeError, match="gather"):
        fdpo.FusedLMHead(weight, gather="not callable")


@pytest.mark.parametrize("loss", ["preference", "tdpo"])
def test_losses_keep_the_scale_and_gather_of_an_lm_head(loss):
    """A loss given an fdpo.LMHead with a scale and a gather computes what the same FusedLMHead does."""
    hidden, weight, labels = inputs(1)
    ref_hidden = hidden + 0.1 * torch.randn(hidden.shape, generator=torch.Generator().manual_seed(2))
    entries = []

    @contextmanager
    def gather():
        entries.append(1)
        yield

    def run(head):
        h = hidden.clone().requires_grad_(True)
        if loss == "preference":
            fn = fdpo.PreferenceLoss(beta=0.3, backend="torch")
        else:
            fn = fdpo.TDPOLoss(beta=0.3, backend="torch")
        out = fn(h, labels, head, ref_hidden=ref_hidden, ref_head=LMHead(weight, scale=0.8))
        out.loss.backward()
        return out.loss.detach(), h.grad

    w = weight.clone().requires_grad_(True)
    got_loss, got_grad = run(LMHead(w, scale=1.9, gather=gather))
    assert entries, "the loss entered the head's gather"
    want_loss, want_grad = run(fdpo.FusedLMHead(weight.clone().requires_grad_(True), logit_scale=1.9, backend="torch"))
    unscaled_loss, _ = run(LMHead(weight.clone().requires_grad_(True)))
    assert torch.allclose(got_loss, want_loss, atol=1e-6) and torch.allclose(got_grad, want_grad, atol=1e-6)
    assert not torch.allclose(got_loss, unscaled_loss, atol=1e-4), "the scale changes the loss of these inputs"
