"""nn.Modules over the fused kernels: the LM head, and the pairwise losses' common base."""

import os
import sys
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from .backends import check_backend_name
from .head_stats import head_stats
from .heads import (
    LOGPROBS_ONLY,
    HeadInput,
    HeadStats,
    LMHead,
    StatsRequest,
    check_compute_dtype,
    check_ignore_index,
    check_logit_scales,
    count_pairs,
    scored_tokens,
)
from .losses import PairLossOptions, check_beta
from .options import BackwardOptions
from .outputs import PreferenceLossOutput


class FusedLMHead(nn.Module):
    """An LM head whose forward returns label log-probs instead of logits.

    Holds the weight [V, D] and optional bias [V] (Parameters, or plain tensors that are used as
    given), or, built by `from_linear`, the model's `lm_head` Linear, read at each call:
    calling the head through this module, rather than reading `lm_head.weight` from outside, is
    what lets FSDP gather a sharded weight before the kernels read it. An invalid softcap,
    temperature, backend or backward_buffer_bytes raises at construction.

    logit_scale multiplies the logits, bias included, before the soft cap (`fdpo.LMHead.scale`);
    gather, None or a zero-argument callable returning a context manager, is entered around every
    use of the weight, in the forward and in the backward (`fdpo.LMHead.gather`, DeepSpeed ZeRO-3).
    compute_dtype (torch.float16, torch.bfloat16, torch.float32 or None) is the dtype the logit
    products are formed in (`fdpo.LMHead.compute_dtype`); None follows an active torch.autocast at
    each call, as an nn.Linear does, and otherwise the weight's and hidden states' dtypes.

    deterministic and backward_buffer_bytes pick the triton backend's backward, as in
    `fdpo.token_logprobs` (see `fdpo.options.BackwardOptions`); they are read-only afterwards.

    Example:
        head = FusedLMHead.from_linear(model.lm_head)                 # reads its weight at each call
        seq = head(hidden, labels, per_sequence=True)                  # float32 [B]
        tok = head(hidden, labels)                                     # float32 [B, T]
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        softcap: float | None = None,
        temperature: float = 1.0,
        ignore_index: int = -100,
        backend: str = "auto",
        deterministic: bool = False,
        backward_buffer_bytes: int | None = None,
        logit_scale: float = 1.0,
        gather: Callable[[], AbstractContextManager] | None = None,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        check_logit_scales(softcap, temperature, scale=logit_scale)
        check_ignore_index(ignore_index)
        check_compute_dtype(compute_dtype)
        if gather is not None and not callable(gather):
            raise TypeError("gather must be None or a zero-argument callable returning a context manager, "
                            f"got {type(gather).__name__}")
        check_backend_name(backend)
        backward_options = BackwardOptions(deterministic, backward_buffer_bytes)
        super().__init__()
        # Parameters are registered (and shared with the module they come from); a plain tensor is
        # kept as it is, so gradients flow to it (or through it, when it is computed) unchanged.
        self.weight = weight
        self.bias = bias
        self.softcap = softcap
        self.temperature = temperature
        self.logit_scale = logit_scale
        self.gather = gather
        self.compute_dtype = compute_dtype
        self.ignore_index = ignore_index
        self.backend = backend
        self.backward_options = backward_options
        self.register_load_state_dict_pre_hook(head_state_keys)

    @property
    def deterministic(self) -> bool:
        """Whether the triton backend sums gradients in a fixed order (no atomics)."""
        return self.backward_options.deterministic

    @property
    def backward_buffer_bytes(self) -> int | None:
        """The triton backend's split-backward buffer budget in bytes (None: the default)."""
        return self.backward_options.buffer_bytes

    @classmethod
    def from_linear(cls, linear: nn.Linear, **options) -> "FusedLMHead":
        """A fused head over `linear` (a submodule, state_dict keys "linear.weight" / "linear.bias"),
        whose weight and bias it reads at every call: a Parameter replaced later (load_state_dict with
        assign=True, tie_weights, resize_token_embeddings) or a parametrized weight (weight_norm) is
        used as it is then, and gradients reach `linear`'s Parameters (frozen stays frozen).

        TypeError for anything but a plain nn.Linear (a PEFT adapter layer, a subclass with its own
        forward), whose output fdpo cannot reproduce from weight and bias; a UserWarning for forward
        hooks on it, which fdpo, reading only weight and bias, does not run. PEFT's ModulesToSaveWrapper
        (modules_to_save=["lm_head"]) is read through: the module its forward runs is scored.

        The Linear stays the model's too (a child of both): with FSDP2, shard a module that holds both
        (the root) and not this head or the Linear on their own; the head never runs the Linear's
        forward, so a Linear sharded by itself would be read sharded.
        """
        check_plain_linear("linear", linear)
        return cls.reading(linear, **options)

    @classmethod
    def reading(cls, linear: nn.Linear, **options) -> "FusedLMHead":
        """`from_linear` for a Linear that `check_plain_linear` has passed (under the caller's name for it)."""
        head = cls(linear.weight, linear.bias, **options)
        del head.weight, head.bias
        head.linear = linear
        return head

    def __getattr__(self, name: str):
        # A head from `from_linear` reads weight and bias from its Linear at every access.
        if name in ("weight", "bias") and "linear" in self._modules:
            return getattr(active_linear(self._modules["linear"]), name)
        return super().__getattr__(name)

    def __setattr__(self, name: str, value) -> None:
        # ... and sets them there: `head.weight = Parameter(...)` replaces the Linear's weight.
        if name in ("weight", "bias") and "linear" in self.__dict__.get("_modules", {}):
            setattr(active_linear(self._modules["linear"]), name, value)
        else:
            super().__setattr__(name, value)

    @property
    def spec(self) -> LMHead:
        """The head as the functional API takes it."""
        return LMHead(self.weight, self.bias, self.softcap, self.temperature, scale=self.logit_scale,
                      gather=self.gather, compute_dtype=self.compute_dtype)

    def forward(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor,
        *,
        cu_seqlens: torch.Tensor | None = None,
        per_sequence: bool = False,
        ref_hidden: torch.Tensor | None = None,
        ref_head: "LMHead | FusedLMHead | nn.Linear | torch.Tensor | None" = None,
        entropy: bool = False,
        kl: bool = False,
        eps: float | None = None,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Per-token log-probs (float32, hidden's leading shape) or per-sequence sums.

        per_sequence=False: hidden [..., D], labels [...] -> float32 [...], 0 at ignored tokens.
        per_sequence=True: padded hidden [B, T, D] -> [B], or packed hidden [N, D] with
        cu_seqlens [S + 1] -> [S] (as `fdpo.sequence_logprobs`).

        With a reference (ref_hidden of the same tokens and its ref_head: an `fdpo.LMHead`, a
        FusedLMHead, an nn.Linear or a weight tensor [V, D]; the last two take this head's temperature,
        see `reference_head`), entropy
        or eps, it returns instead the dict of the two-head statistics in the same layout: "logprob",
        and as requested "entropy", "ref_logprob", "kl" (KL(ref || policy)), "logprob_plus",
        "logprob_minus" (see `fdpo.token_kl`); one fused pass computes them all.
        """
        if (ref_hidden is None) != (ref_head is None):
            raise ValueError("the reference needs both ref_hidden and its head (ref_weight)")
        ref = None if ref_hidden is None else HeadInput(ref_hidden, reference_head(ref_head, self.spec, self), "ref_")
        stats = head_stats(HeadInput(hidden, self.spec), labels, ref=ref,
                           request=StatsRequest(entropy=entropy, kl=kl, eps=eps), ignore_index=self.ignore_index,
                           cu_seqlens=cu_seqlens, per_sequence=per_sequence, backend=self.backend,
                           backward=self.backward_options)
        if ref is not None or entropy or kl or eps is not None:
            return stats.as_dict()
        return stats.logprob

    def extra_repr(self) -> str:
        # A ZeRO-3 partitioned weight is empty outside its gather; its shape is ds_shape then.
        shape = tuple(getattr(self.weight, "ds_shape", self.weight.shape))
        size = f"vocab={shape[0]}, dim={shape[1]}" if len(shape) == 2 else f"weight shape={shape}"
        return (f"{size}, bias={self.bias is not None}, softcap={self.softcap}, "
                f"temperature={self.temperature}, logit_scale={self.logit_scale}, compute_dtype={self.compute_dtype}, "
                f"backend={self.backend!r}")


def head_state_keys(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook of FusedLMHead: a head's "weight" / "bias" keys load into a head from
    `from_linear` (as those of the Linear it reads: "linear.weight", or in a PEFT wrapper the active
    module's, "linear.modules_to_save.default.weight"), and a head from `from_linear`'s "linear.weight" /
    "linear.bias" into a head that holds its weight itself."""
    linear = module._modules.get("linear")
    if linear is None:
        source, target = prefix + "linear.", prefix
    else:
        active = active_linear(linear)
        inner = next(path for path, child in linear.named_modules() if child is active)
        source, target = prefix, prefix + "linear." + (inner + "." if inner else "")
    for name in ("weight", "bias"):
        if source + name in state_dict and target + name not in state_dict:
            state_dict[target + name] = state_dict.pop(source + name)


def active_linear(module: nn.Module) -> nn.Module:
    """The Linear a head module's forward runs: the module itself, or for a PEFT ModulesToSaveWrapper the
    active adapter's copy (the original with adapters disabled, or when the adapter has no copy)."""
    if wrapped_linears(module) is None:
        return module
    adapters = module.active_adapters
    if module.disable_adapters or not adapters or adapters[0] not in module.modules_to_save:
        return module.original_module
    return module.modules_to_save[adapters[0]]


def is_linear_head(module) -> bool:
    """Whether a head argument is an nn.Linear or a PEFT ModulesToSaveWrapper around Linears."""
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Module) and wrapped_linears(module) is not None)


def wrapped_linears(module: nn.Module) -> list[nn.Module] | None:
    """The modules a PEFT `ModulesToSaveWrapper` (modules_to_save=["lm_head"]) switches between, the original
    and one trained copy per adapter, or None for another module. Its `weight` and `bias` are those of the
    module its forward runs (the active adapter's copy, the original with adapters disabled)."""
    if type(module).__name__ == "ModulesToSaveWrapper" and isinstance(getattr(module, "original_module", None),
                                                                      nn.Module):
        return [module.original_module, *module.modules_to_save.values()]
    return None


def check_plain_linear(name: str, linear: nn.Linear) -> None:
    """Refuse anything but a plain nn.Linear: a subclass with its own forward (a scaled readout such as
    mup's MuReadout, a quantized Linear) or another module (a PEFT LoRA layer, whose `weight` is its
    base layer's): fdpo reads only weight and bias, so it would score another head than the module
    computes. Warn about forward hooks on it (other than the sharding frameworks' own), which fdpo
    does not run either. A PEFT ModulesToSaveWrapper passes when every module it wraps does."""
    wrapped = wrapped_linears(linear)
    if wrapped is not None:
        for index, module in enumerate(wrapped):
            check_plain_linear(f"{name} (module {index} of a {type(linear).__name__})", module)
        return
    if linear is None:
        raise TypeError(f"{name} is None: there is no LM head (an nn.Linear) to score")
    kind = f"{type(linear).__module__}.{type(linear).__name__}"
    if hasattr(linear, "base_layer"):
        raise TypeError(f"{name} must be an nn.Linear, got a {kind}, a PEFT adapter layer on the LM head: fdpo reads "
                        "only weight and bias, which are its base layer's, so the adapter would be skipped; merge it "
                        "into the weight (merge_and_unload()) or leave the LM head out of target_modules")
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"{name} must be an nn.Linear, got a {kind}: fdpo scores a head from its weight and bias")
    if type(linear).forward is not nn.Linear.forward:
        raise TypeError(f"{name} is a {type(linear).__name__}, an nn.Linear with its own forward, which fdpo "
                        "cannot reproduce from weight and bias: pass an fdpo.LMHead or FusedLMHead stating the "
                        "head (logit_scale, softcap, temperature)")
    hooks = [hook for hooks in (linear._forward_pre_hooks, linear._forward_hooks) for hook in hooks.values()
             if not hook_module(hook).startswith(SHARDING_HOOK_MODULES)]
    if hooks:
        names = ", ".join(map(hook_name, hooks))
        warnings.warn(f"{name} has {len(hooks)} forward hook(s) ({names}) that fdpo does not run: it reads only the "
                      "Linear's weight and bias, so a hook that changes the logits is not applied", UserWarning,
                      stacklevel=3)


# Forward hooks of these packages gather or shard a module's parameters; fdpo's heads read the
# parameters inside their own gather (`fdpo.LMHead.gather`), so not running them changes no value.
SHARDING_HOOK_MODULES = ("torch.distributed", "deepspeed")


def hook_module(hook: Callable) -> str:
    """The module a hook (function, bound method or functools.partial of one) was defined in."""
    return getattr(getattr(hook, "func", hook), "__module__", None) or ""


def hook_name(hook: Callable) -> str:
    function = getattr(hook, "func", hook)
    return f"{hook_module(hook)}.{getattr(function, '__qualname__', type(function).__name__)}"


def as_lm_head(name: str, head) -> LMHead:
    """A head argument (FusedLMHead, nn.Linear, LMHead or weight tensor [V, D]) as an `fdpo.LMHead`."""
    if isinstance(head, FusedLMHead):
        return head.spec
    if is_linear_head(head):
        check_plain_linear(name, head)
        return LMHead(head.weight, head.bias)
    if isinstance(head, torch.Tensor):
        return LMHead(head)
    if isinstance(head, LMHead):
        return head
    raise TypeError(f"{name} must be an fdpo.FusedLMHead, an nn.Linear, an fdpo.LMHead or a weight tensor "
                    f"[V, D], got {type(head).__name__}")


def reference_head(ref_head, policy: LMHead, owner: nn.Module) -> LMHead:
    """A reference head argument as an `fdpo.LMHead`: the policy's head `policy` itself for None (the
    default reference); an `fdpo.LMHead` or FusedLMHead with its own settings; an nn.Linear or a weight
    tensor, which carry none, with the policy head's temperature, as the functional API divides both
    heads' logits by one temperature unless told otherwise (`fdpo.token_kl`). Soft cap and logit scale
    are the reference model's own: never taken from the policy. A bare reference beside a policy head
    with a soft cap or a logit scale other than 1 is scored without either: `owner` (the module called)
    warns about it once (`warn_bare_reference`)."""
    if ref_head is None:
        return policy
    spec = as_lm_head("ref_head", ref_head)
    if isinstance(ref_head, torch.Tensor) or is_linear_head(ref_head):
        spec = replace(spec, temperature=policy.temperature)
        warn_bare_reference(owner, policy)
    return spec


def warn_bare_reference(owner: nn.Module, policy: LMHead) -> None:
    """UserWarning, once per `owner`, when a reference given as a bare weight or nn.Linear is scored beside a
    policy head `policy` that caps or scales its logits: the reference gets neither (a Gemma-2 policy capped
    at 30 beside an uncapped reference of the same model is a different loss, with no error)."""
    if (policy.softcap is None and policy.scale == 1.0) or owner.__dict__.get("_warned_bare_reference", False):
        return
    owner.__dict__["_warned_bare_reference"] = True
    warnings.warn(f"{type(owner).__name__}: ref_head is a bare weight or nn.Linear, which carries no head settings: "
                  f"the reference is scored with the policy head's temperature ({policy.temperature:g}) but with no "
                  f"soft cap and a logit scale of 1, while the policy head has softcap={policy.softcap} and "
                  f"logit_scale={policy.scale:g}. If the reference model caps or scales its logits too (e.g. "
                  "Gemma-2's final_logit_softcapping), pass it as fdpo.FusedLMHead.from_linear(ref_model.lm_head, "
                  "softcap=..., logit_scale=..., temperature=...) or an fdpo.LMHead(weight, bias, softcap, "
                  "temperature, scale=...); pass fdpo.LMHead(weight) for an uncapped, unscaled reference on "
                  "purpose. (Warned once per module.)", UserWarning, stacklevel=outside_stacklevel())


def outside_stacklevel() -> int:
    """The `warnings.warn` stacklevel, for a call from the function calling this, of the first frame outside
    fdpo and torch.nn's module machinery: the user's call of the module."""
    inside = tuple(str(Path(path).parent) + os.sep for path in (__file__, nn.modules.__file__))
    frame, level = sys._getframe(2), 2  # level 1: the caller's warnings.warn, level 2: its caller
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


def policy_and_reference(owner: nn.Module, head, ref_head) -> tuple[FusedLMHead, LMHead]:
    """The policy head of a loss module `owner` as a FusedLMHead (`fused_head`, with `owner`'s ignore_index,
    backend and backward_options: a FusedLMHead keeps its own, and must have `owner`'s ignore_index) and its
    reference (`reference_head`; None: the policy's head), the latter a constant: detached where read."""
    module = fused_head("head", head, owner.ignore_index, owner.backend, owner.backward_options)
    return module, reference_head(ref_head, module.spec, owner)


def fused_head(name: str, head, ignore_index: int, backend: str, backward: BackwardOptions) -> FusedLMHead:
    """A head as a FusedLMHead module (called, so that FSDP gathers a sharded weight).

    A FusedLMHead is used as it is (its own backend and backward options); any other head gets
    `backend` and `backward`.
    """
    if isinstance(head, FusedLMHead):
        if head.ignore_index != ignore_index:
            raise ValueError(f"{name}.ignore_index ({head.ignore_index}) must equal the loss's ignore_index "
                             f"({ignore_index})")
        return head
    if is_linear_head(head):
        check_plain_linear(name, head)
        return FusedLMHead.reading(head, ignore_index=ignore_index, backend=backend,
                                   deterministic=backward.deterministic, backward_buffer_bytes=backward.buffer_bytes)
    spec = as_lm_head(name, head)
    return FusedLMHead(spec.weight, spec.bias, softcap=spec.softcap, temperature=spec.temperature,
                       ignore_index=ignore_index, backend=backend, deterministic=backward.deterministic,
                       backward_buffer_bytes=backward.buffer_bytes, logit_scale=spec.scale, gather=spec.gather,
                       compute_dtype=spec.compute_dtype)


class PairwiseHeadLoss(nn.Module):
    """Base of the pairwise losses from final hidden states through fused heads (no logits).

    Layouts of `hidden` (the policy's final hidden states) and `labels` (already shifted) hold 2P
    sequences, the P chosen responses first, then the P rejected ones in the same pair order:
    padded hidden [2P, T, D] / labels [2P, T], or packed hidden [N, D] / labels [N] with cu_seqlens
    [2P + 1]; ignore_index marks the tokens not scored. `pairwise` counts the pairs and computes the
    per-sequence statistics (`statistics`); `sequence_loss` splits them into chosen and rejected and
    completes the output of the subclass' `pair_loss` with the policy sums and the scored-token counts.

    backward_buffer_bytes: the triton backend's split-backward buffer (as in `fdpo.token_logprobs`)
    for policy heads given as an nn.Linear, an `fdpo.LMHead` or a weight tensor; a `fdpo.FusedLMHead`
    keeps its own, as it keeps its own backend.
    """

    # The statistics of the two-head pass beyond the policy and reference label log-probs.
    request = LOGPROBS_ONLY

    def __init__(self, ignore_index: int, backend: str, backward_buffer_bytes: int | None = None) -> None:
        check_ignore_index(ignore_index)
        check_backend_name(backend)
        backward_options = BackwardOptions(buffer_bytes=backward_buffer_bytes)
        super().__init__()
        self.ignore_index, self.backend, self.backward_options = ignore_index, backend, backward_options

    def statistics(self, hidden: torch.Tensor, labels: torch.Tensor, head, *, ref_hidden: torch.Tensor | None,
                   ref_head, cu_seqlens: torch.Tensor | None) -> HeadStats:
        """float32 [2P] per-sequence statistics of policy and reference in one fused pass.

        The policy head is called as a module (FSDP gathers it); the reference head (default: the
        policy's head) and ref_hidden are constants.
        """
        if ref_hidden is None:
            raise ValueError("the two-model losses need the reference model's hidden states (ref_hidden) of the same "
                             "tokens: they use its full next-token distribution, not only its log-prob sums")
        module, frozen = policy_and_reference(self, head, ref_head)
        request = self.request
        return HeadStats(**module(hidden, labels, cu_seqlens=cu_seqlens, per_sequence=True,
                                  ref_hidden=ref_hidden.detach(), ref_head=frozen, entropy=request.entropy,
                                  kl=request.kl, eps=request.eps))

    def pair_loss(self, chosen: HeadStats, rejected: HeadStats, chosen_lengths: torch.Tensor,
                  rejected_lengths: torch.Tensor, **options) -> PreferenceLossOutput:
        """The loss of the P pairs from their statistics and scored-token counts (float32 [P] each)."""
        raise NotImplementedError

    def forward(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor,
        head: "FusedLMHead | nn.Linear | torch.Tensor",
        *,
        ref_hidden: torch.Tensor,
        ref_head: "FusedLMHead | nn.Linear | torch.Tensor | None" = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> PreferenceLossOutput:
        """Loss and metrics of the P pairs of a two-model loss; ref_head defaults to the policy's head."""
        return self.pairwise(hidden, labels, head, cu_seqlens=cu_seqlens,
                             statistics=dict(ref_hidden=ref_hidden, ref_head=ref_head))

    def pairwise(self, hidden: torch.Tensor, labels: torch.Tensor, head, *, cu_seqlens: torch.Tensor | None,
                 statistics: dict, **options) -> PreferenceLossOutput:
        """`pair_loss` of the P pairs of `hidden`, with `statistics` the keyword arguments of `statistics`
        and `options` those of `pair_loss`."""
        num_pairs = count_pairs(hidden, labels, cu_seqlens)
        sums = self.statistics(hidden, labels, head, cu_seqlens=cu_seqlens, **statistics)
        counts = scored_tokens(labels, self.ignore_index, cu_seqlens, per_sequence=True).counts()
        return self.sequence_loss(sums, counts, num_pairs, **options)

    def sequence_loss(self, sums: HeadStats, counts: torch.Tensor, num_pairs: int, **options) -> PreferenceLossOutput:
        """`pair_loss` of `num_pairs` pairs from the per-sequence statistics `sums` and scored-token counts
        `counts` [2P] (P chosen, then P rejected), with the detached policy sums (policy_chosen,
        policy_rejected) and the counts (extras "chosen_lengths", "rejected_lengths") in the output."""
        chosen, rejected = sums.split_pairs(num_pairs)
        chosen_lengths, rejected_lengths = counts[:num_pairs], counts[num_pairs:]
        out = self.pair_loss(chosen, rejected, chosen_lengths, rejected_lengths, **options)
        out.policy_chosen, out.policy_rejected = chosen.logprob.detach(), rejected.logprob.detach()
        out.extras["chosen_lengths"], out.extras["rejected_lengths"] = chosen_lengths, rejected_lengths
        return out


class PreferenceLoss(PairwiseHeadLoss):
    """f-DPO preference loss from final hidden states, through the fused LM head (no logits).

    Hyper-parameters are those of `fdpo.preference_loss` (divergences "reverse_kl", "forward_kl",
    "js", "alpha"; loss shapes "sigmoid", "robust", "hinge", "ipo", "bpo"); invalid values raise
    ValueError here, at construction. `ignore_index` marks the labels that are not scored.

    Layouts of `hidden` (the policy's final hidden states, before the LM head) and `labels`
    (already shifted: labels[..., t] is the token predicted from hidden[..., t, :]):
        padded: hidden [2P, T, D], labels [2P, T]: the P chosen responses, then the P rejected
            ones, in the same pair order;
        packed: hidden [N, D], labels [N], cu_seqlens int [2P + 1] (chosen sequences first).
    Prompt and padding tokens carry ignore_index (-100).

    The head is a `fdpo.FusedLMHead` (preferred: calling the module is what lets FSDP gather a
    sharded weight; its own backend, softcap and temperature apply), an `nn.Linear` (wrapped with
    `FusedLMHead.from_linear`, read at each call), an `fdpo.LMHead`, or a weight tensor [V, D].

    The reference is either `ref_logprobs=(ref_chosen [P], ref_rejected [P])`, precomputed, or
    `ref_hidden` (the reference model's hidden states, same layout) with `ref_head` (default: the
    policy's head), turned into log-prob sums under torch.no_grad by the same fused forward.

    Example (a padded batch, reference model kept frozen next to the policy):

        import torch, fdpo

        loss_fn = fdpo.PreferenceLoss(beta=0.1, divergence="js", loss="sigmoid")
        head = fdpo.FusedLMHead.from_linear(policy.lm_head)        # reads its weight at each call
        ref_head = fdpo.FusedLMHead.from_linear(ref_model.lm_head)

        # input_ids [2P, T+1]: the P chosen prompt+response rows, then the P rejected ones;
        # labels = the next token, -100 on prompt and padding positions.
        labels = input_ids[:, 1:].masked_fill(~response_mask[:, 1:], -100)
        hidden = policy.model(input_ids[:, :-1], attention_mask=mask[:, :-1]).last_hidden_state
        with torch.no_grad():
            ref_hidden = ref_model.model(input_ids[:, :-1], attention_mask=mask[:, :-1]).last_hidden_state

        out = loss_fn(hidden, labels, head, ref_hidden=ref_hidden, ref_head=ref_head)
        out.loss.backward()                    # gradients reach the policy's body and head
        optimizer.step(); optimizer.zero_grad()
        print(out.loss.item(), out.accuracy.item(), out.margins.mean().item())

        # With reference sums precomputed offline (float32 [P] each) instead:
        out = loss_fn(hidden, labels, head, ref_logprobs=(ref_chosen, ref_rejected))

    forward returns a `fdpo.PreferenceLossOutput`: loss (scalar, differentiable), chosen_rewards,
    rejected_rewards, margins [P], accuracy, policy_chosen / policy_rejected [P] (detached sums),
    and extras "chosen_lengths" / "rejected_lengths" [P] (scored-token counts, float32),
    "pair_losses" [P], "clamped" ([P] 0 / 1, `fdpo.losses.clamped_pairs`), and "nll" when the loss
    uses the token counts (ipo or nll_weight > 0).

    backward_buffer_bytes: the triton backend's split-backward buffer for heads that are not a
    `fdpo.FusedLMHead` (see `PairwiseHeadLoss`); the reference's sums need no backward.
    """

    def __init__(
        self,
        beta: float = 0.1,
        divergence: str = "reverse_kl",
        alpha: float = 0.5,
        loss: str = "sigmoid",
        label_smoothing: float = 0.0,
        bpo_lambda: float = -0.5,
        nll_weight: float = 0.0,
        ignore_index: int = -100,
        backend: str = "auto",
        *,
        bpo_min_ratio: float = 0.01,
        bpo_max_ratio: float | None = None,
        backward_buffer_bytes: int | None = None,
    ) -> None:
        options = PairLossOptions(divergence=divergence, alpha=alpha, loss=loss, label_smoothing=label_smoothing,
                                  bpo_lambda=bpo_lambda, nll_weight=nll_weight, bpo_min_ratio=bpo_min_ratio,
                                  bpo_max_ratio=bpo_max_ratio)
        check_beta(beta)
        super().__init__(ignore_index, backend, backward_buffer_bytes)
        self.beta, self.options = beta, options

    def _sums(self, name: str, head, hidden: torch.Tensor, labels: torch.Tensor,
              cu_seqlens: torch.Tensor | None) -> torch.Tensor:
        """Per-sequence log-prob sums of `hidden` through `head` (a module is called, so that FSDP gathers it)."""
        module = fused_head(name, head, self.ignore_index, self.backend, self.backward_options)
        return module(hidden, labels, cu_seqlens=cu_seqlens, per_sequence=True)

    def statistics(self, hidden: torch.Tensor, labels: torch.Tensor, head, *, ref_hidden: torch.Tensor | None,
                   ref_head, cu_seqlens: torch.Tensor | None) -> HeadStats:
        """Policy sums [2P] and, from ref_hidden (the reference's own pass, under no_grad), reference sums;
        a reference given as an nn.Linear or a weight tensor takes the policy head's temperature (and no soft
        cap or logit scale: `reference_head` warns once where the policy head has either)."""
        ref = None
        if ref_hidden is not None:
            with torch.no_grad():
                if ref_head is None:
                    ref = self._sums("head", head, ref_hidden, labels, cu_seqlens)
                else:
                    if not isinstance(ref_head, (FusedLMHead, LMHead)):  # bare: the policy head's temperature
                        ref_head = reference_head(ref_head, as_lm_head("head", head), self)
                    ref = self._sums("ref_head", ref_head, ref_hidden, labels, cu_seqlens)
        return HeadStats(logprob=self._sums("head", head, hidden, labels, cu_seqlens), ref_logprob=ref)

    def pair_loss(self, chosen: HeadStats, rejected: HeadStats, chosen_lengths: torch.Tensor,
                  rejected_lengths: torch.Tensor, *, ref_logprobs: tuple[torch.Tensor, torch.Tensor] | None = None,
                  beta: float | torch.Tensor | None = None) -> PreferenceLossOutput:
        ref_chosen, ref_rejected = ref_logprobs if ref_logprobs is not None else (chosen.ref_logprob,
                                                                                   rejected.ref_logprob)
        uses_counts = self.options.uses_lengths
        return self.options.loss_of(
            chosen.logprob, rejected.logprob, ref_chosen, ref_rejected, beta=self.beta if beta is None else beta,
            chosen_lengths=chosen_lengths if uses_counts else None,
            rejected_lengths=rejected_lengths if uses_counts else None, backend=self.backend)

    def forward(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor,
        head: "FusedLMHead | nn.Linear | LMHead | torch.Tensor",
        *,
        ref_logprobs: tuple[torch.Tensor, torch.Tensor] | None = None,
        ref_hidden: torch.Tensor | None = None,
        ref_head: "FusedLMHead | nn.Linear | LMHead | torch.Tensor | None" = None,
        cu_seqlens: torch.Tensor | None = None,
        beta: float | torch.Tensor | None = None,
    ) -> PreferenceLossOutput:
        """Loss and metrics of the P pairs in `hidden` (see the class docstring for layouts).

        beta, when given (a float or a float32 tensor [P]), replaces the module's beta for this call.
        """
        if ref_logprobs is not None:
            if ref_hidden is not None or ref_head is not None:
                raise ValueError("pass either ref_logprobs or ref_hidden (with an optional ref_head), not both")
            if not isinstance(ref_logprobs, (tuple, list)) or len(ref_logprobs) != 2:
                raise ValueError("ref_logprobs must be a pair (ref_chosen [P], ref_rejected [P])")
        elif ref_hidden is not None:
            if not isinstance(ref_hidden, torch.Tensor) or ref_hidden.shape[:-1] != hidden.shape[:-1]:
                raise ValueError(f"ref_hidden must have hidden's layout {tuple(hidden.shape[:-1])} + (D_ref,), got "
                                 f"{tuple(getattr(ref_hidden, 'shape', ()))}")
        else:
            raise ValueError("the reference is missing: pass ref_logprobs=(ref_chosen, ref_rejected) or ref_hidden "
                             "(with ref_head, default the policy's head)")
        return self.pairwise(hidden, labels, head, cu_seqlens=cu_seqlens,
                             statistics=dict(ref_hidden=ref_hidden, ref_head=ref_head),
                             ref_logprobs=ref_logprobs, beta=beta)

    def extra_repr(self) -> str:
        o = self.options
        return (f"beta={self.beta}, divergence={o.divergence!r}, alpha={o.alpha}, loss={o.loss!r}, "
                f"label_smoothing={o.label_smoothing}, bpo_lambda={o.bpo_lambda}, "
                f"nll_weight={o.nll_weight}, backend={self.backend!r}")
