"""Packed batches through the trainer's adapter: refused for models that mix the packed sequences.

Sequences packed into one row (position ids restarting at 0, no attention mask) stay apart only in
models whose mask transformers builds from the position ids. ALiBi and learned-position models
(OPT, BLOOM) attend across them, state-space layers (Mamba, Falcon-H1) carry their state over:
`CausalLM` probes the model at its first packed call and refuses those. Tiny random-weight models
built from configs (nothing is downloaded); tests/test_train_adapter.py checks Llama and Qwen2
packed against their own logits, tests/test_train_loop.py a packed run against a padded one.
"""

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from fdpo.train import CausalLM, PreferenceExample, Trainer, collate
from fdpo.train.adapter import find_decoder, packing_leak, packing_tolerance
from fdpo.train.tokenizer import byte_tokenizer

from train_setup import small_config, write_data

VOCAB = 300
COMMON = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 256,
          "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
LEAKING = {
    "opt": {"ffn_dim": 128, "word_embed_proj_dim": 64},
    "bloom": {"n_layer": 2, "n_head": 4},
    "mamba": {"state_size": 8},
    "falcon_h1": {"mamba_d_ssm": 64, "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_state": 16,
                  "mamba_chunk_size": 16, "mamba_n_groups": 1},
}
CLEAN = {
    "llama": {},
    "qwen2": {},
    "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256},
}
EXAMPLES = [PreferenceExample((1, 5, 6), (7, 8, 9, 2), (10, 2)),
            PreferenceExample((1, 11, 12, 13, 14), (15, 2), (16, 17, 18, 19, 2))]


def make_model(model_type: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    extra = {**LEAKING, **CLEAN}[model_type]
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**COMMON, **extra, **overrides}))


@pytest.mark.parametrize("model_type", list(LEAKING))
def test_a_model_that_mixes_packed_sequences_is_refused_at_the_first_packed_call(model_type):
    model = make_model(model_type).train()
    lm = CausalLM(model, backend="torch")
    padded = collate(EXAMPLES, [0, 1], pad_token_id=0)
    packed = collate(EXAMPLES, [0, 1], pad_token_id=0, packed=True)
    lm(padded.input_ids, padded.labels, attention_mask=padded.attention_mask)   # padded: exact, not probed
    with pytest.raises(ValueError, match=rf"not kept apart by this {model_type} model .*Train without --packed"):
        lm(packed.input_ids, packed.labels, position_ids=packed.position_ids, cu_seqlens=packed.cu_seqlens)
    with pytest.raises(ValueError, match="Train without --packed"):    # every packed call, not only the first
        lm.head_inputs(packed.input_ids, position_ids=packed.position_ids, packed=True)
    assert all(module.training for module in model.modules())            # the probe restored the training mode


@pytest.mark.parametrize("model_type", list(LEAKING))
def test_the_probe_sees_the_leak_with_margin(model_type):
    """The leak of each model is at least 10 times the float32 tolerance (the smallest, Falcon-H1's,
    moves the other pairs' log-prob sums by 2.6e-5 only: the probe compares hidden states)."""
    model = make_model(model_type)
    leak, dtype = packing_leak(find_decoder(model), VOCAB, "cpu")
    assert dtype == torch.float32 and leak > 10 * packing_tolerance(dtype)


@pytest.mark.parametrize("model_type", list(CLEAN))
def test_a_model_that_keeps_packed_sequences_apart_gives_the_padded_sums(model_type):
    """Probed once (in train mode with dropout: each module's mode restored), with a leak far below the
    tolerance, then packed sums equal to the padded ones and to the float64 model's own, and the same
    gradients."""
    model = make_model(model_type, **({"resid_pdrop": 0.1} if model_type == "gpt2" else {}))
    reference = copy.deepcopy(model).double().eval()
    model.train()
    (model.transformer.h[0] if model_type == "gpt2" else model.get_decoder().layers[0]).eval()   # a mixed mode
    modes = {name: module.training for name, module in model.named_modules()}
    leak, dtype = packing_leak(find_decoder(model), VOCAB, "cpu")
    assert leak < packing_tolerance(dtype) / 100
    assert {name: module.training for name, module in model.named_modules()} == modes
    model.eval()
    lm = CausalLM(model, backend="torch")
    padded = collate(EXAMPLES, [0, 1], pad_token_id=0)
    packed = collate(EXAMPLES, [0, 1], pad_token_id=0, packed=True)
    got_packed = lm(packed.input_ids, packed.labels, position_ids=packed.position_ids, cu_seqlens=packed.cu_seqlens)
    assert lm.packing_checked
    got_padded = lm(padded.input_ids, padded.labels, attention_mask=padded.attention_mask, per_sequence=True)
    logits = reference(input_ids=padded.input_ids, attention_mask=padded.attention_mask).logits
    want = (torch.log_softmax(logits, -1).gather(-1, padded.labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            * (padded.labels != -100)).sum(-1)
    torch.testing.assert_close(got_packed.double(), want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got_packed, got_padded, rtol=1e-5, atol=1e-5)
    got_packed.sum().backward()
    packed_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    lm(padded.input_ids, padded.labels, attention_mask=padded.attention_mask, per_sequence=True).sum().backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(packed_grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_trainer_refuses_a_packed_run_of_a_model_that_mixes_the_sequences(tmp_path):
    """--packed on OPT: refused at the first step (the reference's first packed call), before any update;
    the same model trains padded."""
    data = write_data(tmp_path, train=16, evaluation=8)
    model = make_model("opt", vocab_size=259, pad_token_id=256, bos_token_id=257, eos_token_id=258)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = Trainer(small_config(data, tmp_path / "packed", max_steps=1, packed=True), model=model,
                      tokenizer=byte_tokenizer())
    with pytest.raises(ValueError, match=r"this opt model \(OPTForCausalLM\).*Train without --packed"):
        trainer.train_step()
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    padded = Trainer(small_config(data, tmp_path / "padded", max_steps=1), model=model, tokenizer=byte_tokenizer())
    assert torch.isfinite(torch.tensor(padded.train_step()["loss"]))


def test_the_probe_runs_once_without_autocast(monkeypatch):
    """Under bfloat16 autocast the probe of a float32 model runs in float32 (autocast off), so it still
    refuses BLOOM and Falcon-H1, whose leaks (1e-3 to 2e-2) are below 8 bfloat16 units; a clean model
    passes, and after a pass later packed calls do not probe again."""
    import fdpo.train.adapter as adapter

    calls = []

    def counted(*args, **kwargs):
        calls.append(torch.is_autocast_enabled("cpu"))
        return packing_leak(*args, **kwargs)

    monkeypatch.setattr(adapter, "packing_leak", counted)
    packed = collate(EXAMPLES, [0, 1], pad_token_id=0, packed=True)
    inputs = {"position_ids": packed.position_ids, "cu_seqlens": packed.cu_seqlens}
    lm = CausalLM(make_model("llama"), backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lm(packed.input_ids, packed.labels, **inputs)
        lm(packed.input_ids, packed.labels, **inputs)
        for family in ("bloom", "falcon_h1"):
            with pytest.raises(ValueError, match=f"this {family} model"):
                CausalLM(make_model(family), backend="torch")(packed.input_ids, packed.labels, **inputs)
    assert calls == [True, True, True]
