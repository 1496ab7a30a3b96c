"""TRL's DPOTrainer on fdpo's head, with fdpo's loss types "bpo", "tdpo" and "epsilon_dpo".

- "bpo": the Bregman (SBA) loss of `fdpo.preference_loss` (`bpo_lambda`), on the reward difference
  of any `f_divergence_type`.
- "tdpo": TDPO1 / TDPO2 (`tdpo_variant`, `tdpo_alpha`, `fdpo.TDPOLoss`): the reference backbone
  runs once to its final hidden states, and one fused pass over both heads gives the policy and
  reference log-probs and the per-token KL. reverse_kl only.
- "epsilon_dpo": epsilon-DPO's per-pair beta (`fdpo.EpsilonDPOLoss`, `epsilon`) over the sigmoid
  loss (with `label_smoothing`: cDPO) of any `f_divergence_type`; the controller's beta
  (`trainer.epsilon_dpo`) moves after every optimizer step and is saved with TRL's checkpoints
  (`epsilon_dpo.pt` next to the optimizer state) and restored on resume.

Each of them is the run's only loss type and logs TRL's metrics; for "tdpo" and "epsilon_dpo" the
policy's entropy, mean logits and top-1 flags behind TRL's head metrics come from the loss's own
fused pass (`two_model_loss`). TRL's own loss types run as in TRL, on fdpo's head.
"""

import contextlib
import functools
import os
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
import trl
from accelerate.utils import is_peft_model
from transformers import TrainerCallback
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import FusedCausalLMOutput, use_adapter

from ...epsilon_dpo import EpsilonDPO, EpsilonDPOLoss, check_eps
from ...head_stats import head_stats
from ...heads import TOKEN_CONSTANTS, HeadInput, HeadStats, LMHead, count_pairs, scored_tokens
from ...losses import preference_loss
from ...outputs import PreferenceLossOutput
from ...tdpo import VARIANTS, TDPOLoss, check_tdpo_options
from .head import HeadCall, head_rows, patched_model, set_head_backend, temporarily_installed

FDPO_LOSS_TYPES = ("bpo", "tdpo", "epsilon_dpo")
# The loss types that need the reference's hidden states (its full next-token distributions).
TWO_MODEL_LOSS_TYPES = ("tdpo", "epsilon_dpo")
# TRL's f_divergence_type -> fdpo's divergence (alpha_divergence: see `fdpo_divergence`).
DIVERGENCES = {"reverse_kl": "reverse_kl", "forward_kl": "forward_kl", "js_divergence": "js",
               "alpha_divergence": "alpha"}
CONTROLLER_FILE = "epsilon_dpo.pt"
# fdpo's DPOConfig fields that belong to one loss type: the loss types that use each.
LOSS_SETTINGS = {"bpo_lambda": ("bpo",), "tdpo_variant": ("tdpo",), "tdpo_alpha": ("tdpo",),
                 "epsilon": ("epsilon_dpo",)}


def fdpo_divergence(f_divergence_type: str, f_alpha_divergence_coef: float) -> tuple[str, float]:
    """(divergence, alpha) of `fdpo.preference_loss` for TRL's f-divergence settings.

    TRL's alpha divergence with coefficient a scores (1 - exp(-(1 - a) r)) / (1 - a): fdpo's alpha
    is 1 - a, in (0, 1) for a in (0, 1); a = 1 is the reverse-KL limit, as in TRL.
    """
    if f_divergence_type not in DIVERGENCES:
        raise ValueError(f"f_divergence_type must be one of {tuple(DIVERGENCES)}, got {f_divergence_type!r}")
    if f_divergence_type != "alpha_divergence":
        return DIVERGENCES[f_divergence_type], 0.5
    if abs(f_alpha_divergence_coef - 1.0) < 1e-6:
        return "reverse_kl", 0.5
    if not 0.0 < f_alpha_divergence_coef < 1.0:
        raise ValueError(f"fdpo's loss types take f_alpha_divergence_coef in (0, 1] (fdpo's alpha = 1 - coef must be "
                         f"in [0, 1)), got {f_alpha_divergence_coef}")
    return "alpha", 1.0 - f_alpha_divergence_coef


@dataclass
class DPOConfig(trl.DPOConfig):
    """TRL's DPOConfig; `loss_type` also takes "bpo", "tdpo" and "epsilon_dpo" (one at a time).

    bpo_lambda: BPO's lambda (> -1; -0.5 the paper's setting). tdpo_variant: "tdpo1" | "tdpo2";
    tdpo_alpha: TDPO2's KL weight (> 0). epsilon: epsilon-DPO's step (0, 1); `beta` is its initial
    beta. fdpo_backend: fdpo's backend for the head and the losses ("auto": triton on CUDA, torch
    otherwise). Settings the chosen loss cannot honour raise ValueError here, and so does a loss
    type's own setting (bpo_lambda, tdpo_variant, tdpo_alpha, epsilon) changed from its default where no
    chosen loss type uses it (`LOSS_SETTINGS`; tdpo_alpha: with tdpo_variant "tdpo2" only), rather
    than being silently ignored.
    """

    bpo_lambda: float = field(default=-0.5, metadata={"help": "BPO's lambda (> -1), loss_type='bpo'."})
    tdpo_variant: str = field(default="tdpo2", metadata={"help": "'tdpo1' or 'tdpo2', loss_type='tdpo'."})
    tdpo_alpha: float = field(default=0.5, metadata={"help": "TDPO2's KL weight (> 0), loss_type='tdpo'."})
    epsilon: float = field(default=0.01, metadata={"help": "epsilon-DPO's step in (0, 1), loss_type='epsilon_dpo'."})
    fdpo_backend: str = field(default="auto", metadata={"help": "fdpo's backend: auto, triton, torch or reference."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.refuse_unused_settings()
        chosen = [t for t in self.loss_type if t in FDPO_LOSS_TYPES]
        if not chosen:
            return
        if len(self.loss_type) > 1:
            raise ValueError(f"fdpo's loss type {chosen[0]!r} must be the only loss type, got {self.loss_type}")
        loss_type = chosen[0]
        divergence, _ = fdpo_divergence(self.f_divergence_type, self.f_alpha_divergence_coef)
        if loss_type == "tdpo":
            check_tdpo_options(self.beta, self.tdpo_alpha, self.tdpo_variant, divergence)
        if loss_type == "epsilon_dpo":
            check_eps(self.epsilon)
        if self.tdpo_variant not in VARIANTS:
            raise ValueError(f"tdpo_variant must be one of {VARIANTS}, got {self.tdpo_variant!r}")
        if self.label_smoothing and loss_type != "epsilon_dpo":
            raise ValueError(f"label_smoothing applies to loss_type 'epsilon_dpo' (its sigmoid loss) among fdpo's "
                             f"loss types, not to {loss_type!r}")
        if self.ld_alpha is not None or self.use_weighting:
            raise ValueError(f"ld_alpha and use_weighting are TRL loss options that fdpo's {loss_type!r} does not take")
        if loss_type in TWO_MODEL_LOSS_TYPES and self.precompute_ref_log_probs:
            raise ValueError(f"loss_type {loss_type!r} needs the reference model's hidden states at every step: "
                             "precompute_ref_log_probs=True only keeps its log-prob sums")

    def refuse_unused_settings(self) -> None:
        """ValueError for a loss type's own setting changed from its default while none of `loss_type` (a list:
        TRL combines several) uses it, or for tdpo_alpha changed with TDPO1, which has no KL weight."""
        defaults = {f.name: f.default for f in fields(DPOConfig) if f.name in LOSS_SETTINGS}
        unused = [f"{name}={getattr(self, name)!r} (loss_type {' / '.join(map(repr, users))} only; default "
                  f"{defaults[name]!r})" for name, users in LOSS_SETTINGS.items()
                  if getattr(self, name) != defaults[name] and not any(t in users for t in self.loss_type)]
        if unused:
            raise ValueError(f"loss_type={self.loss_type} would ignore {', '.join(unused)}: leave each at its default "
                             "or choose the loss type that uses it")
        if self.tdpo_alpha != defaults["tdpo_alpha"] and self.tdpo_variant == "tdpo1":
            raise ValueError(f"tdpo_alpha={self.tdpo_alpha!r} is TDPO2's KL weight; tdpo_variant 'tdpo1' has none (its "
                             "KL term has weight 1) and would ignore it: use tdpo_variant='tdpo2', or leave tdpo_alpha "
                             f"at its default, {defaults['tdpo_alpha']!r}")


class EpsilonDPOCallback(TrainerCallback):
    """Moves epsilon-DPO's beta after every optimizer step (`fdpo.EpsilonDPO.update`)."""

    def __init__(self, controller: EpsilonDPO) -> None:
        self.controller = controller

    def on_step_end(self, args, state, control, **kwargs):
        self.controller.update()


class DPOTrainer(trl.DPOTrainer):
    """TRL's DPOTrainer with fdpo's head on its models and fdpo's loss types.

    It installs fdpo's head (`fdpo.integrations.trl.install`) for its own `__init__` only, where TRL
    patches the policy and the reference: trainers built afterwards get TRL's head again, unless
    `install()` was in force before (it stays so).

    Takes TRL's arguments; `args` is an `fdpo.integrations.trl.DPOConfig` (a TRL DPOConfig runs TRL's
    loss types on fdpo's head). For loss_type "epsilon_dpo", `trainer.epsilon_dpo` is the
    `fdpo.EpsilonDPO` controller. Every fdpo loss type logs TRL's metrics (rewards/*, logps/*,
    entropy, logits/chosen, logits/rejected, mean_token_accuracy, as TRL reduces them), rewards/* as
    TRL defines them for every loss type and divergence: beta (policy - reference) log-prob sums, with
    each pair's beta for epsilon_dpo. Beyond them: "kl/chosen", "kl/rejected" (tdpo: summed
    KL(ref || policy) per response), "tdpo/rewards/*" (chosen, rejected, accuracies, margins of TDPO's
    own rewards, beta ((policy - reference) + KL sum)) and "epsilon_dpo/beta".
    """

    def __init__(self, model: Any, ref_model: Any = None, args: trl.DPOConfig | None = None, *more: Any,
                 **kwargs: Any) -> None:
        loss_type = args.loss_type[0] if args is not None and args.loss_type[0] in FDPO_LOSS_TYPES else None
        self.fdpo_loss_type = loss_type
        self.epsilon_dpo = None
        if loss_type is not None and not isinstance(args, DPOConfig):
            raise TypeError(f"loss_type {loss_type!r} needs an fdpo.integrations.trl.DPOConfig (it holds the loss's "
                            f"settings), got a {type(args).__name__}")
        # fdpo's head is installed while TRL's __init__ patches the models (the only place TRL's
        # DPOTrainer calls add_fused_lm_head), not for trainers built afterwards.
        with temporarily_installed():
            if loss_type is None:
                super().__init__(model, ref_model, args, *more, **kwargs)
            else:
                # TRL's __init__ accepts only its own loss types (and limits f-divergences to some of them):
                # it is built with a stand-in that accepts every f-divergence, then given fdpo's loss type back.
                args.loss_type = ["sigmoid"]
                try:
                    super().__init__(model, ref_model, args, *more, **kwargs)
                finally:
                    args.loss_type = [loss_type]
        self._set_head_backend()
        if loss_type is None:
            return
        if loss_type in TWO_MODEL_LOSS_TYPES and self.ref_model is not None:
            check_vocabularies(loss_type, self.model, self.ref_model)
        config = args
        self.loss_types = [loss_type]
        self.divergence, self.alpha = fdpo_divergence(config.f_divergence_type, config.f_alpha_divergence_coef)
        backend = config.fdpo_backend
        if loss_type == "tdpo":
            self.pair_loss_fn = TDPOLoss(beta=config.beta, alpha=config.tdpo_alpha, variant=config.tdpo_variant,
                                         backend=backend)
        elif loss_type == "epsilon_dpo":
            self.epsilon_dpo = EpsilonDPO(beta=config.beta, eps=config.epsilon)
            self.pair_loss_fn = EpsilonDPOLoss(self.epsilon_dpo, divergence=self.divergence, alpha=self.alpha,
                                               label_smoothing=config.label_smoothing, backend=backend)
            self.add_callback(EpsilonDPOCallback(self.epsilon_dpo))

    def _set_head_backend(self) -> None:
        """The heads TRL's __init__ installed (with backend "auto") run on `args.fdpo_backend`, the
        reference's too, where `args` is fdpo's DPOConfig (TRL's has no backend setting)."""
        if not isinstance(self.args, DPOConfig):
            return
        for model in (self.model, self.ref_model):  # set_head_backend finds the patched model inside PEFT
            if model is not None:
                set_head_backend(model, self.args.fdpo_backend)

    def _precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
        """TRL's pass over `dataset` for the reference log-probs (`precompute_ref_log_probs=True`), on
        `args.fdpo_backend`: TRL runs it inside its `__init__`, before `_set_head_backend` could run."""
        self._set_head_backend()
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def _compute_loss(self, model, inputs, return_outputs):
        if self.fdpo_loss_type is None:
            return super()._compute_loss(model, inputs, return_outputs)
        if return_outputs:
            raise ValueError(f"loss_type {self.fdpo_loss_type!r} has no logits to return: evaluate with "
                             "prediction_loss_only=True")
        mode = "train" if self.model.training else "eval"
        model_kwargs = {k: v for k, v in inputs.items() if k not in ("completion_mask", "ref_chosen_logps",
                                                                      "ref_rejected_logps")}
        model_kwargs["use_cache"] = False
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        if self.fdpo_loss_type == "bpo":
            loss, aux_loss = self._bpo_loss(model, inputs, model_kwargs, labels, mode)
        else:
            loss, aux_loss = self._two_model_loss(model, inputs, model_kwargs, labels, mode)
        # TRL weighs each loss type's mean loss by its entry of loss_weights (the one entry here).
        loss = loss * self.loss_weights[0]
        if self.aux_loss_enabled and aux_loss is not None:
            loss = loss + self.router_aux_loss_coef * aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        if mode == "train":
            tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += tokens // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return loss

    def _bpo_loss(self, model, inputs, model_kwargs, labels, mode) -> tuple[torch.Tensor, torch.Tensor | None]:
        """BPO on the per-sequence sums of TRL's fused forwards (the reference's as TRL computes them)."""
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        seq_len = inputs["completion_mask"].shape[1] - 1
        chosen, rejected = outputs.log_probs[:, -seq_len:].sum(dim=1).chunk(2)
        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_model = self.model if self.ref_model is None else self.ref_model
            ref_chosen, ref_rejected = self.compute_ref_log_probs(ref_model, inputs)
        out = preference_loss(chosen, rejected, ref_chosen, ref_rejected, beta=self.beta, divergence=self.divergence,
                              alpha=self.alpha, loss="bpo", bpo_lambda=self.args.bpo_lambda,
                              backend=self.args.fdpo_backend)
        self._log_head_metrics(mode, outputs, inputs["completion_mask"][..., 1:], seq_len)
        self._log_pair_metrics(mode, chosen, rejected, self.beta * (chosen - ref_chosen).detach(),
                               self.beta * (rejected - ref_rejected).detach())
        self._log_clamped_pairs(mode, out.extras["clamped"])
        return out.loss, outputs.aux_loss

    def _two_model_loss(self, model, inputs, model_kwargs, labels,
                        mode) -> tuple[torch.Tensor, torch.Tensor | None]:
        """TDPO / epsilon-DPO: the reference backbone to its hidden states, then one fused two-head pass
        inside the policy's forward, which also gives TRL's head metrics. Returns the loss and the
        policy's MoE router loss (or None)."""
        ref_kwargs = {k: v for k, v in model_kwargs.items() if k != "output_router_logits"}
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), \
                self._reference_context():
            ref_model = self.model if self.ref_model is None else self.ref_model
            ref = ref_model(**ref_kwargs, labels=labels, fused_lm_head=True, fdpo_head_fn=lambda call: call)
        self.pair_loss_fn.train(self.model.training)
        out, outputs, (ref_chosen, ref_rejected) = model(
            **model_kwargs, labels=labels, fused_lm_head=True,
            fdpo_head_fn=functools.partial(two_model_loss, self.pair_loss_fn, ref=ref))
        seq_len = inputs["completion_mask"].shape[1] - 1
        self._log_head_metrics(mode, outputs, inputs["completion_mask"][..., 1:], seq_len)
        # TRL's rewards: beta (policy - reference) log-prob sums, with each pair's beta for epsilon-DPO.
        beta = self.beta if self.fdpo_loss_type == "tdpo" else out.extras["beta"]
        self._log_pair_metrics(mode, out.policy_chosen, out.policy_rejected, beta * (out.policy_chosen - ref_chosen),
                               beta * (out.policy_rejected - ref_rejected))
        if self.fdpo_loss_type == "tdpo":
            self._log_rewards(mode, "tdpo/rewards", out.chosen_rewards, out.rejected_rewards)
            for name in ("chosen", "rejected"):
                kl = self.accelerator.gather_for_metrics(out.extras[f"kl_{name}"])
                self._metrics[mode][f"kl/{name}"].append(kl.mean().item())
        else:
            self._metrics[mode]["epsilon_dpo/beta"].append(self.epsilon_dpo.beta)
            self._log_clamped_pairs(mode, out.extras["clamped"])
        return out.loss, outputs.aux_loss

    def _log_clamped_pairs(self, mode: str, clamped: torch.Tensor) -> None:
        """`clamped_pairs`: the fraction of pairs where a clamp of the pair loss is active
        (`fdpo.losses.clamped_pairs`): a response's forward-KL / alpha score, whose gradient is 0
        there, or a BPO margin, whose pair's gradient is 0."""
        self._metrics[mode]["clamped_pairs"].append(self.accelerator.gather_for_metrics(clamped).mean().item())

    def _reference_context(self) -> contextlib.AbstractContextManager:
        """With PEFT and no reference model, the reference is the model with its adapter off (or "ref")."""
        if self.ref_model is not None or not is_peft_model(self.model):
            return contextlib.nullcontext()
        unwrapped = self.accelerator.unwrap_model(self.model)
        return use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)

    def _log_head_metrics(self, mode: str, outputs: Any, shift_completion_mask: torch.Tensor, seq_len: int) -> None:
        """TRL's entropy, logits/chosen, logits/rejected and mean_token_accuracy of the policy's per-token
        statistics [2P, >= seq_len] (TRL's reductions: token-weighted means over the completions)."""
        gather = self.accelerator.gather_for_metrics
        mask = shift_completion_mask
        chosen_mask, rejected_mask = mask.bool().chunk(2)
        entropy = (outputs.entropy[:, -seq_len:].detach() * mask).sum()
        self._metrics[mode]["entropy"].append(ratio(gather(entropy).sum(), gather(mask.sum()).sum()))
        chosen_logits, rejected_logits = outputs.mean_logits[:, -seq_len:].chunk(2)
        halves = (("chosen", chosen_logits, chosen_mask), ("rejected", rejected_logits, rejected_mask))
        for name, logits, kept in halves:
            self._metrics[mode][f"logits/{name}"].append(ratio(gather(logits[kept].sum()).sum(),
                                                               gather(kept.sum()).sum()))
        correct = outputs.is_top1[:, -seq_len:].chunk(2)[0] & chosen_mask
        self._metrics[mode]["mean_token_accuracy"].append(ratio(gather(correct.sum()).sum(),
                                                                gather(chosen_mask.sum()).sum()))

    def _log_pair_metrics(self, mode: str, chosen: torch.Tensor, rejected: torch.Tensor,
                          chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> None:
        """TRL's rewards/* and logps/* metrics from [P] policy sums and TRL's rewards, beta (policy -
        reference) log-prob sums."""
        self._log_rewards(mode, "rewards", chosen_rewards, rejected_rewards)
        gather, metrics = self.accelerator.gather, self._metrics[mode]
        metrics["logps/chosen"].append(gather(chosen.detach()).mean().item())
        metrics["logps/rejected"].append(gather(rejected.detach()).mean().item())

    def _log_rewards(self, mode: str, prefix: str, chosen_rewards: torch.Tensor,
                     rejected_rewards: torch.Tensor) -> None:
        """`prefix`/chosen, /rejected, /accuracies and /margins of [P] rewards, reduced as TRL reduces its own."""
        gather, metrics = self.accelerator.gather, self._metrics[mode]
        chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
        metrics[f"{prefix}/chosen"].append(gather(chosen_rewards).mean().item())
        metrics[f"{prefix}/rejected"].append(gather(rejected_rewards).mean().item())
        metrics[f"{prefix}/accuracies"].append(gather((chosen_rewards > rejected_rewards).float()).mean().item())
        metrics[f"{prefix}/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.epsilon_dpo is not None and self.args.should_save:
            torch.save(self.epsilon_dpo.state_dict(), os.path.join(output_dir, CONTROLLER_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """TRL's optimizer and scheduler states and, for epsilon_dpo, the controller's (beta and pending steps).
        ValueError, before either is loaded, for a checkpoint without the controller's state or with another
        epsilon than `args.epsilon`: epsilon defines the run's beta trajectory, and the controller would
        otherwise take the checkpoint's silently (fdpo's own trainer refuses a changed epsilon too)."""
        state = None
        if checkpoint is not None and self.epsilon_dpo is not None:
            path = os.path.join(checkpoint, CONTROLLER_FILE)
            if not os.path.isfile(path):
                raise ValueError(f"{checkpoint} holds no epsilon-DPO state ({CONTROLLER_FILE}): it was not written by "
                                 "loss_type='epsilon_dpo'")
            state = torch.load(path, weights_only=True)
            saved, requested = state.get("eps"), self.epsilon_dpo.eps
            if saved is not None and float(saved) != requested:
                raise ValueError(f"cannot resume {checkpoint}: settings that define its state differ (epsilon "
                                 f"{float(saved)!r} -> {requested!r}); resume with the checkpoint's epsilon="
                                 f"{float(saved)!r}, or start a new run (another output_dir, no "
                                 "resume_from_checkpoint)")
        super()._load_optimizer_and_scheduler(checkpoint)
        if state is not None:
            self.epsilon_dpo.load_state_dict(state)


def vocabulary_rows(model: torch.nn.Module) -> int | None:
    """`head_rows` of the model `add_fused_lm_head` patched (`model` or the one it wraps)."""
    return head_rows(patched_model(model))


def check_vocabularies(loss_type: str, model: torch.nn.Module, ref_model: torch.nn.Module) -> None:
    """ValueError when the policy's and the reference's heads have different vocabulary sizes: the two-model
    losses compare their next-token distributions entry by entry."""
    rows, ref_rows = vocabulary_rows(model), vocabulary_rows(ref_model)
    if rows is not None and ref_rows is not None and rows != ref_rows:
        raise ValueError(f"loss_type {loss_type!r} compares the policy's and the reference's next-token "
                         f"distributions over one vocabulary: ref_weight has {ref_rows} vocabulary rows but weight "
                         f"has {rows} (give both models the same vocabulary size, e.g. resize_token_embeddings)")


def lm_head(call: HeadCall) -> LMHead:
    """The head of a HeadCall as an `fdpo.LMHead` (soft cap, logit scale, temperature, ZeRO-3 gather, and
    float32 products with cast_lm_head_to_fp32)."""
    s = call.settings
    return LMHead(call.weight, call.bias, s.softcap, s.temperature, scale=s.scale, gather=call.gather,
                  compute_dtype=s.compute_dtype)


def two_model_loss(loss_fn: TDPOLoss | EpsilonDPOLoss, call: HeadCall, *,
                   ref: HeadCall) -> tuple[PreferenceLossOutput, FusedCausalLMOutput,
                                           tuple[torch.Tensor, torch.Tensor]]:
    """`loss_fn`'s loss of the 2P rows of `call` (P chosen, then P rejected) with the reference's `ref`.

    One fused pass over both heads (`fdpo.LMHead`s, which carry the logit scale and the ZeRO-3
    gather) computes, per token, what `loss_fn` requests and the policy's entropy, mean logit and
    top-1 flag (TRL's head metrics); the per-sequence sums of the former feed `loss_fn.sequence_loss`,
    as `loss_fn`'s own forward feeds them. Returns the loss's `fdpo.PreferenceLossOutput` (with the
    detached policy sums [P] and the scored-token counts), the policy's per-token statistics as a
    `FusedCausalLMOutput` (detached `entropy`, `mean_logits`, `is_top1`, `label_mask`; the call's MoE
    router loss `aux_loss`), and the reference's detached log-prob sums (chosen [P], rejected [P]).
    Where one call has more positions than the other (the virtual tokens of prompt-learning PEFT), the
    longer one's leading positions, which must carry no labels, are dropped (`trailing_positions`):
    the per-token statistics then cover the shorter call's positions.
    """
    # Prompt-learning PEFT prepends virtual tokens to one model's positions (the policy's; the reference,
    # its adapter off, has none): both keep their last positions, the real tokens', as TRL's losses do.
    length = min(call.hidden.shape[1], ref.hidden.shape[1])
    call = trailing_positions(call, length, loss_fn.ignore_index)
    ref = trailing_positions(ref, length, loss_fn.ignore_index)
    request = replace(loss_fn.request, entropy=True, mean_logits=True, top1=True)
    policy = HeadInput(call.hidden, lm_head(call))
    frozen = HeadInput(ref.hidden.detach(), lm_head(ref))  # a constant: head_stats detaches it inside its gather
    stats = head_stats(policy, call.labels, ref=frozen, request=request, ignore_index=loss_fn.ignore_index,
                       backend=loss_fn.backend, backward=loss_fn.backward_options)
    tokens = scored_tokens(call.labels, loss_fn.ignore_index, per_sequence=True)
    summed = [name for name in stats.as_dict() if name not in TOKEN_CONSTANTS
              and (name != "entropy" or loss_fn.request.entropy)]
    sums = HeadStats(**{name: tokens.layout(getattr(stats, name).reshape(-1)[tokens.rows]) for name in summed})
    num_pairs = count_pairs(call.hidden, call.labels, None)
    out = loss_fn.sequence_loss(sums, tokens.counts(), num_pairs)
    outputs = FusedCausalLMOutput(entropy=stats.entropy.detach(), mean_logits=stats.mean_logits,
                                  is_top1=stats.is_top1, label_mask=call.labels != loss_fn.ignore_index,
                                  aux_loss=call.aux_loss)
    chosen, rejected = sums.split_pairs(num_pairs)
    return out, outputs, (chosen.ref_logprob.detach(), rejected.ref_logprob.detach())


def trailing_positions(call: HeadCall, length: int, ignore_index: int) -> HeadCall:
    """`call` with only its last `length` positions (hidden states and labels); ValueError if a dropped
    position carries a label (the positions would pair the two models' tokens out of step)."""
    cut = call.hidden.shape[1] - length
    if cut == 0:
        return call
    if (call.labels[:, :cut] != ignore_index).any():
        raise ValueError(f"one model's forward has {call.hidden.shape[1]} positions, the other's {length}, and the "
                         f"first {cut} of the longer one carry labels: only virtual tokens (prompt-learning PEFT), "
                         "which carry none, may lead one model's positions")
    return replace(call, hidden=call.hidden[:, cut:], labels=call.labels[:, cut:])


def ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> float:
    """numerator / denominator as a float, 0.0 when the denominator is 0 (TRL's metric convention)."""
    denominator = denominator.item()
    return numerator.item() / denominator if denominator > 0 else 0.0


