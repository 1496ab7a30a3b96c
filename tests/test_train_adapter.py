"""The transformers adapter against each model's own logits, in float64.

Tiny random-weight models of four architectures are built from configs (nothing is downloaded),
with a vocabulary of 300 so that the fused kernels go over more than one vocabulary tile. The
reference is the model itself in float64: log_softmax of `model(input_ids).logits`, gathered at
the labels, and the gradients of its sum.
"""

import copy

import peft
import pytest
import torch
from model_reference import assert_matches_the_models_own, batch, model_logprobs
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from fdpo.train import CausalLM, PreferenceExample, collate

VOCAB = 300


def make_model(arch: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    common = {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, **common, **overrides))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, **common, **overrides))
    elif arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=48, n_layer=2, n_head=4, n_positions=64, **common, **overrides))
    else:
        # Large logits (std 0.5 weights) so that a soft cap of 2 bends them visibly.
        model = Gemma2ForCausalLM(Gemma2Config(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                                               final_logit_softcapping=2.0, initializer_range=0.5, **common,
                                               **overrides))
    return model.eval()


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gemma2"])
def test_logprobs_and_gradients_match_the_models_own_logits(device, arch, backend):
    """The model runs on `device`; its float64 copy, the reference, on the CPU."""
    assert_matches_the_models_own(make_model(arch), VOCAB, backend, device)


@pytest.mark.parametrize("arch", ["gpt2", "gemma2"])
def test_tied_embeddings_are_one_parameter_and_get_both_gradients(arch):
    model = make_model(arch)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    ids, labels, mask = batch(VOCAB, 1)
    CausalLM(model, backend="torch")(ids, labels, attention_mask=mask).sum().backward()
    reference = copy.deepcopy(make_model(arch)).double()
    model_logprobs(reference, ids, labels, mask).sum().backward()
    torch.testing.assert_close(model.get_input_embeddings().weight.grad.double(),
                               reference.get_input_embeddings().weight.grad, rtol=1e-4, atol=1e-5)


def test_gemma2_softcap_is_applied():
    model = make_model("gemma2")
    lm = CausalLM(model, backend="torch")
    assert lm.head().softcap == 2.0
    ids, labels, mask = batch(VOCAB, 2)
    want = model_logprobs(copy.deepcopy(model).double(), ids, labels, mask)
    torch.testing.assert_close(lm(ids, labels, attention_mask=mask).double(), want, rtol=1e-5, atol=2e-5)
    uncapped = CausalLM(model, backend="torch")
    uncapped.options = {**uncapped.options, "softcap": None}
    assert (uncapped(ids, labels, attention_mask=mask).double() - want).abs().max() > 1e-2


def test_frozen_head_gets_no_weight_gradient():
    model = make_model("llama")
    model.lm_head.weight.requires_grad_(False)
    reference = copy.deepcopy(model).double()
    ids, labels, mask = batch(VOCAB, 3)
    CausalLM(model, backend="torch")(ids, labels, attention_mask=mask).sum().backward()
    model_logprobs(reference, ids, labels, mask).sum().backward()
    assert model.lm_head.weight.grad is None
    torch.testing.assert_close(model.model.norm.weight.grad.double(), reference.model.norm.weight.grad,
                               rtol=1e-4, atol=1e-5)


def test_lora_wrapped_model_trains_adapters_only():
    model = peft.get_peft_model(make_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                      lora_dropout=0.0, init_lora_weights=False))
    reference = copy.deepcopy(model).double()
    ids, labels, mask = batch(VOCAB, 4)
    lm = CausalLM(model, backend="torch")
    got = lm(ids, labels, attention_mask=mask)
    want = model_logprobs(reference, ids, labels, mask)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=2e-5)
    got.sum().backward()
    want.sum().backward()
    assert model.get_base_model().lm_head.weight.grad is None
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(p.grad is not None for p in lora.values())
    for name, p in reference.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(lora[name].grad.double(), p.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_sequences_equal_padded_ones(arch):
    model = make_model(arch)
    lm = CausalLM(model, backend="torch")
    examples = [PreferenceExample((1, 5, 6), (7, 8, 9, 2), (10, 2)),
                PreferenceExample((1, 11, 12, 13, 14), (15, 2), (16, 17, 18, 19, 2))]
    padded = collate(examples, [0, 1], pad_token_id=0)
    packed = collate(examples, [0, 1], pad_token_id=0, packed=True)
    want = torch.stack([model_logprobs(copy.deepcopy(model).double(), padded.input_ids[i:i + 1],
                                       padded.labels[i:i + 1], padded.attention_mask[i:i + 1]).sum()
                        for i in range(4)])
    got_padded = lm(padded.input_ids, padded.labels, attention_mask=padded.attention_mask, per_sequence=True)
    got_packed = lm(packed.input_ids, packed.labels, position_ids=packed.position_ids, cu_seqlens=packed.cu_seqlens)
    torch.testing.assert_close(got_padded.double(), want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got_packed.double(), want, rtol=1e-5, atol=1e-4)


def test_autocast_runs_the_head_in_the_autocast_dtype():
    """Under bf16 autocast the head multiplies bf16-rounded hidden states and weight (as a Linear under
    autocast does), to float32 accumulation; the float32 products differ from them by far more."""
    model = make_model("llama")
    lm = CausalLM(model, backend="torch")
    ids, labels, mask = batch(VOCAB, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = lm(ids, labels, attention_mask=mask)
        hidden = lm.hidden_states(ids, attention_mask=mask).detach()
        assert lm.head_dtype(torch.zeros(1)) == torch.bfloat16
    got.sum().backward()
    assert model.lm_head.weight.grad.dtype == torch.float32
    weight, scored = model.lm_head.weight.detach(), labels != -100

    def logprobs64(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        z = h.double() @ w.double().T
        return z.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0] * scored

    want = logprobs64(hidden.bfloat16(), weight.bfloat16())
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
    assert (want - logprobs64(hidden, weight)).abs().max() > 1e-4, "bf16 and fp32 products told apart"


def test_under_autocast_the_head_shares_its_weight_and_multiplies_in_bfloat16():
    """No cast copy of the [V, D] weight: the head holds the Parameter itself, with its compute dtype
    fixed to autocast's, so that losses computed later (outside autocast too) use it."""
    model = make_model("llama")
    lm = CausalLM(model, backend="torch")
    ids, _, mask = batch(VOCAB, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden, head = lm.head_inputs(ids, attention_mask=mask)
    assert head.weight is model.lm_head.weight
    assert head.compute_dtype == torch.bfloat16
    _, plain = lm.head_inputs(ids, attention_mask=mask)
    assert plain.weight is model.lm_head.weight and plain.compute_dtype == hidden.dtype


def test_a_model_without_a_linear_head_is_rejected():
    model = make_model("llama")
    model.lm_head = torch.nn.Identity()
    with pytest.raises(TypeError, match=r"get_output_embeddings\(\) must be an nn\.Linear, got a .*\.Identity"):
        CausalLM(model)


def test_an_lm_head_fdpo_cannot_reproduce_is_refused():
    """LoRA on the LM head (its `weight` is the base layer's: the adapter would be skipped) and a Linear
    subclass with its own forward raise TypeError when the trainer's adapter is built."""
    lora = peft.get_peft_model(make_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(TypeError, match=r"get_output_embeddings\(\) must be an nn\.Linear, got a peft\..*Linear"):
        CausalLM(lora, backend="torch")

    class ScaledReadout(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 0.5

    model = make_model("llama")
    readout = ScaledReadout(48, VOCAB, bias=False)
    readout.weight = model.lm_head.weight
    model.lm_head = readout
    with pytest.raises(TypeError, match=r"an nn\.Linear with its own forward"):
        CausalLM(model, backend="torch")
