"""Per-token and per-sequence label log-probs straight from hidden states and the LM head.

`token_logprobs` and `sequence_logprobs` never build the [tokens x vocabulary] logits on the
"triton" and "torch" backends: the forward keeps an online log-sum-exp over vocabulary tiles and
the backward recomputes each logit tile from the saved per-token LSE (docs/math.md sections 1 and 8).
They are the head statistics with no extras (`fdpo.head_stats`).
"""

import torch

from .head_stats import head_stats
from .heads import HeadInput, LMHead
from .options import BackwardOptions


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    temperature: float = 1.0,
    backend: str = "auto",
    deterministic: bool = False,
    backward_buffer_bytes: int | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """log p(label) of every token under the LM head, without materializing the logits.

    Args:
        hidden: [..., D] float16/bfloat16/float32 final hidden states; any leading shape and
            strides (e.g. `hidden[:, :-1]` is read in place).
        weight: [V, D] LM-head weight on the same device, of any float dtype. bias: [V] or None.
        labels: integer [...] (hidden's leading shape), in [0, V) or equal to `ignore_index`.
        softcap: c for logits c * tanh(z / c) (Gemma-2), or None. temperature: logits / T.
        backend: "auto" | "triton" | "torch" | "reference" (see `fdpo.backends`); only "reference"
            differentiates twice (create_graph=True raises RuntimeError on the others).
        deterministic: on the triton backend, accumulate gradients in a fixed order (no atomics); torch's
            deterministic mode (`torch.use_deterministic_algorithms(True)`) does the same.
        backward_buffer_bytes: on the triton backend, the most bytes of the split backward's dz buffer
            (None: 1 GiB where the cost model picks the split backward, see `fdpo.options.BackwardOptions`;
            0: the fused-atomics backward, no scratch).
        compute_dtype: the dtype the head's logit products and gradient GEMMs' operands are formed in
            (torch.float16, torch.bfloat16 or torch.float32; accumulated in float32, never a copy of
            the weight). None: the autocast dtype when torch.autocast is on for hidden's device, else
            hidden's dtype when weight shares it, float32 when they differ (`fdpo.LMHead.compute_dtype`).

    Returns:
        float32 [...] log-probs, exactly 0.0 where labels == ignore_index. Differentiable in hidden,
        weight and bias; ignored tokens get zero gradient.

    Example (inside a training step):
        hidden = model.model(input_ids).last_hidden_state          # [B, T, D], no logits
        lp = fdpo.token_logprobs(hidden[:, :-1], model.lm_head.weight, labels[:, 1:])
        loss = -(lp.sum(-1) / (labels[:, 1:] != -100).sum(-1)).mean()
        loss.backward()
    """
    policy = HeadInput(hidden, LMHead(weight, bias, softcap, temperature, compute_dtype=compute_dtype))
    backward = BackwardOptions(deterministic, backward_buffer_bytes)
    return head_stats(policy, labels, ignore_index=ignore_index, backend=backend, backward=backward).logprob


def sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    temperature: float = 1.0,
    backend: str = "auto",
    deterministic: bool = False,
    backward_buffer_bytes: int | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Sum of label log-probs over the non-ignored tokens of each sequence, without the logits.

    Layouts:
        padded: hidden [B, T, D] (any strides), labels [B, T] -> float32 [B];
        packed: hidden [N, D], labels [N], cu_seqlens integer [S + 1] (0 = c_0 <= ... <= c_S = N,
            sequence s is rows c_s .. c_{s+1} - 1) -> float32 [S].
    A sequence whose tokens are all ignored gets 0.0 and zero gradient. Other arguments as in
    `token_logprobs`; the per-sequence sums are accumulated inside the forward kernel (or, with
    deterministic=True, by fixed-order float64 per-sequence reductions).
    """
    policy = HeadInput(hidden, LMHead(weight, bias, softcap, temperature, compute_dtype=compute_dtype))
    return head_stats(policy, labels, ignore_index=ignore_index, cu_seqlens=cu_seqlens, per_sequence=True,
                      backend=backend, backward=BackwardOptions(deterministic, backward_buffer_bytes)).logprob
