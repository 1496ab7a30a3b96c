"""Argument checks shared by the launchers: they are public entry points and fail loudly on wrong
shapes, dtypes, devices, strides and settings.

The values of the index tensors are trusted, not checked (a check would read them back from the
GPU at every launch): `ScoredTokens.rows` must index the [B, T] rows of the hidden states, `labels`
be in [0, V) and `seq_ids` in [0, num_seqs), nondecreasing. The public functions (`fdpo.head_stats`
and everything built on it) validate the labels and build the rows and sequence ids themselves;
callers of these launchers must do the same (an index outside these ranges reads or writes outside
the tensors)."""

import torch
import triton.language as tl

from fdpo.heads import FLOAT_DTYPES, HeadInput, ScoredTokens, check_logit_scales, head_compute_dtype

from .launch import runs_on

# The Triton dtype of each compute dtype, the kernels' COMPUTE_DTYPE constexprs.
TRITON_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def check_device(device: torch.device) -> None:
    """The kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (see `runs_on`).

    Meta tensors are accepted too: launches built on them can be compiled (`fdpo.kernels.aot`)
    but not run.
    """
    if device.type == "meta" or runs_on(device):
        return
    raise ValueError(
        f"the Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before "
        f"importing fdpo); got tensors on {device}. Use backend='torch' on this device.")


def check_head_inputs(head: HeadInput, tokens: ScoredTokens, *, scaled_mixed: bool = False) -> None:
    """Check one LM head applied to the rows `tokens.rows` of `head.hidden`.

    hidden [B, T, D] and weight [V, D] (and bias [V]) are float tensors on one device; rows is
    int64 [R]; labels (and seq_ids, when given) are int32 [R]; num_seqs >= 1 when seq_ids holds rows
    (0 sequences of 0 rows is an empty result); softcap, temperature and the logit scale positive and
    finite. scaled_mixed: the caller's kernels take the head's logit scale and a weight (and bias)
    dtype other than hidden's (docs/math.md 13); without it both raise. `head.prefix` (e.g. "ref_")
    names the head's own arguments in the messages.
    """
    p, hidden, weight, bias = head.prefix, head.hidden, head.weight, head.bias
    rows, labels, seq_ids = tokens.rows, tokens.labels, tokens.seq_ids
    if not isinstance(head, HeadInput):
        raise TypeError(f"the {p or 'policy '}head must be an fdpo.heads.HeadInput, got {type(head).__name__}")
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{p}hidden must be float16, bfloat16 or float32, got {hidden.dtype}")
    if hidden.dim() != 3:
        raise ValueError(f"{p}hidden must be [B, T, D] for the kernels, got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"{p}weight must be [V, D] with D = {hidden.shape[2]} ({p}hidden's last dim), "
                         f"got shape {tuple(weight.shape)}")
    dtypes = (weight.dtype,) if bias is None else (weight.dtype, bias.dtype)
    if any(dtype not in FLOAT_DTYPES for dtype in dtypes):
        raise TypeError(f"{p}weight and {p}bias must be float16, bfloat16 or float32, got {dtypes}")
    if not scaled_mixed and any(dtype != hidden.dtype for dtype in dtypes):
        raise TypeError(f"{p}weight dtype {weight.dtype} (and bias) must match {p}hidden dtype {hidden.dtype} "
                        "for this kernel")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"{p}bias must be [V] = [{weight.shape[0]}], got shape {tuple(bias.shape)}")
    if rows.dtype != torch.int64 or rows.dim() != 1:
        raise TypeError(f"rows must be a 1-D int64 tensor, got {rows.dtype} of shape {tuple(rows.shape)}")
    named = {"labels": labels} if seq_ids is None else {"labels": labels, "seq_ids": seq_ids}
    for name, t in named.items():
        if t.dtype != torch.int32 or t.shape != rows.shape:
            raise TypeError(f"{name} must be int32 of shape {tuple(rows.shape)} (one per row), "
                            f"got {t.dtype} of shape {tuple(t.shape)}")
    for name, t in {"rows": rows, **named}.items():
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (the kernels read element r at ptr + r), got strides "
                             f"{t.stride()}: pass {name}.contiguous()")
    num_seqs = tokens.num_seqs
    if seq_ids is not None and (num_seqs < 0 or (num_seqs == 0 and rows.numel() > 0)):
        raise ValueError(f"num_seqs must be >= 1 when seq_ids is given with rows (>= 0 without), got {num_seqs}")
    tensors = {f"{p}hidden": hidden, f"{p}weight": weight, "rows": rows, **named}
    if bias is not None:
        tensors[f"{p}bias"] = bias
    for name, t in tensors.items():
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but {p}hidden is on {hidden.device}: "
                             "all operands must be on one device")
    check_device(hidden.device)
    check_logit_scales(head.head.softcap, head.head.temperature, p, head.head.scale)
    if not scaled_mixed and head.head.scale != 1.0:
        raise ValueError(f"{p}logit_scale {head.head.scale} is not taken by this kernel (1.0 only)")


def heads_compute_dtype(policy: HeadInput, ref: HeadInput | None) -> torch.dtype:
    """The dtype the tiles and the tl.dot precision of a kernel that forms both heads' products follow:
    their common compute dtype, float32 when they differ (the policy's without a reference). A
    forward and the backward that recomputes the same tiles must both use it: the reference's fp32
    products are TF32 or IEEE by this dtype's precision, and its saved LSE is only valid for one."""
    dtype = head_compute_dtype(policy)
    return dtype if ref is None or head_compute_dtype(ref) == dtype else torch.float32


def check_ref_head(ref: HeadInput, policy: HeadInput, tokens: ScoredTokens, *, scaled_mixed: bool = False) -> None:
    """The reference head must score the policy's tokens over the policy's vocabulary, on its device
    (scaled_mixed as in `check_head_inputs`)."""
    if not isinstance(ref, HeadInput):
        raise TypeError(f"ref must be an fdpo.heads.HeadInput, got {type(ref).__name__}")
    check_head_inputs(ref, tokens, scaled_mixed=scaled_mixed)
    if ref.weight.shape[0] != policy.weight.shape[0]:
        raise ValueError(f"the reference head has {ref.weight.shape[0]} vocabulary rows but the policy head has "
                         f"{policy.weight.shape[0]}: both must share one vocabulary")
    ref_tokens, tokens_ = ref.hidden.shape[0] * ref.hidden.shape[1], policy.hidden.shape[0] * policy.hidden.shape[1]
    if ref_tokens != tokens_:
        raise ValueError(f"the reference hidden states hold {ref_tokens} tokens but the policy's hold {tokens_}: "
                         "rows index both")
    if ref.hidden.device != policy.hidden.device:
        raise ValueError(f"the reference hidden states are on {ref.hidden.device} but the policy's on "
                         f"{policy.hidden.device}")


def head_args(head: HeadInput | None, prefix: str) -> dict:
    """A head's pointers, sizes, strides and scales as kernel arguments named `{prefix}...`.

    Pointers h_ptr, w_ptr, b_ptr; sizes D, T; strides stride_hb, stride_ht, stride_hd, stride_wv,
    stride_wd; scales softcap (1.0 without), inv_temp. Without a head (prefix "r" for an absent
    reference) the pointers are None and the sizes, strides and scales neutral.
    """
    if head is None:
        return {f"{prefix}h_ptr": None, f"{prefix}w_ptr": None, f"{prefix}b_ptr": None, f"{prefix}D": 1,
                f"{prefix}T": 1, **{f"stride_{prefix}{s}": 0 for s in ("hb", "ht", "hd", "wv", "wd")},
                f"{prefix}softcap": 1.0, f"{prefix}inv_temp": 1.0}
    hidden, weight = head.hidden, head.weight
    return {f"{prefix}h_ptr": hidden, f"{prefix}w_ptr": weight, f"{prefix}b_ptr": contiguous_bias(head),
            f"{prefix}D": hidden.shape[2], f"{prefix}T": hidden.shape[1],
            f"stride_{prefix}hb": hidden.stride(0), f"stride_{prefix}ht": hidden.stride(1),
            f"stride_{prefix}hd": hidden.stride(2), f"stride_{prefix}wv": weight.stride(0),
            f"stride_{prefix}wd": weight.stride(1),
            f"{prefix}softcap": float(head.head.softcap or 1.0), f"{prefix}inv_temp": 1.0 / head.head.temperature}


def contiguous_bias(head: HeadInput) -> torch.Tensor | None:
    """The head's bias as the kernels read it, element v at b_ptr + v: a strided view (a column of a
    packed parameter) is copied, a contiguous bias passed as it is; None stays None."""
    return None if head.bias is None else head.bias.contiguous()


def head_scale(head: HeadInput | None, prefix: str) -> dict:
    """The kernel argument {prefix}scale: the head's logit scale (1.0 without a head)."""
    return {f"{prefix}scale": 1.0 if head is None else float(head.head.scale)}


def head_flags(head: HeadInput | None, prefix: str) -> dict:
    """The constexprs {prefix}HAS_BIAS and {prefix}HAS_SOFTCAP of a head (False without one), and
    {prefix}COMPUTE_DTYPE (`compute_constexpr`)."""
    return {f"{prefix}HAS_BIAS": head is not None and head.bias is not None,
            f"{prefix}HAS_SOFTCAP": head is not None and head.head.softcap is not None,
            f"{prefix}COMPUTE_DTYPE": compute_constexpr(head)}


def head_operands(*heads: HeadInput | None) -> tuple[torch.Tensor, ...]:
    """The hidden states and weights of the given heads (None skipped), whose widths `launch.tiles_for`
    stages."""
    return tuple(t for head in heads if head is not None for t in (head.hidden, head.weight))


def compute_constexpr(head: HeadInput | None) -> tl.dtype | None:
    """The Triton dtype the kernels round `head`'s operand tiles to before every product
    (`fdpo.heads.head_compute_dtype`: the head's compute_dtype, else the common dtype of its hidden
    states and weight, float32 when they differ); None without a head (its tiles are never formed)."""
    return None if head is None else TRITON_DTYPES[head_compute_dtype(head)]


def check_stats_heads(policy: HeadInput, tokens: ScoredTokens, ref: HeadInput | None) -> None:
    """The heads a head-statistics backward (fused or split) reads: the policy, and the reference when
    given (`fdpo.heads.StatsGrad.ref`, with the KL's gradient), as `check_head_inputs` /
    `check_ref_head` check them, logit scales and mixed-dtype heads allowed. The gradient terms
    themselves are `StatsGrad.check`'s."""
    check_head_inputs(policy, tokens, scaled_mixed=True)
    if ref is not None:
        check_ref_head(ref, policy, tokens, scaled_mixed=True)
