"""fdpo: fused Triton kernels for preference fine-tuning without materialized logits.

Public API (names are a contract):
    fdpo.token_logprobs(hidden, weight, labels, ...)      -> float32 [...] label log-probs
    fdpo.sequence_logprobs(hidden, weight, labels, ...)   -> float32 [B] or [S] per-sequence sums
    fdpo.preference_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, ...)
                                                          -> PreferenceLossOutput (f-DPO losses)
    fdpo.PreferenceLoss(...)(hidden, labels, head, ...)   -> the same, from hidden states
    fdpo.token_kl(hidden, weight, ref_hidden, ref_weight, labels, ...)
                                                          -> (logprob, ref_logprob, KL(ref || policy)) per token
    fdpo.token_entropy(hidden, weight, labels=None, ...)  -> float32 [...] policy entropy per token
    fdpo.token_statistics(hidden, weight, labels, outputs=(...), ...)
                                                          -> {name: [...]} log-prob, entropy, mean logit,
                                                             top-1, log sum p^2 from one pass
    fdpo.perturbed_logprobs(hidden, weight, ref_hidden, ref_weight, labels, eps, ...)
                                                          -> epsilon-DPO's (logprob_plus, logprob_minus)
    fdpo.token_divergence(hidden, weight, ref_hidden, ref_weight, labels, divergence=...)
                                                          -> float32 [...] forward/reverse KL, JS, alpha, TV per token
    fdpo.TokenDivergenceLoss                              -> the same as a loss (mean, or per-sequence sums)
    fdpo.TDPOLoss / fdpo.tdpo_loss                        -> TDPO1 / TDPO2 (token-level KL in the margin)
    fdpo.EpsilonDPO, fdpo.EpsilonDPOLoss / fdpo.epsilon_dpo_loss
                                                          -> epsilon-DPO's adaptive beta over any f-DPO loss
Backends: "auto" | "triton" | "torch" | "reference" (see `fdpo.backends`).
"""

from .epsilon_dpo import EpsilonDPO, EpsilonDPOLoss, epsilon_dpo_loss, epsilon_dpo_steps
from .heads import LMHead
from .logprobs import sequence_logprobs, token_logprobs
from .losses import preference_loss
from .modules import FusedLMHead, PreferenceLoss
from .outputs import PreferenceLossOutput
from .tdpo import TDPOLoss, tdpo_loss
from .token_divergence import TokenDivergenceLoss, token_divergence
from .token_stats import perturbed_logprobs, token_entropy, token_kl, token_statistics

__version__ = "0.1.0"

__all__ = [
    "EpsilonDPO",
    "EpsilonDPOLoss",
    "FusedLMHead",
    "LMHead",
    "PreferenceLoss",
    "PreferenceLossOutput",
    "TDPOLoss",
    "TokenDivergenceLoss",
    "epsilon_dpo_loss",
    "epsilon_dpo_steps",
    "perturbed_logprobs",
    "preference_loss",
    "sequence_logprobs",
    "tdpo_loss",
    "token_divergence",
    "token_entropy",
    "token_kl",
    "token_logprobs",
    "token_statistics",
]
