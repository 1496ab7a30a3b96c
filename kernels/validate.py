"""Argument checks shared by the launchers: they are public entry points and fail loudly."""

import math
from dataclasses import dataclass

import torch

from .launch import interpreting

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_device(device: torch.device) -> None:
    """The kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1.

    Meta tensors are accepted too: launches built on them can be compiled (`fdpo.kernels.aot`)
    but not run.
    """
    if device.type in ("cuda", "meta") or (device.type == "cpu" and interpreting()):
        return
    raise ValueError(
        f"the Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before "
        f"importing fdpo); got tensors on {device}. Use backend='torch' on this device.")


def check_head_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    rows: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None,
    seq_ids: torch.Tensor | None = None,
    num_seqs: int = 0,
    softcap: float | None = None,
    temperature: float = 1.0,
    prefix: str = "",
) -> None:
    """Check the operands of one LM head applied to the rows `rows` of `hidden`.

    hidden [B, T, D] and weight [V, D] (and bias [V]) share one float dtype and device; rows is
    int64 [R]; labels (and seq_ids, when given) are int32 [R]; num_seqs >= 1 when seq_ids holds rows
    (0 sequences of 0 rows is an empty result); softcap and temperature positive and finite.
    `prefix` (e.g. "ref_") names the head's own arguments in the messages.
    """
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{prefix}hidden must be float16, bfloat16 or float32, got {hidden.dtype}")
    if hidden.dim() != 3:
        raise ValueError(f"{prefix}hidden must be [B, T, D] for the kernels, got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"{prefix}weight must be [V, D] with D = {hidden.shape[2]} ({prefix}hidden's last dim), "
                         f"got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{prefix}weight dtype {weight.dtype} must match {prefix}hidden dtype {hidden.dtype}")
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{prefix}bias must be [V] = [{weight.shape[0]}], got shape {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"{prefix}bias dtype {bias.dtype} must match {prefix}hidden dtype {hidden.dtype}")
    if rows.dtype != torch.int64 or rows.dim() != 1:
        raise TypeError(f"rows must be a 1-D int64 tensor, got {rows.dtype} of shape {tuple(rows.shape)}")
    named = {"labels": labels} if seq_ids is None else {"labels": labels, "seq_ids": seq_ids}
    for name, t in named.items():
        if t.dtype != torch.int32 or t.shape != rows.shape:
            raise TypeError(f"{name} must be int32 of shape {tuple(rows.shape)} (one per row), "
                            f"got {t.dtype} of shape {tuple(t.shape)}")
    if seq_ids is not None and (num_seqs < 0 or (num_seqs == 0 and rows.numel() > 0)):
        raise ValueError(f"num_seqs must be >= 1 when seq_ids is given with rows (>= 0 without), got {num_seqs}")
    tensors = {f"{prefix}hidden": hidden, f"{prefix}weight": weight, "rows": rows, **named}
    if bias is not None:
        tensors[f"{prefix}bias"] = bias
    for name, t in tensors.items():
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but {prefix}hidden is on {hidden.device}: "
                             "all operands must be on one device")
    check_device(hidden.device)
    if softcap is not None and not 0 < softcap < math.inf:
        raise ValueError(f"{prefix}softcap must be a positive finite number or None, got {softcap}")
    if not 0 < temperature < math.inf:
        raise ValueError(f"{prefix}temperature must be a positive finite number, got {temperature}")


@dataclass(frozen=True)
class RefHead:
    """The reference model's side of a two-head computation (KL, perturbed log-probs), as the
    launchers hold it internally (they take its parts as `ref_*` keyword arguments).

    hidden [B', T', D'] holds the same B*T tokens as the policy's hidden states (the launchers'
    flat `rows` index both), in any strides; weight [V, D'] has the policy's vocabulary; bias [V]
    or None; softcap and temperature as for the policy head. D' may differ from the policy's D.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    softcap: float | None = None
    temperature: float = 1.0


def ref_head(ref_hidden: torch.Tensor | None, ref_weight: torch.Tensor | None, ref_bias: torch.Tensor | None,
             ref_softcap: float | None, ref_temperature: float) -> RefHead | None:
    """The launchers' `ref_*` arguments as one record; None when no reference head is given."""
    if ref_hidden is None and ref_weight is None:
        if ref_bias is not None:
            raise ValueError("ref_bias was given without ref_hidden and ref_weight")
        return None
    if ref_hidden is None or ref_weight is None:
        raise ValueError("the reference head needs both ref_hidden and ref_weight")
    return RefHead(ref_hidden, ref_weight, ref_bias, ref_softcap, ref_temperature)


def ref_strides(ref: RefHead | None) -> dict[str, int]:
    """The reference head's strides as kernel arguments (zeros when there is none)."""
    if ref is None:
        return dict(stride_rhb=0, stride_rht=0, stride_rhd=0, stride_rwv=0, stride_rwd=0)
    return dict(stride_rhb=ref.hidden.stride(0), stride_rht=ref.hidden.stride(1), stride_rhd=ref.hidden.stride(2),
                stride_rwv=ref.weight.stride(0), stride_rwd=ref.weight.stride(1))


def check_ref_head(ref: RefHead, hidden: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor,
                   labels: torch.Tensor) -> None:
    """The reference head must score the policy's tokens over the policy's vocabulary, on its device."""
    if not isinstance(ref, RefHead):
        raise TypeError(f"ref must be a RefHead, got {type(ref).__name__}")
    check_head_inputs(ref.hidden, ref.weight, rows, labels, bias=ref.bias, softcap=ref.softcap,
                      temperature=ref.temperature, prefix="ref_")
    if ref.weight.shape[0] != weight.shape[0]:
        raise ValueError(f"the reference head has {ref.weight.shape[0]} vocabulary rows but the policy head has "
                         f"{weight.shape[0]}: both must share one vocabulary")
    if ref.hidden.shape[0] * ref.hidden.shape[1] != hidden.shape[0] * hidden.shape[1]:
        raise ValueError(f"the reference hidden states hold {ref.hidden.shape[0] * ref.hidden.shape[1]} tokens but "
                         f"the policy's hold {hidden.shape[0] * hidden.shape[1]}: rows index both")
    if ref.hidden.device != hidden.device:
        raise ValueError(f"the reference hidden states are on {ref.hidden.device} but the policy's on {hidden.device}")


def check_row_vectors(hidden: torch.Tensor, rows: torch.Tensor, **named: torch.Tensor | None) -> None:
    """Each given per-row tensor is float32 [R] on hidden's device."""
    for name, t in named.items():
        if t is None:
            continue
        if t.dtype != torch.float32 or t.shape != rows.shape or t.device != hidden.device:
            raise ValueError(f"{name} must be float32 of shape {tuple(rows.shape)} on {hidden.device}, "
                             f"got {t.dtype} of shape {tuple(t.shape)} on {t.device}")
