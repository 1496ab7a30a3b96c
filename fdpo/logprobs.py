"""Per-token and per-sequence label log-probs straight from hidden states and the LM head.

`token_logprobs` and `sequence_logprobs` never build the [tokens x vocabulary] logits on the
"triton" and "torch" backends: the forward keeps an online log-sum-exp over vocabulary tiles and
the backward recomputes each logit tile from the saved per-token LSE (docs/math.md sections 1 and 8).
"""

import math
from dataclasses import dataclass

import torch

from .backends import head_ops, reference, resolve_backend
from .backends.chunked import segment_sums

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The public entries whose gradients go through FusedHeadLogprobs' backward.
LOGPROB_FUNCTIONS = "fdpo.token_logprobs / fdpo.sequence_logprobs / fdpo.FusedLMHead / fdpo.PreferenceLoss"


@dataclass(frozen=True)
class LMHead:
    """How hidden states become logits: z = capped(h W^T + b) / temperature.

    weight [V, D] and bias [V] share the hidden states' dtype and device; softcap c gives
    c * tanh(z / c) (Gemma-2 final-logit soft-capping), None for none.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    softcap: float | None = None
    temperature: float = 1.0


@dataclass(frozen=True)
class ScoredTokens:
    """The tokens that are scored (label != ignore_index) and the sequences they sum into.

    rows: int64 [R] flat indices into the leading shape of the hidden states; labels: int32 [R];
    seq_ids: int32 [R] nondecreasing sequence index of each row (None for per-token outputs);
    num_seqs: S; lead_shape: the hidden states' leading shape (the shape of per-token outputs).
    """

    rows: torch.Tensor
    labels: torch.Tensor
    seq_ids: torch.Tensor | None
    num_seqs: int
    lead_shape: torch.Size

    @property
    def num_tokens(self) -> int:
        return self.lead_shape.numel()


def refuse_double_backward(functions: str, backend: str) -> None:
    """Raise inside a hand-written backward that is asked to build a graph (create_graph=True).

    Those backwards are not differentiable: the gradient they return would silently miss every
    second-order term. Autograd runs a backward with grad mode on exactly when create_graph=True.
    """
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{functions}: double backward (create_graph=True through this function's gradient) is not supported "
            f"on backend={backend!r}, whose backward is hand-written; use backend='reference' (plain autograd "
            "over materialized logits) for higher-order gradients such as gradient penalties")


def rows_view(hidden: torch.Tensor) -> torch.Tensor:
    """hidden [..., D] as a [B, T, D] view with the same rows in the same order, without copying.

    Leading dims are merged where their strides allow it, so contiguous tensors and slices such as
    `hidden[:, :-1]` stay views (the kernels read them in place). Leading shapes that cannot be
    expressed with two strides are copied.
    """
    *lead, dim = hidden.shape
    merged: list[tuple[int, int]] = []
    for size, stride in zip(lead, hidden.stride()[:-1], strict=True):
        if size == 1:
            continue
        if merged and merged[-1][1] == stride * size:
            merged[-1] = (merged[-1][0] * size, stride)
        else:
            merged.append((size, stride))
    if len(merged) > 2:
        return hidden.reshape(1, -1, dim)
    (b, stride_b), (t, stride_t) = [(1, 0)] * (2 - len(merged)) + merged
    return hidden.as_strided((b, t, dim), (stride_b, stride_t, hidden.stride(-1)))


def check_logit_scales(softcap: float | None, temperature: float, prefix: str = "") -> None:
    """softcap (None or a number) and temperature must be positive and finite: inf or nan turn every logit into NaN."""
    if softcap is not None and not (isinstance(softcap, (int, float)) and 0 < softcap < math.inf):
        raise ValueError(f"{prefix}softcap must be a positive finite number or None, got {softcap!r}")
    if not (isinstance(temperature, (int, float)) and 0 < temperature < math.inf):
        raise ValueError(f"{prefix}temperature must be a positive finite number, got {temperature!r}")


def check_head(hidden: torch.Tensor, head: LMHead, labels: torch.Tensor, ignore_index: int, prefix: str = "") -> None:
    """Validate one head applied to `hidden` with `labels`; `prefix` (e.g. "ref_") names the arguments."""
    if not isinstance(hidden, torch.Tensor) or hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{prefix}hidden must be a float16, bfloat16 or float32 tensor, got "
                        f"{getattr(hidden, 'dtype', type(hidden).__name__)}")
    if hidden.dim() < 1:
        raise ValueError(f"{prefix}hidden must have shape [..., D], got a scalar")
    weight, bias = head.weight, head.bias
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{prefix}weight must be a [V, D] tensor with D = {hidden.shape[-1]} "
                         f"({prefix}hidden's last dim), got {tuple(getattr(weight, 'shape', ()))}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{prefix}weight dtype {weight.dtype} must match {prefix}hidden dtype {hidden.dtype} "
                        "(cast one of them; mixed-precision heads are not fused)")
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{prefix}bias must have shape [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"{prefix}bias dtype {bias.dtype} must match {prefix}hidden dtype {hidden.dtype}")
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype.is_complex \
            or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {getattr(labels, 'dtype', type(labels).__name__)}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}")
    for name, t in ((f"{prefix}weight", weight), (f"{prefix}bias", bias), ("labels", labels)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but {prefix}hidden is on {hidden.device}: "
                             "all inputs must be on one device")
    check_logit_scales(head.softcap, head.temperature, prefix)
    vocab = weight.shape[0]
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bad.any():
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}; "
                         f"found {int(labels[first])} at index {first}")


def _check_cu_seqlens(cu_seqlens: torch.Tensor, hidden: torch.Tensor) -> None:
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype.is_floating_point \
            or cu_seqlens.dtype == torch.bool or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise TypeError("cu_seqlens must be a 1-D integer tensor [S + 1] of sequence boundaries")
    if hidden.dim() != 2:
        raise ValueError(f"the packed layout (cu_seqlens given) needs hidden [N, D], got {tuple(hidden.shape)}")
    if cu_seqlens.device != hidden.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but hidden is on {hidden.device}")
    n = hidden.shape[0]
    # In int64: differences of small unsigned dtypes wrap around (uint8 2 - 4 = 254 "never decreases").
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != n or bool((cu_seqlens.long().diff() < 0).any()):
        raise ValueError(f"cu_seqlens must start at 0, never decrease and end at N = {n}; "
                         f"got {cu_seqlens.tolist() if cu_seqlens.numel() <= 16 else 'a tensor that does not'}")


def check_packed_layout(hidden: torch.Tensor, cu_seqlens: torch.Tensor | None, per_sequence: bool) -> None:
    """Per-sequence sums need padded hidden [B, T, D], or packed hidden [N, D] with valid cu_seqlens."""
    if cu_seqlens is not None:
        _check_cu_seqlens(cu_seqlens, hidden)
    elif per_sequence and hidden.dim() != 3:
        raise ValueError(f"per-sequence sums (sequence_logprobs) needs padded hidden [B, T, D] with labels "
                         f"[B, T], or packed hidden [N, D] with cu_seqlens; got hidden of shape {tuple(hidden.shape)}")


def packed_seq_ids(cu_seqlens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """int64 sequence index of each packed token position, given boundaries cu_seqlens [S + 1]."""
    return torch.searchsorted(cu_seqlens.long(), positions.long(), right=True) - 1


def scored_tokens(labels: torch.Tensor, ignore_index: int, cu_seqlens: torch.Tensor | None = None,
                  per_sequence: bool = False) -> ScoredTokens:
    """Index the non-ignored tokens of `labels` and, for per-sequence sums, their sequences.

    Per sequence: padded labels [B, T] give one sequence per row; packed labels [N] with
    cu_seqlens [S + 1] give S sequences.
    """
    flat = labels.reshape(-1)
    rows = (flat != ignore_index).nonzero().squeeze(1)
    seq_ids, num_seqs = None, 0
    if per_sequence and cu_seqlens is None:
        num_seqs = labels.shape[0]
        seq_ids = (rows // labels.shape[1]).to(torch.int32)
    elif per_sequence:
        num_seqs = cu_seqlens.numel() - 1
        seq_ids = packed_seq_ids(cu_seqlens, rows).to(torch.int32)
    return ScoredTokens(rows, flat[rows].to(torch.int32), seq_ids, num_seqs, labels.shape)


class FusedHeadLogprobs(torch.autograd.Function):
    """Label log-probs of scored tokens through the LM head, with a hand-written backward.

    forward(hidden, weight, bias, head, tokens, backend, deterministic) returns float32 per-token
    log-probs of shape tokens.lead_shape (0 at ignored tokens) when tokens.seq_ids is None, else
    float32 per-sequence sums [tokens.num_seqs]. Saves only the inputs and the per-token LSE.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, head: LMHead, tokens: ScoredTokens, backend: str, deterministic: bool):
        ops = head_ops(backend)
        kernel_seq_ids = None if deterministic else tokens.seq_ids
        logprob, lse, seq_sums = ops.logprob_forward(
            rows_view(hidden), weight, tokens.rows, tokens.labels, bias=bias, seq_ids=kernel_seq_ids,
            num_seqs=tokens.num_seqs, softcap=head.softcap, temperature=head.temperature)
        ctx.save_for_backward(hidden, weight, bias, lse)
        ctx.head, ctx.tokens, ctx.backend, ctx.deterministic = head, tokens, backend, deterministic
        if tokens.seq_ids is None:
            out = logprob.new_zeros(tokens.num_tokens).index_copy_(0, tokens.rows, logprob)
            return out.view(tokens.lead_shape)
        return seq_sums if seq_sums is not None else segment_sums(logprob, tokens.seq_ids, tokens.num_seqs)

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward(LOGPROB_FUNCTIONS, ctx.backend)
        hidden, weight, bias, lse = ctx.saved_tensors
        tokens: ScoredTokens = ctx.tokens
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        if tokens.seq_ids is None:
            grad = grad_out.reshape(-1)[tokens.rows]
        else:
            grad = grad_out[tokens.seq_ids.long()]
        d_hidden, d_weight, d_bias = head_ops(ctx.backend).logprob_backward(
            rows_view(hidden), weight, tokens.rows, tokens.labels, lse, grad.float().contiguous(),
            bias=bias, softcap=ctx.head.softcap, temperature=ctx.head.temperature,
            need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias,
            deterministic=ctx.deterministic)
        if d_hidden is not None:
            full = hidden.new_zeros(tokens.num_tokens, hidden.shape[-1])
            d_hidden = full.index_copy_(0, tokens.rows, d_hidden.to(hidden.dtype)).view(hidden.shape)
        if d_weight is not None:
            d_weight = d_weight.to(weight.dtype)
        if d_bias is not None:
            d_bias = d_bias.to(bias.dtype)
        return d_hidden, d_weight, d_bias, None, None, None, None


def head_logprobs(
    hidden: torch.Tensor,
    head: LMHead,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    cu_seqlens: torch.Tensor | None = None,
    per_sequence: bool = False,
    backend: str = "auto",
    deterministic: bool = False,
) -> torch.Tensor:
    """Shared entry of `token_logprobs` and `sequence_logprobs` (validated, dispatched)."""
    check_head(hidden, head, labels, ignore_index)
    check_packed_layout(hidden, cu_seqlens, per_sequence)
    concrete = resolve_backend(backend, hidden.device)
    if concrete == "reference":
        values = reference.token_logprobs(hidden, head.weight, labels, bias=head.bias, ignore_index=ignore_index,
                                          softcap=head.softcap, temperature=head.temperature)
        if not per_sequence or cu_seqlens is None:
            return values.sum(dim=-1) if per_sequence else values
        positions = torch.arange(labels.numel(), device=labels.device)
        return values.new_zeros(cu_seqlens.numel() - 1).index_add(0, packed_seq_ids(cu_seqlens, positions), values)
    tokens = scored_tokens(labels, ignore_index, cu_seqlens, per_sequence)
    return FusedHeadLogprobs.apply(hidden, head.weight, head.bias, head, tokens, concrete, deterministic)


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
) -> torch.Tensor:
    """log p(label) of every token under the LM head, without materializing the logits.

    Args:
        hidden: [..., D] float16/bfloat16/float32 final hidden states; any leading shape and
            strides (e.g. `hidden[:, :-1]` is read in place).
        weight: [V, D] LM-head weight, same dtype and device. bias: [V] or None.
        labels: integer [...] (hidden's leading shape), in [0, V) or equal to `ignore_index`.
        softcap: c for logits c * tanh(z / c) (Gemma-2), or None. temperature: logits / T.
        backend: "auto" | "triton" | "torch" | "reference" (see `fdpo.backends`); only "reference"
            differentiates twice (create_graph=True raises RuntimeError on the others).
        deterministic: on the triton backend, accumulate gradients in a fixed order (no atomics).

    Returns:
        float32 [...] log-probs, exactly 0.0 where labels == ignore_index. Differentiable in hidden,
        weight and bias; ignored tokens get zero gradient.

    Example (inside a training step):
        hidden = model.model(input_ids).last_hidden_state          # [B, T, D], no logits
        lp = fdpo.token_logprobs(hidden[:, :-1], model.lm_head.weight, labels[:, 1:])
        loss = -(lp.sum(-1) / (labels[:, 1:] != -100).sum(-1)).mean()
        loss.backward()
    """
    return head_logprobs(hidden, LMHead(weight, bias, softcap, temperature), labels,
                         ignore_index=ignore_index, backend=backend, deterministic=deterministic)


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
    return head_logprobs(hidden, LMHead(weight, bias, softcap, temperature), labels,
                         ignore_index=ignore_index, cu_seqlens=cu_seqlens, per_sequence=True,
                         backend=backend, deterministic=deterministic)
