"""The LM head, the hidden states it is applied to, and the layout of the tokens it scores.

One set of types carries a head from the public API down to the kernel launchers:

- `LMHead`: weight [V, D], bias [V] or None, softcap, temperature, scale, gather, compute_dtype:
  z = capped(scale (h W^T + b)) / T, the products formed in the compute dtype (`head_compute_dtype`);
- `HeadInput`: hidden states [..., D] with the head applied to them (the policy, or the reference);
- `ScoredTokens`: the scored rows (label != ignore_index), their int32 labels, the sequence each
  belongs to, and the per-sequence sums and counts over them;
- `HeadStats`: the per-token statistics of one fused pass (log-probs are statistics with no extras);
- `StatsGrad`: what a hand-written backward of those statistics differentiates (the forward's saved
  per-row tensors, the per-row gradients, and which of the head's gradients are needed).

Nothing here needs Triton; the checks raise ValueError / TypeError naming the argument at fault.
"""

import math
import numbers
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field, fields, replace

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The device types whose torch.autocast state `autocast_compute_dtype` reads.
AUTOCAST_DEVICES = ("cuda", "cpu", "xpu", "mps", "hpu")
# Rows per block of the padded reductions of `segment_sums`.
SEGMENT_BLOCK = 256


def check_logit_scales(softcap: float | None, temperature: float, prefix: str = "", scale: float = 1.0) -> None:
    """softcap (None or a number), temperature and scale must be positive and finite: inf or nan turn
    every logit into NaN. A scale that is not a number raises TypeError."""
    if softcap is not None and (isinstance(softcap, bool) or not (isinstance(softcap, (int, float))
                                                                  and 0 < softcap < math.inf)):
        raise ValueError(f"{prefix}softcap must be a positive finite number or None, got {softcap!r}")
    if isinstance(temperature, bool) or not (isinstance(temperature, (int, float)) and 0 < temperature < math.inf):
        raise ValueError(f"{prefix}temperature must be a positive finite number, got {temperature!r}")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"{prefix}logit_scale (the head's scale) must be a number, got {type(scale).__name__}")
    if not 0 < scale < math.inf:
        raise ValueError(f"{prefix}logit_scale (the head's scale) must be a positive finite number, got {scale!r}")


def compute_dtype(hidden_dtype: torch.dtype, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype a head without an explicit `LMHead.compute_dtype` is multiplied in outside autocast:
    the inputs' own when hidden and weight share it, else float32 (the wider of two float dtypes, or
    fp32 for float16 with bfloat16; docs/math.md 13)."""
    return hidden_dtype if hidden_dtype == weight_dtype else torch.float32


def check_compute_dtype(dtype: torch.dtype | None, prefix: str = "") -> None:
    """`dtype` must be None or one of FLOAT_DTYPES: TypeError for something that is not a torch.dtype,
    ValueError for another dtype."""
    if dtype is None:
        return
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{prefix}compute_dtype must be None or a torch.dtype among torch.float16, torch.bfloat16, "
                        f"torch.float32, got {type(dtype).__name__}")
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{prefix}compute_dtype must be None, torch.float16, torch.bfloat16 or torch.float32, "
                         f"got {dtype}")


@dataclass(frozen=True)
class LMHead:
    """How hidden states become logits: z = capped(scale * (h W^T + b)) / temperature (docs/math.md 0, 13).

    weight [V, D] and bias [V] are float tensors on the hidden states' device, of any float dtypes.
    compute_dtype (float16, bfloat16, float32 or None) is the dtype the logit products and the
    gradient GEMMs' operands are formed in: hidden-state and weight tiles are rounded to it in
    registers (or chunk by chunk), never copied whole, and accumulated in float32; the bias is added
    in float32 as given. None: the autocast dtype where torch.autocast is on for the hidden states'
    device when a public entry is called (as an nn.Linear under autocast), else `compute_dtype(hidden
    dtype, weight dtype)` (`head_compute_dtype`; docs/math.md 13). Gradients come back in each
    tensor's own dtype. softcap c gives c * tanh(x / c) (Gemma-2 final-logit soft-capping), None
    for none. scale multiplies the logits, bias included, before the soft cap (TRL's `logit_scale`;
    Cohere). gather: None, or a zero-argument callable returning a context manager entered around
    every use of weight and bias, in the forward and in the hand-written backwards that recompute
    the logits (DeepSpeed ZeRO-3, whose partitioned parameters are empty outside it).
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    softcap: float | None = None
    temperature: float = 1.0
    # Keyword-only: the public API adds only keyword-only parameters (tests/test_public_api.py).
    scale: float = field(default=1.0, kw_only=True)
    gather: Callable[[], AbstractContextManager] | None = field(default=None, kw_only=True)
    compute_dtype: torch.dtype | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        check_compute_dtype(self.compute_dtype)

    def detached(self) -> "LMHead":
        """The same head with weight and bias detached (a constant, as the reference is)."""
        return replace(self, weight=self.weight.detach(), bias=None if self.bias is None else self.bias.detach())


def gathered(*heads: "LMHead | None") -> ExitStack:
    """One context entering the `gather` of each given head (in order), for a use of their weights.

    Raises TypeError for a gather that is not callable.
    """
    stack = ExitStack()
    with stack:
        for head in heads:
            if head is None or head.gather is None:
                continue
            if not callable(head.gather):
                raise TypeError("gather must be None or a zero-argument callable returning a context manager, "
                                f"got {type(head.gather).__name__}")
            stack.enter_context(head.gather())
        return stack.pop_all()


@dataclass(frozen=True)
class HeadInput:
    """Hidden states [..., D] with the head that turns them into logits.

    `prefix` names the head's arguments in error messages ("" for the policy, "ref_" for the reference).
    """

    hidden: torch.Tensor
    head: LMHead
    prefix: str = ""

    @property
    def weight(self) -> torch.Tensor:
        return self.head.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.head.bias

    def rows_view(self) -> "HeadInput":
        """The same input with hidden as a [B, T, D] view of the same rows (see `rows_view`)."""
        return replace(self, hidden=rows_view(self.hidden))

    def detached(self) -> "HeadInput":
        return HeadInput(self.hidden.detach(), self.head.detached(), self.prefix)

    def check(self, labels: torch.Tensor, ignore_index: int, label_values: bool = True) -> None:
        """Validate the head applied to `hidden` with `labels` (integer, hidden's leading shape).

        label_values: also check that every label is in [0, V) or ignore_index (one read of the
        labels on the host, as each check of tensor values on CUDA).
        """
        check_ignore_index(ignore_index)
        p, hidden, weight, bias = self.prefix, self.hidden, self.head.weight, self.head.bias
        if not isinstance(hidden, torch.Tensor) or hidden.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{p}hidden must be a float16, bfloat16 or float32 tensor, got "
                            f"{getattr(hidden, 'dtype', type(hidden).__name__)}")
        if hidden.dim() < 1:
            raise ValueError(f"{p}hidden must have shape [..., D], got a scalar")
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
            raise ValueError(f"{p}weight must be a [V, D] tensor with D = {hidden.shape[-1]} "
                             f"({p}hidden's last dim), got {tuple(getattr(weight, 'shape', ()))}")
        if weight.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{p}weight dtype {weight.dtype} is not float16, bfloat16 or float32")
        for name, tensor in ((f"{p}hidden", hidden), (f"{p}weight", weight), (f"{p}bias", bias)):
            if tensor is not None and is_sharded(tensor):
                raise TypeError(f"{name} is a DTensor, a tensor FSDP2 (fully_shard) keeps sharded outside the "
                                "forward of the module it shards: call the head inside that module's forward (shard "
                                "a module that holds the head and its Linear together, such as the model's root), or "
                                "pass full tensors (.full_tensor())")
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],):
                raise ValueError(f"{p}bias must have shape [V] = [{weight.shape[0]}], got "
                                 f"{tuple(getattr(bias, 'shape', ()))}")
            if bias.dtype not in FLOAT_DTYPES:
                raise TypeError(f"{p}bias dtype {bias.dtype} is not float16, bfloat16 or float32")
        if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype.is_complex \
                or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor, got {getattr(labels, 'dtype', type(labels).__name__)}")
        if labels.shape != hidden.shape[:-1]:
            raise ValueError(f"labels shape {tuple(labels.shape)} must equal hidden's leading shape "
                             f"{tuple(hidden.shape[:-1])}")
        for name, t in ((f"{p}weight", weight), (f"{p}bias", bias), ("labels", labels)):
            if t is not None and t.device != hidden.device:
                raise ValueError(f"{name} is on {t.device} but {p}hidden is on {hidden.device}: "
                                 "all inputs must be on one device")
        check_logit_scales(self.head.softcap, self.head.temperature, p, self.head.scale)
        if not label_values:
            return
        vocab = weight.shape[0]
        labels = labels.long()  # compared as int64: ignore_index in a narrower dtype would wrap (uint8: -100 -> 156)
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
        if bad.any():
            first = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}; "
                             f"found {int(labels[first])} at index {first}")

    def check_reference(self, ref: "HeadInput", labels: torch.Tensor, ignore_index: int) -> None:
        """`ref` must score this input's tokens (same leading shape) over the same vocabulary, on its device.

        The labels' values are not read again: this input's `check` read them against the same V.
        """
        hidden, ref_hidden = self.hidden, ref.hidden
        same_tokens = isinstance(ref_hidden, torch.Tensor) and ref_hidden.dim() >= 1 \
            and ref_hidden.shape[:-1] == hidden.shape[:-1]
        if not same_tokens:
            raise ValueError(f"ref_hidden must have hidden's leading shape {tuple(hidden.shape[:-1])} (one row per "
                             f"token, any hidden size), got {tuple(getattr(ref_hidden, 'shape', ()))}")
        ref.check(labels, ignore_index, label_values=False)
        if ref.weight.shape[0] != self.weight.shape[0]:
            raise ValueError(f"ref_weight has {ref.weight.shape[0]} vocabulary rows but weight has "
                             f"{self.weight.shape[0]}: the two heads must share one vocabulary")
        if ref_hidden.device != hidden.device:
            raise ValueError(f"ref_hidden is on {ref_hidden.device} but hidden is on {hidden.device}")


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a torch.distributed DTensor (one shard of a parameter FSDP2 manages)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def head_compute_dtype(head: HeadInput) -> torch.dtype:
    """The dtype `head`'s logit products and gradient GEMMs' operands are formed in: the head's explicit
    `LMHead.compute_dtype`, else `compute_dtype(hidden dtype, weight dtype)` (docs/math.md 13)."""
    explicit = head.head.compute_dtype
    return explicit if explicit is not None else compute_dtype(head.hidden.dtype, head.weight.dtype)


def autocast_compute_dtype(head: HeadInput) -> HeadInput:
    """`head` as a public entry computes it: without an explicit `LMHead.compute_dtype`, the autocast
    dtype where torch.autocast is enabled for the hidden states' device at the call (what an
    nn.Linear under autocast multiplies in), made explicit so that the backward, which runs outside
    the autocast context, forms its products in the same dtype. An explicit compute_dtype, or no
    autocast, leaves the head as it is."""
    if not isinstance(head.head, LMHead) or head.head.compute_dtype is not None \
            or not isinstance(head.hidden, torch.Tensor):
        return head
    device = head.hidden.device.type
    if device not in AUTOCAST_DEVICES or not torch.is_autocast_enabled(device):
        return head
    return replace(head, head=replace(head.head, compute_dtype=torch.get_autocast_dtype(device)))


def zero_head_grads(policy: HeadInput, num_rows: int, *, need_hidden: bool, need_weight: bool,
                    need_bias: bool) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The float32 accumulators a head backward adds into, zeroed on the policy's device:
    (d_hidden [num_rows, D], d_weight [V, D], d_bias [V]), None where not needed."""
    vocab, dim = policy.weight.shape
    f32 = dict(dtype=torch.float32, device=policy.hidden.device)
    return (torch.zeros(num_rows, dim, **f32) if need_hidden else None,
            torch.zeros(vocab, dim, **f32) if need_weight else None,
            torch.zeros(vocab, **f32) if need_bias else None)


def check_row_vectors(hidden: torch.Tensor, rows: torch.Tensor, **named: torch.Tensor | None) -> None:
    """Each given per-row tensor is a contiguous float32 [R] (R = rows.numel()) on hidden's device;
    None is skipped.

    Raises ValueError naming the tensor at fault.
    """
    for name, t in named.items():
        if t is None:
            continue
        if t.dtype != torch.float32 or t.shape != rows.shape or t.device != hidden.device:
            raise ValueError(f"{name} must be float32 of shape {tuple(rows.shape)} on {hidden.device}, "
                             f"got {t.dtype} of shape {tuple(t.shape)} on {t.device}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (the kernels read row r at ptr + r), got strides "
                             f"{t.stride()}: pass {name}.contiguous()")


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


def segment_sums(values: torch.Tensor, seq_ids: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """float32 [num_seqs] sums of float32 `values` [R] whose nondecreasing `seq_ids` are in [0, num_seqs).

    Accumulated in float64 by fixed-shape padded reductions, never by atomics or by differencing a
    prefix sum: deterministic on every device, and a NaN or inf reaches only its own sequence's sum.
    Segments longer than SEGMENT_BLOCK rows are first cut into blocks of SEGMENT_BLOCK rows whose sums
    are reduced again the same way. Sequences without rows get 0. Differentiable in `values`.
    """
    counts = torch.bincount(seq_ids.long(), minlength=num_seqs)
    sums = values.double()
    while True:
        longest = int(counts.max()) if num_seqs else 0
        width = max(1, min(SEGMENT_BLOCK, longest))
        blocks = counts.add(width - 1).div(width, rounding_mode="floor").clamp(min=1)
        sums = block_sums(sums, counts, blocks, width)
        if longest <= width:
            return sums.float()
        counts = blocks


def block_sums(values: torch.Tensor, counts: torch.Tensor, blocks: torch.Tensor, width: int) -> torch.Tensor:
    """Row sums of the zero-padded [blocks.sum(), width] matrix holding each segment's values in order.

    Segment s is counts[s] consecutive entries of `values`, laid out over its blocks[s] rows
    (counts[s] <= blocks[s] * width). Each entry is written once, so the layout is deterministic.
    """
    positions = torch.arange(values.numel(), device=values.device)
    segment = torch.repeat_interleave(torch.arange(counts.numel(), device=values.device), counts,
                                      output_size=values.numel())
    offset = positions - (counts.cumsum(0) - counts)[segment]
    padded = values.new_zeros(int(blocks.sum()), width)
    padded[(blocks.cumsum(0) - blocks)[segment] + offset // width, offset % width] = values
    return padded.sum(dim=1)


@dataclass(frozen=True)
class ScoredTokens:
    """The tokens that are scored (label != ignore_index) and the sequences they sum into.

    rows: int64 [R] flat indices into the leading shape of the hidden states; labels: int32 [R];
    seq_ids: int32 [R] nondecreasing sequence index of each row (None for per-token outputs);
    num_seqs: S; lead_shape: the hidden states' leading shape (the shape of per-token outputs).
    """

    rows: torch.Tensor
    labels: torch.Tensor
    seq_ids: torch.Tensor | None = None
    num_seqs: int = 0
    lead_shape: torch.Size | None = None

    @property
    def num_tokens(self) -> int:
        return self.lead_shape.numel()

    @property
    def per_sequence(self) -> bool:
        return self.seq_ids is not None

    def layout(self, values: torch.Tensor) -> torch.Tensor:
        """Per-row float32 values [R] as the output: per-sequence sums [S], or lead_shape with 0 at ignored tokens.

        The per-token output is allocated in its final shape and filled through a flat view, so that it
        is no view itself: an autograd Function returning a view it made refuses in-place changes of it
        (`lp[~mask] = 0`, `masked_fill_`).
        """
        if self.per_sequence and self.lead_shape is not None and len(self.lead_shape) == 2:
            # Padded [B, T]: each row of the zero-filled float64 [B, T] layout is one sequence. The
            # same fixed-order reduction as segment_sums', without its host reads of the lengths.
            padded = values.new_zeros(self.num_tokens, dtype=torch.float64)
            return padded.index_copy(0, self.rows, values.double()).view(self.lead_shape).sum(1).float()
        if self.per_sequence:
            return segment_sums(values, self.seq_ids, self.num_seqs)
        out = values.new_zeros(self.lead_shape)
        out.view(-1).index_copy_(0, self.rows, values)
        return out

    def row_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """The gradient of an output laid out by `layout`, as float32 [R] per-row gradients."""
        picked = grad[self.seq_ids.long()] if self.per_sequence else grad.reshape(-1)[self.rows]
        return picked.float().contiguous()

    def counts(self) -> torch.Tensor:
        """float32 [S] number of scored tokens of each sequence."""
        # Exact integer sums in float32 whatever the order; unlike bincount, no host read of the size.
        ones = torch.ones(self.seq_ids.numel(), device=self.seq_ids.device)
        return ones.new_zeros(self.num_seqs).index_add_(0, self.seq_ids.long(), ones)

    def scatter_rows(self, rows_grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Per-row gradients [R, D] as a gradient of `like` [..., D], zero at the rows not scored."""
        full = like.new_zeros(self.num_tokens, like.shape[-1])
        return full.index_copy_(0, self.rows, rows_grad.to(like.dtype)).view(like.shape)


def check_cu_seqlens(cu_seqlens: torch.Tensor, hidden: torch.Tensor) -> None:
    """Packed layouts need hidden [N, D] and integer boundaries 0 = c_0 <= ... <= c_S = N."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype.is_floating_point \
            or cu_seqlens.dtype == torch.bool or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise TypeError("cu_seqlens must be a 1-D integer tensor [S + 1] of sequence boundaries")
    if hidden.dim() != 2:
        raise ValueError(f"the packed layout (cu_seqlens given) needs hidden [N, D], got {tuple(hidden.shape)}")
    if cu_seqlens.device != hidden.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but hidden is on {hidden.device}")
    n = hidden.shape[0]
    # In int64: differences of small unsigned dtypes wrap around (uint8 2 - 4 = 254 "never decreases").
    # One host read for the three conditions.
    cu = cu_seqlens.long()
    if bool((cu[0] != 0) | (cu[-1] != n) | (cu.diff() < 0).any()):
        raise ValueError(f"cu_seqlens must start at 0, never decrease and end at N = {n}; "
                         f"got {cu_seqlens.tolist() if cu_seqlens.numel() <= 16 else 'a tensor that does not'}")


def check_packed_layout(hidden: torch.Tensor, cu_seqlens: torch.Tensor | None, per_sequence: bool) -> None:
    """Per-sequence sums need padded hidden [B, T, D], or packed hidden [N, D] with valid cu_seqlens."""
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, hidden)
    elif per_sequence and hidden.dim() != 3:
        raise ValueError(f"per-sequence sums (sequence_logprobs) needs padded hidden [B, T, D] with labels "
                         f"[B, T], or packed hidden [N, D] with cu_seqlens; got hidden of shape {tuple(hidden.shape)}")


def check_ignore_index(ignore_index) -> None:
    """ignore_index must be an integer (a Python or numpy int; not a bool): the label value not scored."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an integer (the label value that is not scored), got "
                        f"{type(ignore_index).__name__} {ignore_index!r}")


def scored_tokens(labels: torch.Tensor, ignore_index: int, cu_seqlens: torch.Tensor | None = None,
                  per_sequence: bool = False) -> ScoredTokens:
    """Index the non-ignored tokens of `labels` and, for per-sequence sums, their sequences.

    Per sequence: padded labels [B, T] give one sequence per row; packed labels [N] with
    cu_seqlens [S + 1] give S sequences.
    """
    check_ignore_index(ignore_index)
    flat = labels.reshape(-1).long()  # ignore_index compared as int64, as `HeadInput.check` does
    rows = (flat != ignore_index).nonzero().squeeze(1)
    seq_ids, num_seqs = None, 0
    if per_sequence and cu_seqlens is None:
        num_seqs = labels.shape[0]
        seq_ids = (rows // labels.shape[1]).to(torch.int32)
    elif per_sequence:
        num_seqs = cu_seqlens.numel() - 1
        seq_ids = (torch.searchsorted(cu_seqlens.long(), rows, right=True) - 1).to(torch.int32)
    return ScoredTokens(rows, flat[rows].to(torch.int32), seq_ids, num_seqs, labels.shape)


def count_pairs(hidden: torch.Tensor, labels: torch.Tensor, cu_seqlens: torch.Tensor | None) -> int:
    """P, for hidden holding 2P sequences (P chosen, then P rejected), padded or packed."""
    if cu_seqlens is None:
        if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
            raise ValueError(f"padded inputs need hidden [2P, T, D] and labels [2P, T], got hidden "
                             f"{tuple(hidden.shape)} and labels {tuple(labels.shape)} (packed inputs need "
                             "cu_seqlens)")
        sequences = hidden.shape[0]
    else:
        if hidden.dim() != 2 or not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1:
            raise ValueError(f"packed inputs need hidden [N, D], labels [N] and cu_seqlens [2P + 1], got "
                             f"hidden {tuple(hidden.shape)}")
        sequences = cu_seqlens.numel() - 1
    if sequences < 2 or sequences % 2:
        raise ValueError(f"hidden must hold 2P sequences (P chosen, then P rejected), got {sequences}")
    return sequences // 2


@dataclass(frozen=True)
class StatsRequest:
    """Which statistics beyond the label log-probs one pass computes.

    entropy: the policy entropy; kl: KL(ref || policy); eps: the label log-probs of the logit
    mixtures (1 +- eps) z -+ eps z_ref (epsilon-DPO), None for none. The reference's label log-prob
    comes with any reference. mean_logits, top1, log_sum_sq_probs: the per-token constants of
    docs/math.md 13 (per token only), from the same vocabulary pass.
    """

    entropy: bool = False
    kl: bool = False
    eps: float | None = None
    mean_logits: bool = False
    top1: bool = False
    log_sum_sq_probs: bool = False

    @property
    def constants(self) -> tuple[str, ...]:
        """The HeadStats names of the requested docs/math.md 13 statistics (per-token constants)."""
        wanted = (self.mean_logits, self.top1, self.log_sum_sq_probs)
        return tuple(name for name, want in zip(TOKEN_CONSTANTS, wanted, strict=True) if want)


@dataclass
class HeadStats:
    """Statistics of the scored tokens, float32, per token (0 at ignored ones) or per-sequence sums.

    logprob always; entropy, kl (differentiable like logprob, in the policy only), ref_logprob,
    logprob_plus and logprob_minus (constants) as requested, None otherwise. Per token only, as
    requested (constants, docs/math.md 13): mean_logits (float32, the mean of z over the vocabulary),
    is_top1 (torch.bool, the label is the first argmax of z; False at ignored tokens) and
    log_sum_sq_probs (float32, log sum_v p_v^2).
    """

    logprob: torch.Tensor
    entropy: torch.Tensor | None = None
    ref_logprob: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    logprob_plus: torch.Tensor | None = None
    logprob_minus: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None

    def as_dict(self) -> dict[str, torch.Tensor]:
        """The statistics computed, by name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def split_pairs(self, num_pairs: int) -> tuple["HeadStats", "HeadStats"]:
        """Per-sequence statistics of 2P sequences as those of the P chosen and the P rejected ones."""
        values = self.as_dict()
        return (HeadStats(**{k: v[:num_pairs] for k, v in values.items()}),
                HeadStats(**{k: v[num_pairs:2 * num_pairs] for k, v in values.items()}))


@dataclass(frozen=True)
class StatsGrad:
    """The gradient terms of a head-statistics backward, per scored row.

    The backward computes the gradients of sum_r (logprob_grad_r logprob_r + kl_grad_r KL_r +
    entropy_grad_r H_r) w.r.t. the policy head's hidden states, weight and bias, recomputing the
    logits from the forward's saved log-sum-exps (docs/math.md 1, 6, 7). Every tensor is float32 [R],
    one value per scored row (`ScoredTokens.rows`), on the hidden states' device:

    lse: the policy's log-sum-exp from the forward; logprob_grad: dL/d logprob.
    ref, ref_lse, kl_grad: the reference head, its log-sum-exp and dL/d KL(ref || policy); the three
        together or none (the reference gets no gradient).
    entropy, entropy_grad: the policy entropy from the forward and dL/d entropy; both or none.
    need_hidden, need_weight, need_bias: which of dHidden, dWeight, dBias to produce (a frozen head
        skips dWeight entirely).
    """

    lse: torch.Tensor
    logprob_grad: torch.Tensor
    ref: HeadInput | None = None
    ref_lse: torch.Tensor | None = None
    kl_grad: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    entropy_grad: torch.Tensor | None = None
    need_hidden: bool = True
    need_weight: bool = True
    need_bias: bool = False

    @property
    def has_kl(self) -> bool:
        """Whether the KL term has a gradient (then ref and ref_lse are given)."""
        return self.kl_grad is not None

    @property
    def has_entropy(self) -> bool:
        """Whether the entropy term has a gradient (then entropy is given)."""
        return self.entropy_grad is not None

    @property
    def needs_any(self) -> bool:
        """Whether any of dHidden, dWeight, dBias is needed."""
        return self.need_hidden or self.need_weight or self.need_bias

    def rows(self, part: slice) -> "StatsGrad":
        """The terms of the scored rows `part` (views of every per-row tensor), for a chunk of rows."""
        def cut(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[part]
        return replace(self, lse=self.lse[part], logprob_grad=self.logprob_grad[part], ref_lse=cut(self.ref_lse),
                       kl_grad=cut(self.kl_grad), entropy=cut(self.entropy), entropy_grad=cut(self.entropy_grad))

    def check(self, policy: HeadInput, tokens: ScoredTokens) -> None:
        """Check the terms against the policy head and the scored rows they differentiate.

        Each per-row tensor must be float32 [R] on policy.hidden's device; ref and ref_lse come
        exactly with kl_grad, entropy exactly with entropy_grad; need_bias needs the policy's bias.
        The heads themselves are the caller's to check (the kernels check their own layouts).
        Raises ValueError naming the argument at fault.
        """
        check_row_vectors(policy.hidden, tokens.rows, lse=self.lse, logprob_grad=self.logprob_grad,
                          ref_lse=self.ref_lse, kl_grad=self.kl_grad, entropy=self.entropy,
                          entropy_grad=self.entropy_grad)
        if self.has_kl and (self.ref is None or self.ref_lse is None):
            raise ValueError("kl_grad needs the reference head (ref_hidden, ref_weight) and its saved "
                             "log-sum-exp (ref_lse)")
        if not self.has_kl and (self.ref is not None or self.ref_lse is not None):
            raise ValueError("ref and ref_lse are read only for the KL's gradient: give them with kl_grad or "
                             "not at all")
        if self.has_entropy and self.entropy is None:
            raise ValueError("entropy_grad needs the forward's per-row entropy (entropy)")
        if not self.has_entropy and self.entropy is not None:
            raise ValueError("entropy is read only for the entropy's gradient: give it with entropy_grad or not at all")
        if self.need_bias and policy.bias is None:
            raise ValueError("need_bias=True but bias is None")


# The names of HeadStats' fields, in order; the backends' per-row outputs use the same names.
STATS = tuple(f.name for f in fields(HeadStats))
# The per-token constants of docs/math.md 13, in StatsRequest's order (mean_logits, top1, log_sum_sq_probs).
TOKEN_CONSTANTS = ("mean_logits", "is_top1", "log_sum_sq_probs")
# A request for the label log-probs alone.
LOGPROBS_ONLY = StatsRequest()
