"""The logit scale and the gather hook of `fdpo.LMHead` survive the modules (docs/math.md 13).

`fdpo.FusedLMHead(logit_scale=, gather=)` and the pairwise losses, which wrap any head in a
FusedLMHead, must compute with the head's scale and enter its gather: dropping either gives
plausible numbers computed from the wrong logits (or from a partitioned, empty weight).
"""

import pickle
import sys
import warnings
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


def module_logprobs(linear: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """float64 label log-probs of the module's own output, 0 at ignored tokens."""
    bias = None if linear.bias is None else linear.bias.double()
    logits = torch.nn.functional.linear(hidden.double(), linear.weight.double(), bias)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return logp.masked_fill(labels == -100, 0.0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_head_from_a_linear_reads_its_current_weight_at_every_call(device, backend):
    """Built once, as a training loop builds it: a weight_norm-parametrized Linear's weight (recomputed from
    its g and v after each update) and a Parameter replaced by load_state_dict(assign=True) are the ones
    scored, and the gradients reach the parametrization's own Parameters."""
    from torch.nn.utils.parametrizations import weight_norm

    hidden, _, labels = (t.to(device) for t in inputs(1))
    linear = weight_norm(torch.nn.Linear(D, V)).to(device)
    head = fdpo.FusedLMHead.from_linear(linear, backend=backend)
    optimizer = torch.optim.SGD(linear.parameters(), lr=0.5)
    for _ in range(2):
        got = head(hidden, labels)
        torch.testing.assert_close(got.double(), module_logprobs(linear, hidden, labels), rtol=0, atol=2e-5)
        optimizer.zero_grad()
        (-got.sum()).backward()
        g, v = linear.parametrizations.weight.original0, linear.parametrizations.weight.original1
        assert g.grad is not None and v.grad is not None and linear.bias.grad is not None
        optimizer.step()

    model = torch.nn.Sequential(torch.nn.Linear(D, D), torch.nn.Linear(D, V)).to(device)
    head = fdpo.FusedLMHead.from_linear(model[1], backend=backend)
    model.load_state_dict({k: torch.randn_like(v) for k, v in model.state_dict().items()}, assign=True)
    assert head.weight is model[1].weight and head.bias is model[1].bias
    torch.testing.assert_close(head(hidden, labels).double(), module_logprobs(model[1], hidden, labels), rtol=0,
                               atol=2e-5)
    assert set(head.state_dict()) == {"linear.weight", "linear.bias"}


def test_a_head_from_anything_but_a_plain_linear_is_refused():
    """A Linear subclass with its own forward and a non-Linear module with a `weight` (a PEFT LoRA layer's is
    its base layer's, so its adapter would be skipped) raise TypeError, through from_linear and the losses."""
    class ScaledReadout(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 0.25

    class AdapterLayer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.base_layer = torch.nn.Linear(D, V)

        @property
        def weight(self):
            return self.base_layer.weight

    hidden, _, labels = inputs()
    with pytest.raises(TypeError, match=r"an nn\.Linear with its own forward"):
        fdpo.FusedLMHead.from_linear(ScaledReadout(D, V))
    with pytest.raises(TypeError, match=r"must be an nn\.Linear, got a .*AdapterLayer, a PEFT adapter layer on the "
                                        r"LM head.*\(merge_and_unload\(\)\)"):
        fdpo.FusedLMHead.from_linear(AdapterLayer())
    with pytest.raises(TypeError, match="linear is None: there is no LM head"):
        fdpo.FusedLMHead.from_linear(None)
    with pytest.raises(TypeError, match=r"an nn\.Linear with its own forward"):
        fdpo.PreferenceLoss(backend="torch")(hidden, labels, ScaledReadout(D, V),
                                             ref_logprobs=(torch.zeros(P), torch.zeros(P)))


def test_forward_hooks_on_the_linear_are_reported_unless_they_shard_it():
    """fdpo reads weight and bias and never runs the Linear: a forward hook (which could change the logits)
    gets a UserWarning naming it; a sharding framework's hook (it only gathers the weight) does not."""
    def scale_output(module, args, output):
        return output * 0.25

    def gather_params(module, args):
        return None

    gather_params.__module__ = "torch.distributed.fsdp.some_hooks"
    linear = torch.nn.Linear(D, V)
    linear.register_forward_pre_hook(gather_params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fdpo.FusedLMHead.from_linear(linear)
    linear.register_forward_hook(scale_output)
    with pytest.warns(UserWarning, match=r"1 forward hook\(s\) \(.*scale_output\) that fdpo does not run"):
        fdpo.FusedLMHead.from_linear(linear)


def wrapper_logprobs(module: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """float64 label log-probs of a head module's own forward (any module), 0 at ignored tokens."""
    with torch.no_grad():
        logits = module(hidden).double()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return logp.masked_fill(labels == -100, 0.0)


def test_a_head_from_a_peft_modules_to_save_wrapper_scores_what_its_forward_runs():
    """PEFT's modules_to_save=["lm_head"] wraps the head in a ModulesToSaveWrapper: fdpo scores the active
    adapter's trained copy, and the original head inside `disable_adapter()`, as the wrapper's forward does."""
    import peft

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(D, D)
            self.lm_head = torch.nn.Linear(D, V)

        def forward(self, x):
            return self.lm_head(self.proj(x))

    model = peft.get_peft_model(Tiny(), peft.LoraConfig(target_modules=["proj"], modules_to_save=["lm_head"]))
    wrapper = model.base_model.model.lm_head
    assert type(wrapper).__name__ == "ModulesToSaveWrapper"
    with torch.no_grad():
        wrapper.modules_to_save["default"].weight.add_(0.5 * torch.randn(V, D))
    hidden, _, labels = inputs(2)
    head = fdpo.FusedLMHead.from_linear(wrapper, backend="torch")
    trained = head(hidden, labels).double()
    torch.testing.assert_close(trained, wrapper_logprobs(wrapper, hidden, labels), rtol=0, atol=2e-5)
    with model.disable_adapter():
        original = head(hidden, labels).double()
        torch.testing.assert_close(original, wrapper_logprobs(wrapper, hidden, labels), rtol=0, atol=2e-5)
    assert (trained - original).abs().max() > 0.1
    # The pair losses take the wrapper as a head too; the head's keys and attributes are the active copy's.
    out = fdpo.PreferenceLoss(backend="torch")(hidden, labels, wrapper, ref_logprobs=(torch.zeros(P), torch.zeros(P)))
    torch.testing.assert_close(out.policy_chosen.double(), trained[:P].sum(dim=1), rtol=0, atol=1e-4)
    copy = wrapper.modules_to_save["default"]
    head.weight = torch.nn.Parameter(torch.zeros(V, D))
    assert copy.weight is head.weight and wrapper.original_module.weight.any()
    head.load_state_dict({"weight": torch.ones(V, D), "bias": torch.ones(V)}, strict=False)
    assert (copy.weight == 1).all() and (copy.bias == 1).all()

    class ScaledReadout(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 0.5

    wrapper.modules_to_save["default"] = ScaledReadout(D, V)  # every module the wrapper may run is checked
    with pytest.raises(TypeError, match=r"module 1 of a ModulesToSaveWrapper\) is a ScaledReadout"):
        fdpo.FusedLMHead.from_linear(wrapper)


def test_a_head_from_a_linear_loads_the_keys_it_saved_before_and_sets_its_linears_weight():
    """A from_linear head saved "weight" / "bias" when it held the Parameters itself: such a state_dict loads
    into the Linear; assigning head.weight replaces the Linear's weight."""
    linear = torch.nn.Linear(D, V)
    head = fdpo.FusedLMHead.from_linear(linear)
    old = {"weight": torch.randn(V, D), "bias": torch.randn(V)}
    head.load_state_dict(old)
    assert torch.equal(linear.weight, old["weight"]) and torch.equal(linear.bias, old["bias"])
    head.weight = torch.nn.Parameter(torch.zeros(V, D))
    assert linear.weight is head.weight and not linear.weight.any()
    assert set(head.state_dict()) == {"linear.weight", "linear.bias"}
    # ... and the other way: a head holding its weight itself loads a from_linear head's keys.
    holder = fdpo.FusedLMHead(torch.nn.Parameter(torch.ones(V, D)), torch.nn.Parameter(torch.ones(V)))
    holder.load_state_dict(head.state_dict())
    assert torch.equal(holder.weight, linear.weight) and torch.equal(holder.bias, linear.bias)


@pytest.mark.filterwarnings("ignore:.*ref_head is a bare weight or nn.Linear:UserWarning")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_bare_reference_head_takes_the_policy_heads_temperature(device, backend):
    """A reference given as a weight tensor or an nn.Linear carries no settings: it is divided by the policy
    head's temperature, as the functional API divides both heads (fdpo.token_kl, fdpo.token_divergence), and
    keeps its own soft cap (none). An fdpo.LMHead reference keeps its own temperature."""
    hidden, weight, labels = (t.to(device) for t in inputs(3))
    ref_hidden, ref_weight = hidden.flip(0), weight.flip(0)
    ref_linear = torch.nn.Linear(D, V, bias=False).to(device)
    ref_linear.weight.data.copy_(ref_weight)
    head = fdpo.FusedLMHead(weight, softcap=3.0, temperature=0.6, backend=backend)
    want = fdpo.token_kl(hidden, weight, ref_hidden, ref_weight, labels, softcap=3.0, temperature=0.6,
                         backend=backend)
    for ref_head in (ref_weight, ref_linear):
        got = head(hidden, labels, ref_hidden=ref_hidden, ref_head=ref_head, kl=True)
        for name, value in zip(("logprob", "ref_logprob", "kl"), want, strict=True):
            torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6)
    own = head(hidden, labels, ref_hidden=ref_hidden, ref_head=LMHead(ref_weight), kl=True)
    assert (own["ref_logprob"] - want[1]).abs().max() > 0.1
    direct = fdpo.token_divergence(hidden, weight, ref_hidden, ref_weight, labels, divergence="js", softcap=3.0,
                                   temperature=0.6, backend=backend).sum(dim=1)
    loss = fdpo.TokenDivergenceLoss(divergence="js", backend=backend, reduction="sequence")
    torch.testing.assert_close(loss(hidden, labels, head, ref_hidden=ref_hidden, ref_head=ref_weight), direct,
                               rtol=0, atol=1e-6)
    # The pair and two-model losses: a bare reference scores as an LMHead at the policy head's temperature.
    tempered = LMHead(ref_weight, temperature=0.6)
    for loss_fn in (fdpo.PreferenceLoss(backend=backend), fdpo.TDPOLoss(backend=backend),
                    fdpo.TDPOLoss(token_divergence="js", backend=backend),
                    fdpo.EpsilonDPOLoss(fdpo.EpsilonDPO(), backend=backend).eval()):
        want = loss_fn(hidden, labels, head, ref_hidden=ref_hidden, ref_head=tempered).loss
        untempered = loss_fn(hidden, labels, head, ref_hidden=ref_hidden, ref_head=LMHead(ref_weight)).loss
        assert abs(want.item() - untempered.item()) > 1e-3, type(loss_fn).__name__
        for ref_head in (ref_weight, ref_linear):
            got = loss_fn(hidden, labels, head, ref_hidden=ref_hidden, ref_head=ref_head).loss
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=type(loss_fn).__name__)


def test_a_weight_fsdp2_keeps_sharded_is_refused_with_what_to_do():
    """A from_linear head whose Linear FSDP2 shards on its own reads the DTensor shard (the head never runs the
    Linear's forward, which would gather it): TypeError saying so, instead of torch's mixed-tensor error deep in
    a matmul. A real DTensor on a one-process gloo group."""
    import socket

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        hidden, weight, labels = inputs()
        mesh = init_device_mesh("cpu", (1,))
        sharded = distribute_tensor(weight, mesh, [Shard(0)])
        bias = distribute_tensor(torch.zeros(V), mesh, [Shard(0)])
        for backend in ("torch", "reference"):
            with pytest.raises(TypeError, match=r"weight is a DTensor, a tensor FSDP2 \(fully_shard\) keeps"):
                fdpo.FusedLMHead(sharded, backend=backend)(hidden, labels)
            with pytest.raises(TypeError, match=r"^bias is a DTensor"):
                fdpo.FusedLMHead(weight, bias, backend=backend)(hidden, labels)
    finally:
        dist.destroy_process_group()


BARE_REFERENCE = "ref_head is a bare weight or nn.Linear"


def reference_modules(backend: str = "torch") -> list:
    """One of each module that takes a reference head beside a policy head (EpsilonDPOLoss in eval mode:
    it records no steps)."""
    return [fdpo.PreferenceLoss(backend=backend), fdpo.TDPOLoss(backend=backend),
            fdpo.TDPOLoss(token_divergence="js", backend=backend),
            fdpo.EpsilonDPOLoss(fdpo.EpsilonDPO(), backend=backend).eval(),
            fdpo.TokenDivergenceLoss("js", backend=backend)]


def bare_reference_warnings(module, head, hidden, labels, ref_hidden, ref_head, calls: int = 2) -> list:
    """The UserWarnings about a bare reference of `calls` calls of `module` (a loss given `head`, or a
    FusedLMHead `head` itself when module is None)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(calls):
            if module is None:
                head(hidden, labels, ref_hidden=ref_hidden, ref_head=ref_head, kl=True)
            else:
                module(hidden, labels, head, ref_hidden=ref_hidden, ref_head=ref_head)
    return [w for w in caught if issubclass(w.category, UserWarning) and BARE_REFERENCE in str(w.message)]


@pytest.mark.parametrize("setting", [dict(softcap=3.0), dict(logit_scale=1.5)])
def test_a_bare_reference_beside_a_capped_or_scaled_policy_head_warns_once_per_module(setting):
    """A reference given as a weight or an nn.Linear carries no soft cap or logit scale: beside a policy head
    that has either (a Gemma-2 policy capped at 30), it is scored uncapped, a different loss with no error.
    Every module that resolves such a reference warns, once per instance (not per call), at the user's line,
    saying what it uses and how to pass a capped reference."""
    hidden, weight, labels = inputs(5)
    ref_hidden, ref_weight = hidden.flip(0), weight.flip(0)
    ref_linear = torch.nn.Linear(D, V, bias=False)
    ref_linear.weight.data.copy_(ref_weight)
    for ref_head in (ref_weight, ref_linear):
        head = fdpo.FusedLMHead(weight, backend="torch", **setting)
        for module in [*reference_modules(), None]:
            caught = bare_reference_warnings(module, head, hidden, labels, ref_hidden, ref_head)
            name = type(module if module is not None else head).__name__
            assert len(caught) == 1, (name, [str(w.message) for w in caught])
            message = str(caught[0].message)
            assert message.startswith(f"{name}: ") and "no soft cap and a logit scale of 1" in message, message
            assert "FusedLMHead.from_linear(ref_model.lm_head, softcap=" in message and "fdpo.LMHead" in message
            assert caught[0].filename == __file__, (name, caught[0].filename)
            # A second head given to the same module: still once per module.
            if module is not None:
                other = fdpo.LMHead(weight, softcap=setting.get("softcap"), scale=setting.get("logit_scale", 1.0))
                assert not bare_reference_warnings(module, other, hidden, labels, ref_hidden, ref_head, calls=1)


def test_no_bare_reference_warning_where_nothing_is_dropped():
    """No warning where the reference states its own head (an fdpo.LMHead or FusedLMHead), defaults to the
    policy's head, or sits beside a policy head without soft cap or logit scale (its temperature, the one
    setting a bare reference takes from the policy, is not dropped)."""
    hidden, weight, labels = inputs(6)
    ref_hidden, ref_weight = hidden.flip(0), weight.flip(0)
    capped = fdpo.FusedLMHead(weight, softcap=3.0, logit_scale=1.5, backend="torch")
    plain = fdpo.FusedLMHead(weight, temperature=0.7, backend="torch")
    cases = [(capped, fdpo.LMHead(ref_weight, softcap=3.0)), (capped, fdpo.LMHead(ref_weight)),
             (capped, fdpo.FusedLMHead(ref_weight, softcap=3.0)), (capped, None), (plain, ref_weight),
             (plain, torch.nn.Linear(D, V)), (weight, ref_weight)]
    for head, ref_head in cases:
        for module in reference_modules():
            assert not bare_reference_warnings(module, head, hidden, labels, ref_hidden, ref_head, calls=1), \
                (type(module).__name__, type(ref_head).__name__)
        if isinstance(head, fdpo.FusedLMHead) and ref_head is not None:
            assert not bare_reference_warnings(None, head, hidden, labels, ref_hidden, ref_head, calls=1)


def test_token_divergence_loss_settings_set_later_act_as_at_construction():
    """divergence, alpha and beta of a TokenDivergenceLoss set after construction (an annealed JS beta) give the
    loss, gradient and repr of a module built with them; an invalid value raises ValueError as at construction
    and leaves the module as it was."""
    hidden, weight, labels = inputs(7)
    ref_hidden, ref_weight = hidden.flip(0), 1.5 * weight.flip(0)

    def run(fn):
        h = hidden.clone().requires_grad_(True)
        loss = fn(h, labels, weight, ref_hidden=ref_hidden, ref_head=ref_weight)
        loss.backward()
        return loss.detach(), h.grad

    loss_fn = fdpo.TokenDivergenceLoss("js", beta=0.1, backend="torch")
    previous = run(loss_fn)[0]
    settings = {"divergence": "js", "beta": 0.1, "alpha": 0.5}
    for name, value in [("beta", 0.9), ("divergence", "alpha"), ("alpha", 0.2), ("divergence", "reverse_kl"),
                        ("divergence", "js"), ("beta", 0.4)]:
        setattr(loss_fn, name, value)
        settings[name] = value
        fresh = fdpo.TokenDivergenceLoss(backend="torch", **settings)
        got, want = run(loss_fn), run(fresh)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (name, value)
        assert repr(loss_fn) == repr(fresh) and loss_fn.spec == fresh.spec and getattr(loss_fn, name) == value
        assert abs(got[0].item() - previous.item()) > 1e-4, f"setting {name}={value!r} changes this loss"
        previous = got[0]
    for name, value, match in [("beta", 1.5, "beta must be"), ("beta", True, "beta must be"),
                               ("alpha", -0.1, "alpha must be"), ("divergence", "kl", "divergence must be one of")]:
        with pytest.raises(ValueError, match=match):
            setattr(loss_fn, name, value)
        assert getattr(loss_fn, name) == settings[name] and loss_fn.spec == fresh.spec


def test_token_divergence_loss_pickled_with_public_settings_still_loads():
    """A whole module pickled when divergence, alpha, beta and spec were plain attributes (before they
    became properties) loads with its settings and computes the same loss."""
    module = fdpo.TokenDivergenceLoss("js", beta=0.3)
    state = {(name[1:] if name in ("_divergence", "_alpha", "_beta", "_spec") else name): value
             for name, value in module.__dict__.items()}
    assert {"divergence", "alpha", "beta", "spec"} <= set(state)
    old = fdpo.TokenDivergenceLoss.__new__(fdpo.TokenDivergenceLoss)
    old.__setstate__(state)
    assert (old.divergence, old.beta, old.spec) == ("js", 0.3, module.spec)
    torch.manual_seed(0)
    hidden, weight, labels = torch.randn(2, 3, 8), torch.randn(20, 8), torch.randint(0, 20, (2, 3))
    ref_hidden = torch.randn(2, 3, 8)
    kwargs = {"ref_hidden": ref_hidden, "ref_head": weight}
    assert torch.equal(old(hidden, labels, weight, **kwargs), module(hidden, labels, weight, **kwargs))
    restored = pickle.loads(pickle.dumps(module))
    restored.beta = 0.7
    assert restored.spec == fdpo.TokenDivergenceLoss("js", beta=0.7).spec


def test_token_divergence_loss_takes_a_fused_heads_backend_and_backward_options(monkeypatch):
    """As the pair losses do (`fdpo.modules.fused_head`): a FusedLMHead policy head runs on its own backend with
    its own deterministic and backward_buffer_bytes, any other head on the loss's; a FusedLMHead whose
    ignore_index differs from the loss's is refused with the pair losses' error."""
    token_divergence = sys.modules["fdpo.token_divergence"]  # the module (fdpo.token_divergence is its function)

    hidden, weight, labels = inputs(8)
    ref_hidden, ref_weight = hidden.flip(0), weight.flip(0)
    calls = []
    divergence_stats = token_divergence.divergence_stats

    def recording(*args, **kwargs):
        calls.append((kwargs["backend"], kwargs["backward"]))
        return divergence_stats(*args, **kwargs)

    monkeypatch.setattr(token_divergence, "divergence_stats", recording)
    head = fdpo.FusedLMHead(weight, backend="reference", deterministic=True, backward_buffer_bytes=0)
    loss_fn = fdpo.TokenDivergenceLoss("forward_kl", backend="torch", backward_buffer_bytes=1 << 20)
    h = hidden.clone().requires_grad_(True)
    loss = loss_fn(h, labels, head, ref_hidden=ref_hidden, ref_head=ref_weight)
    assert calls == [("reference", head.backward_options)]
    # The reference backend is plain autograd: the double backward the torch backend refuses runs.
    (grad,) = torch.autograd.grad(loss, h, create_graph=True)
    grad.square().sum().backward()
    calls.clear()
    loss_fn(hidden, labels, weight, ref_hidden=ref_hidden, ref_head=ref_weight)
    assert calls == [("torch", loss_fn.backward_options)]
    for module in (loss_fn, fdpo.TDPOLoss(backend="torch")):
        with pytest.raises(ValueError, match=r"head.ignore_index \(-1\) must equal the loss's ignore_index \(-100\)"):
            module(hidden, labels, fdpo.FusedLMHead(weight, ignore_index=-1), ref_hidden=ref_hidden,
                   ref_head=ref_weight)


def test_tdpo1_checks_and_ignores_alpha_as_the_modules_do_every_unused_argument():
    """TDPOLoss(variant="tdpo1") checks alpha and does not use it, as PreferenceLoss checks and ignores alpha
    outside divergence="alpha" and bpo_lambda outside loss="bpo" (a variant set later finds a valid alpha);
    the TRL configuration, which names a whole run, refuses it instead (tests/test_trl_integration.py)."""
    hidden, weight, labels = inputs(9)
    ref_hidden = hidden.flip(0)

    def loss(fn):
        return fn(hidden, labels, weight, ref_hidden=ref_hidden).loss

    assert torch.equal(loss(fdpo.TDPOLoss(variant="tdpo1", alpha=0.05, backend="torch")),
                       loss(fdpo.TDPOLoss(variant="tdpo1", backend="torch")))
    assert torch.equal(loss(fdpo.PreferenceLoss(divergence="js", alpha=0.05, bpo_lambda=0.3, backend="torch")),
                       loss(fdpo.PreferenceLoss(divergence="js", backend="torch")))
    with pytest.raises(ValueError, match="alpha must be"):
        fdpo.TDPOLoss(variant="tdpo1", alpha=-1.0)
    with pytest.raises(ValueError, match="alpha must be"):
        fdpo.PreferenceLoss(divergence="js", alpha=1.5)
