"""TRL's fused LM head protocol on fdpo's kernels: `model(..., labels=..., fused_lm_head=True)`.

`add_fused_lm_head` has the signature and output (`trl.trainer.utils.FusedCausalLMOutput`) of TRL's
own, plus `backend`; `install()` rebinds the name `add_fused_lm_head` in TRL's modules, so that the
trainers, which import it by name and call it on their models in `__init__`, patch them with this
one, and rebinds `_chunked_divergence_loss` in `trl.trainer.distillation_trainer` (the
DistillationTrainer's loss, by its module-level name) to fdpo's generalized JSD
(`fdpo.integrations.trl.distill`); `uninstall()` restores TRL's functions.
"""

import contextlib
import functools
import math
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
import transformers
import trl.trainer.utils as trl_utils
from packaging.version import Version
from trl.trainer.utils import FusedCausalLMOutput, maybe_gather_lm_head_ctx

from ...backends import check_backend_name
from ...token_stats import token_statistics
from ..hf_logits import check_logit_options, final_logit_softcap, logit_scale
from .distill import TRL_CHUNKED_DIVERGENCE_LOSS, chunked_divergence_loss
from .fsdp import full_parameter

# The per-token fields of FusedCausalLMOutput, in TRL's names, and fdpo's names of the same statistics.
OUTPUTS = {"log_probs": "logprob", "entropy": "entropy", "mean_logits": "mean_logits", "is_top1": "is_top1",
           "log_sum_sq_probs": "log_sum_sq_probs"}
IGNORE_INDEX = -100
# TRL's own `add_fused_lm_head`, as imported before any `install()`.
TRL_ADD_FUSED_LM_HEAD = trl_utils.add_fused_lm_head


@dataclass(frozen=True)
class HeadSettings:
    """How a patched model turns its final hidden states into statistics.

    temperature divides the logits after the soft cap `softcap` (None: none) and the scale `scale`;
    cast_fp32 forms the head's products in float32, under autocast too (`compute_dtype`); outputs:
    TRL's names of the per-token fields computed; backend: an fdpo backend name.
    """

    temperature: float
    softcap: float | None
    scale: float
    cast_fp32: bool
    outputs: tuple[str, ...]
    backend: str

    @property
    def compute_dtype(self) -> torch.dtype | None:
        """The heads' `fdpo.LMHead.compute_dtype`: float32 with cast_fp32, else None (an active autocast's
        dtype, else the hidden states' and the head's own)."""
        return torch.float32 if self.cast_fp32 else None


@dataclass(frozen=True)
class HeadCall:
    """The shifted hidden states [B, T, D] and labels [B, T] of one fused forward, with the head to apply.

    weight [V, D] and bias [V] (or None) are the full head (DTensors gathered); `gather()` is the
    context manager that holds a ZeRO-3 partitioned head gathered (a null context otherwise);
    aux_loss: the MoE load-balancing loss (scalar) when the backbone returned router logits, else None.
    """

    hidden: torch.Tensor
    labels: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    settings: HeadSettings
    gather: Callable[[], Any]
    aux_loss: torch.Tensor | None = None

    def statistics(self, outputs: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """`fdpo.token_statistics` of these tokens (one vocabulary pass); `outputs` in TRL's names, the
        result keyed by them."""
        s = self.settings
        stats = token_statistics(self.hidden, self.weight, self.labels, outputs=tuple(OUTPUTS[o] for o in outputs),
                                 bias=self.bias, softcap=s.softcap, temperature=s.temperature, logit_scale=s.scale,
                                 ignore_index=IGNORE_INDEX, backend=s.backend, gather=self.gather,
                                 compute_dtype=s.compute_dtype)
        return {name: stats[OUTPUTS[name]] for name in outputs}


def check_settings(temperature: float, outputs: tuple[str, ...], backend: str) -> None:
    """Raise ValueError / TypeError for a temperature, outputs or backend add_fused_lm_head cannot use."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not (0 < temperature < math.inf):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    if isinstance(outputs, str) or not all(isinstance(o, str) for o in outputs):
        raise TypeError(f"outputs must be a tuple of field names, got {outputs!r}")
    unknown = [o for o in outputs if o not in OUTPUTS]
    if unknown:
        raise ValueError(f"outputs must be among {tuple(OUTPUTS)}, got {unknown}")
    check_backend_name(backend)


def left_pad(labels: torch.Tensor, length: int) -> torch.Tensor:
    """shift_labels [B, T'] left-padded with -100 to [B, length].

    Prompt-learning PEFT (prompt tuning, p-tuning) prepends virtual tokens to the inputs and -100 to
    `labels`, but not to `shift_labels`: their positions are not scored.
    """
    missing = length - labels.shape[-1]
    if missing < 0:
        raise ValueError(f"labels have {labels.shape[-1]} positions but the hidden states only {length}")
    return labels if missing == 0 else torch.nn.functional.pad(labels, (missing, 0), value=IGNORE_INDEX)


def router_aux_loss(model: torch.nn.Module, text_config: Any, router_logits: Any,
                    attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The MoE load-balancing loss of transformers' Mixtral (every MoE family's) from the router logits."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    num_experts = getattr(text_config, "num_experts", None) or getattr(text_config, "num_local_experts", None) \
        or model.num_experts
    top_k = getattr(text_config, "num_experts_per_tok", None) or model.num_experts_per_tok
    return load_balancing_loss_func(router_logits, num_experts, top_k, attention_mask)


def add_fused_lm_head(
    model: torch.nn.Module,
    temperature: float = 1.0,
    cast_lm_head_to_fp32: bool = False,
    outputs: tuple[str, ...] = ("log_probs",),
    backend: str = "auto",
) -> None:
    """Patch `model` so that `model(..., labels=labels, fused_lm_head=True)` runs fdpo's fused head.

    TRL's `add_fused_lm_head` with fdpo's kernels; it also calls `install()`, so trainers built
    afterwards patch their models with this function. The patched forward returns a
    `FusedCausalLMOutput`: float32 [B, T-1] `log_probs` (labels [B, T] are shifted; pre-shifted
    `shift_labels` [B, T] are not) and, when listed in `outputs`, `entropy` (differentiable),
    `mean_logits`, `log_sum_sq_probs` (constants) and bool `is_top1`, all zero at labels -100; bool
    `label_mask`; `loss` = -sum(log_probs) / `num_items_in_batch` (default: the scored-token count)
    plus the MoE router loss (weight `router_aux_loss_coef`, also returned as `aux_loss`) when the
    model returns router logits. The logits are z = softcap(scale (h W^T + b)) / temperature with the
    config's `final_logit_softcapping` and logit scale (`logit_scale`, from `fdpo.integrations.hf_logits`);
    a config that sets the logits otherwise raises ValueError (`check_logit_options`). Without
    `fused_lm_head=True` the model's original forward runs (generation is unchanged).

    Args:
        model: a transformers causal LM (before PEFT wraps it; a PEFT model's base model).
        temperature: divides the logits. cast_lm_head_to_fp32: the head multiplies in float32, under
            autocast too (`fdpo.LMHead.compute_dtype` float32; the hidden states cast to float32, a
            16-bit weight widened tile by tile, never copied whole).
        outputs: TRL's names of the fields computed, among `OUTPUTS`; log_probs and loss always are.
        backend: fdpo's backend ("auto": triton on CUDA, torch otherwise).

    Like TRL's head (and an nn.Linear lm_head), fdpo's follows autocast: without cast_lm_head_to_fp32,
    a float32 model under bfloat16 autocast has its head's products formed in bfloat16 on the tensor
    cores, the float32 weight and hidden states rounded to bfloat16 tile by tile in registers (no
    bfloat16 copy of the weight), accumulated in float32, gradients returned in float32
    (`fdpo.LMHead.compute_dtype`, docs/math.md 13). Outside autocast it multiplies in the hidden
    states' and the head's own dtype (float32 when they differ).

    Calling it again on a patched model replaces the settings (the original forward is kept).
    The patched forward also takes `fdpo_head_fn`, a callable of the call's `HeadCall` (shifted
    hidden states, labels, the head) whose result it returns instead of the output: fdpo's
    DPOTrainer computes its two-model losses there, inside the model's forward, where DDP's and
    FSDP's hooks run.
    """
    check_settings(temperature, tuple(outputs), backend)
    check_logit_options(model.config, head_rows(model))
    install()
    text_config = model.config.get_text_config()
    settings = HeadSettings(float(temperature), final_logit_softcap(model.config), logit_scale(model.config),
                            bool(cast_lm_head_to_fp32),
                            tuple(dict.fromkeys(("log_probs", *outputs))), backend)
    # On the model, read at every call: `set_head_backend` changes it after TRL's trainers patched it.
    model._fdpo_head_settings = settings
    original_forward = getattr(model, "_fdpo_original_forward", None) or model.forward
    # Before transformers 5, vision-language models expose their language backbone as `model`.
    backbone_name = "base_model"
    if text_config is not model.config and Version(transformers.__version__) < Version("5.0.0"):
        backbone_name = "model"

    # The original signature stays visible (`generate` validates its keyword arguments against it).
    @functools.wraps(type(model).forward)
    def fused_forward(self, *args, fused_lm_head: bool = False, labels: torch.Tensor | None = None,
                      shift_labels: torch.Tensor | None = None, num_items_in_batch: Any = None,
                      fdpo_head_fn: Callable[[HeadCall], Any] | None = None, **kwargs):
        if not fused_lm_head:
            passed = {"labels": labels, "shift_labels": shift_labels, "num_items_in_batch": num_items_in_batch}
            return self._fdpo_original_forward(*args, **kwargs, **{k: v for k, v in passed.items() if v is not None})
        kwargs["use_cache"] = False
        if getattr(text_config, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        # Looked up on every call: FSDP and PEFT replace the backbone and the head after patching.
        backbone_out = getattr(self, backbone_name)(*args, **kwargs)
        aux_loss = None
        if kwargs.get("output_router_logits"):
            aux_loss = router_aux_loss(self, text_config, backbone_out.router_logits, kwargs.get("attention_mask"))
        call = head_call(self, backbone_out.last_hidden_state, labels, shift_labels, self._fdpo_head_settings,
                         aux_loss)
        if fdpo_head_fn is not None:
            return fdpo_head_fn(call)
        return fused_output(call, num_items_in_batch, getattr(text_config, "router_aux_loss_coef", 0.0))

    model.forward = types.MethodType(fused_forward, model)
    model._fdpo_original_forward = original_forward


def set_head_backend(model: torch.nn.Module, backend: str) -> None:
    """Run the head `add_fused_lm_head` installed on `model` on fdpo's `backend`, its other settings
    kept (TRL's trainers install it with the default "auto"). `model` may be the patched model or a
    wrapper of it: DDP, DeepSpeed's engine and FSDP1 (`.module`), PEFT (`get_base_model()`). TypeError
    when no head was installed."""
    check_backend_name(backend)
    patched = patched_model(model)
    patched._fdpo_head_settings = replace(patched._fdpo_head_settings, backend=backend)


def head_rows(model: torch.nn.Module) -> int | None:
    """Rows of `model`'s output embedding: a ZeRO-3 partitioned weight's full shape; None where a wrapper
    keeps only a flat shard (FSDP1), or where the model has no output embedding weight."""
    weight = getattr(model.get_output_embeddings(), "weight", None)
    if weight is None:
        return None
    shape = getattr(weight, "ds_shape", weight.shape)
    return shape[0] if len(shape) == 2 else None


def patched_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model `add_fused_lm_head` patched, `model` itself or the one it wraps (DDP, DeepSpeed's engine and
    FSDP1 through `.module`, PEFT through `get_base_model()`); TypeError when none was patched."""
    patched = model
    # Looked up in the instance's own attributes: FSDP1, DeepSpeed and PEFT pass attribute reads
    # through to the wrapped model, so hasattr would stop at the wrapper (and the setting land there).
    while "_fdpo_head_settings" not in vars(patched):
        inner = getattr(patched, "module", None)
        if not isinstance(inner, torch.nn.Module) and hasattr(patched, "get_base_model"):
            inner = patched.get_base_model()
        if not isinstance(inner, torch.nn.Module) or inner is patched:
            raise TypeError(f"{type(model).__name__} has no fused head of fdpo's: call add_fused_lm_head on it "
                            "first")
        patched = inner
    return patched


def head_call(model: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor | None,
              shift_labels: torch.Tensor | None, settings: HeadSettings,
              aux_loss: torch.Tensor | None = None) -> HeadCall:
    """The HeadCall of final hidden states [B, T, D] with labels [B, T] (shifted here) or shift_labels."""
    if shift_labels is None:
        if labels is None:
            raise ValueError("fused_lm_head=True needs labels (or shift_labels): the head scores only labelled tokens")
        if labels.shape[-1] != hidden.shape[1]:
            # Prompt-learning PEFT pads `labels` itself; any other mismatch would misalign every label.
            raise ValueError(f"labels have {labels.shape[-1]} positions but the hidden states {hidden.shape[1]}: "
                             "they must be the model's input positions")
        hidden, labels = hidden[:, :-1], labels[:, 1:]
    else:
        labels = left_pad(shift_labels, hidden.shape[1])
    head = model.get_output_embeddings()
    weight, bias = head.weight, head.bias
    # FSDP2 shards the head as DTensors; the backbone's output is a plain tensor.
    weight, bias = full_parameter(weight), full_parameter(bias)
    # With `device_map`, the backbone may end on another device than the head.
    hidden, labels = hidden.to(weight.device), labels.to(weight.device)
    if settings.cast_fp32:
        hidden = hidden.float()
    return HeadCall(hidden, labels, weight, bias, settings, functools.partial(maybe_gather_lm_head_ctx, weight, bias),
                    aux_loss)


def fused_output(call: HeadCall, num_items_in_batch: Any, router_aux_loss_coef: float) -> FusedCausalLMOutput:
    """The FusedCausalLMOutput of one call (see `add_fused_lm_head`)."""
    settings = call.settings
    stats = call.statistics(settings.outputs)
    mask = call.labels != IGNORE_INDEX
    log_probs = stats["log_probs"]
    if call.hidden.requires_grad and not log_probs.requires_grad:
        # No scored token: a differentiable zero connected to the model, so that backward() still runs.
        log_probs = log_probs + 0 * (call.hidden.reshape(-1)[:1].sum() + call.weight.reshape(-1)[:1].sum())
    count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    loss = -log_probs.sum() / count
    if call.aux_loss is not None:
        loss = loss + router_aux_loss_coef * call.aux_loss
    is_top1 = stats.get("is_top1")
    return FusedCausalLMOutput(
        loss=loss, log_probs=log_probs, entropy=stats.get("entropy"), log_sum_sq_probs=stats.get("log_sum_sq_probs"),
        mean_logits=stats.get("mean_logits"), is_top1=None if is_top1 is None else is_top1.bool() & mask,
        label_mask=mask, aux_loss=call.aux_loss)


def _trl_modules() -> list[types.ModuleType]:
    # sys.modules.copy(): one C-level copy, where iterating the live dict races with imports on other
    # threads (dataloader workers, tokenizer threads), raising "dictionary changed size during iteration".
    modules = sys.modules.copy()
    return [m for name, m in modules.items() if (name == "trl" or name.startswith("trl.")) and m is not None]


def install() -> None:
    """Make TRL's trainers run on fdpo's kernels (idempotent).

    Rebinds `add_fused_lm_head` in `trl.trainer.utils` (trainer modules imported later take it from
    there) and in every TRL module already imported that holds TRL's function (trl.trainer, the dpo,
    grpo, rloo, kto and sft trainers, ...): TRL's trainers patch their models with fdpo's head.
    Models patched before keep their head. Rebinds `_chunked_divergence_loss` wherever TRL's is
    (trl.trainer.distillation_trainer, which DistillationTrainer and its subclasses call) to
    `fdpo.integrations.trl.distill.chunked_divergence_loss`.
    """
    _rebind("add_fused_lm_head", TRL_ADD_FUSED_LM_HEAD, add_fused_lm_head)
    _rebind("_chunked_divergence_loss", TRL_CHUNKED_DIVERGENCE_LOSS, chunked_divergence_loss)


def uninstall() -> None:
    """Restore TRL's `add_fused_lm_head` and `_chunked_divergence_loss` everywhere `install()` (or a later
    import) put fdpo's."""
    _rebind("add_fused_lm_head", add_fused_lm_head, TRL_ADD_FUSED_LM_HEAD)
    _rebind("_chunked_divergence_loss", chunked_divergence_loss, TRL_CHUNKED_DIVERGENCE_LOSS)


def installed() -> bool:
    """Whether TRL's trainers currently patch their models with fdpo's head."""
    return trl_utils.add_fused_lm_head is add_fused_lm_head


@contextlib.contextmanager
def temporarily_installed() -> Iterator[None]:
    """`install()` for the block only: TRL's functions come back after it (exception or not), unless
    fdpo's were already installed when it began (a user's `install()` stays in force)."""
    was_installed = installed()
    install()
    try:
        yield
    finally:
        if not was_installed:
            uninstall()


def _rebind(name: str, old: Callable, new: Callable) -> None:
    for module in _trl_modules():
        if vars(module).get(name) is old:
            setattr(module, name, new)
