"""Backward of the head statistics: dHidden, dWeight, dBias from recomputed logit tiles.

Given g_r = dL/d logprob_r per scored row and the forward's saved lse_r, each [BLOCK_N, BLOCK_V]
tile of logits is recomputed from the hidden states and the weight, turned into
    dz = g (onehot(label) - exp(z - lse)) * d(capped(scale x) / T)/d(raw x)      (docs/math.md 1, 13)
and multiplied back: dH[rows] += dz W[cols], dW[cols] += dz^T H[rows], db[cols] += sum_rows dz.
The same pass optionally adds the policy-side gradients of the per-token KL(ref || policy)
(g_kl (p - p_ref), recomputing the reference tile too) and of the entropy (-g_ent p (z - lse + H)),
the statistics of `head_stats_fwd` (docs/math.md 6, 7); a masked logit (-inf, p = 0) gets 0 from
both, and g_kl is 0 at the rows whose KL is +inf (docs/math.md 8).
All three accumulate in fp32 buffers. The fast path adds with fp32 atomics (order-dependent
rounding); the deterministic path gives each output tile a single program that adds in a fixed
order, at the price of recomputing the logits once more when both dH and dW are wanted.
"""

from dataclasses import replace

import torch
import triton
import triton.language as tl

from fdpo.heads import HeadInput, LMHead, ScoredTokens, StatsGrad, zero_head_grads

from .launch import (
    BATCH_SIZED,
    Launch,
    bf16_products,
    input_precision,
    meta_operands,
    tile_gradient_launches,
    tiles_for,
    widened,
)
from .tiles import (
    add_hidden_grad,
    add_to,
    add_weight_grad,
    backward_steps,
    backward_tile,
    head_pair_tiles,
    hidden_row_offsets,
    policy_tile_grad,
)
from .validate import check_stats_heads, head_args, head_flags, head_operands, head_scale, heads_compute_dtype


@triton.jit
def head_stats_grad_tile(
    tile_n, tile_v,
    h_ptr, w_ptr, b_ptr, rows_ptr, labels_ptr, lse_ptr, g_ptr,
    ref_h_ptr, ref_w_ptr, ref_b_ptr, ref_lse_ptr, g_kl_ptr, ent_ptr, g_ent_ptr,
    R, V, D, T, ref_D, ref_T,
    stride_hb, stride_ht, stride_hd, stride_wv, stride_wd,
    stride_ref_hb, stride_ref_ht, stride_ref_hd, stride_ref_wv, stride_ref_wd,
    softcap, inv_temp, scale, ref_softcap, ref_inv_temp, ref_scale,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, REF_HAS_BIAS: tl.constexpr, REF_HAS_SOFTCAP: tl.constexpr,
    KL: tl.constexpr, ENTROPY: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, REF_COMPUTE_DTYPE: tl.constexpr,
):
    """Recompute logit tile (tile_n, tile_v) and return its fp32 gradient dz with the tile's indices.

    With KL the reference tile is recomputed too (from ref_h/ref_w/ref_b); rows index both hidden tensors.
    Returns (dz [BLOCK_N, BLOCK_V], offs, row_mask, h_offs, cols, col_mask); dz is 0 outside.
    """
    offs = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs < R
    rows = tl.load(rows_ptr + offs, mask=row_mask, other=0)
    labels = tl.load(labels_ptr + offs, mask=row_mask, other=-1)
    lse = tl.load(lse_ptr + offs, mask=row_mask, other=0.0)
    g = tl.load(g_ptr + offs, mask=row_mask, other=0.0)
    ref_lse = lse
    g_kl = g
    if KL:
        ref_lse = tl.load(ref_lse_ptr + offs, mask=row_mask, other=0.0)
        g_kl = tl.load(g_kl_ptr + offs, mask=row_mask, other=0.0)
    entropy = lse
    g_ent = g
    if ENTROPY:
        entropy = tl.load(ent_ptr + offs, mask=row_mask, other=0.0)
        g_ent = tl.load(g_ent_ptr + offs, mask=row_mask, other=0.0)
    h_offs = hidden_row_offsets(rows, T, stride_hb, stride_ht)
    cols = tile_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    z, zr = head_pair_tiles(h_ptr, w_ptr, b_ptr, ref_h_ptr, ref_w_ptr, ref_b_ptr, rows, row_mask,
                            cols, col_mask, D, T, ref_D, ref_T,
                            stride_hb, stride_ht, stride_hd, stride_wv, stride_wd,
                            stride_ref_hb, stride_ref_ht, stride_ref_hd, stride_ref_wv, stride_ref_wd,
                            softcap, inv_temp, ref_softcap, ref_inv_temp,
                            HAS_BIAS, HAS_SOFTCAP, REF_HAS_BIAS, REF_HAS_SOFTCAP,
                            BLOCK_N, BLOCK_V, BLOCK_D, INPUT_PRECISION, COMPUTE_DTYPE, REF_COMPUTE_DTYPE,
                            scale, ref_scale, KL)
    dz = policy_tile_grad(z, zr, cols, row_mask[:, None] & col_mask[None, :], labels, lse, g,
                          ref_lse, g_kl, entropy, g_ent, softcap, inv_temp, scale, HAS_SOFTCAP, KL, ENTROPY)
    return dz, offs, row_mask, h_offs, cols, col_mask


# Two schedules of the same tile gradient.
# ORDERED=False: one program per (row tile, vocabulary tile), in grouped order so that neighbouring
# programs reuse weight and hidden tiles from L2. Recompute the tile (1 matmul-equivalent), then
# add its dH and dW contributions (1 each) with fp32 atomics: 3 of the 4 matmul-equivalents of
# forward + backward, the floor. The BLOCK_N x BLOCK_V tile is the atomics' reuse factor.
# ORDERED=True: one program per row tile (WEIGHT_SIDE=False: it owns dH of those rows and sweeps the
# vocabulary tiles in order) or per vocabulary tile (WEIGHT_SIDE=True: it owns dW and db of those
# columns and sweeps the row tiles in order). A single writer adding in a fixed order makes the
# result bitwise reproducible; the barrier after each step makes the plain stores of one step
# visible to every thread of the program before the next step reads them back.
@triton.jit(do_not_specialize=BATCH_SIZED)
def _head_stats_bwd_kernel(
    h_ptr, w_ptr, b_ptr, rows_ptr, labels_ptr, lse_ptr, g_ptr,
    ref_h_ptr, ref_w_ptr, ref_b_ptr, ref_lse_ptr, g_kl_ptr, ent_ptr, g_ent_ptr,
    dh_ptr, dw_ptr, db_ptr,
    R, V, D, T, ref_D, ref_T,
    stride_hb, stride_ht, stride_hd, stride_wv, stride_wd,
    stride_ref_hb, stride_ref_ht, stride_ref_hd, stride_ref_wv, stride_ref_wd,
    softcap, inv_temp, scale, ref_softcap, ref_inv_temp, ref_scale,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, REF_HAS_BIAS: tl.constexpr, REF_HAS_SOFTCAP: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, REF_COMPUTE_DTYPE: tl.constexpr,
    KL: tl.constexpr, ENTROPY: tl.constexpr, ORDERED: tl.constexpr, WEIGHT_SIDE: tl.constexpr,
    GRAD_H: tl.constexpr, GRAD_W: tl.constexpr, GRAD_B: tl.constexpr, GROUP_N: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    own = tl.program_id(0)
    num_n, num_v = tl.cdiv(R, BLOCK_N), tl.cdiv(V, BLOCK_V)
    for step in range(0, backward_steps(num_n, num_v, ORDERED, WEIGHT_SIDE)):
        tile_n, tile_v = backward_tile(own, step, num_n, num_v, ORDERED, WEIGHT_SIDE, GROUP_N)
        dz, offs, row_mask, h_offs, cols, col_mask = head_stats_grad_tile(
            tile_n, tile_v, h_ptr, w_ptr, b_ptr, rows_ptr, labels_ptr, lse_ptr, g_ptr,
            ref_h_ptr, ref_w_ptr, ref_b_ptr, ref_lse_ptr, g_kl_ptr, ent_ptr, g_ent_ptr, R, V, D, T, ref_D, ref_T,
            stride_hb, stride_ht, stride_hd, stride_wv, stride_wd, stride_ref_hb, stride_ref_ht, stride_ref_hd,
            stride_ref_wv, stride_ref_wd, softcap, inv_temp, scale, ref_softcap, ref_inv_temp, ref_scale,
            HAS_BIAS, HAS_SOFTCAP, REF_HAS_BIAS, REF_HAS_SOFTCAP, KL, ENTROPY,
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


def grad_args(grad: StatsGrad) -> dict:
    """The per-row pointers of `head_stats_grad_tile` from the terms: lse_ptr, g_ptr (dL/d logprob),
    ref_lse_ptr and g_kl_ptr (None without the KL's gradient), ent_ptr and g_ent_ptr (None without
    the entropy's); all float32 [R]."""
    return dict(lse_ptr=grad.lse, g_ptr=grad.logprob_grad, ref_lse_ptr=grad.ref_lse, g_kl_ptr=grad.kl_grad,
                ent_ptr=grad.entropy, g_ent_ptr=grad.entropy_grad)


def head_stats_backward_launches(
    policy: HeadInput,
    tokens: ScoredTokens,
    grad: StatsGrad,
    *,
    deterministic: bool = False,
) -> tuple[list[Launch], tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]]:
    """Build (without running) the launches of `head_stats_backward` and allocate their outputs."""
    check_stats_heads(policy, tokens, grad.ref)
    grad.check(policy, tokens)
    weight, rows, ref = policy.weight, tokens.rows, grad.ref
    num_rows, vocab = rows.numel(), weight.shape[0]
    dtype = heads_compute_dtype(policy, ref)  # the forward's, which saved the reference's LSE
    kind = "mixed_backward" if widened(policy) else "two_heads_backward" if grad.has_kl else "backward"
    tiles = tiles_for(kind, dtype, *head_operands(policy, ref))
    d_hidden, d_weight, d_bias = zero_head_grads(policy, num_rows, need_hidden=grad.need_hidden,
                                                 need_weight=grad.need_weight, need_bias=grad.need_bias)

    args = dict(
        **head_args(policy, ""), **head_args(ref, "ref_"), **head_scale(policy, ""), **head_scale(ref, "ref_"),
        **grad_args(grad), rows_ptr=rows, labels_ptr=tokens.labels,
        dh_ptr=d_hidden, dw_ptr=d_weight, db_ptr=d_bias, R=num_rows, V=vocab,
    )
    shared = dict(
        **head_flags(policy, ""), **head_flags(ref, "REF_"), KL=grad.has_kl, ENTROPY=grad.has_entropy,
        BLOCK_N=tiles.block_n, BLOCK_V=tiles.block_v, BLOCK_D=tiles.block_d,
        INPUT_PRECISION=input_precision(dtype),
    )
    launches = tile_gradient_launches(_head_stats_bwd_kernel, args, shared, tiles, num_rows, vocab,
                                      need_hidden=grad.need_hidden, need_weight=grad.need_weight,
                                      need_bias=grad.need_bias, deterministic=deterministic)
    return launches, (d_hidden, d_weight, d_bias)


def head_stats_backward(
    policy: HeadInput,
    tokens: ScoredTokens,
    grad: StatsGrad,
    *,
    deterministic: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of sum_r grad.logprob_grad_r logprob_r (+ kl_grad_r KL_r + entropy_grad_r H_r) w.r.t.
    the policy head.

    Args:
        policy, tokens: as given to `head_logprob_forward` / `head_stats_forward` (hidden [B, T, D];
            rows index it).
        grad: the terms (`fdpo.heads.StatsGrad`): the forward's float32 [R] log-sum-exps (and the
            reference's, the entropy), the float32 [R] per-row gradients, and which of dHidden,
            dWeight, dBias to produce. The reference is read only with the KL's gradient and gets none.
        deterministic: single-writer kernels with a fixed summation order instead of atomics.

    Returns:
        (d_hidden float32 [R, D] for the scored rows, d_weight float32 [V, D], d_bias float32 [V]),
        each None when not requested.
    """
    launches, outputs = head_stats_backward_launches(policy, tokens, grad, deterministic=deterministic)
    if tokens.rows.numel():
        for launch in launches:
            launch()
    return outputs


def aot_launches(dtype: torch.dtype) -> dict[str, Launch]:
    """Every launch variant of this module on meta operands, for `fdpo.kernels.aot`; with fp32, also
    the atomic one of an fp32 head on bf16 hidden states (fp32 products), and the atomic ones of fp32
    operands with bf16 products (autocast)."""
    op = meta_operands(dtype)
    head = HeadInput(op["hidden"], LMHead(op["weight"], op["bias"], softcap=30.0, temperature=0.7, scale=0.5))
    tokens = ScoredTokens(op["rows"], op["labels"])
    logprob_only = StatsGrad(op["f32"], op["f32"], need_bias=True)
    (atomic,), _ = head_stats_backward_launches(head, tokens, logprob_only)
    (hidden_side, weight_side), _ = head_stats_backward_launches(head, tokens, logprob_only, deterministic=True)
    ref = HeadInput(op["hidden"], LMHead(op["weight"], op["bias"], softcap=30.0, temperature=0.7, scale=2.0), "ref_")
    every_term = replace(logprob_only, ref=ref, ref_lse=op["f32"], kl_grad=op["f32"], entropy=op["f32"],
                         entropy_grad=op["f32"])
    (two_heads,), _ = head_stats_backward_launches(head, tokens, every_term)
    launches = {"atomics, dH+dW+db": atomic, "ordered, dH": hidden_side, "ordered, dW+db": weight_side,
                "atomics, + KL and entropy terms": two_heads}
    if dtype == torch.float32:
        mixed = HeadInput(meta_operands(torch.bfloat16)["hidden"], head.head)
        with_entropy = replace(logprob_only, entropy=op["f32"], entropy_grad=op["f32"])
        (launches["atomics, bf16 hidden states, + entropy"],), _ = head_stats_backward_launches(
            mixed, tokens, with_entropy)
        (launches["atomics, dH+dW+db, bf16 products"],), _ = head_stats_backward_launches(
            bf16_products(head), tokens, logprob_only)
        (launches["atomics, + KL and entropy terms, bf16 products"],), _ = head_stats_backward_launches(
            bf16_products(head), tokens, replace(every_term, ref=bf16_products(ref)))
    return launches
