"""f-DPO preference losses over per-sequence log-prob sums (docs/math.md sections 2, 3 and 4).

`preference_loss` crosses four divergences with five loss shapes:

    r = policy - reference (per response),  m = beta * (g(r_w) - g(r_l)),  loss = mean_pairs shape(m)

Divergence scores g (the log-space f'(pi/ref) of f-DPO, shifted so that g(0) = 0):
    reverse_kl  g = r                                 standard DPO
    forward_kl  g = 1 - exp(-r)
    js          g = log(2 sigma(r))                   Jensen-Shannon
    alpha       g = (1 - exp(-alpha r)) / alpha       0 < alpha < 1, the f-DPO paper's alpha
Loss shapes of m:
    sigmoid     (1-eps) softplus(-m) + eps softplus(m)            eps = label_smoothing (cDPO)
    robust      ((1-eps) softplus(-m) - eps softplus(m)) / (1-2eps)
    hinge       relu(1 - m)
    ipo         (g(r_w/|y_w|) - g(r_l/|y_l|) - 1/(2 beta))^2     length-normalized, no beta in m
    bpo         exp(-(lam+1) m)/(4(lam+1)) - exp(lam m)/(4 lam)   Bregman (SBA), lam = bpo_lambda > -1

Clamps (each keeps every loss and gradient finite in float32 for log-ratios of +-200; where
none is active the result is the unclamped formula):
    forward_kl, alpha: the exponent -alpha r (-r for forward KL) is clamped at EXP_MAX = 30, beyond
        which the score is constant and its gradient 0. exp(30) ~ 1.1e13 leaves room for IPO's
        square and for the LM-head backward's sums of these gradients over tokens and vocabulary.
    bpo: the paper's ratio clip R = exp(-m) in [bpo_min_ratio, bpo_max_ratio] (default R >= 0.01)
        clamps m to [-log R_max, -log R_min]; m is further kept where both BPO exponents are
        <= EXP_MAX. Outside the clamp the loss is constant and its gradient 0.
    js and reverse_kl need no clamp (softplus and sigmoid are evaluated in their stable forms).
"""

import math
from dataclasses import dataclass, fields

import torch

from .backends import Backend, resolve_backend
from .backends.pairs import divergence_score
from .options import DIVERGENCES, LOSS_SHAPES, SMOOTHED_SHAPES, PairLossSpec
from .outputs import PreferenceLossOutput

# Largest exponent of the forward-KL and alpha scores and of the BPO loss (see the module docstring).
EXP_MAX = 30.0


def check_options(
    *,
    divergence: str,
    alpha: float,
    loss: str,
    label_smoothing: float,
    bpo_lambda: float,
    nll_weight: float,
    bpo_min_ratio: float,
    bpo_max_ratio: float | None,
) -> None:
    """Raise ValueError naming the first hyper-parameter outside its allowed values."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if loss not in LOSS_SHAPES:
        raise ValueError(f"loss must be one of {LOSS_SHAPES}, got {loss!r}")
    if not (isinstance(alpha, (int, float)) and 0.0 < alpha < 1.0):
        raise ValueError(f"alpha must be in the open interval (0, 1) (the f-DPO paper's alpha; TRL >= 0.29's "
                         f"f_alpha_divergence_coef a corresponds to alpha = 1 - a), got {alpha!r}")
    if not (isinstance(label_smoothing, (int, float)) and 0.0 <= label_smoothing < 0.5):
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing!r}")
    if label_smoothing and loss not in SMOOTHED_SHAPES:
        raise ValueError(f"label_smoothing applies to loss in {SMOOTHED_SHAPES} only; got {label_smoothing} "
                         f"with loss={loss!r}")
    if not (isinstance(bpo_lambda, (int, float)) and math.isfinite(bpo_lambda) and bpo_lambda > -1.0):
        raise ValueError(f"bpo_lambda must be a finite number > -1, got {bpo_lambda!r}")
    if not (isinstance(nll_weight, (int, float)) and math.isfinite(nll_weight) and nll_weight >= 0.0):
        raise ValueError(f"nll_weight must be a finite number >= 0, got {nll_weight!r}")
    if not (isinstance(bpo_min_ratio, (int, float)) and 0.0 <= bpo_min_ratio < math.inf):
        raise ValueError(f"bpo_min_ratio must be a finite number >= 0 (0 for no lower clip), got {bpo_min_ratio!r}")
    if bpo_max_ratio is not None and not (isinstance(bpo_max_ratio, (int, float)) and bpo_min_ratio < bpo_max_ratio):
        raise ValueError(f"bpo_max_ratio must be None (no upper clip) or a number > bpo_min_ratio = {bpo_min_ratio}, "
                         f"got {bpo_max_ratio!r}")
    if loss == "bpo":
        bpo_margin_range(bpo_lambda, bpo_min_ratio, bpo_max_ratio)  # raises for a clip that leaves no margin


def check_beta(beta: float | torch.Tensor) -> None:
    """beta must be a positive finite float, or a float tensor [P] of positive finite betas."""
    if isinstance(beta, torch.Tensor):
        if not beta.dtype.is_floating_point or beta.dim() != 1:
            raise ValueError(f"beta must be a float > 0 or a 1-D float tensor [P] of per-pair betas > 0, "
                             f"got a {beta.dtype} tensor of shape {tuple(beta.shape)}")
        if not bool(((beta > 0) & beta.isfinite()).all()):
            raise ValueError("beta must be > 0 and finite for every pair; the per-pair beta tensor has "
                             f"values down to {float(beta.min())}")
    elif isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (0.0 < beta < math.inf):
        raise ValueError(f"beta must be a float > 0 or a float tensor [P] of per-pair betas > 0, got {beta!r}")


def bpo_margin_range(bpo_lambda: float, bpo_min_ratio: float, bpo_max_ratio: float | None,
                     exp_max: float = EXP_MAX) -> tuple[float, float]:
    """[m_lo, m_hi]: the paper's ratio clip R = exp(-m) in [R_min, R_max], narrowed so that the BPO
    exponents -(lambda+1) m and lambda m stay <= exp_max."""
    m_hi = -math.log(bpo_min_ratio) if bpo_min_ratio > 0 else math.inf
    m_lo = -math.log(bpo_max_ratio) if bpo_max_ratio is not None else -math.inf
    m_lo = max(m_lo, -exp_max / (bpo_lambda + 1.0))
    if bpo_lambda > 0:
        m_hi = min(m_hi, exp_max / bpo_lambda)
    elif bpo_lambda < 0:
        m_lo = max(m_lo, exp_max / bpo_lambda)
    if not m_lo < m_hi:
        raise ValueError(f"the BPO ratio clip [{bpo_min_ratio}, {bpo_max_ratio}] leaves no margin range at "
                         f"bpo_lambda={bpo_lambda} (m would be clamped to [{m_lo:.4g}, {m_hi:.4g}])")
    return m_lo, m_hi


def _per_pair(name: str, t, num_pairs: int | None, device: torch.device | None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point or t.dim() != 1:
        raise ValueError(f"{name} must be a 1-D float tensor [P] of per-sequence log-prob sums, got "
                         f"{f'a {t.dtype} tensor of shape {tuple(t.shape)}' if isinstance(t, torch.Tensor) else t!r}")
    if num_pairs is not None and t.shape[0] != num_pairs:
        raise ValueError(f"{name} has {t.shape[0]} pairs but policy_chosen has {num_pairs}: every per-pair "
                         "input must have the same length P")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but policy_chosen is on {device}")
    return t.float().contiguous()


def _lengths(name: str, t, num_pairs: int, device: torch.device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != num_pairs or t.dtype == torch.bool:
        raise ValueError(f"{name} must be a tensor [P] = [{num_pairs}] of scored-token counts, got "
                         f"{tuple(t.shape) if isinstance(t, torch.Tensor) else t!r}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but policy_chosen is on {device}")
    if not bool((t >= 1).all()):
        raise ValueError(f"{name} must be >= 1 for every pair (a response with no scored token has no "
                         f"normalized log-prob); got a minimum of {float(t.min())}")
    return t.detach().float().contiguous()


@dataclass(frozen=True)
class PairLossOptions:
    """The pair loss' hyper-parameters other than beta (see `preference_loss`), checked once, here.

    A module holds one for its lifetime; `preference_loss` builds one per call. `loss_of` computes
    the loss of P pairs under these options.
    """

    divergence: str = "reverse_kl"
    alpha: float = 0.5
    loss: str = "sigmoid"
    label_smoothing: float = 0.0
    bpo_lambda: float = -0.5
    nll_weight: float = 0.0
    bpo_min_ratio: float = 0.01
    bpo_max_ratio: float | None = None

    def __post_init__(self) -> None:
        check_options(**{f.name: getattr(self, f.name) for f in fields(self)})

    @property
    def uses_lengths(self) -> bool:
        """Whether the loss needs the scored-token counts (ipo, or an NLL term)."""
        return self.loss == "ipo" or self.nll_weight > 0

    def loss_of(
        self,
        policy_chosen: torch.Tensor,
        policy_rejected: torch.Tensor,
        ref_chosen: torch.Tensor,
        ref_rejected: torch.Tensor,
        *,
        beta: float | torch.Tensor,
        chosen_lengths: torch.Tensor | None = None,
        rejected_lengths: torch.Tensor | None = None,
        backend: str | Backend = "auto",
    ) -> PreferenceLossOutput:
        """`preference_loss` of the float [P] sums under these options (arguments as there)."""
        policy_chosen = _per_pair("policy_chosen", policy_chosen, None, None)
        num_pairs, device = policy_chosen.shape[0], policy_chosen.device
        if num_pairs < 1:
            raise ValueError("policy_chosen must hold at least one pair, got an empty tensor")
        policy_rejected = _per_pair("policy_rejected", policy_rejected, num_pairs, device)
        ref_chosen = _per_pair("ref_chosen", ref_chosen, num_pairs, device)
        ref_rejected = _per_pair("ref_rejected", ref_rejected, num_pairs, device)
        check_beta(beta)
        if isinstance(beta, torch.Tensor):
            if beta.shape[0] != num_pairs or beta.device != device:
                raise ValueError(f"beta as a tensor must be [P] = [{num_pairs}] on {device} (one beta per pair), "
                                 f"got shape {tuple(beta.shape)} on {beta.device}")
            beta = beta.detach().float().contiguous()
        else:
            beta = float(beta)
        if self.uses_lengths and (chosen_lengths is None or rejected_lengths is None):
            raise ValueError(f"chosen_lengths and rejected_lengths (scored-token counts [P]) are required for "
                             f"loss='ipo' or nll_weight > 0; got loss={self.loss!r}, nll_weight={self.nll_weight}")
        if (chosen_lengths is None) != (rejected_lengths is None):
            raise ValueError("chosen_lengths and rejected_lengths must be given together")
        if chosen_lengths is not None:
            chosen_lengths = _lengths("chosen_lengths", chosen_lengths, num_pairs, device)
            rejected_lengths = _lengths("rejected_lengths", rejected_lengths, num_pairs, device)
        margin_min, margin_max = (bpo_margin_range(self.bpo_lambda, self.bpo_min_ratio, self.bpo_max_ratio)
                                  if self.loss == "bpo" else (-math.inf, math.inf))
        spec = PairLossSpec(
            beta=beta, divergence=self.divergence, loss=self.loss, alpha=float(self.alpha),
            label_smoothing=float(self.label_smoothing), bpo_lambda=float(self.bpo_lambda), margin_min=margin_min,
            margin_max=margin_max, exp_max=EXP_MAX, nll_weight=float(self.nll_weight),
            chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
        if isinstance(backend, str):
            backend = resolve_backend(backend, device)
        value, nll, accuracy, pair_losses, chosen_rewards, rejected_rewards, margins = backend.pair_loss(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected, spec)
        extras = {"pair_losses": pair_losses,
                  "clamped": clamped_pairs(policy_chosen, policy_rejected, ref_chosen, ref_rejected, spec)}
        if chosen_lengths is not None:
            extras["nll"] = nll
        return PreferenceLossOutput(loss=value, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards,
                                    margins=margins, accuracy=accuracy, extras=extras)


@torch.no_grad()
def clamped_pairs(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                  ref_rejected: torch.Tensor, spec: PairLossSpec) -> torch.Tensor:
    """float32 [P]: 1 for the pairs where a clamp of the module docstring is active, i.e. where the
    gradient is not the unclamped formula's, else 0: a forward-KL / alpha score past EXP_MAX (that
    response's score gradient is 0) or a BPO margin outside [margin_min, margin_max] (the pair's
    gradient is 0). Decided on the float32 log-ratios (divided by the lengths for ipo) and the margin
    m = beta (g_w - g_l) formed as the torch backend forms it (`fdpo.backends.pairs`), so a margin at
    the clamp's edge is flagged as that backend clamps it; the triton kernel's own score functions may
    round a margin within a few ulps of the edge to the other side (divergences other than reverse
    KL). Its mean is the fraction of pairs with a response score or a margin past its clamp."""
    a = 1.0 if spec.divergence == "forward_kl" else spec.alpha
    clamped = torch.zeros_like(policy_chosen, dtype=torch.bool)
    scores = []
    for policy, ref, lengths in ((policy_chosen, ref_chosen, spec.chosen_lengths),
                                 (policy_rejected, ref_rejected, spec.rejected_lengths)):
        r = policy.float() - ref.float()
        if spec.loss == "ipo":
            r = r / lengths
        if spec.divergence in ("forward_kl", "alpha"):
            clamped |= -a * r > spec.exp_max
        scores.append(divergence_score(r, spec.divergence, spec.alpha, spec.exp_max)[0])
    if spec.loss == "bpo":
        m = spec.beta * (scores[0] - scores[1])
        clamped |= (m < spec.margin_min) | (m > spec.margin_max)
    return clamped.float()


def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float | torch.Tensor = 0.1,
    divergence: str = "reverse_kl",
    alpha: float = 0.5,
    loss: str = "sigmoid",
    label_smoothing: float = 0.0,
    bpo_lambda: float = -0.5,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    nll_weight: float = 0.0,
    backend: str | Backend = "auto",
    bpo_min_ratio: float = 0.01,
    bpo_max_ratio: float | None = None,
) -> PreferenceLossOutput:
    """f-DPO preference loss of P pairs from their per-sequence log-prob sums.

    Args:
        policy_chosen, policy_rejected: float [P] policy log-prob sums of the chosen (w) and
            rejected (l) responses, differentiable (computed in float32 whatever their dtype).
        ref_chosen, ref_rejected: float [P] reference sums (usually without grad; if they require
            grad they get the exact gradient too).
        beta: > 0; a float or a float tensor [P] of per-pair betas (epsilon-DPO), a constant for
            the gradient.
        divergence: "reverse_kl" (DPO) | "forward_kl" | "js" | "alpha" (see the module docstring).
        alpha: in (0, 1), the f-DPO paper's alpha (used by divergence="alpha"). TRL >= 0.29 names
            the same divergence by a = 1 - alpha: TRL's f_alpha_divergence_coef=a is alpha=1 - a here.
        loss: "sigmoid" | "robust" | "hinge" | "ipo" | "bpo".
        label_smoothing: eps in [0, 0.5) for "sigmoid" (cDPO) and "robust"; must be 0 otherwise.
        bpo_lambda: lambda > -1 of the BPO (SBA) loss; -0.5 is the paper's large-scale setting.
        bpo_min_ratio, bpo_max_ratio: BPO's clip of R = exp(-m) (0 / None for no clip).
        chosen_lengths, rejected_lengths: [P] counts (>= 1) of scored tokens per response; needed
            by loss="ipo" and by nll_weight > 0.
        nll_weight: adds nll_weight * mean(-policy_chosen / chosen_lengths) (RPO-style NLL).
        backend: "auto" | "triton" | "torch" | "reference" ("torch" and "reference" run the same
            PyTorch forward, "torch" with a hand-written backward, "reference" differentiated by
            autograd, which supports double backward; "triton" one kernel launch forward and one
            backward), or a backend already resolved by `fdpo.backends.resolve_backend`.

    Returns:
        PreferenceLossOutput: loss (scalar float32, differentiable: mean pair loss plus the NLL
        term), chosen_rewards / rejected_rewards [P] = beta * g(r) (beta * g(r / |y|) for ipo),
        margins [P] = their difference, accuracy = fraction of pairs with margin > 0; extras
        "pair_losses" [P], "clamped" ([P], 1 where a clamp of the module docstring silences part
        or all of the pair's gradient, else 0) and, when lengths are given, "nll" (the unweighted
        NLL term). All metrics are detached float32.

    Raises:
        ValueError: an unknown divergence or loss name, alpha outside (0, 1), beta <= 0,
            label_smoothing outside [0, 0.5), bpo_lambda <= -1, mismatched pair counts, missing
            or non-positive lengths where needed; the message names the argument.
    """
    options = PairLossOptions(divergence=divergence, alpha=alpha, loss=loss, label_smoothing=label_smoothing,
                              bpo_lambda=bpo_lambda, nll_weight=nll_weight, bpo_min_ratio=bpo_min_ratio,
                              bpo_max_ratio=bpo_max_ratio)
    return options.loss_of(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=beta,
                           chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths, backend=backend)
