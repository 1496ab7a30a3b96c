"""Backward of the token-level divergences: policy-side dHidden, dWeight, dBias (docs/math.md 12).

Given g_r = dL/dD_r per scored row and the forward's saved lse_r, ref_lse_r, D_r and aux_r, each
[BLOCK_N, BLOCK_V] tile pair of logits is recomputed and turned into
    dz = g dD/dz(log p = z - lse, log q = z_ref - ref_lse, D, aux) * d(capped z / T)/d(raw z)
(`divergence_tile_grad`; docs/math.md 1 for the chain rule). The reference gets no gradient, nor
does a row whose D is +inf (a KL of masked logits, a constant: docs/math.md 8, 12).
Two backwards, as for the head statistics (`fdpo.options.BackwardOptions` picks):
- fused (`token_divergence_backward`): dz multiplied back inside the kernel, dH[rows] += dz W[cols],
  dW[cols] += dz^T H[rows], db[cols] += column sums, with fp32 atomics; deterministic=True gives each
  output tile one program adding in a fixed order instead.
- split (`token_divergence_split_backward`): dz of C rows at a time written to a [C, V] buffer in
  the head's compute dtype, then dH = dz W and dW += dz^T H as GEMMs accumulating in fp32, no atomics.
"""

import torch
import triton
import triton.language as tl

from fdpo.divergences import DivergenceSpec
from fdpo.heads import HeadInput, LMHead, ScoredTokens, check_row_vectors, zero_head_grads

from .head_stats_split_bwd import chunk_rows, split_gemms
from .launch import BATCH_SIZED, Launch, bf16_products, input_precision, meta_operands, tile_gradient_launches
from .tiles import (
    add_hidden_grad,
    add_to,
    add_weight_grad,
    backward_steps,
    backward_tile,
    compute_cast,
    grouped_tile,
    head_pair_tiles,
    hidden_row_offsets,
)
from .token_divergence_fwd import (
    check_divergence_heads,
    check_spec,
    divergence_head_args,
    divergence_scalars,
    divergence_tile_grad,
    divergence_tiles,
    log_probs,
)
from .validate import head_compute_dtype, head_flags, heads_compute_dtype

# The per-row float32 vectors the backward reads besides the incoming gradient.
SAVED_ROWS = ("lse", "ref_lse", "divergence", "aux")


@triton.jit
def divergence_grad_tile(
    tile_n, tile_v,
    h_ptr, w_ptr, b_ptr, ref_h_ptr, ref_w_ptr, ref_b_ptr, rows_ptr,
    lse_ptr, ref_lse_ptr, div_ptr, aux_ptr, g_ptr,
    R, V, D, T, ref_D, ref_T,
    stride_hb, stride_ht, stride_hd, stride_wv, stride_wd,
    stride_ref_hb, stride_ref_ht, stride_ref_hd, stride_ref_wv, stride_ref_wd,
    softcap, inv_temp, ref_softcap, ref_inv_temp, param, rest, log_keep, log_mix,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, REF_HAS_BIAS: tl.constexpr, REF_HAS_SOFTCAP: tl.constexpr,
    DIVERGENCE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, REF_COMPUTE_DTYPE: tl.constexpr,
):
    """Recompute tile pair (tile_n, tile_v) and return its fp32 dz = g dD/d(raw policy logits).

    A row whose D is +inf (a KL where one head masks an entry the other does not: +inf for every
    finite parameter nearby) gets dz = 0 (docs/math.md 12).
    Returns (dz [BLOCK_N, BLOCK_V], offs, row_mask, h_offs, cols, col_mask); dz is 0 outside the tile.
    """
    offs = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs < R
    rows = tl.load(rows_ptr + offs, mask=row_mask, other=0)
    lse = tl.load(lse_ptr + offs, mask=row_mask, other=0.0)
    ref_lse = tl.load(ref_lse_ptr + offs, mask=row_mask, other=0.0)
    value = tl.load(div_ptr + offs, mask=row_mask, other=0.0)
    aux = tl.load(aux_ptr + offs, mask=row_mask, other=0.0)
    g = tl.load(g_ptr + offs, mask=row_mask, other=0.0)
    h_offs = hidden_row_offsets(rows, T, stride_hb, stride_ht)
    cols = tile_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    z, zr = head_pair_tiles(h_ptr, w_ptr, b_ptr, ref_h_ptr, ref_w_ptr, ref_b_ptr, rows, row_mask,
                            cols, col_mask, D, T, ref_D, ref_T,
                            stride_hb, stride_ht, stride_hd, stride_wv, stride_wd,
                            stride_ref_hb, stride_ref_ht, stride_ref_hd, stride_ref_wv, stride_ref_wd,
                            softcap, inv_temp, ref_softcap, ref_inv_temp,
                            HAS_BIAS, HAS_SOFTCAP, REF_HAS_BIAS, REF_HAS_SOFTCAP,
                            BLOCK_N, BLOCK_V, BLOCK_D, INPUT_PRECISION, COMPUTE_DTYPE, REF_COMPUTE_DTYPE)
    dz = divergence_tile_grad(log_probs(z, lse), log_probs(zr, ref_lse), value, aux, param, rest, log_keep, log_mix,
                              DIVERGENCE)
    dz = dz * (g * inv_temp)[:, None]
    if HAS_SOFTCAP:
        t = z / (softcap * inv_temp)
        dz = dz * (1.0 - t * t)
    live = row_mask & (value != float("inf"))
    return tl.where(live[:, None] & col_mask[None, :], dz, 0.0), offs, row_mask, h_offs, cols, col_mask


# One kernel, two schedules (as `head_stats_bwd`): ORDERED=False, one program per tile pair in
# grouped order (neighbours share weight tiles in L2), fp32 atomics into dH, dW, db: the tile pair
# is recomputed once (2 matmul-equivalents: both heads) and multiplied back twice. ORDERED=True,
# one program per row tile (WEIGHT_SIDE=False: owns dH of its rows, sweeps the vocabulary) or per
# vocabulary tile (WEIGHT_SIDE=True: owns dW and db of its columns, sweeps the rows), adding in a
# fixed order: bitwise reproducible; the barrier makes one step's plain stores visible to the
# program's threads before the next step reads them. Block shape: `divergence_tiles("backward")`
# (two fp32 logit tiles live beside the dz tile).
@triton.jit(do_not_specialize=BATCH_SIZED)
def _token_divergence_bwd_kernel(
    h_ptr, w_ptr, b_ptr, ref_h_ptr, ref_w_ptr, ref_b_ptr, rows_ptr,
    lse_ptr, ref_lse_ptr, div_ptr, aux_ptr, g_ptr, dh_ptr, dw_ptr, db_ptr,
    R, V, D, T, ref_D, ref_T,
    stride_hb, stride_ht, stride_hd, stride_wv, stride_wd,
    stride_ref_hb, stride_ref_ht, stride_ref_hd, stride_ref_wv, stride_ref_wd,
    softcap, inv_temp, ref_softcap, ref_inv_temp, param, rest, log_keep, log_mix,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, REF_HAS_BIAS: tl.constexpr, REF_HAS_SOFTCAP: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, REF_COMPUTE_DTYPE: tl.constexpr,
    DIVERGENCE: tl.constexpr, ORDERED: tl.constexpr, WEIGHT_SIDE: tl.constexpr,
    GRAD_H: tl.constexpr, GRAD_W: tl.constexpr, GRAD_B: tl.constexpr, GROUP_N: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    own = tl.program_id(0)
    num_n, num_v = tl.cdiv(R, BLOCK_N), tl.cdiv(V, BLOCK_V)
    for step in range(0, backward_steps(num_n, num_v, ORDERED, WEIGHT_SIDE)):
        tile_n, tile_v = backward_tile(own, step, num_n, num_v, ORDERED, WEIGHT_SIDE, GROUP_N)
        dz, offs, row_mask, h_offs, cols, col_mask = divergence_grad_tile(
            tile_n, tile_v, h_ptr, w_ptr, b_ptr, ref_h_ptr, ref_w_ptr, ref_b_ptr, rows_ptr,
            lse_ptr, ref_lse_ptr, div_ptr, aux_ptr, g_ptr, R, V, D, T, ref_D, ref_T,
            stride_hb, stride_ht, stride_hd, stride_wv, stride_wd,
            stride_ref_hb, stride_ref_ht, stride_ref_hd, stride_ref_wv, stride_ref_wd,
            softcap, inv_temp, ref_softcap, ref_inv_temp, param, rest, log_keep, log_mix,
            HAS_BIAS, HAS_SOFTCAP, REF_HAS_BIAS, REF_HAS_SOFTCAP, DIVERGENCE,
            BLOCK_N, BLOCK_V, BLOCK_D, INPUT_PRECISION, COMPUTE_DTYPE, REF_COMPUTE_DTYPE)
        if GRAD_H:
            add_hidden_grad(dz, offs, row_mask, w_ptr, cols, col_mask, dh_ptr, D, stride_wv, stride_wd,
                            not ORDERED, BLOCK_D, INPUT_PRECISION, COMPUTE_DTYPE)
        if GRAD_W:
            add_weight_grad(dz, h_ptr, h_offs, row_mask, cols, col_mask, dw_ptr, D, stride_hd,
                            not ORDERED, BLOCK_D, INPUT_PRECISION, COMPUTE_DTYPE)
        if GRAD_B:
            add_to(db_ptr + cols, tl.sum(dz, axis=0), col_mask, not ORDERED)
        if ORDERED:
            tl.debug_barrier()


# One program per tile pair of a chunk of rows, grouped order; dz is formed as in the fused kernel
# and stored once in the buffer's dtype (nothing accumulated across programs). The work per tile
# is the divergence forward's (two dot chains, elementwise fp32), so it takes its tiles.
@triton.jit(do_not_specialize=BATCH_SIZED)
def _token_divergence_dz_kernel(
    h_ptr, w_ptr, b_ptr, ref_h_ptr, ref_w_ptr, ref_b_ptr, rows_ptr,
    lse_ptr, ref_lse_ptr, div_ptr, aux_ptr, g_ptr, dz_ptr, stride_dz,
    R, V, D, T, ref_D, ref_T,
    stride_hb, stride_ht, stride_hd, stride_wv, stride_wd,
    stride_ref_hb, stride_ref_ht, stride_ref_hd, stride_ref_wv, stride_ref_wd,
    softcap, inv_temp, ref_softcap, ref_inv_temp, param, rest, log_keep, log_mix,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, REF_HAS_BIAS: tl.constexpr, REF_HAS_SOFTCAP: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, REF_COMPUTE_DTYPE: tl.constexpr,
    DIVERGENCE: tl.constexpr, GROUP_N: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    tile_n, tile_v = grouped_tile(tl.program_id(0), tl.cdiv(R, BLOCK_N), tl.cdiv(V, BLOCK_V), GROUP_N)
    dz, offs, row_mask, _, cols, col_mask = divergence_grad_tile(
        tile_n, tile_v, h_ptr, w_ptr, b_ptr, ref_h_ptr, ref_w_ptr, ref_b_ptr, rows_ptr,
        lse_ptr, ref_lse_ptr, div_ptr, aux_ptr, g_ptr, R, V, D, T, ref_D, ref_T,
        stride_hb, stride_ht, stride_hd, stride_wv, stride_wd,
        stride_ref_hb, stride_ref_ht, stride_ref_hd, stride_ref_wv, stride_ref_wd,
        softcap, inv_temp, ref_softcap, ref_inv_temp, param, rest, log_keep, log_mix,
        HAS_BIAS, HAS_SOFTCAP, REF_HAS_BIAS, REF_HAS_SOFTCAP, DIVERGENCE,
        BLOCK_N, BLOCK_V, BLOCK_D, INPUT_PRECISION, COMPUTE_DTYPE, REF_COMPUTE_DTYPE)
    ptrs = dz_ptr + offs.to(tl.int64)[:, None] * stride_dz + cols[None, :]
    tl.store(ptrs, compute_cast(dz, COMPUTE_DTYPE), mask=row_mask[:, None] & col_mask[None, :])


def check_backward_inputs(policy: HeadInput, ref: HeadInput, tokens: ScoredTokens, spec: DivergenceSpec,
                          saved: dict[str, torch.Tensor], grad: torch.Tensor, need_bias: bool = False) -> None:
    """Heads, spec, the float32 [R] saved rows (SAVED_ROWS) and per-row gradient on hidden's device, and a
    policy bias when `need_bias`."""
    check_divergence_heads(policy, ref, tokens)
    check_spec(spec)
    missing = [name for name in SAVED_ROWS if not isinstance(saved.get(name), torch.Tensor)]
    if missing:
        raise ValueError(f"saved must hold the forward's float32 rows {SAVED_ROWS}; missing {missing}")
    check_row_vectors(policy.hidden, tokens.rows, grad=grad, **{name: saved[name] for name in SAVED_ROWS})
    if need_bias and policy.bias is None:
        raise ValueError("need_bias=True but bias is None")


def kernel_args(policy: HeadInput, ref: HeadInput, tokens: ScoredTokens, spec: DivergenceSpec,
                saved: dict[str, torch.Tensor], grad: torch.Tensor) -> tuple[dict, dict]:
    """(args, constexprs) shared by the backward kernels, without the outputs and schedule flags."""
    args = dict(**divergence_head_args(policy, ""), **divergence_head_args(ref, "ref_"), rows_ptr=tokens.rows,
                lse_ptr=saved["lse"], ref_lse_ptr=saved["ref_lse"], div_ptr=saved["divergence"],
                aux_ptr=saved["aux"], g_ptr=grad, R=tokens.rows.numel(), V=policy.weight.shape[0],
                **divergence_scalars(spec))
    constexprs = dict(**head_flags(policy, ""), **head_flags(ref, "REF_"), DIVERGENCE=spec.code,
                      INPUT_PRECISION=input_precision(heads_compute_dtype(policy, ref)))
    return args, constexprs


def token_divergence_backward_launches(
    policy: HeadInput, ref: HeadInput, tokens: ScoredTokens, spec: DivergenceSpec,
    saved: dict[str, torch.Tensor], grad: torch.Tensor, *,
    need_hidden: bool = True, need_weight: bool = True, need_bias: bool = False, deterministic: bool = False,
) -> tuple[list[Launch], tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]]:
    """Build (without running) the launches of `token_divergence_backward` and allocate their outputs."""
    check_backward_inputs(policy, ref, tokens, spec, saved, grad, need_bias)
    num_rows, vocab = tokens.rows.numel(), policy.weight.shape[0]
    tiles = divergence_tiles("backward", policy, ref)
    d_hidden, d_weight, d_bias = zero_head_grads(policy, num_rows, need_hidden=need_hidden, need_weight=need_weight,
                                                 need_bias=need_bias)
    args, shared = kernel_args(policy, ref, tokens, spec, saved, grad)
    args.update(dh_ptr=d_hidden, dw_ptr=d_weight, db_ptr=d_bias)
    shared.update(BLOCK_N=tiles.block_n, BLOCK_V=tiles.block_v, BLOCK_D=tiles.block_d)
    launches = tile_gradient_launches(_token_divergence_bwd_kernel, args, shared, tiles, num_rows, vocab,
                                      need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias,
                                      deterministic=deterministic)
    return launches, (d_hidden, d_weight, d_bias)


def token_divergence_backward(
    policy: HeadInput, ref: HeadInput, tokens: ScoredTokens, spec: DivergenceSpec,
    saved: dict[str, torch.Tensor], grad: torch.Tensor, **options,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of sum_r grad_r D_r with respect to the policy head (the fused backward).

    Args:
        policy, ref, tokens, spec: as given to `token_divergence_forward` (hidden as [B, T, D]).
        saved: its float32 [R] rows "lse", "ref_lse", "divergence", "aux". grad: float32 [R], dL/dD.
        options: need_hidden, need_weight, need_bias (which gradients to produce), deterministic
            (single-writer kernels adding in a fixed order instead of atomics).

    Returns:
        (d_hidden float32 [R, D] of the scored rows, d_weight float32 [V, D], d_bias float32 [V]),
        None where not requested.
    """
    launches, outputs = token_divergence_backward_launches(policy, ref, tokens, spec, saved, grad, **options)
    if tokens.rows.numel():
        for launch in launches:
            launch()
    return outputs


def token_divergence_dz_launch(policy: HeadInput, ref: HeadInput, tokens: ScoredTokens, spec: DivergenceSpec,
                               saved: dict[str, torch.Tensor], grad: torch.Tensor, dz: torch.Tensor) -> Launch:
    """Build (without running) the launch writing dz[i] = grad_i dD_i/d(raw policy logits), i < R.

    dz: a [C >= R, V] buffer of the policy head's compute dtype on its device with contiguous rows.
    """
    check_backward_inputs(policy, ref, tokens, spec, saved, grad)
    num_rows, vocab = tokens.rows.numel(), policy.weight.shape[0]
    dtype = head_compute_dtype(policy)
    if not isinstance(dz, torch.Tensor) or dz.dtype != dtype or dz.device != policy.hidden.device:
        raise TypeError(f"dz must be a {dtype} tensor on {policy.hidden.device} (the policy head's compute dtype)")
    if dz.dim() != 2 or dz.shape[0] < num_rows or dz.shape[1] != vocab or (vocab > 1 and dz.stride(1) != 1):
        raise ValueError(f"dz must be [C, V] with C >= {num_rows}, V = {vocab} and contiguous rows, got shape "
                         f"{tuple(dz.shape)} and strides {dz.stride()}")
    tiles = divergence_tiles("forward", policy, ref)
    args, constexprs = kernel_args(policy, ref, tokens, spec, saved, grad)
    return Launch(
        _token_divergence_dz_kernel,
        grid=(triton.cdiv(num_rows, tiles.block_n) * triton.cdiv(vocab, tiles.block_v),),
        args=dict(args, dz_ptr=dz, stride_dz=dz.stride(0)),
        constexprs=dict(constexprs, GROUP_N=tiles.group_n, BLOCK_N=tiles.block_n, BLOCK_V=tiles.block_v,
                        BLOCK_D=tiles.block_d),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages)


def token_divergence_split_backward(
    policy: HeadInput, ref: HeadInput, tokens: ScoredTokens, spec: DivergenceSpec,
    saved: dict[str, torch.Tensor], grad: torch.Tensor, *, buffer_bytes: int,
    need_hidden: bool = True, need_weight: bool = True, need_bias: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """`token_divergence_backward`'s gradients through a dz buffer of at most `buffer_bytes` bytes.

    C rows per chunk as `fdpo.kernels.head_stats_split_backward` takes them (`chunk_rows`: a budget below
    one row raises ValueError, that is the fused backward's case); the chunks' GEMMs are that backward's
    (`split_gemms`: dz [C, V] in the policy head's compute dtype, dH[chunk] = dz W, dW += dz^T H[chunk],
    db += column sums into fp32 accumulators, a weight of another dtype than the operands' cast
    WEIGHT_CAST_ROWS rows at a time). No atomics.
    Returns (d_hidden float32 [R, D], d_weight [V, D], d_bias [V]), None where not needed.
    """
    check_backward_inputs(policy, ref, tokens, spec, saved, grad, need_bias)
    rows = tokens.rows
    chunk = min(chunk_rows(policy.weight.shape[0], head_compute_dtype(policy), buffer_bytes), max(rows.numel(), 1))

    def write_dz(part: slice, dz: torch.Tensor) -> None:
        token_divergence_dz_launch(policy, ref, ScoredTokens(rows[part], tokens.labels[part]), spec,
                                   {name: saved[name][part] for name in SAVED_ROWS}, grad[part], dz)()

    return split_gemms(policy, rows, chunk, write_dz, need_hidden=need_hidden, need_weight=need_weight,
                       need_bias=need_bias)


def aot_launches(dtype: torch.dtype) -> dict[str, Launch]:
    """The backward's variants on meta operands, for `fdpo.kernels.aot`: the atomic fused kernel for
    a KL and the second-pass divergences, the ordered pair for JS, and the split dz kernel for alpha."""
    op = meta_operands(dtype)
    head = HeadInput(op["hidden"], LMHead(op["weight"], op["bias"], softcap=30.0, temperature=0.7))
    ref = HeadInput(op["hidden"], LMHead(op["weight"], op["bias"], softcap=30.0, temperature=0.7), "ref_")
    tokens = ScoredTokens(op["rows"], op["labels"])
    saved = {name: op["f32"] for name in SAVED_ROWS}
    launches = {}
    for spec in (DivergenceSpec("forward_kl"), DivergenceSpec("js", 0.5), DivergenceSpec("alpha", 0.5),
                 DivergenceSpec("tv")):
        (atomic,), _ = token_divergence_backward_launches(head, ref, tokens, spec, saved, op["f32"], need_bias=True)
        launches[f"divergence bwd {spec.describe()}"] = atomic
    js = DivergenceSpec("js", 0.5)
    (hidden_side, weight_side), _ = token_divergence_backward_launches(head, ref, tokens, js, saved, op["f32"],
                                                                       need_bias=True, deterministic=True)
    launches["divergence bwd js, ordered dH"] = hidden_side
    launches["divergence bwd js, ordered dW"] = weight_side
    dz = torch.empty(op["rows"].numel(), op["weight"].shape[0], dtype=dtype, device="meta")
    launches["divergence dz alpha"] = token_divergence_dz_launch(head, ref, tokens, DivergenceSpec("alpha", 0.5),
                                                                 saved, op["f32"], dz)
    if dtype == torch.float32:
        # A mixed-dtype policy (bfloat16 hidden states, float32 head): fp32 products, operands cast in registers.
        mixed = HeadInput(meta_operands(torch.bfloat16)["hidden"], head.head)
        (atomic,), _ = token_divergence_backward_launches(mixed, ref, tokens, js, saved, op["f32"], need_bias=True)
        launches["divergence bwd js, mixed-dtype policy"] = atomic
        launches["divergence dz js, mixed-dtype policy"] = token_divergence_dz_launch(mixed, ref, tokens, js, saved,
                                                                                      op["f32"], dz)
        # Both heads' fp32 operands with bf16 products (autocast).
        (atomic,), _ = token_divergence_backward_launches(bf16_products(head), bf16_products(ref), tokens, js, saved,
                                                          op["f32"], need_bias=True)
        launches["divergence bwd js, bf16 products"] = atomic
    return launches
