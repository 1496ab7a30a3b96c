"""The names each choice of the API accepts, the pair loss' settings and the head backward's options,
defined once for the package, its kernels and benchmarks."""

from dataclasses import dataclass

import torch

from . import cost
from .gemm import accumulating_16bit_gemm

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


@dataclass(frozen=True)
class BackwardOptions:
    """How the triton backend runs the head statistics' backward (the other backends ignore these).

    deterministic: the fused backward (and the forward's per-sequence sums) add in a fixed order, no
        atomics; torch's deterministic mode has the same effect (`ordered`). The split backward has
        no atomics whatever this says.
    buffer_bytes: the public `backward_buffer_bytes`, the most bytes of the split backward's scratch
        dz buffer [C, V] in the head's dtype. 0: the fused-atomics backward, with no scratch. None
        (the default): a budget of `fdpo.cost.DEFAULT_BACKWARD_BUFFER_BYTES` (1 GiB) and the
        strategy the cost model predicts faster (`fdpo.cost.choose_backward`) on a CUDA device it
        knows; the fused backward on any other device. A positive budget: the cost model's choice
        on a known device, the split backward on any other; in both cases the fused backward when
        the budget holds not even one row of dz (V x itemsize bytes). Always the fused backward for
        a 16-bit head on a CUDA device where torch has no 16-bit GEMM accumulating into fp32
        (`fdpo.gemm.accumulating_16bit_gemm`: torch 2.8 and 2.9, whose addmm with out_dtype refuses
        an fp32 accumulator): there the split backward multiplies fp32 copies of dz, H[chunk] and W
        (on the FP32 units at torch's default float32 matmul precision), which the cost model does
        not price: about 10x its predicted time at N = 16384, V = 128256, D = 4096, and about twice
        the budget in fp32 copies beyond it.
    strategy: None for the rules above; "fused" or "split" (`fdpo.cost.STRATEGIES`) pins one on
        every device, as the benchmarks do to measure both (a split whose budget holds no row of dz
        still runs fused; a pinned split runs where its GEMMs fall back to fp32 copies too, at the
        cost above). Not a public argument: set on `FusedLMHead.backward_options`.
    Raises TypeError / ValueError at construction for a budget that is not None or an integer >= 0,
    or an unknown strategy.
    """

    deterministic: bool = False
    buffer_bytes: int | None = None
    strategy: str | None = None

    def __post_init__(self) -> None:
        if self.strategy is not None and self.strategy not in cost.STRATEGIES:
            raise ValueError(f"strategy must be None or one of {cost.STRATEGIES}, got {self.strategy!r}")
        budget = self.buffer_bytes
        if budget is None:
            return
        if not isinstance(budget, int) or isinstance(budget, bool):
            raise TypeError(f"backward_buffer_bytes must be None or an int (bytes), got {type(budget).__name__}")
        if budget < 0:
            raise ValueError(f"backward_buffer_bytes must be >= 0 (0: the fused backward, no scratch), got {budget}")

    @property
    def ordered(self) -> bool:
        """Whether the triton backend must add in a fixed order: `deterministic`, or torch's own
        deterministic mode (`torch.use_deterministic_algorithms(True)`, which TRL's and HF's
        `full_determinism` turn on) when the kernels run."""
        return self.deterministic or torch.are_deterministic_algorithms_enabled()

    def split_buffer_bytes(self, rows: int, vocab: int, hidden: int, dtype: torch.dtype,
                           device: torch.device) -> int:
        """The dz budget (bytes) of the split backward for `rows` scored rows through a [vocab, hidden]
        head of `dtype` on `device`, or 0 where the fused backward runs (see the class docstring)."""
        budget = cost.DEFAULT_BACKWARD_BUFFER_BYTES if self.buffer_bytes is None else self.buffer_bytes
        if rows == 0 or self.strategy == "fused" or cost.split_rows(vocab, dtype, budget) == 0:
            return 0
        if self.strategy == "split":
            return budget
        if device.type == "cuda" and dtype != torch.float32 and not accumulating_16bit_gemm(device, dtype):
            return 0
        spec = cost.known_device(device)
        if spec is None:
            return 0 if self.buffer_bytes is None else budget
        return budget if cost.choose_backward(rows, vocab, hidden, dtype, spec, budget) == "split" else 0


# The head backward's options when none are given: atomics allowed, the default buffer budget.
DEFAULT_BACKWARD = BackwardOptions()
