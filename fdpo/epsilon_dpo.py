"""epsilon-DPO: instance-level adaptive beta (Lee et al., arXiv 2502.13177), without logits.

For each pair, the policy's log-ratio rho = a_w - a_l is compared with the same log-ratio under the
perturbed policies whose logits are (1 +- eps) z -+ eps z_ref (docs/math.md 5):
    step = +1 if rho+ > rho > rho-,  -1 if rho- > rho > rho+,  0 otherwise (strict),
    beta_i = beta / (1 + eps step_i)          (a constant for the gradient)
and, after each optimizer step, beta <- beta / (1 + eps mean(step)) over the whole global batch.
The perturbed sums S+- come from the same fused pass as the policy and reference log-probs, so no
logits of either model are ever held. Unlike the official code, label smoothing does take effect here.
"""

import math

import torch
import torch.distributed as dist

from .heads import HeadStats, StatsRequest
from .losses import PairLossOptions, _per_pair, check_beta
from .modules import PairwiseHeadLoss
from .outputs import PreferenceLossOutput


def check_eps(eps: float) -> None:
    if not (isinstance(eps, (int, float)) and 0.0 < eps < 1.0):
        raise ValueError(f"eps must be a number in the open interval (0, 1) (0.01 in the paper), got {eps!r}")


def check_controller_beta(beta: float) -> None:
    """The controller's beta is one number (the per-pair betas it produces are its own)."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (0.0 < beta < math.inf):
        raise ValueError(f"epsilon-DPO's beta must be a finite number > 0, got {beta!r}")


def epsilon_dpo_steps(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    plus_chosen: torch.Tensor,
    plus_rejected: torch.Tensor,
    minus_chosen: torch.Tensor,
    minus_rejected: torch.Tensor,
) -> torch.Tensor:
    """float32 [P] steps in {-1, 0, +1} from policy and perturbed log-prob sums (all float [P], detached).

    +1 where rho+ > rho > rho- (the policy's preference grows along z - z_ref: beta may shrink),
    -1 where rho- > rho > rho+, 0 otherwise, with rho = chosen - rejected of each set of sums. A pair
    with a non-finite sum (a NaN, or the -inf of a reference that alone masks a vocabulary entry,
    docs/math.md 8) has no defined order: step 0.
    """
    named = {"policy_chosen": policy_chosen, "policy_rejected": policy_rejected, "plus_chosen": plus_chosen,
             "plus_rejected": plus_rejected, "minus_chosen": minus_chosen, "minus_rejected": minus_rejected}
    first = _per_pair("policy_chosen", policy_chosen, None, None)
    a_w, a_l, p_w, p_l, m_w, m_l = (_per_pair(name, t, first.shape[0], first.device).detach()
                                    for name, t in named.items())
    rho, rho_plus, rho_minus = a_w - a_l, p_w - p_l, m_w - m_l
    up = (rho_plus > rho) & (rho > rho_minus)
    down = (rho_minus > rho) & (rho > rho_plus)
    finite = torch.stack([a_w, a_l, p_w, p_l, m_w, m_l]).isfinite().all(0)
    return (up.float() - down.float()) * finite


class EpsilonDPO:
    """The beta controller of epsilon-DPO: per-pair betas now, a global beta update per optimizer step.

    Example (with gradient accumulation; `loss_fn = fdpo.EpsilonDPOLoss(controller)`):

        controller = fdpo.EpsilonDPO(beta=0.01, eps=0.01)
        for micro_batch in micro_batches:
            loss_fn(hidden, labels, head, ref_hidden=ref_hidden).loss.backward()   # records the steps
        optimizer.step(); optimizer.zero_grad()
        controller.update()      # beta <- beta / (1 + eps * mean step), mean over all ranks

    Steps recorded since the last update (every micro-batch, and with torch.distributed initialized
    every rank) are averaged at `update()`. `state_dict()` / `load_state_dict()` carry beta and the
    pending steps through checkpoints.
    """

    def __init__(self, beta: float = 0.01, eps: float = 0.01) -> None:
        check_controller_beta(beta)
        check_eps(eps)
        self.beta = float(beta)
        self.eps = float(eps)
        self._step_sum = 0.0
        self._step_count = 0
        self._pending: list[torch.Tensor] = []

    def pair_betas(self, steps: torch.Tensor) -> torch.Tensor:
        """float32 [P] beta / (1 + eps step_i) for steps [P] in {-1, 0, 1}."""
        return (self.beta / (1.0 + self.eps * steps.float())).detach()

    def record(self, steps: torch.Tensor) -> None:
        """Remember the steps [P] of a training micro-batch for the next `update()` (no device sync here)."""
        self._pending.append(steps.detach().to(torch.float64).sum().reshape(1))
        self._step_count += steps.numel()

    def _gather(self) -> tuple[float, int]:
        step_sum = self._step_sum + (float(torch.cat(self._pending).sum()) if self._pending else 0.0)
        count = self._step_count
        if dist.is_available() and dist.is_initialized():
            device = self._pending[0].device if self._pending else torch.device("cpu")
            if dist.get_backend() == "nccl":
                device = torch.device("cuda", torch.cuda.current_device())
            totals = torch.tensor([step_sum, float(count)], dtype=torch.float64, device=device)
            dist.all_reduce(totals)
            step_sum, count = float(totals[0]), int(totals[1])
        return step_sum, count

    def update(self) -> float:
        """Apply beta <- beta / (1 + eps * mean step) over the steps recorded since the last update.

        With torch.distributed initialized this is a collective: every rank must call it. Without
        recorded steps beta is unchanged. Returns the new beta.
        """
        step_sum, count = self._gather()
        if count:
            self.beta = self.beta / (1.0 + self.eps * step_sum / count)
        self._step_sum, self._step_count, self._pending = 0.0, 0, []
        return self.beta

    def state_dict(self) -> dict[str, float | int]:
        """beta, eps and the steps recorded but not yet applied (this rank's)."""
        pending = float(torch.cat(self._pending).sum()) if self._pending else 0.0
        return {"beta": self.beta, "eps": self.eps, "step_sum": self._step_sum + pending,
                "step_count": self._step_count}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        """Restore beta, eps and the pending steps of a `state_dict()`: the state's eps replaces this
        controller's, as a checkpoint is restored as it was written. Where eps comes from the run's
        settings, compare it with `state["eps"]` first: fdpo's trainers refuse to resume with another."""
        missing = {"beta", "eps", "step_sum", "step_count"} - set(state)
        if missing:
            raise ValueError(f"epsilon-DPO state is missing {sorted(missing)}")
        check_controller_beta(state["beta"])
        check_eps(state["eps"])
        step_sum, step_count = state["step_sum"], state["step_count"]
        # Each recorded step is -1, 0 or +1: a sum beyond the count is a corrupted state.
        if isinstance(step_count, bool) or not isinstance(step_count, int) or step_count < 0:
            raise ValueError(f"epsilon-DPO state: step_count must be an integer >= 0, got {step_count!r}")
        if not (isinstance(step_sum, (int, float)) and abs(step_sum) <= step_count):
            raise ValueError(f"epsilon-DPO state: step_sum must be a number in [-step_count, step_count] = "
                             f"[-{step_count}, {step_count}] (each step is -1, 0 or +1), got {step_sum!r}")
        self.beta, self.eps = float(state["beta"]), float(state["eps"])
        self._step_sum, self._step_count, self._pending = float(step_sum), step_count, []

    def __repr__(self) -> str:
        return f"EpsilonDPO(beta={self.beta:.6g}, eps={self.eps})"


def epsilon_dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    plus_chosen: torch.Tensor,
    plus_rejected: torch.Tensor,
    minus_chosen: torch.Tensor,
    minus_rejected: torch.Tensor,
    *,
    beta: float = 0.01,
    eps: float = 0.01,
    **options,
) -> PreferenceLossOutput:
    """epsilon-DPO loss of P pairs: `fdpo.preference_loss` with per-pair betas beta / (1 + eps step_i).

    Args:
        policy_chosen, policy_rejected, ref_chosen, ref_rejected: float [P] log-prob sums as in
            `fdpo.preference_loss` (policy differentiable).
        plus_chosen, ..., minus_rejected: float [P] sums of the perturbed label log-probs
            (`fdpo.perturbed_logprobs`), constants.
        beta: the controller's current beta (> 0); eps: in (0, 1).
        options: any other keyword of `fdpo.preference_loss` (divergence, alpha, loss,
            label_smoothing, ...): epsilon-DPO composes with every f-DPO divergence and loss shape.

    Returns:
        The `fdpo.PreferenceLossOutput` of the preference loss, with extras "steps" [P] and "beta" [P].
    """
    check_beta(beta)
    check_eps(eps)
    if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not math.isfinite(beta):
        raise ValueError(f"beta must be the controller's float beta, got {beta!r}")
    if "beta" in options:
        raise ValueError("beta is set by epsilon-DPO per pair")
    per_call = {name: options.pop(name) for name in ("chosen_lengths", "rejected_lengths", "backend")
                if name in options}
    return epsilon_dpo_output(PairLossOptions(**options), policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                              plus_chosen, plus_rejected, minus_chosen, minus_rejected, beta=beta, eps=eps,
                              **per_call)


def epsilon_dpo_output(
    options: PairLossOptions,
    *sums: torch.Tensor,
    beta: float,
    eps: float,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    backend: str = "auto",
) -> PreferenceLossOutput:
    """`epsilon_dpo_loss` of the eight float [P] sums (in its order) with checked options, beta and eps."""
    policy_chosen, policy_rejected, ref_chosen, ref_rejected, *perturbed = sums
    steps = epsilon_dpo_steps(policy_chosen, policy_rejected, *perturbed)
    betas = (beta / (1.0 + eps * steps)).float()
    out = options.loss_of(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=betas,
                          chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths, backend=backend)
    out.extras["steps"], out.extras["beta"] = steps, betas
    return out


class EpsilonDPOLoss(PairwiseHeadLoss):
    """epsilon-DPO from final hidden states of policy and reference, through fused heads (no logits).

    One fused pass gives the policy, reference and both perturbed label log-probs of every token;
    their per-sequence sums give each pair's step and beta (from `controller`), and the loss is the
    f-DPO loss chosen here (any divergence and loss shape of `fdpo.preference_loss`). In training
    mode with gradients enabled the steps are recorded in the controller; call `controller.update()`
    after each optimizer step. Layouts as `fdpo.PreferenceLoss` (chosen rows first, then rejected).
    Invalid hyper-parameters or backend raise ValueError at construction. backward_buffer_bytes: the
    triton backend's split-backward buffer for policy heads that are not a `fdpo.FusedLMHead` (see
    `fdpo.modules.PairwiseHeadLoss`).

    Example:

        controller = fdpo.EpsilonDPO(beta=0.01, eps=0.01)
        loss_fn = fdpo.EpsilonDPOLoss(controller, divergence="reverse_kl")
        out = loss_fn(hidden, labels, fdpo.FusedLMHead.from_linear(policy.lm_head),
                      ref_hidden=ref_hidden, ref_head=ref_model.lm_head)
        out.loss.backward(); optimizer.step(); optimizer.zero_grad()
        controller.update()
        out.extras["steps"], out.extras["beta"]          # [P] per-pair steps and betas
    """

    def __init__(
        self,
        controller: EpsilonDPO,
        divergence: str = "reverse_kl",
        alpha: float = 0.5,
        loss: str = "sigmoid",
        label_smoothing: float = 0.0,
        bpo_lambda: float = -0.5,
        nll_weight: float = 0.0,
        ignore_index: int = -100,
        backend: str = "auto",
        *,
        backward_buffer_bytes: int | None = None,
    ) -> None:
        if not isinstance(controller, EpsilonDPO):
            raise TypeError(f"controller must be an fdpo.EpsilonDPO, got {type(controller).__name__}")
        options = PairLossOptions(divergence=divergence, alpha=alpha, loss=loss, label_smoothing=label_smoothing,
                                  bpo_lambda=bpo_lambda, nll_weight=nll_weight)
        super().__init__(ignore_index, backend, backward_buffer_bytes)
        self.controller, self.options = controller, options

    @property
    def request(self) -> StatsRequest:
        return StatsRequest(eps=self.controller.eps)

    def pair_loss(self, chosen: HeadStats, rejected: HeadStats, chosen_lengths: torch.Tensor,
                  rejected_lengths: torch.Tensor) -> PreferenceLossOutput:
        uses_counts = self.options.uses_lengths
        out = epsilon_dpo_output(
            self.options, chosen.logprob, rejected.logprob, chosen.ref_logprob, rejected.ref_logprob,
            chosen.logprob_plus, rejected.logprob_plus, chosen.logprob_minus, rejected.logprob_minus,
            beta=self.controller.beta, eps=self.controller.eps, chosen_lengths=chosen_lengths if uses_counts else None,
            rejected_lengths=rejected_lengths if uses_counts else None, backend=self.backend)
        if self.training and torch.is_grad_enabled():
            self.controller.record(out.extras["steps"])
        return out

    # The two-model forward of the base, named here so that it stays part of this class' recorded API.
    forward = PairwiseHeadLoss.forward

    def extra_repr(self) -> str:
        shown = {name: getattr(self.options, name) for name in ("divergence", "alpha", "loss", "label_smoothing",
                                                                  "bpo_lambda", "nll_weight")}
        return f"{self.controller!r}, " + ", ".join(f"{k}={v!r}" for k, v in {**shown, "backend": self.backend}.items())
