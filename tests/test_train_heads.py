"""The trainer's head against the own logits of every model family whose config scales or caps them.

Each family's tiny random-weight model is built from a config (nothing is downloaded), with a
vocabulary of 300 (more than one vocabulary tile) and large weights where a soft cap should bend the
logits visibly. The reference is the model itself in float64: log_softmax of `model(input_ids).logits`,
gathered at the labels, and the gradients of its sum (tests/test_train_adapter.py does the same for
models whose logits are the plain h W^T + b). The settings (`fdpo.integrations.hf_logits`): Falcon-H1's
`lm_head_multiplier`, Granite's and MiniCPM3's `logits_scaling` (divided), HyperCLOVA X's (multiplied),
Cohere's `logit_scale`, Muse Glimmer's `output_multiplier` (before its soft cap), the soft caps of
Gemma 2 and 3, and of PaliGemma 2, which keeps it in its Gemma 2 text config.
"""

import copy
import warnings

import pytest
import torch
import transformers as tf
from model_reference import assert_matches_the_models_own, batch, model_logits

from fdpo.integrations.hf_logits import logit_scale, unsupported_logit_options
from fdpo.train import CausalLM
from fdpo.train.adapter import head_options
from fdpo.train.objective import PreferenceModel

VOCAB = 300
COMMON = {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
SMALL = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2}


def paligemma() -> torch.nn.Module:
    """PaliGemma 2: a Gemma 2 text config with a soft cap of 2, which the top-level config does not hold."""
    text = tf.Gemma2Config(**SMALL, **COMMON, head_dim=12, final_logit_softcapping=2.0, initializer_range=0.5)
    vision = tf.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   image_size=28, patch_size=14)
    config = tf.PaliGemmaConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=48,
                                image_token_index=VOCAB - 1)
    assert getattr(config, "final_logit_softcapping", None) is None
    assert config.get_text_config().final_logit_softcapping == 2.0
    return tf.PaliGemmaForConditionalGeneration(config)


def muse_glimmer() -> torch.nn.Module:
    """Muse Glimmer: `output_multiplier` (3) before a soft cap of 2, both in its text config."""
    text = tf.MuseGlimmerTextConfig(**SMALL, **COMMON, head_dim=12, final_logit_softcapping=2.0, output_multiplier=3.0,
                                    sliding_window=8)
    vision = tf.MuseGlimmerVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, out_hidden_size=48)
    return tf.MuseGlimmerForConditionalGeneration(tf.MuseGlimmerConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), image_token_id=VOCAB - 1,
        video_token_id=VOCAB - 2, out_hidden_size=48, projector_hidden_size=32))


# family -> (builder, the fused head's logit_scale, its softcap)
MODELS = {
    "falcon_h1": (lambda: tf.FalconH1ForCausalLM(tf.FalconH1Config(
        **SMALL, **COMMON, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_n_groups=1, mamba_d_state=8,
        mamba_chunk_size=8, lm_head_multiplier=0.25)), 0.25, None),
    "granite": (lambda: tf.GraniteForCausalLM(tf.GraniteConfig(**SMALL, **COMMON, logits_scaling=4.0)), 0.25, None),
    "granitemoe": (lambda: tf.GraniteMoeForCausalLM(tf.GraniteMoeConfig(
        **SMALL, **COMMON, logits_scaling=4.0, num_local_experts=2, num_experts_per_tok=1,
        experts_implementation="eager")), 0.25, None),  # grouped_mm has no float64
    "minicpm3": (lambda: tf.MiniCPM3ForCausalLM(tf.MiniCPM3Config(
        **{**SMALL, "num_key_value_heads": 4}, **COMMON, kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8,
        qk_rope_head_dim=4, v_head_dim=12, dim_model_base=12)), 0.25, None),
    "hyperclovax": (lambda: tf.HyperCLOVAXForCausalLM(tf.HyperCLOVAXConfig(**SMALL, **COMMON, logits_scaling=4.0)),
                    4.0, None),
    "cohere": (lambda: tf.CohereForCausalLM(tf.CohereConfig(**SMALL, **COMMON, logit_scale=0.5)), 0.5, None),
    "cohere2": (lambda: tf.Cohere2ForCausalLM(tf.Cohere2Config(**SMALL, **COMMON, logit_scale=0.5)), 0.5, None),
    "gemma2": (lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(
        **SMALL, **COMMON, head_dim=12, final_logit_softcapping=2.0, initializer_range=0.5)), 1.0, 2.0),
    "gemma3": (lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
        **SMALL, **COMMON, head_dim=12, final_logit_softcapping=2.0, initializer_range=0.5)), 1.0, 2.0),
    "paligemma": (paligemma, 1.0, 2.0),
    "muse_glimmer": (muse_glimmer, 3.0, 2.0),
}


def make_model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = MODELS[family][0]().eval()
    _, scale, softcap = MODELS[family]
    if softcap is not None:
        # Scaled logits of several units, so that the soft cap of 2 bends them.
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(20 / scale)
    return model


@pytest.mark.parametrize("family", sorted(MODELS))
def test_head_options_are_the_models_own(family):
    _, scale, softcap = MODELS[family]
    lm = CausalLM(make_model(family), backend="torch")
    assert lm.options == {"logit_scale": pytest.approx(scale), "softcap": softcap}
    head = lm.head()
    assert (head.logit_scale, head.softcap, head.temperature) == (pytest.approx(scale), softcap, 1.0)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("family", sorted(MODELS))
def test_logprobs_and_gradients_match_the_models_own_logits(device, family, backend):
    """Trainer log-probs and their gradients against the model's own, in float64 (the model on `device`)."""
    assert_matches_the_models_own(make_model(family), VOCAB, backend, device, top=2, scaled_atol=True)


@pytest.mark.parametrize("family", ["falcon_h1", "paligemma", "muse_glimmer"])
def test_statistics_kl_uses_the_reference_heads_own_scale_and_cap(family):
    """The evaluation statistics' KL(reference || policy) and entropy through the reference head's own
    logit scale and soft cap, against both models' own logits (a reference with other weights)."""
    policy, ref = make_model(family), make_model(family)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids, labels, mask = batch(VOCAB, 3, top=2)
    rows = ids.shape[0]
    policy_lm, ref_lm = CausalLM(policy, backend="torch"), CausalLM(ref, backend="torch")
    ref_hidden, ref_head = ref_lm.head_inputs(ids, attention_mask=mask)
    module = PreferenceModel(policy_lm, torch.nn.Identity())
    hidden, head = policy_lm.head_inputs(ids, attention_mask=mask)
    stats = module._statistics(hidden, labels, head, None, rows, {"ref_hidden": ref_hidden, "ref_head": ref_head})
    with torch.no_grad():
        lp = torch.log_softmax(model_logits(copy.deepcopy(policy).double(), ids, mask), -1)
        lq = torch.log_softmax(model_logits(copy.deepcopy(ref).double(), ids, mask), -1)
    scored = labels != -100
    kl = (lq.exp() * (lq - lp)).sum(-1)[scored].sum()
    entropy = -(lp.exp() * lp).sum(-1)[scored].sum()
    torch.testing.assert_close(stats["kl_sum"].double(), kl, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stats["entropy_sum"].double(), entropy, rtol=1e-4, atol=1e-4)


def test_logit_scale_conventions_of_the_text_config():
    """The scale is read from the text config, with each family's convention (multiply or divide)."""
    assert logit_scale(tf.HyperCLOVAXConfig(logits_scaling=4.0)) == 4.0
    assert logit_scale(tf.GraniteConfig(logits_scaling=4.0)) == 0.25
    assert logit_scale(tf.FalconH1Config(lm_head_multiplier=0.5)) == 0.5
    assert logit_scale(tf.CohereConfig(logit_scale=0.0625)) == 0.0625
    vision_text = tf.HyperCLOVAXVisionV2Config(text_config={"model_type": "hyperclovax", "logits_scaling": 8.0})
    assert logit_scale(vision_text) == 8.0
    assert head_options(tf.LlamaConfig()) == {"logit_scale": 1.0, "softcap": None}


@pytest.mark.parametrize(("config", "setting"), [
    (lambda: tf.RecurrentGemmaConfig(logits_soft_cap=30.0), "logits_soft_cap=30.0"),
    (lambda: tf.xLSTMConfig(output_logit_soft_cap=30.0), "output_logit_soft_cap=30.0"),
    (lambda: tf.InklingTextConfig(logits_mup_width_multiplier=24.0), "logits_mup_width_multiplier=24.0"),
    (lambda: tf.MptConfig(logit_scale=0.5), "logit_scale=0.5"),
])
def test_settings_the_head_cannot_reproduce_are_refused(config, setting):
    with pytest.raises(ValueError, match=setting.replace(".", r"\.")):
        head_options(config())


def test_an_unpadded_vocabulary_below_the_heads_rows_is_refused():
    config = tf.InklingTextConfig(logits_mup_width_multiplier=1.0, vocab_size=512, unpadded_vocab_size=500)
    assert unsupported_logit_options(config) == []          # the head's rows unknown: nothing to compare
    with pytest.raises(ValueError, match="unpadded_vocab_size=500"):
        head_options(config, head_rows=512)
    assert head_options(config, head_rows=500) == {"logit_scale": 1.0, "softcap": None}


def test_a_recurrent_gemma_model_is_refused_at_construction():
    torch.manual_seed(0)
    model = tf.RecurrentGemmaForCausalLM(tf.RecurrentGemmaConfig(
        num_hidden_layers=2, vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=2,
        num_key_value_heads=1, lru_width=32, attention_window_size=8, block_types=["recurrent", "attention"]))
    with pytest.raises(ValueError, match="logits_soft_cap"):
        CausalLM(model, backend="torch")
