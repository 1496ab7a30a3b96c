"""The LM head's logit options of a Hugging Face transformers config, without TRL.

A transformers causal LM computes its logits as z = capped(scale (h W^T + b)) with a logit scale and a
soft cap that its config states under several names; fdpo's heads take them as `logit_scale` (before
the cap) and `softcap` (docs/math.md 0, 13). Both fdpo's trainer (`fdpo.train.CausalLM`) and its TRL
integration (`fdpo.integrations.trl.add_fused_lm_head`) read them here. Multimodal models keep them
in their text config (`config.get_text_config()`: PaliGemma 2's soft cap, Granite Vision's and
HyperCLOVA X Vision's `logits_scaling`, Muse's `output_multiplier`), which is the one read.
"""

from typing import Any


def text_config(config: Any) -> Any:
    """The config of a model's language model: `config.get_text_config()`, or `config` itself."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def logit_scale(config: Any) -> float:
    """The factor a model's config applies to h W^T + b before the soft cap (1.0 when it applies none).

    `config` is a transformers config (its text config is read). The conventions, first found wins:
    `logit_scale` (Cohere; None on MPT means unscaled), `output_multiplier`, `lm_head_multiplier`
    (Falcon-H1) multiply; `logits_scaling` divides (Granite, MiniCPM3), except on HyperCLOVA X
    (model_type "hyperclovax"), which multiplies by it.
    """
    text = text_config(config)
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(text, name, None)
        if value is not None:
            return float(value)
    scaling = getattr(text, "logits_scaling", None)
    if scaling is None:
        return 1.0
    return float(scaling) if getattr(text, "model_type", None) == "hyperclovax" else 1.0 / float(scaling)


def final_logit_softcap(config: Any) -> float | None:
    """The soft cap c (c tanh(x / c), after the logit scale) of a model's config: its text config's
    `final_logit_softcapping` (Gemma 2 and 3, PaliGemma 2, ...), None for none."""
    return getattr(text_config(config), "final_logit_softcapping", None)


def unsupported_logit_options(config: Any, head_rows: int | None = None) -> list[str]:
    """The settings of a model's (text) config that change its logits in a way `logit_scale` and
    `final_logit_softcap` do not read, each as "name=value (what the model does)"; empty when there
    is none. Known in transformers: RecurrentGemma's `logits_soft_cap` and xLSTM's
    `output_logit_soft_cap` (soft caps under other names), Inkling's `logits_mup_width_multiplier`
    (divides the hidden states) and an `unpadded_vocab_size` below `head_rows`, the LM head's row
    count (Inkling drops the padded rows' logits), and an MPT `logit_scale`, which transformers' MPT
    does not apply although `logit_scale` would.
    """
    found = []
    text = text_config(config)
    for config_ in (config,) if text is config else (config, text):
        model_type = getattr(config_, "model_type", None)
        for name in ("logits_soft_cap", "output_logit_soft_cap"):
            value = getattr(config_, name, None)
            if value is not None:
                found.append(f"{name}={value!r} ({model_type} soft-caps the logits by it)")
        multiplier = getattr(config_, "logits_mup_width_multiplier", None)
        if isinstance(multiplier, (int, float)) and multiplier != 1:
            found.append(f"logits_mup_width_multiplier={multiplier!r} ({model_type} divides the hidden states by it)")
        unpadded = getattr(config_, "unpadded_vocab_size", None)
        if isinstance(unpadded, int) and head_rows is not None and unpadded < head_rows:
            found.append(f"unpadded_vocab_size={unpadded} below the head's {head_rows} rows ({model_type} drops "
                         "the logits of the padded rows)")
        if model_type == "mpt" and getattr(config_, "logit_scale", None) is not None:
            found.append(f"logit_scale={config_.logit_scale!r} (transformers' mpt does not apply it)")
    return list(dict.fromkeys(found))


def check_logit_options(config: Any, head_rows: int | None = None) -> None:
    """ValueError naming each setting of `unsupported_logit_options(config, head_rows)`: with one, a fused
    head built from `logit_scale` and `final_logit_softcap` would score other log-probs than the model."""
    unsupported = unsupported_logit_options(config, head_rows)
    if unsupported:
        raise ValueError(f"{type(config).__name__} sets the logits in a way fdpo's fused head does not reproduce: "
                         f"{'; '.join(unsupported)}; it would score other log-probs than the model computes")
