"""fdpo.PreferenceLoss end to end: hidden states -> loss, against a float64 reference with logits.

The reference materializes log_softmax(h W^T + b) in float64 from the same (fp32 or bf16) values,
sums the label log-probs of each sequence, applies the docs/math.md formulas of preference_reference
and differentiates with autograd. Shapes are odd and larger than one interpreter tile in every
dimension (78 padded rows > 64, V = 150 > 128, D = 70 > 64).

Tolerances (relative to the largest entry of each compared tensor): the fused log-probs accumulate
in fp32 (bf16 x bf16 products are exact in fp32), so sums and losses agree to ~1e-6 and 1e-4
leaves margin; fp32 gradients likewise. bf16 gradients are rounded to bf16 on output (relative
error up to 2^-8 = 3.9e-3 per entry), hence 1e-2 for them.
"""

import itertools

import pytest
import torch
from torch import nn

import fdpo

from float64_reference import token_logprobs64
from preference_reference import preference

PAIRS, T, D, V = 3, 13, 70, 150
IGNORE = -100


def make_labels(gen: torch.Generator) -> torch.Tensor:
    """[2P, T] labels: a prompt prefix and a padding suffix of ignored tokens around >= 2 scored ones."""
    labels = torch.randint(0, V, (2 * PAIRS, T), generator=gen)
    for row in range(2 * PAIRS):
        start = int(torch.randint(0, 5, (), generator=gen))
        stop = int(torch.randint(start + 2, T + 1, (), generator=gen))
        labels[row, :start] = IGNORE
        labels[row, stop:] = IGNORE
    return labels


def make_head(gen, dtype, device, requires_grad=True):
    """weight [V, D] and bias [V] Parameters (as a model's lm_head holds them)."""
    weight = (torch.randn(V, D, generator=gen) / D**0.5).to(dtype).to(device)
    bias = (torch.randn(V, generator=gen) * 0.1).to(dtype).to(device)
    return nn.Parameter(weight, requires_grad=requires_grad), nn.Parameter(bias, requires_grad=requires_grad)


def reference_sums(hidden, weight, bias, labels, cu_seqlens=None) -> torch.Tensor:
    """float64 per-sequence label log-prob sums through materialized logits."""
    picked = token_logprobs64(hidden, weight, labels, bias, ignore_index=IGNORE)
    if cu_seqlens is None:
        return picked.sum(-1)
    return torch.stack([picked[a:b].sum() for a, b in itertools.pairwise(cu_seqlens.tolist())])


def counts(labels, cu_seqlens=None) -> torch.Tensor:
    scored = (labels != IGNORE).double()
    if cu_seqlens is None:
        return scored.sum(-1)
    return torch.stack([scored[a:b].sum() for a, b in itertools.pairwise(cu_seqlens.tolist())])


def pack(padded: torch.Tensor, labels: torch.Tensor):
    """Padded [2P, T, ...] -> packed rows of uneven lengths (each row cut after its last scored token)."""
    lengths = [int((row != IGNORE).nonzero().max()) + 1 for row in labels]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    rows = torch.cat([padded[i, :n] for i, n in enumerate(lengths)])
    return rows, torch.cat([labels[i, :n] for i, n in enumerate(lengths)]), cu


def assert_close(actual, expected, rtol):
    expected = expected.detach().double().cpu()
    torch.testing.assert_close(actual.detach().double().cpu(), expected, rtol=0.0,
                               atol=rtol * expected.abs().max().item())


def reference_loss(sums, ref_sums, lens, beta=0.1, **options):
    """float64 loss dict from [2P] policy and reference sums (chosen first) via preference_reference."""
    p = PAIRS
    return preference(sums[:p], sums[p:], ref_sums[:p], ref_sums[p:], beta=beta, len_w=lens[:p], len_l=lens[p:],
                      **options)


CASES = [
    # dtype, divergence, loss, library options, reference options
    (torch.float32, "js", "sigmoid", dict(label_smoothing=0.1), dict(eps=0.1)),
    (torch.bfloat16, "alpha", "ipo", dict(alpha=0.3, nll_weight=0.5), dict(alpha=0.3, nll_weight=0.5)),
    (torch.float32, "forward_kl", "bpo", dict(bpo_lambda=0.0), dict(lam=0.0)),
    (torch.bfloat16, "reverse_kl", "robust", dict(label_smoothing=0.2), dict(eps=0.2)),
]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize(("dtype", "divergence", "loss", "options", "ref_options"), CASES,
                         ids=[f"{c[1]}-{c[2]}-{str(c[0])[6:]}" for c in CASES])
def test_policy_and_reference_hidden_states(device, packed, dtype, divergence, loss, options, ref_options):
    """The reference from ref_hidden through its own head; gradients to hidden, weight and bias."""
    gen = torch.Generator().manual_seed(0)
    labels = make_labels(gen)
    hidden = torch.randn(2 * PAIRS, T, D, generator=gen).to(dtype)
    ref_hidden = (hidden.float() + 0.3 * torch.randn(2 * PAIRS, T, D, generator=gen)).to(dtype)
    weight, bias = make_head(gen, dtype, device)
    ref_weight, ref_bias = make_head(gen, dtype, device, requires_grad=False)
    cu = None
    if packed:
        hidden, _, _ = pack(hidden, labels)
        ref_hidden, labels, cu = pack(ref_hidden, labels)
        cu = cu.to(device)
    hidden = hidden.to(device).requires_grad_()
    ref_hidden, labels = ref_hidden.to(device), labels.to(device)

    loss_fn = fdpo.PreferenceLoss(beta=0.1, divergence=divergence, loss=loss, **options)
    out = loss_fn(hidden, labels, fdpo.FusedLMHead(weight, bias), ref_hidden=ref_hidden,
                  ref_head=fdpo.FusedLMHead(ref_weight, ref_bias), cu_seqlens=cu)
    out.loss.backward()

    h64 = hidden.detach().double().requires_grad_()
    w64, b64 = weight.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    sums = reference_sums(h64, w64, b64, labels, cu)
    ref_sums = reference_sums(ref_hidden, ref_weight, ref_bias, labels, cu)
    lens = counts(labels, cu)
    ref = reference_loss(sums, ref_sums, lens, divergence=divergence, loss=loss, **ref_options)
    ref["loss"].backward()

    grad_rtol = 1e-2 if dtype == torch.bfloat16 else 1e-4
    assert_close(out.loss, ref["loss"], 1e-4)
    assert_close(torch.cat([out.policy_chosen, out.policy_rejected]), sums, 1e-5)
    assert_close(out.chosen_rewards, ref["chosen_rewards"], 1e-4)
    assert_close(out.margins, ref["margins"], 1e-4)
    assert out.accuracy.item() == pytest.approx(ref["accuracy"].item())
    assert torch.equal(torch.cat([out.extras["chosen_lengths"], out.extras["rejected_lengths"]]).cpu(),
                       lens.float())
    assert_close(hidden.grad, h64.grad, grad_rtol)
    assert_close(weight.grad, w64.grad, grad_rtol)
    assert_close(bias.grad, b64.grad, grad_rtol)
    assert ref_hidden.grad is None and ref_weight.grad is None


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_precomputed_reference_and_policy_head_reuse(device, packed):
    """ref_logprobs given; then the same reference from ref_hidden through the policy's own head
    (no ref_head): the reference pass adds no gradient to the shared weight."""
    gen = torch.Generator().manual_seed(1)
    labels = make_labels(gen)
    hidden = torch.randn(2 * PAIRS, T, D, generator=gen)
    ref_hidden = hidden + 0.2 * torch.randn(2 * PAIRS, T, D, generator=gen)
    weight, bias = make_head(gen, torch.float32, device)
    cu = None
    if packed:
        hidden, _, _ = pack(hidden, labels)
        ref_hidden, labels, cu = pack(ref_hidden, labels)
        cu = cu.to(device)
    hidden, ref_hidden, labels = hidden.to(device), ref_hidden.to(device), labels.to(device)

    lens = counts(labels, cu)
    ref_sums = reference_sums(ref_hidden, weight.detach(), bias.detach(), labels, cu)
    w64, b64 = weight.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    expected = reference_loss(reference_sums(hidden, w64, b64, labels, cu), ref_sums, lens, beta=0.3,
                              divergence="js", loss="hinge")
    expected["loss"].backward()

    head = fdpo.FusedLMHead(weight, bias)
    loss_fn = fdpo.PreferenceLoss(beta=0.3, divergence="js", loss="hinge")
    precomputed = (ref_sums[:PAIRS].float().to(device), ref_sums[PAIRS:].float().to(device))
    for reference in (dict(ref_logprobs=precomputed), dict(ref_hidden=ref_hidden)):
        weight.grad = bias.grad = None
        out = loss_fn(hidden, labels, head, cu_seqlens=cu, **reference)
        out.loss.backward()
        assert_close(out.loss, expected["loss"], 1e-4)
        assert_close(weight.grad, w64.grad, 1e-4)
        assert_close(bias.grad, b64.grad, 1e-4)


def test_head_forms_agree(device):
    """FusedLMHead, nn.Linear, LMHead and a bare weight tensor give the same loss and weight gradient."""
    gen = torch.Generator().manual_seed(2)
    labels = make_labels(gen).to(device)
    hidden = torch.randn(2 * PAIRS, T, D, generator=gen).to(device)
    linear = nn.Linear(D, V, bias=False).to(device)
    ref = (-torch.rand(PAIRS, generator=gen).to(device) * 30, -torch.rand(PAIRS, generator=gen).to(device) * 30)
    loss_fn = fdpo.PreferenceLoss(divergence="alpha", loss="sigmoid")
    results = []
    for head in (fdpo.FusedLMHead.from_linear(linear), linear, fdpo.LMHead(linear.weight), linear.weight):
        linear.weight.grad = None
        out = loss_fn(hidden, labels, head, ref_logprobs=ref)
        out.loss.backward()
        results.append((out.loss.detach(), linear.weight.grad.clone()))
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=0, atol=0)
        torch.testing.assert_close(grad, results[0][1], rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_call_time_beta_and_backend(device, backend):
    """A per-pair beta passed at call time overrides the module's beta; both backends agree with the
    reference."""
    gen = torch.Generator().manual_seed(3)
    labels = make_labels(gen).to(device)
    hidden = torch.randn(2 * PAIRS, T, D, generator=gen).to(device)
    weight, bias = make_head(gen, torch.float32, device, requires_grad=False)
    ref = (-torch.rand(PAIRS, generator=gen) * 30, -torch.rand(PAIRS, generator=gen) * 30)
    beta = torch.tensor([0.05, 0.2, 0.4])
    loss_fn = fdpo.PreferenceLoss(beta=0.1, loss="ipo", backend=backend)
    out = loss_fn(hidden, labels, fdpo.LMHead(weight, bias), ref_logprobs=tuple(t.to(device) for t in ref),
                  beta=beta.to(device))
    sums = reference_sums(hidden, weight, bias, labels)
    expected = reference_loss(sums, torch.cat(ref).double(), counts(labels), beta=beta.double(), loss="ipo")
    assert_close(out.loss, expected["loss"], 1e-4)
    assert_close(out.chosen_rewards, expected["chosen_rewards"], 1e-4)


@pytest.fixture
def batch(device):
    gen = torch.Generator().manual_seed(4)
    labels = make_labels(gen).to(device)
    hidden = torch.randn(2 * PAIRS, T, D, generator=gen).to(device)
    ref = (torch.zeros(PAIRS, device=device), torch.zeros(PAIRS, device=device))
    return hidden, labels, torch.randn(V, D, generator=gen).to(device), ref


@pytest.mark.parametrize(("call", "error", "match"), [
    (lambda h, y, w, r: fdpo.PreferenceLoss()(h[:5], y[:5], w, ref_logprobs=r), ValueError, "2P sequences"),
    (lambda h, y, w, r: fdpo.PreferenceLoss()(h, y, w), ValueError, "the reference is missing"),
    (lambda h, y, w, r: fdpo.PreferenceLoss()(h, y, w, ref_logprobs=r, ref_hidden=h), ValueError, "not both"),
    (lambda h, y, w, r: fdpo.PreferenceLoss()(h, y, w, ref_logprobs=r[0]), ValueError, "ref_logprobs must be a pair"),
    (lambda h, y, w, r: fdpo.PreferenceLoss()(h, y, w, ref_logprobs=(r[0][:2], r[1])), ValueError,
     "ref_chosen has 2 pairs"),
    (lambda h, y, w, r: fdpo.PreferenceLoss()(h, y, w, ref_hidden=h[:, :4]), ValueError, "ref_hidden must have"),
    (lambda h, y, w, r: fdpo.PreferenceLoss()(h, y, fdpo.FusedLMHead(w, ignore_index=-1), ref_logprobs=r),
     ValueError, r"head.ignore_index \(-1\) must equal"),
    (lambda h, y, w, r: fdpo.PreferenceLoss()(h, y, "lm_head", ref_logprobs=r), TypeError, "head must be"),
    (lambda h, y, w, r: fdpo.PreferenceLoss()(h.flatten(0, 1), y.flatten(), w, ref_logprobs=r,
                                              cu_seqlens=torch.tensor([0, 13, 26, 39], device=h.device)),
     ValueError, "2P sequences"),
    (lambda h, y, w, r: fdpo.PreferenceLoss()(h, y, w, ref_logprobs=r, beta=-1.0), ValueError, "beta must be"),
    (lambda h, y, w, r: fdpo.PreferenceLoss(divergence="tv"), ValueError, "divergence must be one of"),
    (lambda h, y, w, r: fdpo.PreferenceLoss(divergence="alpha", alpha=1.5), ValueError, "alpha must be"),
    (lambda h, y, w, r: fdpo.PreferenceLoss(beta=0), ValueError, "beta must be"),
    (lambda h, y, w, r: fdpo.PreferenceLoss(loss="bpo", bpo_lambda=-1), ValueError, "bpo_lambda"),
    (lambda h, y, w, r: fdpo.PreferenceLoss(label_smoothing=0.7), ValueError, "label_smoothing"),
])
def test_invalid_inputs(batch, call, error, match):
    with pytest.raises(error, match=match):
        call(*batch)
