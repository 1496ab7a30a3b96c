"""TDPO: token-level DPO with the sequential KL to the reference (Zeng et al., arXiv 2404.11999).

With per-sequence log-prob sums a (policy) and b (reference) and the sums K of the per-token
KL(pi_ref || pi_theta) over each response (docs/math.md 6):
    u = (a_w - b_w) - (a_l - b_l) - c (K_l - K_w),   loss = mean_pairs softplus(-beta u)
TDPO1: c = 1. TDPO2: c = alpha and K_w is detached (the paper's recommended variant, alpha = 0.5).
TDPO is defined for the reverse-KL (DPO) reward only; any other divergence raises.
`TDPOLoss(token_divergence=...)` sums another per-token divergence into K (docs/math.md 12): an
extension beyond the paper, whose K is KL(pi_ref || pi_theta) ("forward_kl", the default).
"""

import math

import torch
import torch.nn.functional as F

from .divergences import DivergenceSpec
from .heads import HeadStats, StatsRequest
from .losses import _per_pair, check_beta
from .modules import PairwiseHeadLoss
from .outputs import PreferenceLossOutput
from .token_divergence import divergence_pair_statistics

VARIANTS = ("tdpo1", "tdpo2")


def check_tdpo_options(beta, alpha: float, variant: str, divergence: str) -> None:
    """Raise ValueError naming the first TDPO hyper-parameter outside its allowed values."""
    if divergence != "reverse_kl":
        raise ValueError(f"TDPO is defined for divergence='reverse_kl' only (its KL term is the reverse-KL "
                         f"decomposition of the DPO reward), got divergence={divergence!r}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0 (TDPO2's KL weight, 0.5 in the paper), got {alpha!r}")
    check_beta(beta)


def tdpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    kl_chosen: torch.Tensor,
    kl_rejected: torch.Tensor,
    *,
    beta: float | torch.Tensor = 0.1,
    alpha: float = 0.5,
    variant: str = "tdpo2",
    divergence: str = "reverse_kl",
) -> PreferenceLossOutput:
    """TDPO loss of P pairs from per-sequence sums.

    Args:
        policy_chosen, policy_rejected: float [P] policy log-prob sums (differentiable).
        ref_chosen, ref_rejected: float [P] reference log-prob sums (constants).
        kl_chosen, kl_rejected: float [P] sums over each response of KL(pi_ref || pi_theta) per token
            (differentiable; see `fdpo.token_kl`). TDPO2 detaches kl_chosen.
        beta: > 0, float or float tensor [P]. alpha: TDPO2's KL weight (> 0; checked, and unused, with
            "tdpo1"). variant: "tdpo1" | "tdpo2".
        divergence: must be "reverse_kl" (TDPO is defined for it only).

    Returns:
        PreferenceLossOutput: loss (mean of softplus(-beta u)); chosen/rejected rewards
        beta ((a - b) + K) as the official implementation reports them; margins; accuracy (margin > 0);
        extras "pair_losses", "kl_chosen", "kl_rejected" (detached sums).
    """
    check_tdpo_options(beta, alpha, variant, divergence)
    a_w = _per_pair("policy_chosen", policy_chosen, None, None)
    num_pairs, device = a_w.shape[0], a_w.device
    if num_pairs < 1:
        raise ValueError("policy_chosen must hold at least one pair, got an empty tensor")
    a_l = _per_pair("policy_rejected", policy_rejected, num_pairs, device)
    b_w = _per_pair("ref_chosen", ref_chosen, num_pairs, device).detach()
    b_l = _per_pair("ref_rejected", ref_rejected, num_pairs, device).detach()
    k_w = _per_pair("kl_chosen", kl_chosen, num_pairs, device)
    k_l = _per_pair("kl_rejected", kl_rejected, num_pairs, device)
    if isinstance(beta, torch.Tensor):
        if beta.shape != (num_pairs,) or beta.device != device:
            raise ValueError(f"beta as a tensor must be [P] = [{num_pairs}] on {device}, got {tuple(beta.shape)}")
        beta = beta.detach().float()
    if variant == "tdpo2":
        c, k_w_term = alpha, k_w.detach()
    else:
        c, k_w_term = 1.0, k_w
    u = (a_w - b_w) - (a_l - b_l) - c * (k_l - k_w_term)
    pair_losses = F.softplus(-beta * u)
    with torch.no_grad():
        chosen_rewards = beta * ((a_w - b_w) + k_w)
        rejected_rewards = beta * ((a_l - b_l) + k_l)
        margins = chosen_rewards - rejected_rewards
    return PreferenceLossOutput(
        loss=pair_losses.mean(), chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards, margins=margins,
        accuracy=(margins > 0).float().mean(),
        extras={"pair_losses": pair_losses.detach(), "kl_chosen": k_w.detach(), "kl_rejected": k_l.detach()})


class TDPOLoss(PairwiseHeadLoss):
    """TDPO from final hidden states of policy and reference, through fused heads (no logits).

    One fused pass over the vocabulary gives, per token, the policy and reference label log-probs and
    KL(pi_ref || pi_theta); their per-sequence sums feed `fdpo.tdpo_loss`. Layouts are those of
    `fdpo.PreferenceLoss`: padded hidden [2P, T, D] / labels [2P, T] (P chosen rows, then P
    rejected), or packed hidden [N, D] / labels [N] with cu_seqlens [2P + 1]. Invalid
    hyper-parameters or backend raise ValueError at construction. alpha is checked whatever the variant
    and used by "tdpo2" only, as the modules check every argument and use those of the chosen option
    (`fdpo.PreferenceLoss`'s alpha outside divergence="alpha", bpo_lambda outside loss="bpo"); beta,
    alpha and variant are read at every call. `fdpo.integrations.trl.DPOConfig`, a run's settings,
    refuses a tdpo_alpha that TDPO1 would ignore. backward_buffer_bytes: the triton backend's
    split-backward buffer for policy heads that are not a `fdpo.FusedLMHead` (see
    `fdpo.modules.PairwiseHeadLoss`).

    Example:

        loss_fn = fdpo.TDPOLoss(beta=0.1, alpha=0.5, variant="tdpo2")
        head = fdpo.FusedLMHead.from_linear(policy.lm_head)
        hidden = policy.model(input_ids, attention_mask=mask).last_hidden_state        # [2P, T, D]
        with torch.no_grad():
            ref_hidden = ref_model.model(input_ids, attention_mask=mask).last_hidden_state
        out = loss_fn(hidden, labels, head, ref_hidden=ref_hidden, ref_head=ref_model.lm_head)
        out.loss.backward()
        out.extras["kl_chosen"], out.extras["kl_rejected"]        # [P] sequence KL sums

    forward returns a `fdpo.PreferenceLossOutput` (see `fdpo.tdpo_loss`) with policy_chosen /
    policy_rejected and extras "chosen_lengths" / "rejected_lengths" (scored-token counts).

    token_divergence (with token_alpha, token_beta): the per-token divergence summed into K, as
    `fdpo.token_divergence` names them. The default "forward_kl" is KL(pi_ref || pi_theta), the
    paper's; "reverse_kl", "js", "alpha" and "tv" are an extension beyond the paper (the KL's
    place in the margin, the rewards and extras "kl_chosen" / "kl_rejected" holds their sums).
    """

    request = StatsRequest(kl=True)

    def __init__(
        self,
        beta: float = 0.1,
        alpha: float = 0.5,
        variant: str = "tdpo2",
        divergence: str = "reverse_kl",
        ignore_index: int = -100,
        backend: str = "auto",
        *,
        backward_buffer_bytes: int | None = None,
        token_divergence: str = "forward_kl",
        token_alpha: float = 0.5,
        token_beta: float = 0.5,
    ) -> None:
        check_tdpo_options(beta, alpha, variant, divergence)
        token_spec = DivergenceSpec.of(token_divergence, token_alpha, token_beta)
        super().__init__(ignore_index, backend, backward_buffer_bytes)
        self.beta, self.alpha, self.variant = beta, alpha, variant
        self.token_divergence = token_spec

    def statistics(self, hidden: torch.Tensor, labels: torch.Tensor, head, *, ref_hidden: torch.Tensor | None,
                   ref_head, cu_seqlens: torch.Tensor | None) -> HeadStats:
        """The base's one fused pass for KL(ref || policy); another token_divergence in `kl` (docs/math.md 12)."""
        if self.token_divergence.name == "forward_kl":
            return super().statistics(hidden, labels, head, ref_hidden=ref_hidden, ref_head=ref_head,
                                      cu_seqlens=cu_seqlens)
        return divergence_pair_statistics(self, hidden, labels, head, ref_hidden=ref_hidden, ref_head=ref_head,
                                          cu_seqlens=cu_seqlens, spec=self.token_divergence)

    def pair_loss(self, chosen: HeadStats, rejected: HeadStats, chosen_lengths: torch.Tensor,
                  rejected_lengths: torch.Tensor) -> PreferenceLossOutput:
        return tdpo_loss(chosen.logprob, rejected.logprob, chosen.ref_logprob, rejected.ref_logprob, chosen.kl,
                         rejected.kl, beta=self.beta, alpha=self.alpha, variant=self.variant)

    # The two-model forward of the base, named here so that it stays part of this class' recorded API.
    forward = PairwiseHeadLoss.forward

    def extra_repr(self) -> str:
        text = f"beta={self.beta}, alpha={self.alpha}, variant={self.variant!r}, backend={self.backend!r}"
        if self.token_divergence.name != "forward_kl":
            text += f", token_divergence={self.token_divergence.describe()!r}"
        return text
