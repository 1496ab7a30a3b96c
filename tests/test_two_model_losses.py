"""TDPO and epsilon-DPO against float64 references written from docs/math.md 5 and 6.

Pair-level formulas are checked on random sums with float64 autograd; the modules (hidden states
to loss) against a float64 reference that materializes both logit tensors and follows the
official formulas. The epsilon-DPO step logic is checked on constructed cases whose answer is
known, and the controller's arithmetic, state round trip and distributed mean exactly.
"""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import fdpo

from float64_reference import assert_close, token_stats64
from partitioned import Partitioned
from preference_reference import preference

P, T, V, D, D_REF = 3, 23, 300, 80, 56


def pair_sums(seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(P, generator=g, dtype=torch.float64) for _ in range(6)]


def tdpo64(a_w, a_l, b_w, b_l, k_w, k_l, beta, alpha, variant):
    """docs/math.md 6: u = Delta - c (K_l - K_w) (K_w detached for TDPO2), loss = mean softplus(-beta u)."""
    c, k_w_term = (alpha, k_w.detach()) if variant == "tdpo2" else (1.0, k_w)
    u = (a_w - b_w) - (a_l - b_l) - c * (k_l - k_w_term)
    return F.softplus(-beta * u).mean()


@pytest.mark.parametrize("variant", ["tdpo1", "tdpo2"])
def test_tdpo_loss_and_gradients(variant):
    sums = pair_sums()
    leaves = [s.clone().requires_grad_(True) for s in sums]
    want = tdpo64(*leaves, beta=0.1, alpha=0.5, variant=variant)
    want.backward()
    inputs = [s.float().requires_grad_(True) for s in sums]
    out = fdpo.tdpo_loss(*inputs, beta=0.1, alpha=0.5, variant=variant)
    out.loss.backward()
    assert_close(out.loss, want, 1e-6, "loss")
    for got, ref, name in zip(inputs, leaves, ("a_w", "a_l", "b_w", "b_l", "K_w", "K_l"), strict=True):
        if name.startswith("b") or (name == "K_w" and variant == "tdpo2"):
            assert got.grad is None, f"{name} must get no gradient (a constant, or TDPO2's detached chosen KL)"
        else:
            assert_close(got.grad, ref.grad, 1e-6, f"d{name}")
    # docs/math.md 6: dL/da_w = G, dL/dK_l = -c G with G = -beta sigma(-beta u) / P.
    a_w, a_l, b_w, b_l, k_w, k_l = sums
    c = 0.5 if variant == "tdpo2" else 1.0
    u = (a_w - b_w) - (a_l - b_l) - c * (k_l - k_w)
    G = -0.1 * torch.sigmoid(-0.1 * u) / P
    assert_close(inputs[0].grad, G, 1e-6, "dL/da_w = G")
    assert_close(inputs[5].grad, -c * G, 1e-6, "dL/dK_l = -c G")
    rewards = 0.1 * ((a_w - b_w) + k_w)
    assert_close(out.chosen_rewards, rewards, 1e-6, "chosen rewards")


def test_tdpo_is_reverse_kl_only_and_validates():
    sums = [s.float() for s in pair_sums()]
    for divergence in ("forward_kl", "js", "alpha"):
        with pytest.raises(ValueError, match="TDPO is defined for divergence='reverse_kl' only"):
            fdpo.tdpo_loss(*sums, divergence=divergence)
        with pytest.raises(ValueError, match="TDPO is defined for divergence='reverse_kl' only"):
            fdpo.TDPOLoss(divergence=divergence)
    with pytest.raises(ValueError, match="variant must be one of"):
        fdpo.TDPOLoss(variant="tdpo3")
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        fdpo.TDPOLoss(alpha=0.0)
    with pytest.raises(ValueError, match="beta must be"):
        fdpo.TDPOLoss(beta=-1.0)
    with pytest.raises(ValueError, match="kl_rejected has 2 pairs"):
        fdpo.tdpo_loss(*sums[:5], sums[5][:2])


def model_inputs(device, shared_head, seed=0):
    """Padded policy and reference hidden states of 2P sequences (chosen first), heads and labels."""
    g = torch.Generator().manual_seed(seed)
    d_ref = D if shared_head else D_REF
    hidden = torch.randn(2 * P, T, D, generator=g)
    weight = 0.2 * torch.randn(V, D, generator=g)
    ref_hidden = hidden[..., :d_ref] + 0.3 * torch.randn(2 * P, T, d_ref, generator=g)
    ref_weight = weight if shared_head else 0.2 * torch.randn(V, d_ref, generator=g)
    labels = torch.randint(0, V, (2 * P, T), generator=g)
    labels[:, :4] = -100                                     # the prompt
    labels[torch.rand(2 * P, T, generator=g) < 0.1] = -100   # and some padding
    return hidden.to(device), weight.to(device), ref_hidden.to(device), ref_weight.to(device), labels.to(device)


def sequence_stats64(hidden, weight, ref_hidden, ref_weight, labels, eps=0.1):
    """float64 per-sequence sums of every statistic, from both materialized logit tensors."""
    stats = token_stats64(hidden, weight, labels, None, ref_hidden.double(), ref_weight.double(), None, eps=eps)
    return {k: v.sum(-1) for k, v in stats.items()}


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("shared_head", [False, True], ids=["distinct heads", "shared head"])
@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_tdpo_module_against_materialized_logits(device, backend, shared_head, layout):
    hidden, weight, ref_hidden, ref_weight, labels = model_inputs(device, shared_head)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    loss_fn = fdpo.TDPOLoss(beta=0.2, alpha=0.5, variant="tdpo2", backend=backend)
    ref_head = None if shared_head else ref_weight
    if layout == "padded":
        out = loss_fn(h, labels, w, ref_hidden=ref_hidden, ref_head=ref_head)
    else:
        cu = torch.arange(0, 2 * P * T + 1, T, device=device)
        out = loss_fn(h.view(-1, D), labels.view(-1), w, ref_hidden=ref_hidden.reshape(2 * P * T, -1),
                      ref_head=ref_head, cu_seqlens=cu)
    out.loss.backward()

    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    s = sequence_stats64(h64, w64, ref_hidden, w64.detach() if shared_head else ref_weight, labels)
    lp, ref_lp, kl = s["logprob"], s["ref_logprob"], s["kl"]
    want = tdpo64(lp[:P], lp[P:], ref_lp[:P], ref_lp[P:], kl[:P], kl[P:], beta=0.2, alpha=0.5, variant="tdpo2")
    want.backward()
    assert_close(out.loss, want, 1e-5, "loss")
    assert_close(out.extras["kl_chosen"], kl[:P], 1e-5, "chosen KL sums")
    assert_close(out.extras["kl_rejected"], kl[P:], 1e-5, "rejected KL sums")
    assert_close(h.grad.view(hidden.shape), h64.grad, 2e-5, "dHidden")
    assert_close(w.grad, w64.grad, 2e-5, "dWeight")


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_tdpo_with_a_partitioned_reference_head(backend):
    """A ZeRO-3-partitioned reference head (empty outside its gather) gives the loss and gradients of the
    plain one: it is read, and detached, only inside its gather, in the forward and in the KL's backward."""
    hidden, weight, ref_hidden, ref_weight, labels = model_inputs("cpu", False)
    loss_fn = fdpo.TDPOLoss(beta=0.2, alpha=0.5, variant="tdpo2", backend=backend)

    def loss_and_grads(ref_head):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        out = loss_fn(h, labels, w, ref_hidden=ref_hidden, ref_head=ref_head)
        return out.loss.detach(), torch.autograd.grad(out.loss, [h, w])

    want, want_grads = loss_and_grads(ref_weight)
    part = Partitioned(ref_weight)
    got, grads = loss_and_grads(fdpo.LMHead(part.param, gather=part.gather))
    assert part.param.numel() == 0 and part.entries >= (1 if backend == "reference" else 2)
    assert_close(got, want, 1e-6, "loss")
    for g, w, name in zip(grads, want_grads, ("dHidden", "dWeight"), strict=True):
        assert_close(g, w, 1e-5, name)


@pytest.mark.parametrize("rho, plus, minus, step", [
    (0.0, 1.0, -1.0, 1.0),      # rho+ > rho > rho-: +1
    (0.0, -1.0, 1.0, -1.0),     # rho- > rho > rho+: -1
    (0.0, 1.0, 2.0, 0.0),       # rho below both
    (3.0, 1.0, 2.0, 0.0),       # rho above both
    (1.0, 1.0, 0.0, 0.0),       # tie with rho+: strict inequalities give 0
    (1.0, 2.0, 1.0, 0.0),       # tie with rho-
    (1.0, 1.0, 1.0, 0.0),       # all equal
    (0.0, float("-inf"), 1.0, 0.0),  # a non-finite sum (a reference-only vocabulary mask): no order, 0
    (0.0, float("nan"), -1.0, 0.0),
])
def test_epsilon_steps_on_constructed_cases(rho, plus, minus, step):
    zero = torch.zeros(1)
    # chosen - rejected of each set of sums gives rho, rho+ and rho-, with offsets on both sides.
    got = fdpo.epsilon_dpo_steps(zero + rho - 5, zero - 5, zero + plus + 2, zero + 2, zero + minus, zero)
    assert got.tolist() == [step]


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_a_reference_only_vocabulary_mask_takes_no_epsilon_step(device, backend):
    """A reference that masks a vocabulary entry the policy does not: z+ is +inf there on paper, so every
    scored token's lp+ is -inf and the pairs take no step, whatever the responses' lengths (the finite
    stand-in of the masked logit gave steps of +-1 set by the length difference alone)."""
    torch.manual_seed(0)
    pairs, steps, dim, vocab = 4, 12, 16, 300
    hidden = torch.randn(2 * pairs, steps, dim, device=device, requires_grad=True)
    ref_hidden = torch.randn(2 * pairs, steps, dim, device=device)
    weight, ref_weight = 0.5 * torch.randn(vocab, dim, device=device), 0.5 * torch.randn(vocab, dim, device=device)
    labels = torch.randint(0, vocab, (2 * pairs, steps), device=device)
    labels[labels == 5] = 6
    for i in range(pairs):
        labels[i, :steps - (3 + i)] = -100      # chosen responses of 3 to 6 tokens
    labels[pairs:, :steps - 8] = -100           # rejected responses of 8
    ref_bias = torch.zeros(vocab, device=device)
    ref_bias[5] = float("-inf")
    controller = fdpo.EpsilonDPO(beta=0.1, eps=0.01)
    out = fdpo.EpsilonDPOLoss(controller, backend=backend)(hidden, labels, fdpo.LMHead(weight), ref_hidden=ref_hidden,
                                                           ref_head=fdpo.LMHead(ref_weight, bias=ref_bias))
    out.loss.backward()
    assert out.extras["steps"].tolist() == [0.0] * pairs
    assert controller.update() == 0.1
    plus, minus = fdpo.perturbed_logprobs(hidden.detach(), weight, ref_hidden, ref_weight, labels, 0.01,
                                          ref_bias=ref_bias, backend=backend)
    scored = labels != -100
    assert torch.isneginf(plus[scored]).all() and (plus[~scored] == 0).all()
    assert minus[scored].isfinite().all()


def test_controller_arithmetic_and_state():
    controller = fdpo.EpsilonDPO(beta=0.01, eps=0.02)
    steps = torch.tensor([1.0, 1.0, 0.0, -1.0])
    assert_close(controller.pair_betas(steps), torch.tensor([0.01 / 1.02, 0.01 / 1.02, 0.01, 0.01 / 0.98],
                                                            dtype=torch.float64), 1e-7, "per-pair betas")
    controller.record(steps)                              # two micro-batches of one optimizer step
    controller.record(torch.tensor([1.0, 1.0]))
    state = controller.state_dict()
    assert state == {"beta": 0.01, "eps": 0.02, "step_sum": 3.0, "step_count": 6}
    restored = fdpo.EpsilonDPO(beta=0.5, eps=0.5)
    restored.load_state_dict(state)
    expected = 0.01 / (1 + 0.02 * 3.0 / 6)
    assert math.isclose(controller.update(), expected, rel_tol=1e-12)
    assert math.isclose(restored.update(), expected, rel_tol=1e-12), "pending steps survive a checkpoint"
    assert controller.update() == controller.beta == restored.beta, "no steps recorded: beta unchanged"
    with pytest.raises(ValueError, match="missing"):
        restored.load_state_dict({"beta": 0.1})
    for corrupted, match in (({"step_sum": -200.0, "step_count": 1}, r"step_sum must be .* = \[-1, 1\]"),
                             ({"step_sum": 2.0, "step_count": 0}, r"step_sum must be .* = \[-0, 0\]"),
                             ({"step_count": -1}, "step_count must be an integer >= 0"),
                             ({"step_count": 6.0}, "step_count must be an integer >= 0"),
                             ({"beta": torch.tensor([0.1])}, "beta must be a finite number > 0")):
        with pytest.raises(ValueError, match=match):
            restored.load_state_dict({**state, **corrupted})
    assert restored.state_dict() == {**state, "beta": restored.beta, "step_sum": 0.0, "step_count": 0}
    with pytest.raises(ValueError, match="eps must be a number in the open interval"):
        fdpo.EpsilonDPO(eps=1.5)
    with pytest.raises(ValueError, match="beta must be"):
        fdpo.EpsilonDPO(beta=0.0)


def _distributed_update(rank: int, world: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        controller = fdpo.EpsilonDPO(beta=0.1, eps=0.1)
        # rank 0: three +1 steps; rank 1: one -1 step. Global mean = (3 - 1) / 4 = 0.5.
        controller.record(torch.ones(3) if rank == 0 else -torch.ones(1))
        results[rank] = controller.update()
    finally:
        dist.destroy_process_group()


def test_controller_update_averages_over_ranks():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_distributed_update, args=(2, port, results), nprocs=2, join=True)
    expected = 0.1 / (1 + 0.1 * 0.5)
    assert math.isclose(results[0], expected, rel_tol=1e-12) and math.isclose(results[1], expected, rel_tol=1e-12)


@pytest.mark.parametrize("divergence, loss", [("reverse_kl", "sigmoid"), ("js", "sigmoid"), ("alpha", "ipo"),
                                              ("forward_kl", "hinge")])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_epsilon_dpo_module_against_materialized_logits(device, backend, divergence, loss):
    hidden, weight, ref_hidden, ref_weight, labels = model_inputs(device, shared_head=False, seed=4)
    eps = 0.3                                   # large enough that the three step values all occur
    controller = fdpo.EpsilonDPO(beta=0.5, eps=eps)
    loss_fn = fdpo.EpsilonDPOLoss(controller, divergence=divergence, alpha=0.3, loss=loss, backend=backend)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    out = loss_fn(h, labels, w, ref_hidden=ref_hidden, ref_head=ref_weight)
    out.loss.backward()

    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    s = sequence_stats64(h64, w64, ref_hidden, ref_weight, labels, eps=eps)
    lp, plus, minus = s["logprob"].detach(), s["logprob_plus"], s["logprob_minus"]
    rho, rho_p, rho_m = lp[:P] - lp[P:], plus[:P] - plus[P:], minus[:P] - minus[P:]
    steps = ((rho_p > rho) & (rho > rho_m)).double() - ((rho_m > rho) & (rho > rho_p)).double()
    assert out.extras["steps"].tolist() == steps.tolist()
    betas = 0.5 / (1 + eps * steps)
    assert_close(out.extras["beta"], betas, 1e-6, "per-pair betas")
    counts = (labels != -100).sum(-1).double()
    want = preference(s["logprob"][:P], s["logprob"][P:], s["ref_logprob"][:P], s["ref_logprob"][P:], beta=betas,
                      divergence=divergence, alpha=0.3, loss=loss, len_w=counts[:P], len_l=counts[P:])
    want["loss"].backward()
    # The fp32 sums of ~20 log-probs of magnitude ~6 carry an absolute error of ~1e-5, which the
    # exponential scores (forward KL, alpha) turn into a relative error of the same size: 1e-4.
    tol = 1e-4 if divergence in ("forward_kl", "alpha") else 2e-5
    assert_close(out.loss, want["loss"], tol, "loss")
    assert_close(h.grad, h64.grad, tol, "dHidden")
    assert_close(w.grad, w64.grad, tol, "dWeight")
    assert controller.state_dict()["step_count"] == P, "training forward passes record their steps"
    loss_fn.eval()
    loss_fn(hidden, labels, weight, ref_hidden=ref_hidden, ref_head=ref_weight)
    assert controller.state_dict()["step_count"] == P, "evaluation does not record steps"


def test_epsilon_dpo_steps_are_not_constant():
    """On the module test's inputs the step takes more than one value (the comparison has teeth)."""
    hidden, weight, ref_hidden, ref_weight, labels = model_inputs("cpu", shared_head=False, seed=4)
    s = sequence_stats64(hidden, weight, ref_hidden, ref_weight, labels, eps=0.3)
    got = fdpo.epsilon_dpo_steps(*(s[k][half].float() for k in ("logprob", "logprob_plus", "logprob_minus")
                                   for half in (slice(0, P), slice(P, 2 * P))))
    assert len(set(got.tolist())) > 1


def test_epsilon_dpo_module_validates():
    with pytest.raises(TypeError, match=r"controller must be an fdpo\.EpsilonDPO"):
        fdpo.EpsilonDPOLoss(0.1)
    with pytest.raises(ValueError, match="divergence must be one of"):
        fdpo.EpsilonDPOLoss(fdpo.EpsilonDPO(), divergence="kl")
    hidden, weight, _, _, labels = model_inputs("cpu", shared_head=True)
    with pytest.raises(ValueError, match="need the reference model's hidden states"):
        fdpo.EpsilonDPOLoss(fdpo.EpsilonDPO())(hidden, labels, weight, ref_hidden=None)
