"""nn.Modules over the fused kernels."""

import torch
from torch import nn

from .logprobs import LMHead, head_logprobs


class FusedLMHead(nn.Module):
    """An LM head whose forward returns label log-probs instead of logits.

    Holds (or shares with the model's `lm_head` Linear) the weight [V, D] and optional bias [V]:
    calling the head through this module, rather than reading `lm_head.weight` from outside, is
    what lets FSDP gather a sharded weight before the kernels read it.

    Example:
        head = FusedLMHead.from_linear(model.lm_head)                 # shares the Parameters
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
    ) -> None:
        super().__init__()
        if not isinstance(weight, nn.Parameter):
            weight = nn.Parameter(weight, requires_grad=weight.requires_grad)
        self.weight = weight
        if bias is not None and not isinstance(bias, nn.Parameter):
            bias = nn.Parameter(bias, requires_grad=bias.requires_grad)
        self.bias = bias
        self.softcap = softcap
        self.temperature = temperature
        self.ignore_index = ignore_index
        self.backend = backend
        self.deterministic = deterministic

    @classmethod
    def from_linear(cls, linear: nn.Linear, **options) -> "FusedLMHead":
        """A fused head sharing `linear`'s weight and bias Parameters (frozen stays frozen)."""
        return cls(linear.weight, linear.bias, **options)

    @property
    def spec(self) -> LMHead:
        """The head as the functional API takes it."""
        return LMHead(self.weight, self.bias, self.softcap, self.temperature)

    def forward(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor,
        *,
        cu_seqlens: torch.Tensor | None = None,
        per_sequence: bool = False,
    ) -> torch.Tensor:
        """Per-token log-probs (float32, hidden's leading shape) or per-sequence sums.

        per_sequence=False: hidden [..., D], labels [...] -> float32 [...], 0 at ignored tokens.
        per_sequence=True: padded hidden [B, T, D] -> [B], or packed hidden [N, D] with
        cu_seqlens [S + 1] -> [S] (as `fdpo.sequence_logprobs`).
        """
        return head_logprobs(hidden, self.spec, labels, ignore_index=self.ignore_index, cu_seqlens=cu_seqlens,
                             per_sequence=per_sequence or cu_seqlens is not None, backend=self.backend,
                             deterministic=self.deterministic)

    def extra_repr(self) -> str:
        vocab, dim = self.weight.shape
        return (f"vocab={vocab}, dim={dim}, bias={self.bias is not None}, softcap={self.softcap}, "
                f"temperature={self.temperature}, backend={self.backend!r}")
