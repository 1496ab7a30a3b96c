"""Split-K backward of the head statistics: dz chunk by chunk, then dHidden and dWeight as GEMMs.

The fused backward (`head_stats_bwd`) multiplies every recomputed [BLOCK_N, BLOCK_V] gradient tile
back into dHidden and dWeight inside the kernel, with fp32 atomics. This one trades a bounded
scratch buffer for plain tensor-core GEMMs and no atomics. For each chunk of C scored rows:

    dz[C, V]   = dL/d(raw logits) of the chunk, in the head's compute dtype   (`_head_stats_dz_kernel`)
    dH[chunk]  = dz W                                               (GEMM, fp32 output)
    dW        += dz^T H[chunk]                                      (GEMM, fp32 accumulator)
    db        += column sums of dz                                  (fp32)

dz is exactly the tile the fused backward forms (the same `head_stats_grad_tile`: onehot - p, the
KL and entropy terms, then the temperature, soft-cap and logit-scale chain rule; docs/math.md 1,
6, 7, 13) and rounds to the head's compute dtype (`fdpo.heads.head_compute_dtype`: the head's
compute_dtype, else the common dtype of hidden states and weight, fp32 when they differ) as the
fused kernel does before its two products, so both backwards multiply the same dz; the GEMMs read
the hidden states and the weight rounded to the compute dtype too. C is the largest row count
whose buffer fits `buffer_bytes` (in whole row tiles when one fits: `fdpo.cost.split_rows`).
"""

from collections.abc import Callable
from dataclasses import replace

import torch
import triton
import triton.language as tl

from fdpo.cost import split_rows
from fdpo.gemm import accumulating_16bit_gemm, gemm_into, gemm_operand
from fdpo.heads import HeadInput, LMHead, ScoredTokens, StatsGrad, zero_head_grads

from .head_stats_bwd import grad_args, head_stats_grad_tile
from .launch import BATCH_SIZED, Launch, bf16_products, input_precision, meta_operands, tiles_for
from .tiles import compute_cast, grouped_tile
from .validate import (
    check_stats_heads,
    head_args,
    head_compute_dtype,
    head_flags,
    head_operands,
    head_scale,
    heads_compute_dtype,
)

# Weight rows cast per GEMM where the weight is not already in the compute dtype and the GEMM
# operands' dtype (a mixed-dtype head, float32 weights computed in 16 bits, or a 16-bit head
# upcast on the CPU): never a copy of the whole [V, D] weight.
WEIGHT_CAST_ROWS = 4096


# One program per [BLOCK_N, BLOCK_V] tile of the chunk's logits, in grouped order (neighbouring
# programs share a weight tile in L2). It recomputes the policy tile (and, with KL, the reference
# tile) with one tl.dot chain over D each, fp32 accumulators, forms dz in fp32 from the saved LSEs
# and stores it in the buffer's dtype. Nothing is accumulated across programs: every dz element is
# written once. The work per tile is the forward's (a dot chain and elementwise math on one or two
# fp32 tiles, no online reductions), so it takes the forward's block shapes: the one-head forward
# tiles, or the two-head forward tiles when the reference tile is live too.
@triton.jit(do_not_specialize=BATCH_SIZED)
def _head_stats_dz_kernel(
    h_ptr, w_ptr, b_ptr, rows_ptr, labels_ptr, lse_ptr, g_ptr,
    ref_h_ptr, ref_w_ptr, ref_b_ptr, ref_lse_ptr, g_kl_ptr, ent_ptr, g_ent_ptr,
    dz_ptr, stride_dz,
    R, V, D, T, ref_D, ref_T,
    stride_hb, stride_ht, stride_hd, stride_wv, stride_wd,
    stride_ref_hb, stride_ref_ht, stride_ref_hd, stride_ref_wv, stride_ref_wd,
    softcap, inv_temp, scale, ref_softcap, ref_inv_temp, ref_scale,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, REF_HAS_BIAS: tl.constexpr, REF_HAS_SOFTCAP: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, REF_COMPUTE_DTYPE: tl.constexpr,
    KL: tl.constexpr, ENTROPY: tl.constexpr, GROUP_N: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    tile_n, tile_v = grouped_tile(tl.program_id(0), tl.cdiv(R, BLOCK_N), tl.cdiv(V, BLOCK_V), GROUP_N)
    dz, offs, row_mask, _, cols, col_mask = head_stats_grad_tile(
        tile_n, tile_v, h_ptr, w_ptr, b_ptr, rows_ptr, labels_ptr, lse_ptr, g_ptr,
        ref_h_ptr, ref_w_ptr, ref_b_ptr, ref_lse_ptr, g_kl_ptr, ent_ptr, g_ent_ptr, R, V, D, T, ref_D, ref_T,
        stride_hb, stride_ht, stride_hd, stride_wv, stride_wd, stride_ref_hb, stride_ref_ht, stride_ref_hd,
        stride_ref_wv, stride_ref_wd, softcap, inv_temp, scale, ref_softcap, ref_inv_temp, ref_scale,
        HAS_BIAS, HAS_SOFTCAP, REF_HAS_BIAS, REF_HAS_SOFTCAP, KL, ENTROPY,
        BLOCK_N, BLOCK_V, BLOCK_D, INPUT_PRECISION, COMPUTE_DTYPE, REF_COMPUTE_DTYPE)
    ptrs = dz_ptr + offs.to(tl.int64)[:, None] * stride_dz + cols[None, :]
    tl.store(ptrs, compute_cast(dz, COMPUTE_DTYPE), mask=row_mask[:, None] & col_mask[None, :])


def check_dz_buffer(dz: torch.Tensor, policy: HeadInput, num_rows: int) -> None:
    """dz must be a [>= num_rows, V] tensor of the head's compute dtype on its device, rows contiguous."""
    hidden, vocab, dtype = policy.hidden, policy.weight.shape[0], head_compute_dtype(policy)
    if not isinstance(dz, torch.Tensor) or dz.dtype != dtype:
        raise TypeError(f"dz must be a {dtype} tensor (the head's compute dtype), got "
                        f"{getattr(dz, 'dtype', type(dz).__name__)}")
    if dz.dim() != 2 or dz.shape[0] < num_rows or dz.shape[1] != vocab or (vocab > 1 and dz.stride(1) != 1):
        raise ValueError(f"dz must be [C, V] with C >= {num_rows} rows, V = {vocab} and contiguous rows, got shape "
                         f"{tuple(dz.shape)} and strides {dz.stride()}")
    if dz.device != hidden.device:
        raise ValueError(f"dz is on {dz.device} but hidden is on {hidden.device}")


def head_stats_dz_launch(
    policy: HeadInput,
    tokens: ScoredTokens,
    grad: StatsGrad,
    dz: torch.Tensor,
) -> Launch:
    """Build (without running) the launch writing dz[i] = dL/d(raw logits) of scored row i, for i < R.

    Args: as `head_stats_backward` (hidden as [B, T, D]; the R rows of `tokens` and the float32 [R]
    tensors of `grad` are those of one chunk; its need_* are not read), plus dz: the [C >= R, V]
    buffer in the head's compute dtype (`fdpo.heads.compute_dtype`).
    """
    check_stats_heads(policy, tokens, grad.ref)
    grad.check(policy, tokens)
    check_dz_buffer(dz, policy, tokens.rows.numel())
    return dz_launch(policy, tokens, grad, dz)


def dz_launch(policy: HeadInput, tokens: ScoredTokens, grad: StatsGrad, dz: torch.Tensor) -> Launch:
    """`head_stats_dz_launch` on operands already checked (once per backward, not per chunk)."""
    num_rows, vocab, ref = tokens.rows.numel(), policy.weight.shape[0], grad.ref
    dtype = heads_compute_dtype(policy, ref)  # the forward's, which saved the reference's LSE
    tiles = tiles_for("two_heads" if grad.has_kl else "forward", dtype, *head_operands(policy, ref))
    return Launch(
        _head_stats_dz_kernel,
        grid=(triton.cdiv(num_rows, tiles.block_n) * triton.cdiv(vocab, tiles.block_v),),
        args=dict(
            **head_args(policy, ""), **head_args(ref, "ref_"), **head_scale(policy, ""), **head_scale(ref, "ref_"),
            **grad_args(grad), rows_ptr=tokens.rows, labels_ptr=tokens.labels,
            dz_ptr=dz, stride_dz=dz.stride(0), R=num_rows, V=vocab,
        ),
        constexprs=dict(
            **head_flags(policy, ""), **head_flags(ref, "REF_"), KL=grad.has_kl, ENTROPY=grad.has_entropy,
            GROUP_N=tiles.group_n, BLOCK_N=tiles.block_n, BLOCK_V=tiles.block_v, BLOCK_D=tiles.block_d,
            INPUT_PRECISION=input_precision(dtype),
        ),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages)


def chunk_rows(vocab: int, dtype: torch.dtype, buffer_bytes: int) -> int:
    """C, the rows of a [C, vocab] buffer of `dtype` within `buffer_bytes` (`fdpo.cost.split_rows`:
    the most that fit, in whole row tiles of `fdpo.cost.SPLIT_ROW_MULTIPLE` when one fits), the same
    rows the cost model assumes.

    Raises TypeError for a non-integer budget, ValueError when it holds not even one row: a budget
    that small (0 included) means the zero-scratch fused backward (`head_stats_backward`,
    `token_divergence_backward`).
    """
    if not isinstance(buffer_bytes, int) or isinstance(buffer_bytes, bool):
        raise TypeError(f"buffer_bytes must be an int, got {type(buffer_bytes).__name__}")
    rows = split_rows(vocab, dtype, max(buffer_bytes, 0))
    if rows == 0:
        raise ValueError(f"buffer_bytes={buffer_bytes} holds no row of dz ([1, {vocab}] {dtype}: "
                         f"{vocab * dtype.itemsize} bytes); use the fused backward for budgets below one row")
    return rows


def head_stats_split_backward(
    policy: HeadInput,
    tokens: ScoredTokens,
    grad: StatsGrad,
    *,
    buffer_bytes: int,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """`head_stats_backward`'s gradients through a dz buffer of at most `buffer_bytes` bytes.

    Args:
        policy, tokens, grad: as `head_stats_backward` (hidden as [B, T, D]; rows index it).
        buffer_bytes: the budget of the dz buffer [C, V] in the head's compute dtype; C =
            `chunk_rows` rows per chunk (capped at R). A budget below one row raises ValueError: that
            is the fused backward's case.

    Returns:
        (d_hidden float32 [R, D], d_weight float32 [V, D], d_bias float32 [V]), None where not needed.

    Scratch: the dz buffer (C V itemsize bytes), H[chunk] gathered (C D), and [V] column sums. Where
    torch has no fp32-accumulating 16-bit GEMM (the CPU; see `accumulating_16bit_gemm`), the operands
    of a 16-bit compute dtype are rounded to it and upcast to fp32 instead, beyond the budget: dz
    and H[chunk] per chunk, W in blocks of WEIGHT_CAST_ROWS rows per GEMM (as a weight of any dtype
    other than the compute dtype is rounded to it, `gemm_operand`). Products of 16-bit values are
    exact in fp32, so only the summation order differs from the tensor-core path. d_bias sums dz as
    stored (rounded to a 16-bit compute dtype, where the fused backward sums the fp32 tile): a
    relative difference of about 2^-9 for bfloat16.
    There are no atomics: every output element is written by GEMMs in chunk order, so results
    repeat run to run as far as the GEMM library's do (cuBLAS on one stream, per torch's
    reproducibility notes).
    """
    check_stats_heads(policy, tokens, grad.ref)
    grad.check(policy, tokens)
    rows, labels = tokens.rows, tokens.labels
    chunk = min(chunk_rows(policy.weight.shape[0], head_compute_dtype(policy), buffer_bytes), max(rows.numel(), 1))

    def write_dz(part: slice, dz: torch.Tensor) -> None:
        dz_launch(policy, ScoredTokens(rows[part], labels[part]), grad.rows(part), dz)()

    return split_gemms(policy, rows, chunk, write_dz, need_hidden=grad.need_hidden, need_weight=grad.need_weight,
                       need_bias=grad.need_bias)


def split_gemms(
    policy: HeadInput,
    rows: torch.Tensor,
    chunk: int,
    write_dz: Callable[[slice, torch.Tensor], None],
    *,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The GEMM half of a split backward, shared by every dz kernel: for each chunk of `chunk` scored
    rows, `write_dz(part, dz)` fills dz [len(part), V] (a view of one buffer in the policy head's
    compute dtype) with dL/d(raw logits) of rows[part]; then dH[part] = dz W, dW += dz^T H[rows[part]]
    and db += column sums, into float32 accumulators (`gemm_into`; a weight of another dtype than the
    operands' through `weight_product`). rows: int64 [R] flat indices into policy.hidden [B, T, D].

    Returns (d_hidden float32 [R, D], d_weight float32 [V, D], d_bias float32 [V]), None where not needed.
    """
    hidden, weight = policy.hidden, policy.weight
    num_rows, vocab, dtype = rows.numel(), weight.shape[0], head_compute_dtype(policy)
    d_hidden, d_weight, d_bias = zero_head_grads(policy, num_rows, need_hidden=need_hidden, need_weight=need_weight,
                                                 need_bias=need_bias)
    if num_rows == 0 or not (need_hidden or need_weight or need_bias):
        return d_hidden, d_weight, d_bias

    mixed = accumulating_16bit_gemm(hidden.device, dtype)
    # Without mixed-precision GEMMs the operands, rounded to the compute dtype, are widened to fp32
    # (see head_stats_split_backward).
    operand = dtype if mixed else torch.float32
    dz = torch.empty(chunk, vocab, dtype=dtype, device=hidden.device)
    for start in range(0, num_rows, chunk):
        stop = min(start + chunk, num_rows)
        part = slice(start, stop)
        write_dz(part, dz[:stop - start])
        dz_part = dz[:stop - start].to(operand)
        if need_hidden:
            weight_product(d_hidden[part], dz_part, weight, dtype, mixed)
        if need_weight:
            b, t = rows[part] // hidden.shape[1], rows[part] % hidden.shape[1]
            gemm_into(d_weight, dz_part.T, gemm_operand(hidden[b, t], dtype, operand), accumulate=True, mixed=mixed)
        if need_bias:
            d_bias += dz_part.sum(0, dtype=torch.float32)
    return d_hidden, d_weight, d_bias


def weight_product(out: torch.Tensor, dz: torch.Tensor, weight: torch.Tensor, compute: torch.dtype,
                   mixed: bool) -> None:
    """out = dz @ weight into float32 out [C, D] (`gemm_into`), dz [C, V] in the GEMM operands' dtype;
    a weight that is not already in both the compute dtype `compute` and dz's dtype is rounded and
    cast (`gemm_operand`) WEIGHT_CAST_ROWS rows at a time, the products summed over those blocks in
    order: never a copy of the whole [V, D] weight."""
    if weight.dtype == dz.dtype == compute:
        gemm_into(out, dz, weight, accumulate=False, mixed=mixed)
        return
    for v0 in range(0, weight.shape[0], WEIGHT_CAST_ROWS):
        v1 = min(v0 + WEIGHT_CAST_ROWS, weight.shape[0])
        gemm_into(out, dz[:, v0:v1], gemm_operand(weight[v0:v1], compute, dz.dtype), accumulate=v0 > 0, mixed=mixed)


def aot_launches(dtype: torch.dtype) -> dict[str, Launch]:
    """The dz kernel's launch variants on meta operands, for `fdpo.kernels.aot`: one head, and the
    policy with the KL and entropy terms (bias, scale and soft-capping in both: the longest paths);
    with fp32, also an fp32 head on bf16 hidden states, and fp32 operands with bf16 products (autocast)."""
    op = meta_operands(dtype)
    head = HeadInput(op["hidden"], LMHead(op["weight"], op["bias"], softcap=30.0, temperature=0.7, scale=0.5))
    ref = HeadInput(op["hidden"], LMHead(op["weight"], op["bias"], softcap=30.0, temperature=0.7, scale=2.0), "ref_")
    tokens = ScoredTokens(op["rows"], op["labels"])
    dz = torch.empty(op["rows"].numel(), op["weight"].shape[0], dtype=dtype, device="meta")
    logprob_only = StatsGrad(op["f32"], op["f32"])
    one_head = head_stats_dz_launch(head, tokens, logprob_only, dz)
    every_term = replace(logprob_only, ref=ref, ref_lse=op["f32"], kl_grad=op["f32"], entropy=op["f32"],
                         entropy_grad=op["f32"])
    two_heads = head_stats_dz_launch(head, tokens, every_term, dz)
    launches = {"dz chunk": one_head, "dz chunk, + KL and entropy terms": two_heads}
    if dtype == torch.float32:
        mixed = HeadInput(meta_operands(torch.bfloat16)["hidden"], head.head)
        launches["dz chunk, bf16 hidden states"] = head_stats_dz_launch(mixed, tokens, logprob_only, dz)
        launches["dz chunk, bf16 products"] = head_stats_dz_launch(bf16_products(head), tokens, logprob_only,
                                                                   torch.empty_like(dz, dtype=torch.bfloat16))
    return launches
