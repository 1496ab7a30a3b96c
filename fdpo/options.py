"""The names each choice of the API accepts, and the pair loss' settings, defined once for the package,
its kernels and benchmarks."""

from dataclasses import dataclass

import torch

# backend=: "auto" picks triton on CUDA (or under TRITON_INTERPRET=1), torch otherwise (fdpo.backends).
BACKENDS = ("auto", "triton", "torch", "reference")
# divergence=: the f-DPO score g(r) of docs/math.md 2.
DIVERGENCES = ("reverse_kl", "forward_kl", "js", "alpha")
# loss=: the loss shapes of docs/math.md 3 and 4.
LOSS_SHAPES = ("sigmoid", "robust", "hinge", "ipo", "bpo")
# The loss shapes that take label_smoothing.
SMOOTHED_SHAPES = ("sigmoid", "robust")


@dataclass(frozen=True)
class PairLossSpec:
    """Everything about the pair loss except the four differentiable log-prob sums (docs/math.md 2, 3 and 4).

    beta: float or float32 [P]; divergence in DIVERGENCES, alpha its parameter; loss in LOSS_SHAPES,
    label_smoothing (sigmoid, robust) and bpo_lambda its parameters; margin_min / margin_max: the BPO
    clamp of m; exp_max: the largest exponent of the forward-KL and alpha scores and of BPO;
    nll_weight: the weight of the NLL term; chosen_lengths / rejected_lengths: float32 [P]
    scored-token counts or None (constants, never differentiated).
    """

    beta: float | torch.Tensor
    divergence: str
    loss: str
    alpha: float
    label_smoothing: float
    bpo_lambda: float
    margin_min: float
    margin_max: float
    exp_max: float
    nll_weight: float
    chosen_lengths: torch.Tensor | None = None
    rejected_lengths: torch.Tensor | None = None
