"""fdpo's generalized JSD as TRL's DistillationTrainer loss (fdpo.integrations.trl.distill).

`chunked_divergence_loss` against TRL's `_chunked_divergence_loss` on the same tensors and against
float64 from materialized logits; TRL's DistillationTrainer stock vs with `install()`; uninstall.
Student and teacher have different hidden widths (32 and 48) and share one vocabulary. float32, on the
`device` fixture's device (the trainer runs too), except the DTensor test (a one-process gloo mesh on the
CPU) and the benchmark workload's check (CPU implementations).
"""

import functools
import inspect

import pytest
import torch

trl = pytest.importorskip("trl")

import trl.trainer.distillation_trainer as trl_distill  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from trl.kernels.chunked_divergence import ChunkedDivergenceFunction  # noqa: E402
from trl_fixtures import gather_recorder, one_thread, stock_trl  # noqa: E402, F401 (autouse fixtures)

import fdpo.integrations.trl as fdpo_trl  # noqa: E402
from fdpo.backends.fused import FusedBackend  # noqa: E402
from fdpo.integrations.trl import distill as distill_module  # noqa: E402
from fdpo.integrations.trl.distill import TRL_CHUNKED_DIVERGENCE_LOSS, chunked_divergence_loss  # noqa: E402
from fdpo.token_divergence import TokenDivergenceFunction  # noqa: E402
from fdpo.train.tokenizer import byte_tokenizer  # noqa: E402

VOCAB, STUDENT_DIM, TEACHER_DIM = 128, 32, 48
# Fields of TRL's log history that measure time, not training.
TIMING = ("runtime", "per_second", "step_time")
# Every head option TRL passes: biases, per-model logit scales and soft caps, one temperature.
HEAD_OPTIONS = dict(student_logit_scale=1.7, teacher_logit_scale=0.6, student_final_logit_softcapping=3.0,
                    teacher_final_logit_softcapping=5.0, temperature=0.8)


STUDENT_LEAVES = ("student_hidden_states", "student_lm_head_weight", "student_lm_head_bias")


def distillation_inputs(seed: int = 0, device: torch.device | str = "cpu") -> dict:
    """Student hidden [3, 7, 32] (leaf), teacher hidden [3, 7, 48], heads [128, D] with biases, a mask
    whose first row is half masked and whose last row is wholly masked. Drawn on the CPU (the same
    values on every device), then moved to `device`; the student's tensors are leaves there."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, :4] = 0
    mask[2] = 0
    inputs = dict(
        student_hidden_states=torch.randn(3, 7, STUDENT_DIM, generator=g),
        teacher_hidden_states=torch.randn(3, 7, TEACHER_DIM, generator=g),
        student_lm_head_weight=0.3 * torch.randn(VOCAB, STUDENT_DIM, generator=g),
        teacher_lm_head_weight=0.3 * torch.randn(VOCAB, TEACHER_DIM, generator=g),
        completion_mask=mask,
        student_lm_head_bias=0.2 * torch.randn(VOCAB, generator=g),
        teacher_lm_head_bias=0.2 * torch.randn(VOCAB, generator=g),
    )
    inputs = {name: t.to(device) for name, t in inputs.items()}
    for name in STUDENT_LEAVES:
        inputs[name].requires_grad_()
    return inputs


def student_grads(loss: torch.Tensor, inputs: dict) -> tuple[torch.Tensor, ...]:
    """d loss / d (student hidden, weight, bias)."""
    return torch.autograd.grad(loss, [inputs[k] for k in STUDENT_LEAVES])


def float64_loss(inputs: dict, beta: float, num_items_in_batch: int | None, *, student_logit_scale: float,
                 teacher_logit_scale: float, student_final_logit_softcapping: float | None,
                 teacher_final_logit_softcapping: float | None, temperature: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, entropy sum, float64 student leaves) from materialized float64 logits of both models."""
    leaves = [inputs[k].detach().double().requires_grad_() for k in STUDENT_LEAVES]

    def log_probs(hidden, weight, bias, scale, softcap):
        z = scale * (hidden @ weight.T + bias)
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        return torch.log_softmax(z / temperature, dim=-1)

    logp = log_probs(*leaves, student_logit_scale, student_final_logit_softcapping)
    logq = log_probs(inputs["teacher_hidden_states"].double(), inputs["teacher_lm_head_weight"].double(),
                     inputs["teacher_lm_head_bias"].double(), teacher_logit_scale, teacher_final_logit_softcapping)
    if beta == 0.0:
        per_token = (logq.exp() * (logq - logp)).sum(-1)
    elif beta == 1.0:
        per_token = (logp.exp() * (logp - logq)).sum(-1)
    else:
        log_m = torch.logaddexp(logp + torch.log1p(torch.tensor(-beta, dtype=torch.float64)),
                                logq + torch.log(torch.tensor(beta, dtype=torch.float64)))
        per_token = (beta * logq.exp() * (logq - log_m) + (1 - beta) * logp.exp() * (logp - log_m)).sum(-1)
    valid = inputs["completion_mask"] != 0
    count = valid.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    loss = per_token[valid].sum() / count
    entropy = -(logp.exp() * logp).sum(-1)[valid].sum()
    return loss, entropy, leaves


@pytest.mark.parametrize("backend, beta, num_items_in_batch", [
    ("torch", 0.0, None), ("torch", 0.0, torch.tensor(13)), ("torch", 0.5, None), ("torch", 0.5, torch.tensor(13)),
    ("torch", 1.0, None), ("torch", 1.0, torch.tensor(13)),
    ("triton", 0.0, None), ("triton", 0.5, torch.tensor(13)), ("triton", 1.0, None),
])
def test_equals_trl_function(device: torch.device, backend: str, beta: float,
                             num_items_in_batch: torch.Tensor | None) -> None:
    inputs = distillation_inputs(device=device)
    theirs = TRL_CHUNKED_DIVERGENCE_LOSS(**inputs, beta=beta, num_items_in_batch=num_items_in_batch, **HEAD_OPTIONS)
    ours = chunked_divergence_loss(**inputs, beta=beta, num_items_in_batch=num_items_in_batch, backend=backend,
                                   **HEAD_OPTIONS)
    assert ours[2].dtype == theirs[2].dtype and int(ours[2]) == int(theirs[2]) == 10
    assert ours[0].dtype == theirs[0].dtype == torch.float32 and ours[0].shape == theirs[0].shape == ()
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-6, atol=1e-6)
    assert not ours[1].requires_grad
    for a, b in zip(student_grads(ours[0], inputs), student_grads(theirs[0], inputs), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_matches_float64_from_materialized_logits(device: torch.device, beta: float) -> None:
    """fdpo's loss, entropy and student gradients against float64, at least as close as TRL's."""
    inputs = distillation_inputs(seed=1, device=device)
    exact_loss, exact_entropy, leaves = float64_loss(inputs, beta, 11, **HEAD_OPTIONS)
    exact_grads = torch.autograd.grad(exact_loss, leaves)
    for function in (chunked_divergence_loss, TRL_CHUNKED_DIVERGENCE_LOSS):
        loss, entropy, _ = function(**inputs, beta=beta, num_items_in_batch=11, **HEAD_OPTIONS)
        torch.testing.assert_close(loss.double(), exact_loss.detach(), rtol=2e-6, atol=1e-7)
        torch.testing.assert_close(entropy.double(), exact_entropy.detach(), rtol=2e-6, atol=1e-6)
        for got, exact in zip(student_grads(loss, inputs), exact_grads, strict=True):
            torch.testing.assert_close(got.double(), exact, rtol=0, atol=1e-6)


def count_calls(monkeypatch: pytest.MonkeyPatch, seen: dict, name: str, owner: type, attr: str) -> None:
    """Patch owner.attr (a staticmethod stays one) to add 1 to seen[name] on every call."""
    original = getattr(owner, attr)

    @functools.wraps(original)
    def call(*args, **kwargs):
        seen[name] += 1
        return original(*args, **kwargs)

    static = isinstance(inspect.getattr_static(owner, attr), staticmethod)
    monkeypatch.setattr(owner, attr, staticmethod(call) if static else call)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_one_fdpo_vocabulary_pass_per_loss_call(monkeypatch: pytest.MonkeyPatch, device: torch.device,
                                                backend: str) -> None:
    """The logged entropy comes from the divergence's own first pass (with_entropy): one call of fdpo's
    divergence function and none of the head statistics (FusedBackend.head_stats, the separate entropy
    pass this replaced) per loss, forward and backward."""
    seen = {"divergence": 0, "head_stats": 0}
    count_calls(monkeypatch, seen, "divergence", TokenDivergenceFunction, "forward")
    count_calls(monkeypatch, seen, "head_stats", FusedBackend, "head_stats")
    inputs = distillation_inputs(device=device)
    loss, entropy, _ = chunked_divergence_loss(**inputs, beta=0.5, backend=backend, **HEAD_OPTIONS)
    loss.backward()
    assert seen == {"divergence": 1, "head_stats": 0}
    assert entropy.item() > 0 and not entropy.requires_grad


def test_without_valid_positions_the_loss_is_a_differentiable_zero(device: torch.device) -> None:
    inputs = distillation_inputs(device=device) | {"completion_mask": torch.zeros(3, 7, dtype=torch.long,
                                                                                  device=device)}
    loss, entropy, n_valid = chunked_divergence_loss(**inputs, beta=0.5)
    assert loss.detach().item() == 0.0 and entropy.item() == 0.0 and n_valid.item() == 0
    grads = student_grads(loss, inputs)
    assert all(g is not None and not g.any() for g in grads)


def test_teacher_gets_no_gradient(device: torch.device) -> None:
    inputs = distillation_inputs(device=device)
    teacher_weight = inputs["teacher_lm_head_weight"].requires_grad_()
    loss, _, _ = chunked_divergence_loss(**inputs, beta=0.5)
    loss.backward()
    assert teacher_weight.grad is None and inputs["student_lm_head_weight"].grad is not None


@pytest.mark.parametrize("options, error", [
    (dict(beta=1.5), "beta"),
    (dict(beta=0.5, student_logit_scale=0.0), "logit_scale"),
    (dict(beta=0.5, teacher_final_logit_softcapping=-1.0), "softcap"),
])
def test_invalid_settings_raise(options: dict, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        chunked_divergence_loss(**distillation_inputs(), **options)


def test_dtensor_heads_are_gathered() -> None:
    """FSDP2 heads (DTensors on a one-process mesh) give the plain heads' loss; the gradient stays a DTensor."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        plain, sharded = distillation_inputs(), distillation_inputs()
        mesh = init_device_mesh("cpu", (1,))
        for name in ("student_lm_head_weight", "teacher_lm_head_weight"):
            sharded[name] = distribute_tensor(sharded[name].detach(), mesh, [Shard(0)]).requires_grad_(
                name.startswith("student"))
        expected, _, _ = chunked_divergence_loss(**plain, beta=0.5)
        loss, _, _ = chunked_divergence_loss(**sharded, beta=0.5)
        expected.backward()
        loss.backward()
        assert isinstance(sharded["student_lm_head_weight"].grad, DTensor)
        torch.testing.assert_close(loss, expected, rtol=0, atol=0)
        torch.testing.assert_close(sharded["student_lm_head_weight"].grad.full_tensor(),
                                   plain["student_lm_head_weight"].grad, rtol=0, atol=0)
    finally:
        dist.destroy_process_group()


def test_both_heads_enter_the_gather_context(monkeypatch: pytest.MonkeyPatch, device: torch.device) -> None:
    """The ZeRO-3 gather (TRL's maybe_gather_lm_head_ctx) is entered around both heads' use in the forward,
    and around the student's again in the backward."""
    entered = []

    monkeypatch.setattr(distill_module, "maybe_gather_lm_head_ctx", gather_recorder(entered))
    inputs = distillation_inputs(device=device)
    loss, _, _ = chunked_divergence_loss(**inputs, beta=0.5)
    in_forward = [id(w) for w in entered]
    loss.backward()
    student, teacher = id(inputs["student_lm_head_weight"]), id(inputs["teacher_lm_head_weight"])
    assert set(in_forward) == {student, teacher}
    assert student in {id(w) for w in entered[len(in_forward):]}, "not entered again in the backward"


def test_benchmark_distillation_workload_checks_every_implementation() -> None:
    """The "distillation" benchmark workload: its float64 reference (loss, mean entropy and the loss's
    gradients) is this file's float64 loss of the same tensors, and naive, fdpo-torch (the drop-in) and
    TRL pass its check, the logged entropy included; cut-cross-entropy is reported unavailable."""
    workloads = pytest.importorskip("benchmarks.workloads")
    inputs = workloads.make_inputs("distillation", 64, 301, 24, dtype=torch.float32, device=torch.device("cpu"))
    expected = workloads.float64_reference(inputs)
    zeros = torch.zeros(301)
    tensors = dict(student_hidden_states=inputs.hidden, teacher_hidden_states=inputs.ref_hidden,
                   student_lm_head_weight=inputs.weight, teacher_lm_head_weight=inputs.ref_weight,
                   completion_mask=(inputs.labels != -100).long(), student_lm_head_bias=zeros,
                   teacher_lm_head_bias=zeros)
    loss, entropy, leaves = float64_loss(tensors, workloads.JS_BETA, None, student_logit_scale=1.0,
                                         teacher_logit_scale=1.0, student_final_logit_softcapping=None,
                                         teacher_final_logit_softcapping=None, temperature=1.0)
    d_hidden, d_weight = torch.autograd.grad(loss, leaves[:2])
    count = (inputs.labels != -100).sum()
    torch.testing.assert_close(expected[0], torch.stack([loss, entropy / count]).detach())
    torch.testing.assert_close(expected[1], d_hidden)
    torch.testing.assert_close(expected[2], d_weight)
    assert loss > 1e-2
    for name in ("naive", "fdpo-torch", "trl"):
        errors = workloads.check(workloads.REGISTRY[name].build(), inputs, expected)
        assert set(errors) == {"value", "entropy", "grad_hidden", "grad_weight"}, name
        assert max(errors.values()) < 1e-5, (name, errors)
    assert workloads.unavailable("cce", torch.device("cpu"), "distillation") is not None


def test_install_rebinds_the_distillation_loss_and_uninstall_restores_trl() -> None:
    assert trl_distill._chunked_divergence_loss is TRL_CHUNKED_DIVERGENCE_LOSS
    fdpo_trl.install()
    fdpo_trl.install()
    assert trl_distill._chunked_divergence_loss is chunked_divergence_loss
    fdpo_trl.uninstall()
    fdpo_trl.uninstall()
    assert trl_distill._chunked_divergence_loss is TRL_CHUNKED_DIVERGENCE_LOSS


# ---------------------------------------------------------------------------------------------
# TRL's DistillationTrainer, stock and with fdpo installed.


def tiny_llama(seed: int, hidden_size: int, **config) -> LlamaForCausalLM:
    """A random Llama on the 259-token byte tokenizer."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=259, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, pad_token_id=256, bos_token_id=257, eos_token_id=258,
        **config))


@pytest.fixture
def counts(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Calls of fdpo's divergence function and of TRL's ChunkedDivergenceFunction since the test began."""
    seen = {"fdpo": 0, "trl": 0}
    count_calls(monkeypatch, seen, "fdpo", TokenDivergenceFunction, "forward")
    count_calls(monkeypatch, seen, "trl", ChunkedDivergenceFunction, "forward")
    return seen


def distillation_run(tmp_path, use_fdpo: bool, device: torch.device) -> tuple[list[dict], torch.nn.Module]:
    """Three steps of DistillationTrainer (on-policy generation, beta 0.5, temperature 0.9) on `device`,
    student with a logit scale, teacher (wider) with a soft cap."""
    if use_fdpo:
        fdpo_trl.install()
    student = tiny_llama(0, 32, logit_scale=1.3)
    teacher = tiny_llama(1, 48, final_logit_softcapping=4.0)
    prompts = Dataset.from_list([{"prompt": f"sort: {i} {i + 3} 1"} for i in range(8)])
    args = trl.DistillationConfig(
        output_dir=str(tmp_path / f"distill-{use_fdpo}"), per_device_train_batch_size=4, max_steps=3,
        learning_rate=1e-3, logging_steps=1, report_to=[], save_strategy="no", seed=0, use_cpu=device.type == "cpu",
        disable_tqdm=True, bf16=False, activation_checkpointing=False, max_completion_length=6, beta=0.5,
        temperature=0.9)
    trainer = trl.DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=prompts,
                                      processing_class=byte_tokenizer())
    trainer.train()
    fdpo_trl.uninstall()
    return trainer.state.log_history, student


def training_records(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if not any(t in k for t in TIMING)} for record in history]


def test_distillation_trainer_matches_stock_trl(tmp_path, counts: dict, device: torch.device) -> None:
    stock, stock_model = distillation_run(tmp_path, use_fdpo=False, device=device)
    trl_calls = counts["trl"]
    assert trl_calls > 0 and counts["fdpo"] == 0
    ours, our_model = distillation_run(tmp_path, use_fdpo=True, device=device)
    assert counts["trl"] == trl_calls and counts["fdpo"] > 0
    a, b = training_records(stock), training_records(ours)
    assert [sorted(r) for r in a] == [sorted(r) for r in b]
    assert sum("loss" in r for r in b) == 3
    assert max(abs(x[k] - y[k]) for x, y in zip(a, b, strict=True) for k in x) < 1e-5
    assert max((p - q).abs().max().item() for p, q in zip(stock_model.parameters(), our_model.parameters(),
                                                          strict=True)) < 1e-5
    assert trl_distill._chunked_divergence_loss is TRL_CHUNKED_DIVERGENCE_LOSS
