"""What the trainer optimizes: the loss module of a config, and the policy and its loss as one module."""

import torch
from torch import nn

import fdpo

from .adapter import CausalLM
from .config import TrainConfig
from .data import PreferenceBatch


def build_loss(config: TrainConfig) -> nn.Module:
    """The loss module that `config.method` selects, with its hyper-parameters.

    dpo: `fdpo.PreferenceLoss` (any divergence and loss shape); tdpo: `fdpo.TDPOLoss`;
    epsilon_dpo: `fdpo.EpsilonDPOLoss` over a `fdpo.EpsilonDPO` controller (its `controller`
    attribute), whose beta starts at config.beta and moves by config.epsilon.
    """
    nll_weight = config.resolved_nll_weight()
    if config.method == "tdpo":
        return fdpo.TDPOLoss(beta=config.beta, alpha=config.alpha, variant=config.tdpo_variant,
                             divergence=config.divergence, backend=config.backend,
                             token_divergence=config.token_divergence, token_alpha=config.token_alpha,
                             token_beta=config.token_beta)
    shape = {"divergence": config.divergence, "alpha": config.alpha, "loss": config.loss,
             "label_smoothing": config.label_smoothing, "nll_weight": nll_weight, "backend": config.backend}
    if config.method == "epsilon_dpo":
        return fdpo.EpsilonDPOLoss(fdpo.EpsilonDPO(beta=config.beta, eps=config.epsilon), **shape)
    return fdpo.PreferenceLoss(beta=config.beta, **shape)


class PreferenceModel(nn.Module):
    """The policy and its loss as one module: forward(batch tensors, reference inputs) -> loss output.

    Computing the loss inside this forward is what lets DDP and FSDP2 wrap the whole step: the
    LM head (part of the policy) is read only here, while FSDP holds it unsharded.
    """

    def __init__(self, policy: CausalLM, loss_fn: nn.Module) -> None:
        super().__init__()
        self.policy = policy
        self.loss_fn = loss_fn

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                statistics: bool = False, **reference) -> fdpo.PreferenceLossOutput:
        """Loss of the batch (layout of `fdpo.train.data.PreferenceBatch`); `reference` holds ref_logprobs
        or ref_hidden / ref_head.

        statistics=True adds, over the chosen responses, extras "entropy_sum" (policy entropy summed
        over their tokens), "kl_sum" (KL(reference || policy) summed over their tokens, when the
        reference's hidden states are given) and "token_count".
        """
        hidden, head = self.policy.head_inputs(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                               packed=cu_seqlens is not None)
        out = self.loss_fn(hidden, labels, head, cu_seqlens=cu_seqlens, **reference)
        if statistics:
            out.extras.update(self._statistics(hidden, labels, head, cu_seqlens, out.margins.numel(), reference))
        return out

    @torch.no_grad()
    def _statistics(self, hidden: torch.Tensor, labels: torch.Tensor, head: fdpo.FusedLMHead,
                    cu_seqlens: torch.Tensor | None, num_pairs: int, reference: dict) -> dict[str, torch.Tensor]:
        end = int(cu_seqlens[num_pairs]) if cu_seqlens is not None else num_pairs
        hidden, labels = hidden[:end], labels[:end]
        two_heads = {}
        if "ref_hidden" in reference:
            # The reference head's own full spec: its logit scale, soft cap, temperature and compute dtype.
            ref_head = reference["ref_head"]
            two_heads = {"ref_hidden": reference["ref_hidden"][:end], "kl": True,
                         "ref_head": ref_head.spec if isinstance(ref_head, fdpo.FusedLMHead) else ref_head}
        # Entropy and KL from one fused pass over the vocabulary, through the policy head's module call.
        per_token = head(hidden, labels, entropy=True, **two_heads)
        stats = {"entropy_sum": per_token["entropy"].sum(),
                 "token_count": (labels != head.ignore_index).sum().float()}
        if "kl" in per_token:
            stats["kl_sum"] = per_token["kl"].sum()
        return stats


def batch_inputs(batch: PreferenceBatch) -> dict:
    return {"input_ids": batch.input_ids, "labels": batch.labels, "attention_mask": batch.attention_mask,
            "position_ids": batch.position_ids, "cu_seqlens": batch.cu_seqlens}
