"""fdpo inside TRL (fdpo.integrations.trl): the fused head against TRL's and against float64, TRL's
trainers on it against stock TRL, and fdpo's loss types in TRL's DPOTrainer.

Models are a tiny random-weight Llama (hidden 32, 2 layers, the 259-token byte tokenizer); runs
are a few steps in float32 (bf16=False: TrainingArguments turns bf16 autocast on by default), on the
CPU, except where a test runs the fused head on the `device` fixture's device (the GPU when there is
one): its models and tensors go there, and its trainers get use_cpu=False there (`on_device`).
"""

import copy
import dataclasses
import functools
import importlib
import math
import os
import runpy
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

trl = pytest.importorskip("trl")

import trl.trainer.utils as trl_utils  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402
from trl.kernels import ChunkedLogProbFunction  # noqa: E402
from trl_fixtures import gather_recorder, one_thread, stock_trl  # noqa: E402, F401 (autouse fixtures)

import fdpo  # noqa: E402
import fdpo.integrations.trl as fdpo_trl  # noqa: E402
from fdpo.backends.chunked import TorchBackend  # noqa: E402
from fdpo.backends.fused import FusedBackend, TritonBackend  # noqa: E402
from fdpo.backends.reference import ReferenceBackend  # noqa: E402
from fdpo.integrations.trl import dpo as dpo_module  # noqa: E402
from fdpo.integrations.trl import head as head_module  # noqa: E402
from fdpo.train.tokenizer import byte_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = byte_tokenizer()
ALL_OUTPUTS = tuple(fdpo_trl.OUTPUTS)
# Fields of TRL's log history that measure time, not training.
TIMING = ("runtime", "per_second", "step_time")


def tiny_llama(seed: int = 0, **config) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, pad_token_id=256, bos_token_id=257, eos_token_id=258, **config))


def preference_data(n: int = 8) -> Dataset:
    return Dataset.from_list([{"prompt": f"sort: {i} {i + 3} 1", "chosen": f" 1 {i} {i + 3}",
                               "rejected": f" {i + 3} 1"} for i in range(n)])


def run_args(output_dir, **overrides) -> dict:
    args = dict(output_dir=str(output_dir), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-3,
                logging_steps=1, report_to=[], save_strategy="no", seed=0, use_cpu=True, disable_tqdm=True,
                bf16=False)
    return {**args, **overrides}


def on_device(device: torch.device) -> dict:
    """The TrainingArguments that put a trainer's models and batches on `device` (CPU or the one GPU)."""
    return {"use_cpu": device.type == "cpu"}


@pytest.fixture
def counts(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Calls of fdpo's fused backends and of TRL's ChunkedLogProbFunction since the test began."""
    seen = {"fdpo": 0, "trl": 0}

    def counted(name, original):
        def call(*args, **kwargs):
            seen[name] += 1
            return original(*args, **kwargs)
        return call

    monkeypatch.setattr(FusedBackend, "head_stats", counted("fdpo", FusedBackend.head_stats))
    monkeypatch.setattr(ChunkedLogProbFunction, "forward", staticmethod(counted("trl", ChunkedLogProbFunction.forward)))
    return seen


def training_records(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if not any(t in k for t in TIMING)} for record in history]


def max_difference(history_a: list[dict], history_b: list[dict]) -> float:
    """Largest difference of a logged number between two log histories of the same keys."""
    a, b = training_records(history_a), training_records(history_b)
    assert [sorted(r) for r in a] == [sorted(r) for r in b]
    return max(abs(x[k] - y[k]) for x, y in zip(a, b, strict=True) for k in x)


def max_weight_difference(model_a: torch.nn.Module, model_b: torch.nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True))


# ---------------------------------------------------------------------------------------------
# The head: every field against float64, the settings TRL reads from the config.


def float64_fields(model: LlamaForCausalLM, input_ids: torch.Tensor, labels: torch.Tensor, *, scale: float,
                   softcap: float | None, temperature: float) -> dict[str, torch.Tensor]:
    """Every per-token field from materialized float64 logits, labels already shifted ([B, T-1])."""
    hidden = model.model(input_ids).last_hidden_state[:, :-1].double()
    z = (hidden @ model.lm_head.weight.double().T) * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    logp = torch.log_softmax(z, -1)
    mask = labels != -100
    picked = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    fields = {
        "log_probs": picked,
        "entropy": -(logp.exp() * logp).sum(-1),
        "mean_logits": z.mean(-1),
        "log_sum_sq_probs": torch.logsumexp(2 * logp, -1),
        "is_top1": z.argmax(-1) == labels,
    }
    return {k: v.masked_fill(~mask, 0) for k, v in fields.items()} | {"label_mask": mask}


@pytest.mark.parametrize(("setting", "value"), [("logits_soft_cap", 30.0), ("logits_mup_width_multiplier", 24.0),
                                              ("unpadded_vocab_size", 250)])
def test_a_config_that_sets_the_logits_otherwise_is_refused(setting: str, value: float) -> None:
    """A setting of the logits that the fused head's scale and soft cap do not reproduce (a soft cap under
    another name, a width multiplier, padded vocabulary rows the model drops) is refused, not ignored."""
    model = tiny_llama()
    setattr(model.config, setting, value)
    with pytest.raises(ValueError, match=setting):
        fdpo_trl.add_fused_lm_head(model)
    assert not hasattr(model, "_fdpo_head_settings")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_every_field_matches_float64_with_softcap_scale_and_temperature(device: torch.device, backend: str) -> None:
    """The model on `device`; the float64 fields from its hidden states there."""
    model = tiny_llama(final_logit_softcapping=3.0).to(device)
    model.config.logit_scale = 1.7
    fdpo_trl.add_fused_lm_head(model, temperature=0.8, outputs=ALL_OUTPUTS, backend=backend)
    input_ids = torch.randint(0, 259, (3, 9), generator=torch.Generator().manual_seed(1)).to(device)
    labels = input_ids.clone()
    labels[:, :3] = -100
    labels[1, 6:] = -100
    out = model(input_ids, labels=labels, fused_lm_head=True)
    expected = float64_fields(model, input_ids, labels[:, 1:], scale=1.7, softcap=3.0, temperature=0.8)
    for name in ("log_probs", "entropy", "mean_logits", "log_sum_sq_probs"):
        torch.testing.assert_close(getattr(out, name).double(), expected[name], rtol=0, atol=2e-5, msg=name)
    assert out.is_top1.dtype == torch.bool and torch.equal(out.is_top1, expected["is_top1"])
    assert torch.equal(out.label_mask, expected["label_mask"])
    scored = expected["label_mask"].sum()
    torch.testing.assert_close(out.loss.double(), -expected["log_probs"].sum() / scored, rtol=0, atol=2e-6)
    assert out.aux_loss is None

    # Gradients of the loss (log-probs) and of the entropy against float64 autograd.
    model_64 = copy.deepcopy(model).double()
    out.loss.backward(retain_graph=True)
    grads = [p.grad.clone() for p in model.parameters()]
    expected_64 = float64_fields(model_64, input_ids, labels[:, 1:], scale=1.7, softcap=3.0, temperature=0.8)
    (-expected_64["log_probs"].sum() / scored).backward()
    for grad, p in zip(grads, model_64.parameters(), strict=True):
        torch.testing.assert_close(grad.double(), p.grad, rtol=0, atol=2e-5)
    model.zero_grad()
    model_64.zero_grad()
    out.entropy.sum().backward()
    expected_64 = float64_fields(model_64, input_ids, labels[:, 1:], scale=1.7, softcap=3.0, temperature=0.8)
    expected_64["entropy"].sum().backward()
    for p, p64 in zip(model.parameters(), model_64.parameters(), strict=True):
        torch.testing.assert_close(p.grad.double(), p64.grad, rtol=0, atol=5e-5)


def test_head_equals_trl_head_with_shift_labels_and_num_items() -> None:
    ours, theirs = tiny_llama(), tiny_llama()
    fdpo_trl.add_fused_lm_head(ours, temperature=0.9, outputs=ALL_OUTPUTS, backend="torch")
    head_module.TRL_ADD_FUSED_LM_HEAD(theirs, temperature=0.9, outputs=ALL_OUTPUTS)
    input_ids = torch.randint(0, 259, (2, 8), generator=torch.Generator().manual_seed(2))
    shift_labels = torch.roll(input_ids, -1, dims=1)
    shift_labels[:, -1] = -100
    shift_labels[0, :2] = -100
    a = ours(input_ids, shift_labels=shift_labels, num_items_in_batch=torch.tensor(7), fused_lm_head=True)
    b = theirs(input_ids, shift_labels=shift_labels, num_items_in_batch=torch.tensor(7), fused_lm_head=True)
    assert a.log_probs.shape == (2, 8)
    for name in ("loss", "log_probs", "entropy", "mean_logits", "log_sum_sq_probs"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=1e-5, msg=name)
    assert torch.equal(a.is_top1, b.is_top1) and torch.equal(a.label_mask, b.label_mask)


def test_bfloat16_model_with_the_head_cast_to_float32_equals_trl() -> None:
    """cast_lm_head_to_fp32: float32 hidden states through the bfloat16 head, multiplied in float32."""
    ours, theirs = tiny_llama().to(torch.bfloat16), tiny_llama().to(torch.bfloat16)
    fdpo_trl.add_fused_lm_head(ours, cast_lm_head_to_fp32=True, outputs=("log_probs", "entropy"), backend="torch")
    head_module.TRL_ADD_FUSED_LM_HEAD(theirs, cast_lm_head_to_fp32=True, outputs=("log_probs", "entropy"))
    input_ids = torch.randint(0, 259, (2, 7), generator=torch.Generator().manual_seed(7))
    a = ours(input_ids, labels=input_ids, fused_lm_head=True)
    b = theirs(input_ids, labels=input_ids, fused_lm_head=True)
    assert a.log_probs.dtype == torch.float32
    for name in ("loss", "log_probs", "entropy"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=1e-5, msg=name)
    a.loss.backward()
    b.loss.backward()
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert p.grad.dtype == torch.bfloat16
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-2, atol=1e-4)


def test_all_ignored_micro_batch_is_a_differentiable_zero() -> None:
    model = tiny_llama()
    fdpo_trl.add_fused_lm_head(model, outputs=ALL_OUTPUTS, backend="torch")
    input_ids = torch.randint(0, 259, (2, 6))
    out = model(input_ids, labels=torch.full_like(input_ids, -100), fused_lm_head=True)
    assert out.loss.item() == 0.0 and out.loss.requires_grad
    assert not out.label_mask.any() and not out.log_probs.any() and not out.is_top1.any()
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and not p.grad.any(), name


def test_logit_scale_conventions() -> None:
    def config(**fields):
        return SimpleNamespace(model_type=fields.pop("model_type", "x"), **fields)

    assert fdpo_trl.logit_scale(config()) == 1.0
    assert fdpo_trl.logit_scale(config(logit_scale=None)) == 1.0          # MPT: None is unscaled
    assert fdpo_trl.logit_scale(config(logit_scale=0.25)) == 0.25         # Cohere
    assert fdpo_trl.logit_scale(config(output_multiplier=3.0)) == 3.0
    assert fdpo_trl.logit_scale(config(lm_head_multiplier=0.5)) == 0.5    # Falcon-H1
    assert fdpo_trl.logit_scale(config(logits_scaling=4.0)) == 0.25       # Granite, MiniCPM3 divide
    assert fdpo_trl.logit_scale(config(logits_scaling=4.0, model_type="hyperclovax")) == 4.0
    granite = LlamaConfig(vocab_size=8)
    granite.logits_scaling = 8.0
    assert fdpo_trl.logit_scale(granite) == 0.125


def test_original_forward_and_generation_unchanged_without_fused_lm_head() -> None:
    model, plain = tiny_llama(), tiny_llama()
    fdpo_trl.add_fused_lm_head(model, backend="torch")
    fdpo_trl.add_fused_lm_head(model, outputs=("entropy",), backend="torch")      # re-patching: settings replaced
    input_ids = torch.randint(0, 259, (2, 7))
    out, expected = model(input_ids, labels=input_ids), plain(input_ids, labels=input_ids)
    assert torch.equal(out.logits, expected.logits) and torch.equal(out.loss, expected.loss)
    assert model(input_ids, labels=input_ids, fused_lm_head=True).entropy is not None
    prompt = input_ids[:1, :3]
    assert torch.equal(model.generate(prompt, max_new_tokens=4, do_sample=False),
                       plain.generate(prompt, max_new_tokens=4, do_sample=False))


def test_install_rebinds_every_trainer_module_and_uninstall_restores_trl() -> None:
    import trl.trainer.dpo_trainer
    import trl.trainer.grpo_trainer
    import trl.trainer.kto_trainer
    import trl.trainer.rloo_trainer
    import trl.trainer.sft_trainer

    modules = [trl.trainer.dpo_trainer, trl.trainer.grpo_trainer, trl.trainer.kto_trainer, trl.trainer.rloo_trainer,
               trl.trainer.sft_trainer, trl_utils]
    original = trl_utils.add_fused_lm_head
    assert not fdpo_trl.installed()
    fdpo_trl.install()
    fdpo_trl.install()
    assert fdpo_trl.installed()
    assert all(m.add_fused_lm_head is fdpo_trl.add_fused_lm_head for m in modules)
    assert trl.trainer.add_fused_lm_head is fdpo_trl.add_fused_lm_head
    fdpo_trl.uninstall()
    assert all(m.add_fused_lm_head is original for m in modules)
    fdpo_trl.add_fused_lm_head(tiny_llama(), backend="torch")                  # installs too
    assert trl.trainer.dpo_trainer.add_fused_lm_head is fdpo_trl.add_fused_lm_head


def test_head_enters_the_gather_context(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ZeRO-3 gather (TRL's maybe_gather_lm_head_ctx) is entered around the head's use, forward and backward."""
    entered = []

    monkeypatch.setattr(head_module, "maybe_gather_lm_head_ctx", gather_recorder(entered))
    model = tiny_llama()
    fdpo_trl.add_fused_lm_head(model, backend="torch")
    input_ids = torch.randint(0, 259, (2, 6))
    out = model(input_ids, labels=input_ids, fused_lm_head=True)
    in_forward = len(entered)
    out.loss.backward()
    assert in_forward >= 1 and len(entered) > in_forward, "not entered again in the backward"
    assert all(weight is model.lm_head.weight for weight in entered)


def test_two_model_losses_enter_both_heads_gather(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    entered = []

    monkeypatch.setattr(head_module, "maybe_gather_lm_head_ctx", gather_recorder(entered))
    trainer = fdpo_trainer(tmp_path, loss_type="tdpo")
    loss = trainer.compute_loss(trainer.model, first_batch(trainer))
    in_forward = list(entered)
    loss.backward()
    heads = {id(trainer.model.lm_head.weight), id(trainer.ref_model.lm_head.weight)}
    assert {id(w) for w in in_forward} == heads
    assert id(trainer.model.lm_head.weight) in {id(w) for w in entered[len(in_forward):]}


def test_bad_settings_raise() -> None:
    model = tiny_llama()
    with pytest.raises(ValueError, match="outputs must be among"):
        fdpo_trl.add_fused_lm_head(model, outputs=("logits",))
    with pytest.raises(ValueError, match="temperature"):
        fdpo_trl.add_fused_lm_head(model, temperature=0.0)
    with pytest.raises(ValueError, match="backend"):
        fdpo_trl.add_fused_lm_head(model, backend="cuda")
    fdpo_trl.add_fused_lm_head(model, backend="torch")
    with pytest.raises(ValueError, match="needs labels"):
        model(torch.zeros(1, 4, dtype=torch.long), fused_lm_head=True)


# ---------------------------------------------------------------------------------------------
# TRL's trainers on fdpo's head against stock TRL.


def dpo_run(tmp_path, use_fdpo: bool, model=None, ref_model=None, **overrides):
    """(log history, trained model) of a short DPO run, stock TRL or fdpo's DPOTrainer."""
    if use_fdpo:
        config_cls, trainer_cls = fdpo_trl.DPOConfig, fdpo_trl.DPOTrainer
    else:
        config_cls, trainer_cls = trl.DPOConfig, trl.DPOTrainer
    model = tiny_llama() if model is None else model
    ref_model = tiny_llama() if ref_model is None else ref_model
    args = config_cls(**run_args(tmp_path / ("fdpo" if use_fdpo else "trl"), **overrides))
    trainer = trainer_cls(model=model, ref_model=ref_model, args=args, train_dataset=preference_data(),
                          processing_class=TOKENIZER)
    trainer.train()
    return trainer.state.log_history, model


@pytest.mark.parametrize("loss_type, divergence, backend", [
    ("sigmoid", "reverse_kl", "torch"),
    ("ipo", "js_divergence", "torch"),
    ("hinge", "alpha_divergence", "torch"),
    ("sigmoid", "reverse_kl", "triton"),
])
def test_dpo_matches_stock_trl(tmp_path, counts: dict, device: torch.device, loss_type: str, divergence: str,
                              backend: str) -> None:
    options = dict(loss_type=loss_type, f_divergence_type=divergence, f_alpha_divergence_coef=0.3,
                   **on_device(device))
    if backend == "triton":
        options["max_steps"] = 2
    stock, stock_model = dpo_run(tmp_path, False, **options)
    assert counts == {"fdpo": 0, "trl": 2 * options.get("max_steps", 3)}         # policy and reference forwards
    ours, our_model = dpo_run(tmp_path, True, fdpo_backend=backend, **options)
    assert counts["trl"] == 2 * options.get("max_steps", 3) and counts["fdpo"] > 0
    assert max_difference(stock, ours) < 1e-5
    assert max_weight_difference(stock_model, our_model) < 1e-5


def test_dpo_under_bf16_autocast_agrees_with_stock_trl_to_bf16_precision(tmp_path) -> None:
    """Under bf16 autocast both heads multiply in bfloat16 (README "With TRL"): fdpo's losses stay within
    1e-4 of TRL's at every step, as close as TRL's own bf16 run is to its float32 run (within 3x)."""
    def losses(history: list[dict]) -> list[float]:
        return [r["loss"] for r in training_records(history) if "loss" in r]

    stock = losses(dpo_run(tmp_path / "bf16", False, bf16=True)[0])
    stock32 = losses(dpo_run(tmp_path / "fp32", False)[0])
    ours = losses(dpo_run(tmp_path / "ours", True, fdpo_backend="torch", bf16=True)[0])
    ours_vs_trl = [abs(a - b) for a, b in zip(ours, stock, strict=True)]
    bf16_vs_fp32 = [abs(a - b) for a, b in zip(stock, stock32, strict=True)]
    assert len(ours) == 3 and max(ours_vs_trl) < 1e-4, ours_vs_trl
    assert max(ours_vs_trl) <= 3 * max(bf16_vs_fp32), (ours_vs_trl, bf16_vs_fp32)


def rl_run(tmp_path, kind: str, use_fdpo: bool, base_dir: Path, device: torch.device):
    if use_fdpo:
        fdpo_trl.install()
    classes = {"grpo": (trl.GRPOConfig, trl.GRPOTrainer), "rloo": (trl.RLOOConfig, trl.RLOOTrainer)}
    config_cls, trainer_cls = classes[kind]
    prompts = Dataset.from_list([{"prompt": f"sort: {i} {i + 3} 1"} for i in range(8)])

    def reward(completions, **kwargs):
        return [float(c.count("1")) - 0.1 * len(c) for c in completions]

    args = config_cls(**run_args(tmp_path / f"{kind}-{use_fdpo}", max_steps=2, num_generations=2,
                                 max_completion_length=6, beta=0.1, **on_device(device)))
    model = AutoModelForCausalLM.from_pretrained(base_dir)        # the reference is loaded from the same path
    trainer = trainer_cls(model=model, reward_funcs=reward, args=args, train_dataset=prompts,
                          processing_class=TOKENIZER)
    trainer.train()
    fdpo_trl.uninstall()
    return trainer.state.log_history, model


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_grpo_and_rloo_match_stock_trl(tmp_path, counts: dict, device: torch.device, kind: str) -> None:
    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    stock, stock_model = rl_run(tmp_path, kind, False, base_dir, device)
    trl_calls = counts["trl"]
    assert trl_calls > 0 and counts["fdpo"] == 0
    ours, our_model = rl_run(tmp_path, kind, True, base_dir, device)
    assert counts["trl"] == trl_calls and counts["fdpo"] > 0
    assert max_difference(stock, ours) < 1e-5
    assert max_weight_difference(stock_model, our_model) < 1e-5


@pytest.mark.parametrize("kind", ["sft", "kto"])
def test_sft_and_kto_match_stock_trl(tmp_path, counts: dict, device: torch.device, kind: str) -> None:
    def run(use_fdpo: bool):
        if use_fdpo:
            fdpo_trl.install()
        records = [{"prompt": f"sort: {i} {i + 3} 1", "completion": f" 1 {i} {i + 3}"} for i in range(8)]
        args = run_args(tmp_path / f"{kind}-{use_fdpo}", max_steps=2, **on_device(device))
        if kind == "sft":
            trainer = trl.SFTTrainer(model=tiny_llama(), args=trl.SFTConfig(**args),
                                     train_dataset=Dataset.from_list(records), processing_class=TOKENIZER)
        else:
            labelled = [{**r, "label": bool(i % 2)} for i, r in enumerate(records)]
            trainer = trl.KTOTrainer(model=tiny_llama(), ref_model=tiny_llama(seed=1), args=trl.KTOConfig(**args),
                                     train_dataset=Dataset.from_list(labelled), processing_class=TOKENIZER)
        trainer.train()
        fdpo_trl.uninstall()
        return trainer.state.log_history, trainer.model

    stock, stock_model = run(False)
    trl_calls = counts["trl"]
    ours, our_model = run(True)
    assert trl_calls > 0 and counts["trl"] == trl_calls and counts["fdpo"] > 0
    assert max_difference(stock, ours) < 1e-5
    assert max_weight_difference(stock_model, our_model) < 1e-5


def test_fsdp2_dtensor_head_is_gathered() -> None:
    """A head sharded as a DTensor (FSDP2) is used whole; its gradient comes back as a DTensor."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        sharded, plain = tiny_llama(), tiny_llama()
        weight = distribute_tensor(sharded.lm_head.weight.detach(), init_device_mesh("cpu", (1,)), [Shard(0)])
        sharded.lm_head.weight = torch.nn.Parameter(weight)
        for model in (sharded, plain):
            fdpo_trl.add_fused_lm_head(model, outputs=("log_probs", "entropy"), backend="torch")
        input_ids = torch.randint(0, 259, (2, 6), generator=torch.Generator().manual_seed(6))
        a = sharded(input_ids, labels=input_ids, fused_lm_head=True)
        b = plain(input_ids, labels=input_ids, fused_lm_head=True)
        (a.loss + a.entropy.sum()).backward()
        (b.loss + b.entropy.sum()).backward()
        assert isinstance(sharded.lm_head.weight.grad, DTensor)
        torch.testing.assert_close(a.log_probs, b.log_probs, rtol=0, atol=0)
        torch.testing.assert_close(sharded.lm_head.weight.grad.full_tensor(), plain.lm_head.weight.grad,
                                   rtol=0, atol=1e-6)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# fdpo's loss types in TRL's DPOTrainer.


def fdpo_trainer(tmp_path, model_config: dict | None = None, **overrides) -> "fdpo_trl.DPOTrainer":
    """fdpo's DPOTrainer on a policy and a reference of other weights; model_config: extra config fields."""
    models = [tiny_llama(seed) for seed in (0, 1)]
    for model in models:
        for name, value in (model_config or {}).items():
            setattr(model.config, name, value)
    args = fdpo_trl.DPOConfig(**run_args(tmp_path / "run", **{"fdpo_backend": "torch", **overrides}))
    return fdpo_trl.DPOTrainer(model=models[0], ref_model=models[1], args=args, train_dataset=preference_data(),
                               processing_class=TOKENIZER)


def first_batch(trainer) -> dict:
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def direct_loss(trainer, inputs: dict) -> torch.Tensor:
    """The loss type's own fdpo function on the same tensors: hidden states from the backbones."""
    model, ref_model, args = trainer.model, trainer.ref_model, trainer.args
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)[:, 1:]
    hidden = model.model(inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state[:, :-1]
    with torch.no_grad():
        ref_hidden = ref_model.model(inputs["input_ids"],
                                     attention_mask=inputs["attention_mask"]).last_hidden_state[:, :-1]
    scale, softcap = fdpo_trl.logit_scale(model.config), getattr(model.config, "final_logit_softcapping", None)
    head = fdpo.LMHead(model.lm_head.weight * scale, softcap=softcap)
    ref_head = fdpo.LMHead(ref_model.lm_head.weight * scale, softcap=softcap)
    divergence, alpha = {"reverse_kl": ("reverse_kl", 0.5), "forward_kl": ("forward_kl", 0.5),
                         "js_divergence": ("js", 0.5),
                         "alpha_divergence": ("alpha", 1 - args.f_alpha_divergence_coef)}[args.f_divergence_type]
    if args.loss_type == ["bpo"]:
        sums = fdpo.sequence_logprobs(hidden, head.weight, labels, softcap=softcap, backend="reference")
        ref_sums = fdpo.sequence_logprobs(ref_hidden, ref_head.weight, labels, softcap=softcap, backend="reference")
        return fdpo.preference_loss(*sums.chunk(2), *ref_sums.chunk(2), beta=args.beta, divergence=divergence,
                                    alpha=alpha, loss="bpo", bpo_lambda=args.bpo_lambda).loss
    if args.loss_type == ["tdpo"]:
        loss_fn = fdpo.TDPOLoss(beta=args.beta, alpha=args.tdpo_alpha, variant=args.tdpo_variant,
                                backend="reference")
    else:
        loss_fn = fdpo.EpsilonDPOLoss(fdpo.EpsilonDPO(beta=trainer.epsilon_dpo.beta, eps=args.epsilon),
                                      divergence=divergence, alpha=alpha, label_smoothing=args.label_smoothing,
                                      backend="reference")
    return loss_fn(hidden, labels, head, ref_hidden=ref_hidden, ref_head=ref_head).loss


@pytest.mark.parametrize("options", [
    dict(loss_type="bpo", f_divergence_type="js_divergence", bpo_lambda=-0.3),
    dict(loss_type="bpo", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3),
    dict(loss_type="tdpo", tdpo_variant="tdpo1"),
    dict(loss_type="tdpo", tdpo_variant="tdpo2", tdpo_alpha=0.7),
    dict(loss_type="epsilon_dpo", f_divergence_type="forward_kl", label_smoothing=0.1),
    dict(loss_type="tdpo", model_config=dict(logit_scale=1.3, final_logit_softcapping=4.0)),
    dict(loss_type="epsilon_dpo", epsilon=0.3, model_config=dict(logits_scaling=0.8, final_logit_softcapping=4.0)),
    dict(loss_type="tdpo", fdpo_backend="triton", model_config=dict(logit_scale=1.3, final_logit_softcapping=4.0)),
], ids=lambda o: "-".join(str(v) for v in o.values()))
def test_new_loss_types_equal_fdpo_on_the_same_tensors(tmp_path, device: torch.device, options: dict) -> None:
    # The reference has other weights than the policy: the losses are away from their symmetric point.
    trainer = fdpo_trainer(tmp_path, beta=0.5, **options, **on_device(device))
    model = trainer.model
    inputs = first_batch(trainer)
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected = direct_loss(trainer, inputs)
    expected.backward()
    # Two float32 paths to the same hidden states (the trainer's patched forward, the backbone called
    # here) round apart by a few ulps; the alpha divergence's exponentials carry that to ~1e-6 relative.
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for grad, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(grad, p.grad, rtol=0, atol=1e-5)


@pytest.mark.parametrize("loss_type", ["bpo", "tdpo", "epsilon_dpo"])
def test_new_loss_types_lower_the_loss(tmp_path, counts: dict, loss_type: str) -> None:
    trainer = fdpo_trainer(tmp_path, loss_type=loss_type, max_steps=5, learning_rate=1e-2)
    inputs = first_batch(trainer)
    with torch.no_grad():
        before = trainer.compute_loss(trainer.model, inputs).item()
    trainer.train()
    with torch.no_grad():
        after = trainer.compute_loss(trainer.model, inputs).item()
    assert after < before
    assert counts["fdpo"] > 0 and counts["trl"] == 0
    logged = trainer.state.log_history[0]
    assert {"rewards/margins", "logps/chosen", *HEAD_METRICS} <= set(logged)
    assert {"tdpo": "kl/chosen", "epsilon_dpo": "epsilon_dpo/beta", "bpo": "entropy"}[loss_type] in logged


# TRL's metrics of the policy's fused head forward.
HEAD_METRICS = ("entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy")


def float64_head_metrics(trainer, inputs: dict) -> dict[str, float]:
    """TRL's head metrics by TRL's formulas, from the policy's materialized float64 logits of `inputs`."""
    model = trainer.model
    scale, softcap = fdpo_trl.logit_scale(model.config), getattr(model.config, "final_logit_softcapping", None)
    with torch.no_grad():
        hidden = model.model(inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
    z = (hidden[:, :-1].double() @ model.lm_head.weight.double().T) * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logp = torch.log_softmax(z, -1)
    mask = inputs["completion_mask"][:, 1:].bool()
    chosen_mask, rejected_mask = mask.chunk(2)
    chosen_z, rejected_z = z.mean(-1).chunk(2)
    is_top1 = z.argmax(-1) == inputs["input_ids"][:, 1:]
    return {"entropy": (-(logp.exp() * logp).sum(-1) * mask).sum().item() / mask.sum().item(),
            "logits/chosen": chosen_z[chosen_mask].sum().item() / chosen_mask.sum().item(),
            "logits/rejected": rejected_z[rejected_mask].sum().item() / rejected_mask.sum().item(),
            "mean_token_accuracy": (is_top1.chunk(2)[0] & chosen_mask).sum().item() / chosen_mask.sum().item()}


@pytest.mark.parametrize("loss_type", ["tdpo", "epsilon_dpo"])
@pytest.mark.parametrize("model_config", [None, dict(logit_scale=1.3, final_logit_softcapping=4.0)],
                         ids=["plain", "scale-softcap"])
def test_two_model_losses_log_trl_head_metrics_from_their_one_pass(tmp_path, counts: dict, loss_type: str,
                                                                   model_config: dict | None) -> None:
    # A few steps first, so that the policy predicts some of the chosen tokens (mean_token_accuracy > 0).
    trainer = fdpo_trainer(tmp_path, model_config, loss_type=loss_type, beta=0.5, max_steps=6, learning_rate=3e-2)
    trainer.train()
    counts.update(fdpo=0, trl=0)
    inputs = first_batch(trainer)
    expected = float64_head_metrics(trainer, inputs)
    loss = trainer.compute_loss(trainer.model, inputs)
    # The reference's forward stops at its hidden states: the loss and the metrics share one vocabulary pass.
    assert counts == {"fdpo": 1, "trl": 0}
    logged = {name: trainer._metrics["train"][name] for name in HEAD_METRICS}
    assert all(len(values) == 1 for values in logged.values())
    for name, value in expected.items():
        assert logged[name][0] == pytest.approx(value, abs=1e-5), name
    assert expected["mean_token_accuracy"] > 0
    # The loss is the loss type's own fdpo function's (statistics per token, summed per sequence here).
    torch.testing.assert_close(loss, direct_loss(trainer, inputs), rtol=0, atol=1e-6)


@pytest.mark.parametrize("loss_type", ["tdpo", "epsilon_dpo"])
def test_two_model_loss_equals_the_loss_modules_own_forward(tmp_path, loss_type: str) -> None:
    # Per-token statistics summed per sequence by the integration: the loss module's result, bit for bit.
    trainer = fdpo_trainer(tmp_path, loss_type=loss_type, beta=0.5)
    inputs = first_batch(trainer)
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    forward = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels,
                   fused_lm_head=True, fdpo_head_fn=lambda call: call)
    call = trainer.model(**forward)
    with torch.no_grad():
        ref = trainer.ref_model(**forward)
    ours, outputs, ref_sums = dpo_module.two_model_loss(trainer.pair_loss_fn, call, ref=ref)
    theirs = trainer.pair_loss_fn(call.hidden, call.labels, dpo_module.lm_head(call), ref_hidden=ref.hidden,
                                  ref_head=dpo_module.lm_head(ref).detached())
    expected_ref_sums = fdpo.sequence_logprobs(ref.hidden, ref.weight, ref.labels, backend="reference").chunk(2)
    for got, expected in zip(ref_sums, expected_ref_sums, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    for name in ("loss", "chosen_rewards", "rejected_rewards", "policy_chosen", "policy_rejected"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
    assert ours.extras.keys() == theirs.extras.keys()
    assert all(torch.equal(ours.extras[k], v) for k, v in theirs.extras.items())
    ours_grad = torch.autograd.grad(ours.loss, call.hidden, retain_graph=True)[0]
    assert torch.equal(ours_grad, torch.autograd.grad(theirs.loss, call.hidden)[0])
    assert torch.equal(outputs.label_mask, call.labels != -100)


@pytest.mark.parametrize("loss_type", ["tdpo", "epsilon_dpo"])
def test_two_model_losses_head_metrics_equal_stock_trl_at_the_first_step(tmp_path, loss_type: str) -> None:
    # Before the first optimizer step the head metrics do not depend on the loss: stock TRL's sigmoid run
    # logs the same ones on the same batch (same seed, same weights).
    stock, _ = dpo_run(tmp_path, False, loss_type="sigmoid", max_steps=1)
    ours, _ = dpo_run(tmp_path, True, loss_type=loss_type, fdpo_backend="torch", max_steps=1)
    for name in HEAD_METRICS:
        assert ours[0][name] == pytest.approx(stock[0][name], abs=1e-5), name


def reward_metrics(prefix: str, chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """TRL's reward metrics of [P] rewards under `prefix`."""
    return {f"{prefix}/chosen": chosen.mean().item(), f"{prefix}/rejected": rejected.mean().item(),
            f"{prefix}/accuracies": (chosen > rejected).float().mean().item(),
            f"{prefix}/margins": (chosen - rejected).mean().item()}


@pytest.mark.parametrize("options", [dict(loss_type="tdpo", tdpo_variant="tdpo1"),
                                     dict(loss_type="tdpo", tdpo_variant="tdpo2"),
                                     dict(loss_type="epsilon_dpo", f_divergence_type="js_divergence", epsilon=0.3)],
                         ids=lambda o: "-".join(str(v) for v in o.values()))
def test_two_model_losses_log_trl_rewards(tmp_path, options: dict) -> None:
    """rewards/* carry TRL's definition, beta (policy - reference) log-prob sums (each pair's beta for
    epsilon-DPO), whatever the loss; TDPO's own rewards, beta ((a - b) + KL sum), go to tdpo/rewards/*."""
    trainer = fdpo_trainer(tmp_path, beta=0.5, **options)
    model, ref_model, args = trainer.model, trainer.ref_model, trainer.args
    inputs = first_batch(trainer)
    trainer.compute_loss(model, inputs)
    logged = {name: values[0] for name, values in trainer._metrics["train"].items()}
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)[:, 1:]
    with torch.no_grad():
        hidden, ref_hidden = (m.model(inputs["input_ids"], attention_mask=inputs["attention_mask"])
                              .last_hidden_state[:, :-1] for m in (model, ref_model))
        policy = fdpo.sequence_logprobs(hidden, model.lm_head.weight, labels, backend="reference")
        ref = fdpo.sequence_logprobs(ref_hidden, ref_model.lm_head.weight, labels, backend="reference")
        if args.loss_type == ["tdpo"]:
            beta = args.beta
            own = fdpo.TDPOLoss(beta=args.beta, alpha=args.tdpo_alpha, variant=args.tdpo_variant,
                                backend="reference")(hidden, labels, model.lm_head.weight, ref_hidden=ref_hidden,
                                                     ref_head=ref_model.lm_head.weight)
            own_rewards = reward_metrics("tdpo/rewards", own.chosen_rewards, own.rejected_rewards)
        else:
            loss_fn = fdpo.EpsilonDPOLoss(fdpo.EpsilonDPO(beta=args.beta, eps=args.epsilon), divergence="js",
                                          backend="reference")
            beta = loss_fn(hidden, labels, model.lm_head.weight, ref_hidden=ref_hidden,
                           ref_head=ref_model.lm_head.weight).extras["beta"]
            assert (beta != args.beta).all(), "the pairs' betas are the controller's: the test would not see which"
            own_rewards = {}
    chosen, rejected = (policy - ref).chunk(2)
    expected = reward_metrics("rewards", beta * chosen, beta * rejected) | own_rewards
    for name, value in expected.items():
        assert logged[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


def test_epsilon_dpo_beta_survives_checkpoint_resume(tmp_path) -> None:
    options = dict(loss_type="epsilon_dpo", max_steps=4, learning_rate=1e-2, save_strategy="steps", save_steps=2,
                   epsilon=0.2)
    whole = fdpo_trainer(tmp_path / "whole", **options)
    whole.train()
    betas = [r["epsilon_dpo/beta"] for r in whole.state.log_history if "epsilon_dpo/beta" in r]
    assert len(set(betas)) > 1, "beta never moved: the test would not see a lost state"
    checkpoint = tmp_path / "whole" / "run" / "checkpoint-2"
    assert (checkpoint / "epsilon_dpo.pt").is_file()
    resumed = fdpo_trainer(tmp_path / "resumed", **options)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.epsilon_dpo.beta == whole.epsilon_dpo.beta
    assert max_weight_difference(whole.model, resumed.model) < 1e-6

    def after_checkpoint(trainer):
        # num_tokens counts the tokens this process has seen: TRL does not restore it on resume.
        return [{k: v for k, v in r.items() if k != "num_tokens"} for r in trainer.state.log_history
                if r.get("step", 0) > 2 and "epsilon_dpo/beta" in r]

    assert len(after_checkpoint(resumed)) == 2
    assert max_difference(after_checkpoint(whole), after_checkpoint(resumed)) < 1e-6
    fresh = fdpo_trainer(tmp_path / "fresh", **options)
    with pytest.raises(ValueError, match="no epsilon-DPO state"):
        os.remove(checkpoint / "epsilon_dpo.pt")
        fresh.train(resume_from_checkpoint=str(checkpoint))


def test_trl_loss_types_save_checkpoints(tmp_path) -> None:
    """fdpo's DPOTrainer running one of TRL's loss types saves TRL's checkpoints (and no epsilon-DPO state)."""
    trainer = fdpo_trainer(tmp_path, loss_type="sigmoid", max_steps=1, save_strategy="steps", save_steps=1)
    trainer.train()
    checkpoint = tmp_path / "run" / "checkpoint-1"
    assert (checkpoint / "optimizer.pt").is_file()
    assert not (checkpoint / dpo_module.CONTROLLER_FILE).exists()


@pytest.mark.parametrize("options, message", [
    (dict(loss_type="tdpo", f_divergence_type="js_divergence"), "TDPO is defined for divergence='reverse_kl'"),
    (dict(loss_type=["bpo", "sigmoid"]), "must be the only loss type"),
    (dict(loss_type="bpo", label_smoothing=0.1), "label_smoothing"),
    (dict(loss_type="tdpo", precompute_ref_log_probs=True), "hidden states"),
    (dict(loss_type="epsilon_dpo", epsilon=1.5), "eps must be"),
    (dict(loss_type="bpo", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.5),
     "f_alpha_divergence_coef"),
    (dict(loss_type="tdpo", tdpo_variant="tdpo3"), "variant"),
    # A loss type's own setting that no chosen loss type uses, and TDPO2's alpha with TDPO1.
    (dict(loss_type="tdpo", tdpo_variant="tdpo1", tdpo_alpha=0.05), "tdpo_alpha=0.05 is TDPO2's KL weight"),
    (dict(loss_type="tdpo", bpo_lambda=0.7, epsilon=0.3),
     r"loss_type=\['tdpo'\] would ignore bpo_lambda=0.7 \(loss_type 'bpo' only; default -0.5\), epsilon=0.3"),
    (dict(loss_type="bpo", epsilon=0.3), r"would ignore epsilon=0.3 \(loss_type 'epsilon_dpo' only"),
    (dict(loss_type="bpo", tdpo_alpha=3.0), r"would ignore tdpo_alpha=3.0 \(loss_type 'tdpo' only"),
    (dict(loss_type="epsilon_dpo", tdpo_variant="tdpo1"), "would ignore tdpo_variant='tdpo1'"),
    (dict(loss_type="epsilon_dpo", bpo_lambda=0.2), "would ignore bpo_lambda=0.2"),
    (dict(loss_type="sigmoid", tdpo_alpha=3.0), r"loss_type=\['sigmoid'\] would ignore tdpo_alpha=3.0"),
    (dict(loss_type=["sigmoid", "ipo"], loss_weights=[1.0, 0.5], epsilon=0.3, bpo_lambda=0.2),
     r"loss_type=\['sigmoid', 'ipo'\] would ignore bpo_lambda=0.2 .*, epsilon=0.3"),
])
def test_settings_the_loss_cannot_honour_raise(tmp_path, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fdpo_trl.DPOConfig(**run_args(tmp_path, **options))


@pytest.mark.parametrize("options", [
    dict(loss_type="bpo", bpo_lambda=0.7), dict(loss_type="tdpo", tdpo_alpha=0.2),
    dict(loss_type="tdpo", tdpo_variant="tdpo1"), dict(loss_type="epsilon_dpo", epsilon=0.3),
    dict(loss_type=["sigmoid", "ipo"], loss_weights=[1.0, 0.5]), dict(loss_type="sigmoid"),
])
def test_each_loss_types_own_settings_are_taken_with_it(tmp_path, options: dict) -> None:
    """The settings of a loss type are taken with that loss type, and TRL's loss types (one or several) take the
    defaults of every fdpo loss type's settings."""
    config = fdpo_trl.DPOConfig(**run_args(tmp_path, **options))
    for name, value in options.items():
        if name != "loss_type":
            assert getattr(config, name) == value


def test_epsilon_dpo_resume_refuses_another_epsilon(tmp_path) -> None:
    """The controller's eps defines the run's beta trajectory: a checkpoint of another epsilon than the
    config's is refused on resume, naming both, before anything is loaded (as fdpo's trainer refuses a
    changed epsilon), where the controller would otherwise take the checkpoint's eps silently."""
    trainer = fdpo_trainer(tmp_path, loss_type="epsilon_dpo", epsilon=0.05, beta=0.1)
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    torch.save(fdpo.EpsilonDPO(beta=0.3, eps=0.2).state_dict(), checkpoint / dpo_module.CONTROLLER_FILE)
    with pytest.raises(ValueError, match=r"cannot resume .*checkpoint-2: .*\(epsilon 0\.2 -> 0\.05\); resume with "
                                         r"the checkpoint's epsilon=0\.2"):
        trainer._load_optimizer_and_scheduler(str(checkpoint))
    assert (trainer.epsilon_dpo.beta, trainer.epsilon_dpo.eps) == (0.1, 0.05)
    torch.save(fdpo.EpsilonDPO(beta=0.3, eps=0.05).state_dict(), checkpoint / dpo_module.CONTROLLER_FILE)
    trainer._load_optimizer_and_scheduler(str(checkpoint))
    assert (trainer.epsilon_dpo.beta, trainer.epsilon_dpo.eps) == (0.3, 0.05)


@pytest.mark.parametrize("loss_type", ["tdpo", "epsilon_dpo", "bpo"])
def test_reference_of_another_vocabulary_size_raises_at_construction(tmp_path, loss_type: str) -> None:
    """The two-model losses compare the two heads' distributions entry by entry: a reference whose vocabulary
    was padded raises when the trainer is built, not at its first step; bpo, which only reads the reference's
    label log-probs (as TRL's losses do), takes it."""
    ref_model = tiny_llama(1)
    ref_model.resize_token_embeddings(259, pad_to_multiple_of=8)
    args = fdpo_trl.DPOConfig(**run_args(tmp_path, loss_type=loss_type, fdpo_backend="torch"))

    def build():
        return fdpo_trl.DPOTrainer(model=tiny_llama(), ref_model=ref_model, args=args,
                                   train_dataset=preference_data(), processing_class=TOKENIZER)

    if loss_type == "bpo":
        build()
        return
    with pytest.raises(ValueError, match="ref_weight has 264 vocabulary rows but weight has 259"):
        build()


def test_fdpo_loss_types_need_fdpo_config(tmp_path) -> None:
    args = trl.DPOConfig(**run_args(tmp_path, loss_type="bpo"))
    with pytest.raises(TypeError, match=r"needs an fdpo\.integrations\.trl\.DPOConfig"):
        fdpo_trl.DPOTrainer(model=tiny_llama(), ref_model=tiny_llama(), args=args, train_dataset=preference_data(),
                            processing_class=TOKENIZER)


@pytest.mark.parametrize("loss_type", ["bpo", "tdpo"])
def test_loss_weights_scale_fdpo_loss_types_as_trl_scales_its_own(tmp_path, loss_type: str) -> None:
    """TRL multiplies a loss type's mean loss by its loss_weights entry; fdpo's loss types take it too."""
    losses = []
    for weights in (None, [0.25]):
        trainer = fdpo_trainer(tmp_path, loss_type=loss_type, loss_weights=weights)
        with torch.no_grad():
            losses.append(trainer.compute_loss(trainer.model, first_batch(trainer)))
    assert losses[0] > 0.1
    torch.testing.assert_close(losses[1], 0.25 * losses[0], rtol=1e-6, atol=0)


def test_bpo_and_epsilon_dpo_accept_every_f_divergence(tmp_path) -> None:
    for divergence in ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"):
        for loss_type in ("bpo", "epsilon_dpo"):
            fdpo_trl.DPOConfig(**run_args(tmp_path, loss_type=loss_type, f_divergence_type=divergence))


def test_import_without_trl_and_with_an_untested_trl(monkeypatch: pytest.MonkeyPatch) -> None:
    """Re-executes the package's __init__ (its submodules stay as imported) under each condition."""
    with monkeypatch.context() as patched:
        patched.setitem(sys.modules, "trl", None)
        with pytest.raises(ImportError, match=r'pip install "fdpo\[trl\]"'):
            importlib.reload(fdpo_trl)
    with monkeypatch.context() as patched:
        patched.setattr(trl, "__version__", "1.99.0")
        with pytest.warns(UserWarning, match=r"tested with trl>=1\.16,<1\.17; found trl 1\.99\.0") as caught:
            importlib.reload(fdpo_trl)
            import fdpo.integrations.trl  # noqa: F401  (already imported: no second warning)
        assert len([w for w in caught if "tested with trl" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        importlib.reload(fdpo_trl)
    assert fdpo_trl.add_fused_lm_head is head_module.add_fused_lm_head


def test_setup_declares_the_tested_trl_range() -> None:
    text = (REPO / "setup.py").read_text(encoding="utf-8")
    assert f'"trl": ["trl{fdpo_trl.TESTED_TRL}"]' in text



# ---------------------------------------------------------------------------------------------
# PEFT and MoE models.


def test_dpo_with_lora_matches_stock_trl(tmp_path, counts: dict, device: torch.device) -> None:
    from peft import LoraConfig

    def run(use_fdpo: bool):
        config_cls, trainer_cls = (fdpo_trl.DPOConfig, fdpo_trl.DPOTrainer) if use_fdpo else (trl.DPOConfig,
                                                                                               trl.DPOTrainer)
        args = config_cls(**run_args(tmp_path / str(use_fdpo), max_steps=2, **on_device(device)))
        trainer = trainer_cls(model=tiny_llama(), args=args,
                              train_dataset=preference_data(), processing_class=TOKENIZER,
                              peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        trainer.train()
        return trainer.state.log_history, trainer.model

    stock, stock_model = run(False)
    ours, our_model = run(True)
    assert counts["fdpo"] > 0 and counts["trl"] == 4
    assert max_difference(stock, ours) < 1e-5
    assert max_weight_difference(stock_model, our_model) < 1e-5


def test_prompt_tuning_virtual_tokens_are_not_scored() -> None:
    """Prompt-learning PEFT prepends virtual tokens (and -100 labels, but not to shift_labels)."""
    from peft import PromptTuningConfig, get_peft_model

    def prompt_tuned(add_head):
        model = tiny_llama()
        add_head(model, outputs=("log_probs", "entropy"))
        torch.manual_seed(3)
        return get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))

    ours = prompt_tuned(functools.partial(fdpo_trl.add_fused_lm_head, backend="torch"))
    theirs = prompt_tuned(head_module.TRL_ADD_FUSED_LM_HEAD)
    input_ids = torch.randint(0, 259, (2, 7), generator=torch.Generator().manual_seed(4))
    labels = input_ids.clone()
    labels[:, :2] = -100
    a = ours(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels, fused_lm_head=True)
    b = theirs(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels, fused_lm_head=True)
    assert a.log_probs.shape == (2, 3 + 7 - 1)
    for name in ("loss", "log_probs", "entropy"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=1e-5, msg=name)
    assert torch.equal(a.label_mask, b.label_mask)
    # Pre-shifted labels of the real tokens only: the virtual positions get -100 here.
    shift_labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    c = ours(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), shift_labels=shift_labels,
             fused_lm_head=True)
    assert c.log_probs.shape == (2, 3 + 7)
    assert not c.label_mask[:, :3].any()
    torch.testing.assert_close(c.log_probs[:, 3:-1], a.log_probs[:, 3:], rtol=0, atol=1e-6)


def prompt_tuned_direct_loss(trainer, inputs: dict) -> torch.Tensor:
    """The loss type's own fdpo function on the real tokens' positions of a prompt-tuned policy: its hidden
    states from the base backbone fed the virtual tokens' embeddings first, the reference's (the adapter
    off) from the base backbone alone."""
    peft_model, args = trainer.model, trainer.args
    base = peft_model.get_base_model()
    input_ids, mask = inputs["input_ids"], inputs["attention_mask"]
    labels = input_ids.masked_fill(inputs["completion_mask"] == 0, -100)[:, 1:]
    prompts = peft_model.get_prompt(batch_size=input_ids.shape[0])
    virtual = prompts.shape[1]
    embeds = torch.cat([prompts, base.get_input_embeddings()(input_ids)], dim=1)
    full_mask = torch.cat([mask.new_ones(mask.shape[0], virtual), mask], dim=1)
    hidden = base.model(inputs_embeds=embeds, attention_mask=full_mask).last_hidden_state[:, virtual:-1]
    with torch.no_grad():
        ref_hidden = base.model(input_ids, attention_mask=mask).last_hidden_state[:, :-1]
    head = fdpo.LMHead(base.lm_head.weight)
    if args.loss_type == ["tdpo"]:
        loss_fn = fdpo.TDPOLoss(beta=args.beta, alpha=args.tdpo_alpha, variant=args.tdpo_variant, backend="reference")
    else:
        loss_fn = fdpo.EpsilonDPOLoss(fdpo.EpsilonDPO(beta=trainer.epsilon_dpo.beta, eps=args.epsilon),
                                      backend="reference")
    return loss_fn(hidden, labels, head, ref_hidden=ref_hidden, ref_head=head).loss


@pytest.mark.parametrize("loss_type", ["tdpo", "epsilon_dpo"])
def test_two_model_losses_with_prompt_tuning_pair_the_real_tokens(tmp_path, loss_type: str) -> None:
    """The prompt-tuned policy's forward leads with virtual tokens the reference (its adapter off) lacks:
    the two-model losses pair the two models' real tokens, as TRL's losses do."""
    from peft import PromptTuningConfig

    args = fdpo_trl.DPOConfig(**run_args(tmp_path, loss_type=loss_type, fdpo_backend="torch", beta=0.5,
                                         max_steps=2, learning_rate=1e-2))
    trainer = fdpo_trl.DPOTrainer(model=tiny_llama(), args=args, train_dataset=preference_data(),
                                  processing_class=TOKENIZER,
                                  peft_config=PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    inputs = first_batch(trainer)
    expected = prompt_tuned_direct_loss(trainer, inputs)
    assert abs(expected.item() - math.log(2)) > 1e-4, "the virtual tokens move the policy off the reference"
    torch.testing.assert_close(trainer.compute_loss(trainer.model, inputs), expected, rtol=1e-5, atol=1e-6)
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)


def test_two_model_loss_refuses_to_drop_labelled_positions(tmp_path) -> None:
    """Only unlabelled leading positions (virtual tokens) may be dropped to pair the two models' positions."""
    trainer = fdpo_trainer(tmp_path, loss_type="tdpo")
    inputs = first_batch(trainer)
    call = trainer.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                         labels=inputs["input_ids"], fused_lm_head=True, fdpo_head_fn=lambda c: c)
    ref = dataclasses.replace(call, hidden=call.hidden[:, 2:].detach(), labels=call.labels[:, 2:])
    with pytest.raises(ValueError, match="the first 2 of the longer one carry labels"):
        dpo_module.two_model_loss(trainer.pair_loss_fn, call, ref=ref)


def test_labels_of_another_length_than_the_inputs_raise() -> None:
    """`labels` are the input positions' (PEFT pads them for its virtual tokens): labels of another length
    would shift every label against its hidden state, so they raise as TRL's head does."""
    model = tiny_llama()
    fdpo_trl.add_fused_lm_head(model, backend="torch")
    input_ids = torch.randint(0, 259, (2, 7), generator=torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match="labels have 6 positions but the hidden states 7"):
        model(input_ids=input_ids, labels=input_ids[:, 1:], fused_lm_head=True)


def test_moe_router_loss_passes_through() -> None:
    from transformers import MixtralConfig, MixtralForCausalLM

    def mixtral():
        torch.manual_seed(0)
        return MixtralForCausalLM(MixtralConfig(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
            router_aux_loss_coef=0.02))

    ours, theirs, plain = mixtral(), mixtral(), mixtral()
    fdpo_trl.add_fused_lm_head(ours, backend="torch")
    head_module.TRL_ADD_FUSED_LM_HEAD(theirs)
    input_ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(input_ids)
    a = ours(input_ids, attention_mask=mask, labels=input_ids, fused_lm_head=True)
    b = theirs(input_ids, attention_mask=mask, labels=input_ids, fused_lm_head=True)
    expected = plain(input_ids, attention_mask=mask, labels=input_ids)
    assert a.aux_loss is not None
    torch.testing.assert_close(a.aux_loss, b.aux_loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.aux_loss, expected.aux_loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.loss, expected.loss, rtol=0, atol=1e-5)
    # fdpo's two-model losses get it with the head call.
    call = ours(input_ids, attention_mask=mask, labels=input_ids, fused_lm_head=True, fdpo_head_fn=lambda c: c)
    torch.testing.assert_close(call.aux_loss, expected.aux_loss, rtol=0, atol=1e-6)


def test_example_trains(tmp_path) -> None:
    example = runpy.run_path(str(REPO / "examples" / "trl_dpo.py"), run_name="example")
    summary = example["main"](["--max-steps", "6", "--pairs", "48", "--backend", "torch", "--loss-type", "tdpo",
                               "--output-dir", str(tmp_path)])
    assert summary["after/loss"] < summary["before/loss"]


@pytest.mark.parametrize("loss_type", ["tdpo", "epsilon_dpo"])
def test_two_model_losses_with_lora_use_the_adapter_free_model_as_reference(tmp_path, loss_type: str) -> None:
    from peft import LoraConfig

    args = fdpo_trl.DPOConfig(**run_args(tmp_path, loss_type=loss_type, fdpo_backend="torch", max_steps=2,
                                         learning_rate=1e-2))
    trainer = fdpo_trl.DPOTrainer(model=tiny_llama(), args=args, train_dataset=preference_data(),
                                  processing_class=TOKENIZER,
                                  peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert trainer.ref_model is None
    trainer.train()
    first, second = [r for r in trainer.state.log_history if "loss" in r]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)     # LoRA starts as the reference
    assert first["rewards/margins"] == 0.0 and second["rewards/margins"] != 0.0


@pytest.mark.parametrize("backend, loss_type", [("torch", "sigmoid"), ("reference", "sigmoid"), ("torch", "tdpo")])
def test_fdpo_backend_runs_the_heads_trl_installs(tmp_path, monkeypatch, backend: str, loss_type: str) -> None:
    """DPOConfig.fdpo_backend reaches the heads TRL's __init__ installs on the policy and the reference
    (with backend "auto", the triton kernels under this interpreter), not only fdpo's losses."""
    classes = {"torch": TorchBackend, "triton": TritonBackend, "reference": ReferenceBackend}
    seen = {name: 0 for name in classes}
    for name, cls in classes.items():
        def counted(self, *args, _original=cls.head_stats, _name=name, **kwargs):
            seen[_name] += 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(cls, "head_stats", counted)
    dpo_run(tmp_path, True, fdpo_backend=backend, loss_type=loss_type, max_steps=1)
    assert seen[backend] > 0 and sum(seen.values()) == seen[backend], seen


@pytest.mark.parametrize("loss_type", ["sigmoid", "bpo"])
def test_fdpo_backend_runs_the_precomputed_reference_pass(tmp_path, monkeypatch, loss_type: str) -> None:
    """precompute_ref_log_probs=True runs the reference pass inside TRL's __init__: on fdpo_backend too."""
    seen = []
    original = head_module.token_statistics

    def recorded(*args, **kwargs):
        seen.append(kwargs["backend"])
        return original(*args, **kwargs)

    monkeypatch.setattr(head_module, "token_statistics", recorded)
    # Weights of their own: TRL caches the precomputed columns by the dataset's and the model's hashes.
    args = fdpo_trl.DPOConfig(**run_args(tmp_path, loss_type=loss_type, fdpo_backend="reference",
                                         precompute_ref_log_probs=True))
    model = tiny_llama(seed={"sigmoid": 11, "bpo": 12}[loss_type])
    trainer = fdpo_trl.DPOTrainer(model=model, args=args, train_dataset=preference_data(),
                                  processing_class=TOKENIZER)
    assert "ref_chosen_logps" in trainer.train_dataset.column_names
    assert seen and set(seen) == {"reference"}, seen


def stock_dpo_trainer(tmp_path) -> "trl.DPOTrainer":
    return trl.DPOTrainer(model=tiny_llama(), ref_model=tiny_llama(1),
                          args=trl.DPOConfig(**run_args(tmp_path / "stock", max_steps=1)),
                          train_dataset=preference_data(), processing_class=TOKENIZER)


@pytest.mark.parametrize("loss_type", ["sigmoid", "tdpo"])
def test_dpo_trainer_installs_fdpo_for_its_own_models_only(tmp_path, loss_type: str) -> None:
    """Building fdpo's DPOTrainer patches its models with fdpo's head and leaves TRL's installed: a stock
    trl.DPOTrainer built afterwards runs TRL's head."""
    ours = fdpo_trainer(tmp_path, loss_type=loss_type)
    assert "_fdpo_head_settings" in vars(ours.model) and "_fdpo_head_settings" in vars(ours.ref_model)
    assert not fdpo_trl.installed()
    assert trl_utils.add_fused_lm_head is head_module.TRL_ADD_FUSED_LM_HEAD
    stock = stock_dpo_trainer(tmp_path)
    assert "_fdpo_head_settings" not in vars(stock.model) and "_fdpo_head_settings" not in vars(stock.ref_model)


def test_dpo_trainer_leaves_a_users_install_in_force(tmp_path) -> None:
    fdpo_trl.install()
    fdpo_trainer(tmp_path, loss_type="sigmoid")
    assert fdpo_trl.installed()
    stock = stock_dpo_trainer(tmp_path)
    assert "_fdpo_head_settings" in vars(stock.model) and "_fdpo_head_settings" in vars(stock.ref_model)


class PassThrough(torch.nn.Module):
    """A wrapper that passes attribute reads through to the wrapped model, as FSDP1, DeepSpeed's
    engine and PEFT do."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


@pytest.mark.parametrize("wrap", ["pass-through", "peft"])
def test_set_head_backend_reaches_the_patched_model_through_wrappers(wrap: str) -> None:
    from peft import LoraConfig, get_peft_model

    model = tiny_llama()
    fdpo_trl.add_fused_lm_head(model)
    if wrap == "peft":
        wrapper = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    else:
        wrapper = PassThrough(model)
    assert wrapper._fdpo_head_settings.backend == "auto", "the wrapper reads the model's settings through"
    fdpo_trl.set_head_backend(wrapper, "torch")
    assert vars(model)["_fdpo_head_settings"].backend == "torch"
    assert "_fdpo_head_settings" not in vars(wrapper)


def test_a_copy_of_a_patched_model_runs_its_own_weights_without_the_fused_head() -> None:
    model = tiny_llama()
    fdpo_trl.add_fused_lm_head(model)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p in clone.parameters():
            p.add_(0.5)
    ids = torch.randint(0, 200, (1, 6))
    assert not torch.allclose(clone(ids).logits, model(ids).logits)
    torch.testing.assert_close(clone(ids).logits, clone._fdpo_original_forward(ids).logits)


def test_set_head_backend_needs_an_installed_head() -> None:
    with pytest.raises(TypeError, match="has no fused head of fdpo's"):
        fdpo_trl.set_head_backend(tiny_llama(), "torch")
    model = tiny_llama()
    fdpo_trl.add_fused_lm_head(model, outputs=("entropy",))
    wrapper = torch.nn.Module()
    wrapper.module = model  # as DDP, DeepSpeed's engine and FSDP1 hold it
    fdpo_trl.set_head_backend(wrapper, "reference")
    assert model._fdpo_head_settings.backend == "reference"
    assert model._fdpo_head_settings.outputs == ("log_probs", "entropy"), "the other settings are kept"
    with pytest.raises(ValueError):
        fdpo_trl.set_head_backend(model, "cuda")


@pytest.mark.parametrize("options", [dict(loss_type="bpo", beta=200.0),
                                     dict(loss_type="epsilon_dpo", f_divergence_type="forward_kl")],
                         ids=lambda o: o["loss_type"])
def test_clamped_pairs_metric_is_the_fraction_of_pairs_past_a_clamp(tmp_path, options: dict) -> None:
    """bpo / epsilon_dpo log `clamped_pairs`: the fraction of pairs whose BPO margin (past -60 at beta 200) or
    forward-KL score (a policy head scaled by 20: log-ratios down to -34.5) is past its clamp, where the pair
    gets no gradient: the mean of the pair loss's own flags, strictly between 0 and 1 here."""
    trainer = fdpo_trainer(tmp_path, **options)
    inputs = first_batch(trainer)
    if options["loss_type"] == "epsilon_dpo":
        with torch.no_grad():
            trainer.model.lm_head.weight.mul_(20.0)
    trainer.compute_loss(trainer.model, inputs)
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)[:, 1:]
    with torch.no_grad():
        sums = [fdpo.sequence_logprobs(m.model(inputs["input_ids"], attention_mask=inputs["attention_mask"])
                                       .last_hidden_state[:, :-1], m.lm_head.weight, labels, backend="reference")
                for m in (trainer.model, trainer.ref_model)]
    if options["loss_type"] == "bpo":
        out = fdpo.preference_loss(*sums[0].chunk(2), *sums[1].chunk(2), beta=200.0, loss="bpo",
                                   bpo_lambda=trainer.args.bpo_lambda)
    else:
        out = fdpo.preference_loss(*sums[0].chunk(2), *sums[1].chunk(2), beta=trainer.epsilon_dpo.beta,
                                   divergence="forward_kl")
    expected = out.extras["clamped"].mean().item()
    assert 0 < expected < 1
    assert trainer._metrics["train"]["clamped_pairs"] == [pytest.approx(expected)]
