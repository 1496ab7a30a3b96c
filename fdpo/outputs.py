"""What the preference losses return."""

from dataclasses import dataclass, field

import torch


@dataclass
class PreferenceLossOutput:
    """Loss of a batch of P preference pairs and its detached metrics.

    loss: scalar, differentiable (mean over pairs). chosen_rewards, rejected_rewards: [P] implicit
    rewards of each response; margins: [P] chosen minus rejected; accuracy: scalar fraction of
    pairs whose chosen reward is higher. policy_chosen, policy_rejected: [P] policy log-prob sums
    when the loss computed them. extras: method-specific metrics (e.g. per-token KL sums, per-pair
    beta), each a detached tensor. All metrics are float32 and detached.
    """

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    margins: torch.Tensor
    accuracy: torch.Tensor
    policy_chosen: torch.Tensor | None = None
    policy_rejected: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
