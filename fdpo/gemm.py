"""GEMMs of 16-bit operands with fp32 accumulation, where torch has them (no Triton needed).

The split backward (`fdpo.kernels.head_stats_split_backward`) and the `torch` backend's chunks run
their products through these: on CUDA with a 16-bit compute dtype, torch.mm / torch.addmm with
out_dtype=torch.float32 take the operands rounded to it (tensor cores, fp32 accumulator and
output); elsewhere the operands are rounded to the compute dtype, widened to float32 (exactly), and
the products plain fp32 GEMMs (`gemm_operand`).
"""

import functools

import torch


@functools.cache
def accumulating_16bit_gemm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch has 16-bit x 16-bit -> fp32 GEMMs on `device` that also accumulate into fp32.

    torch.mm / torch.addmm(..., out_dtype=torch.float32) came with torch 2.8 (CUDA only; the CPU
    has no kernel for them). Some releases' addmm also required `input` to share the operands'
    dtype, which rules out adding into an fp32 accumulator; one 1 x 1 call on the device tells.
    """
    if device.type != "cuda" or dtype == torch.float32 or "dtype_out" not in torch.ops.aten.addmm.overloads():
        return False
    acc, one = torch.zeros(1, 1, device=device), torch.ones(1, 1, device=device, dtype=dtype)
    try:
        torch.mm(one, one, out_dtype=torch.float32, out=acc)
        torch.addmm(acc, one, one, out_dtype=torch.float32, out=acc)
    except RuntimeError:
        return False
    return True


def gemm_operand(x: torch.Tensor, compute: torch.dtype, operand: torch.dtype) -> torch.Tensor:
    """x (a chunk of hidden states, weight rows, or dz) rounded to the head's compute dtype `compute`, in
    the GEMM operands' dtype `operand` (`compute` itself, or float32 where torch has no fp32-accumulating
    GEMM of it: the widening is exact). No copy where x already has both dtypes."""
    return x.to(compute).to(operand)


def gemm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, accumulate: bool, mixed: bool) -> None:
    """out = a @ b, or out += a @ b with `accumulate`, into float32 `out` with fp32 sums.

    `mixed`: a and b are 16-bit and torch's out_dtype GEMMs take them as they are (tensor cores,
    fp32 accumulator and output; see `accumulating_16bit_gemm`). Otherwise a and b must already be
    float32.
    """
    if mixed:
        if accumulate:
            torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
        else:
            torch.mm(a, b, out_dtype=torch.float32, out=out)
    elif accumulate:
        out.addmm_(a, b)
    else:
        torch.mm(a, b, out=out)
