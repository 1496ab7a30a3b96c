"""The trainer's models: the built-in tiny Llama, or a transformers model loaded by name or path.

A name that is neither a local directory nor in the local Hugging Face cache fails at once, in
one line, when the Hub cannot be reached, instead of retrying for most of a minute and ending
in a traceback about files the user never asked for.
"""

import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from .adapter import unwrap
from .config import BUILTIN_MODEL, TrainConfig
from .tokenizer import VOCAB_SIZE, byte_tokenizer


def tiny_llama(seed: int = 0, vocab_size: int = VOCAB_SIZE) -> nn.Module:
    """The built-in model: a 2-layer Llama of width 64 with random weights (about 0.1 M parameters)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=257, eos_token_id=258, pad_token_id=256)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


# Entries of a transformers configuration that do not change the function the model computes: the
# version that wrote it, generation's cache, the dtype it is stored in (loaded in float32 anyway), its
# own name or path and class list, the attention kernel, what the forward returns, the init scale,
# and the special token ids (generation's; the tokenizer's ids are what the trainer uses).
NON_FUNCTIONAL_CONFIG = frozenset({
    "transformers_version", "use_cache", "dtype", "torch_dtype", "_name_or_path", "name_or_path", "_commit_hash",
    "architectures", "attn_implementation", "_attn_implementation", "_attn_implementation_autoset",
    "output_attentions", "output_hidden_states", "return_dict", "use_return_dict", "initializer_range",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
})


def flat_entries(entries: dict, prefix: str = "") -> dict:
    """A configuration dict with its nested dicts (rope parameters, sub-configurations) flattened into
    dotted names ('rope_parameters.rope_theta'), less NON_FUNCTIONAL_CONFIG's and private entries."""
    flat = {}
    for name, value in entries.items():
        name = str(name)
        if name in NON_FUNCTIONAL_CONFIG or name.startswith("_"):
            continue
        if isinstance(value, dict):
            flat.update(flat_entries(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def as_json(entries: dict) -> dict:
    """entries as JSON reads them back (tuples become lists, other values their str): what run.json holds."""
    return json.loads(json.dumps(entries, sort_keys=True, default=str))


def differing_entries(config, default=None) -> dict:
    """The entries of a transformers configuration that differ from `default`'s, less NON_FUNCTIONAL_CONFIG's
    and private entries, flattened (`flat_entries`) and passed through JSON.

    `default` is the configuration whose entries count as defaults; when it is None or of another class,
    `type(config)()`: the class's defaults. A configuration class that cannot be built without arguments
    is compared through `to_diff_dict`. Each nested sub-configuration (a composite model's text_config,
    vision_config) is compared in the same way, recursively, with the default's sub-configuration of that
    name, and its entries are named '<name>.<entry>': a Llava configuration with a Mistral text_config is
    compared with MistralConfig's defaults, not with those of the Llama text_config that the Llava class
    builds by default (a field that a transformers version adds to MistralConfig with its default would
    otherwise be an entry). A sub-configuration of another class than the default's records its model_type.
    """
    from transformers import PretrainedConfig

    if default is None or type(default) is not type(config):
        try:
            default = type(config)()
        except Exception:  # a configuration class that needs arguments (sub-configurations, required fields)
            default = None
    if default is None:
        defaults, entries = {}, as_json(flat_entries(config.to_diff_dict()))
    else:
        defaults, entries = as_json(flat_entries(default.to_dict())), as_json(flat_entries(config.to_dict()))
    sub_configs = {name: value for name, value in vars(config).items()
                   if isinstance(value, PretrainedConfig) and not name.startswith("_")}
    differ = {name: value for name, value in entries.items() if name.split(".")[0] not in sub_configs
              and (name not in defaults or defaults[name] != value)}
    for name, sub_config in sub_configs.items():
        entries_of_sub = differing_entries(sub_config, getattr(default, name, None))
        differ.update({f"{name}.{entry}": value for entry, value in entries_of_sub.items()})
        model_type = f"{name}.model_type"
        if model_type in entries and defaults.get(model_type) != entries[model_type]:
            differ[model_type] = entries[model_type]
    return differ


def model_config(model: nn.Module) -> dict | None:
    """The entries of the model's transformers configuration that differ from its class's defaults
    (`differing_entries`), as JSON reads them back, so that the copy a run records in run.json compares
    equal to it; None for a model without one.

    Two models of the same weights but another rope base, norm epsilon, dropout or head split
    compute other functions: no parameter records these. Entries equal to the class's own defaults
    (a sub-configuration's: its own class's) are left out, so a transformers version that adds a
    field with its default changes nothing.
    """
    config = getattr(unwrap(model), "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return None
    return differing_entries(config)


def hub_endpoint() -> str:
    """The Hugging Face Hub address transformers downloads from."""
    from huggingface_hub import constants

    return constants.ENDPOINT


def hub_reachable(timeout: float = 5.0) -> bool:
    """Whether a TCP connection to the Hub opens within `timeout` seconds (False in offline mode)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("TRANSFORMERS_OFFLINE") == "1":
        return False
    url = urlparse(hub_endpoint())
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                      timeout=timeout):
            return True
    except OSError:
        return False


def from_pretrained(loader, name: str, what: str, **kwargs):
    """`loader.from_pretrained(name, **kwargs)`, with one-line ValueErrors instead of transformers' tracebacks.

    A name that is not a local path is looked up in the local cache only when the Hub is
    unreachable (no retries); `what` ("model", "tokenizer") starts the messages.
    """
    local = Path(name).exists()
    offline = not local and not hub_reachable()
    if offline:
        kwargs["local_files_only"] = True
        if "adapter_kwargs" in kwargs:  # transformers' probe for a PEFT adapter has its own switch
            kwargs["adapter_kwargs"] = {**kwargs["adapter_kwargs"], "local_files_only": True}
    try:
        return loader.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as error:
        if offline:
            raise ValueError(f"cannot load {what} {name!r}: no such path, not in the local Hugging Face cache, and "
                             f"the Hub ({hub_endpoint()}) is unreachable") from None
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"cannot load {what} {name!r}: {reason}") from None


def builtin_tokenizer():
    """The built-in model's tokenizer: the byte tokenizer, starting every text with its bos token as a
    Llama tokenizer does (the tiny Llama is trained with bos before each prompt)."""
    from tokenizers import processors

    tokenizer = byte_tokenizer()
    bos = tokenizer.bos_token
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.bos_token_id)])
    return tokenizer


def load_model_and_tokenizer(config: TrainConfig) -> tuple[nn.Module, object]:
    """The policy model and its tokenizer: the built-in tiny Llama, or `from_pretrained(config.model)`.

    A model is loaded in float32 whatever dtype it is stored in: these are the master weights that
    AdamW updates (with float32 moments). A bf16-stored model trained in bf16 would round most small
    updates away; the bf16 compute comes from autocast (config.bf16, on GPU).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if config.model == BUILTIN_MODEL:
        model = tiny_llama(config.seed)
        tokenizer = (from_pretrained(AutoTokenizer, config.tokenizer, "tokenizer") if config.tokenizer
                     else builtin_tokenizer())
    else:
        model = from_pretrained(AutoModelForCausalLM, config.model, "model", dtype=torch.float32,
                                adapter_kwargs={})
        tokenizer = from_pretrained(AutoTokenizer, config.tokenizer or config.model, "tokenizer")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in the backward (transformers 5's name, or 4.x's)."""
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
