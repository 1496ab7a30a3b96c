"""Backward of the fused LM head: dHidden, dWeight, dBias from recomputed logit tiles.

Given g_r = dL/d logprob_r per scored row and the forward's saved lse_r, each [BLOCK_N, BLOCK_V]
tile of logits is recomputed from the hidden states and the weight, turned into
    dz = g (onehot(label) - exp(z - lse)) * d(capped z / T)/d(raw z)
and multiplied back: dH[rows] += dz W[cols], dW[cols] += dz^T H[rows], db[cols] += sum_rows dz.
The same pass optionally adds the policy-side gradients of the per-token KL(ref || policy)
(g_kl (p - p_ref), recomputing the reference tile too) and of the entropy (-g_ent p (z - lse + H)),
the two-head statistics of `token_stats_fwd` (docs/math.md 6, 7).
All three accumulate in fp32 buffers. The fast path adds with fp32 atomics (order-dependent
rounding); the deterministic path gives each output tile a single program that adds in a fixed
order, at the price of recomputing the logits once more when both dH and dW are wanted.
"""

import torch
import triton
import triton.language as tl

from .launch import Launch, input_precision, meta_operands, tiles_for
from .tiles import dot, grouped_tile, hidden_row_offsets, logit_tile, policy_tile_grad
from .validate import check_head_inputs, check_ref_head, check_row_vectors, ref_head, ref_strides


@triton.jit
def logprob_grad_tile(
    tile_n, tile_v,
    h_ptr, w_ptr, b_ptr, rows_ptr, labels_ptr, lse_ptr, g_ptr,
    rh_ptr, rw_ptr, rb_ptr, ref_lse_ptr, g_kl_ptr, ent_ptr, g_ent_ptr,
    R, V, D, T, RD, RT,
    stride_hb, stride_ht, stride_hd, stride_wv, stride_wd,
    stride_rhb, stride_rht, stride_rhd, stride_rwv, stride_rwd,
    softcap, inv_temp, ref_softcap, ref_inv_temp,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, REF_HAS_BIAS: tl.constexpr, REF_HAS_SOFTCAP: tl.constexpr,
    KL: tl.constexpr, ENTROPY: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Recompute logit tile (tile_n, tile_v) and return its fp32 gradient dz with the tile's indices.

    With KL the reference tile is recomputed too (from rh/rw/rb); rows index both hidden tensors.
    Returns (dz [BLOCK_N, BLOCK_V], offs, row_mask, h_offs, cols, col_mask); dz is 0 outside.
    """
    offs = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs < R
    rows = tl.load(rows_ptr + offs, mask=row_mask, other=0)
    labels = tl.load(labels_ptr + offs, mask=row_mask, other=-1)
    lse = tl.load(lse_ptr + offs, mask=row_mask, other=0.0)
    g = tl.load(g_ptr + offs, mask=row_mask, other=0.0)
    h_offs = hidden_row_offsets(rows, T, stride_hb, stride_ht)
    cols = tile_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    z = logit_tile(h_ptr, h_offs, row_mask, w_ptr, cols, col_mask, b_ptr, D,
                   stride_hd, stride_wv, stride_wd, softcap, inv_temp,
                   HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, INPUT_PRECISION)
    zr = z
    ref_lse = lse
    g_kl = g
    if KL:
        ref_lse = tl.load(ref_lse_ptr + offs, mask=row_mask, other=0.0)
        g_kl = tl.load(g_kl_ptr + offs, mask=row_mask, other=0.0)
        zr = logit_tile(rh_ptr, hidden_row_offsets(rows, RT, stride_rhb, stride_rht), row_mask,
                        rw_ptr, cols, col_mask, rb_ptr, RD, stride_rhd, stride_rwv, stride_rwd,
                        ref_softcap, ref_inv_temp, REF_HAS_BIAS, REF_HAS_SOFTCAP,
                        BLOCK_N, BLOCK_V, BLOCK_D, INPUT_PRECISION)
    entropy = lse
    g_ent = g
    if ENTROPY:
        entropy = tl.load(ent_ptr + offs, mask=row_mask, other=0.0)
        g_ent = tl.load(g_ent_ptr + offs, mask=row_mask, other=0.0)
    dz = policy_tile_grad(z, zr, cols, row_mask[:, None] & col_mask[None, :], labels, lse, g,
                          ref_lse, g_kl, entropy, g_ent, softcap, inv_temp, HAS_SOFTCAP, KL, ENTROPY)
    return dz, offs, row_mask, h_offs, cols, col_mask


@triton.jit
def add_to(ptrs, value, mask, ATOMIC: tl.constexpr):
    """ptrs += value: an fp32 atomic add, or a plain read-modify-write for a single writer."""
    if ATOMIC:
        tl.atomic_add(ptrs, value, mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + value, mask=mask)


@triton.jit
def add_hidden_grad(
    dz, offs, row_mask, w_ptr, cols, col_mask, dh_ptr, D, stride_wv, stride_wd,
    ATOMIC: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """dh[offs, :] += dz @ W[cols, :] over D in BLOCK_D chunks (dz cast to the weight dtype for tl.dot)."""
    dz = dz.to(w_ptr.dtype.element_ty)
    dh_rows = offs.to(tl.int64) * D
    w_cols = cols.to(tl.int64) * stride_wv
    for k0 in range(0, D, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        k_mask = ks < D
        ks = ks.to(tl.int64)
        w = tl.load(w_ptr + w_cols[:, None] + ks[None, :] * stride_wd,
                    mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        part = dot(dz, w, None, INPUT_PRECISION)
        add_to(dh_ptr + dh_rows[:, None] + ks[None, :], part, row_mask[:, None] & k_mask[None, :], ATOMIC)


@triton.jit
def add_weight_grad(
    dz, h_ptr, h_offs, row_mask, cols, col_mask, dw_ptr, D, stride_hd,
    ATOMIC: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """dw[cols, :] += dz^T @ H[rows, :] over D in BLOCK_D chunks (dz cast to the hidden dtype)."""
    dz_t = tl.trans(dz.to(h_ptr.dtype.element_ty))
    dw_rows = cols.to(tl.int64) * D
    for k0 in range(0, D, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        k_mask = ks < D
        ks = ks.to(tl.int64)
        h = tl.load(h_ptr + h_offs[:, None] + ks[None, :] * stride_hd,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        part = dot(dz_t, h, None, INPUT_PRECISION)
        add_to(dw_ptr + dw_rows[:, None] + ks[None, :], part, col_mask[:, None] & k_mask[None, :], ATOMIC)


# Grid: one program per (row tile, vocabulary tile), in grouped order so that neighbouring
# programs reuse weight and hidden tiles from L2. Recompute the tile (1 matmul-equivalent), then
# add its dH and dW contributions (1 each) with fp32 atomics: 3 of the 4 matmul-equivalents of
# forward + backward, the floor. The BLOCK_N x BLOCK_V tile is the atomics' reuse factor.
@triton.jit
def _logprob_bwd_kernel(
    h_ptr, w_ptr, b_ptr, rows_ptr, labels_ptr, lse_ptr, g_ptr,
    rh_ptr, rw_ptr, rb_ptr, ref_lse_ptr, g_kl_ptr, ent_ptr, g_ent_ptr,
    dh_ptr, dw_ptr, db_ptr,
    R, V, D, T, RD, RT,
    stride_hb, stride_ht, stride_hd, stride_wv, stride_wd,
    stride_rhb, stride_rht, stride_rhd, stride_rwv, stride_rwd,
    softcap, inv_temp, ref_softcap, ref_inv_temp,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, REF_HAS_BIAS: tl.constexpr, REF_HAS_SOFTCAP: tl.constexpr,
    KL: tl.constexpr, ENTROPY: tl.constexpr,
    GRAD_H: tl.constexpr, GRAD_W: tl.constexpr, GRAD_B: tl.constexpr, GROUP_N: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    tile_n, tile_v = grouped_tile(tl.program_id(0), tl.cdiv(R, BLOCK_N), tl.cdiv(V, BLOCK_V), GROUP_N)
    dz, offs, row_mask, h_offs, cols, col_mask = logprob_grad_tile(
        tile_n, tile_v, h_ptr, w_ptr, b_ptr, rows_ptr, labels_ptr, lse_ptr, g_ptr,
        rh_ptr, rw_ptr, rb_ptr, ref_lse_ptr, g_kl_ptr, ent_ptr, g_ent_ptr, R, V, D, T, RD, RT,
        stride_hb, stride_ht, stride_hd, stride_wv, stride_wd,
        stride_rhb, stride_rht, stride_rhd, stride_rwv, stride_rwd, softcap, inv_temp, ref_softcap, ref_inv_temp,
        HAS_BIAS, HAS_SOFTCAP, REF_HAS_BIAS, REF_HAS_SOFTCAP, KL, ENTROPY, BLOCK_N, BLOCK_V, BLOCK_D, INPUT_PRECISION)
    if GRAD_H:
        add_hidden_grad(dz, offs, row_mask, w_ptr, cols, col_mask, dh_ptr, D, stride_wv, stride_wd,
                        True, BLOCK_D, INPUT_PRECISION)
    if GRAD_W:
        add_weight_grad(dz, h_ptr, h_offs, row_mask, cols, col_mask, dw_ptr, D, stride_hd,
                        True, BLOCK_D, INPUT_PRECISION)
    if GRAD_B:
        tl.atomic_add(db_ptr + cols, tl.sum(dz, axis=0), mask=col_mask, sem="relaxed")


# Grid: one program per row tile (WEIGHT_SIDE=False: it owns dH of those rows and sweeps the
# vocabulary tiles in order) or per vocabulary tile (WEIGHT_SIDE=True: it owns dW and db of those
# columns and sweeps the row tiles in order). A single writer adding in a fixed order makes the
# result bitwise reproducible; the barrier after each step makes the plain stores of one step
# visible to every thread of the program before the next step reads them back.
@triton.jit
def _logprob_bwd_ordered_kernel(
    h_ptr, w_ptr, b_ptr, rows_ptr, labels_ptr, lse_ptr, g_ptr,
    rh_ptr, rw_ptr, rb_ptr, ref_lse_ptr, g_kl_ptr, ent_ptr, g_ent_ptr,
    dh_ptr, dw_ptr, db_ptr,
    R, V, D, T, RD, RT,
    stride_hb, stride_ht, stride_hd, stride_wv, stride_wd,
    stride_rhb, stride_rht, stride_rhd, stride_rwv, stride_rwd,
    softcap, inv_temp, ref_softcap, ref_inv_temp,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, REF_HAS_BIAS: tl.constexpr, REF_HAS_SOFTCAP: tl.constexpr,
    KL: tl.constexpr, ENTROPY: tl.constexpr,
    WEIGHT_SIDE: tl.constexpr, GRAD_W: tl.constexpr, GRAD_B: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    own = tl.program_id(0)
    sweep = tl.cdiv(R, BLOCK_N) if WEIGHT_SIDE else tl.cdiv(V, BLOCK_V)
    for step in range(0, sweep):
        tile_n = step if WEIGHT_SIDE else own
        tile_v = own if WEIGHT_SIDE else step
        dz, offs, row_mask, h_offs, cols, col_mask = logprob_grad_tile(
            tile_n, tile_v, h_ptr, w_ptr, b_ptr, rows_ptr, labels_ptr, lse_ptr, g_ptr,
            rh_ptr, rw_ptr, rb_ptr, ref_lse_ptr, g_kl_ptr, ent_ptr, g_ent_ptr, R, V, D, T, RD, RT,
            stride_hb, stride_ht, stride_hd, stride_wv, stride_wd,
            stride_rhb, stride_rht, stride_rhd, stride_rwv, stride_rwd, softcap, inv_temp, ref_softcap, ref_inv_temp,
            HAS_BIAS, HAS_SOFTCAP, REF_HAS_BIAS, REF_HAS_SOFTCAP, KL, ENTROPY,
            BLOCK_N, BLOCK_V, BLOCK_D, INPUT_PRECISION)
        if WEIGHT_SIDE:
            if GRAD_W:
                add_weight_grad(dz, h_ptr, h_offs, row_mask, cols, col_mask, dw_ptr, D, stride_hd,
                                False, BLOCK_D, INPUT_PRECISION)
            if GRAD_B:
                add_to(db_ptr + cols, tl.sum(dz, axis=0), col_mask, False)
        else:
            add_hidden_grad(dz, offs, row_mask, w_ptr, cols, col_mask, dh_ptr, D, stride_wv, stride_wd,
                            False, BLOCK_D, INPUT_PRECISION)
        tl.debug_barrier()


def logprob_backward_launches(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    rows: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    temperature: float = 1.0,
    need_hidden: bool = True,
    need_weight: bool = True,
    need_bias: bool = False,
    deterministic: bool = False,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    ref_softcap: float | None = None,
    ref_temperature: float = 1.0,
    ref_lse: torch.Tensor | None = None,
    kl_grad: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    entropy_grad: torch.Tensor | None = None,
) -> tuple[list[Launch], tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]]:
    """Build (without running) the launches of `logprob_backward` and allocate their outputs."""
    check_head_inputs(hidden, weight, rows, labels, bias=bias, softcap=softcap, temperature=temperature)
    check_row_vectors(hidden, rows, lse=lse, grad=grad, ref_lse=ref_lse, kl_grad=kl_grad, entropy=entropy,
                      entropy_grad=entropy_grad)
    if need_bias and bias is None:
        raise ValueError("need_bias=True but bias is None")
    ref = ref_head(ref_hidden, ref_weight, ref_bias, ref_softcap, ref_temperature)
    kl, with_entropy = kl_grad is not None, entropy_grad is not None
    if kl:
        if ref is None or ref_lse is None:
            raise ValueError("kl_grad needs the reference head (ref_hidden, ref_weight) and its saved "
                             "log-sum-exp (ref_lse)")
        check_ref_head(ref, hidden, weight, rows, labels)
    if with_entropy and entropy is None:
        raise ValueError("entropy_grad needs the forward's per-row entropy (entropy)")
    ref_hidden = ref.hidden if kl else None
    ref_weight = ref.weight if kl else None
    num_rows, vocab, dim = rows.numel(), weight.shape[0], hidden.shape[2]
    tiles = tiles_for("two_heads_backward" if kl else "backward", hidden.dtype)
    f32 = dict(dtype=torch.float32, device=hidden.device)
    d_hidden = torch.zeros(num_rows, dim, **f32) if need_hidden else None
    d_weight = torch.zeros(vocab, dim, **f32) if need_weight else None
    d_bias = torch.zeros(vocab, **f32) if need_bias else None

    args = dict(
        h_ptr=hidden, w_ptr=weight, b_ptr=bias, rows_ptr=rows, labels_ptr=labels, lse_ptr=lse, g_ptr=grad,
        rh_ptr=ref_hidden, rw_ptr=ref_weight, rb_ptr=ref.bias if kl else None,
        ref_lse_ptr=ref_lse if kl else None, g_kl_ptr=kl_grad,
        ent_ptr=entropy if with_entropy else None, g_ent_ptr=entropy_grad,
        dh_ptr=d_hidden, dw_ptr=d_weight, db_ptr=d_bias,
        R=num_rows, V=vocab, D=dim, T=hidden.shape[1],
        RD=ref_hidden.shape[2] if kl else 1, RT=ref_hidden.shape[1] if kl else 1,
        stride_hb=hidden.stride(0), stride_ht=hidden.stride(1), stride_hd=hidden.stride(2),
        stride_wv=weight.stride(0), stride_wd=weight.stride(1),
        **ref_strides(ref if kl else None),
        softcap=float(softcap or 1.0), inv_temp=1.0 / temperature,
        ref_softcap=float(ref.softcap or 1.0) if kl else 1.0, ref_inv_temp=1.0 / ref.temperature if kl else 1.0,
    )
    shared = dict(
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
        REF_HAS_BIAS=kl and ref.bias is not None, REF_HAS_SOFTCAP=kl and ref.softcap is not None,
        KL=kl, ENTROPY=with_entropy,
        BLOCK_N=tiles.block_n, BLOCK_V=tiles.block_v, BLOCK_D=tiles.block_d,
        INPUT_PRECISION=input_precision(hidden.dtype),
    )
    row_tiles, vocab_tiles = triton.cdiv(num_rows, tiles.block_n), triton.cdiv(vocab, tiles.block_v)
    options = dict(num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    launches = []
    if not deterministic:
        if need_hidden or need_weight or need_bias:
            launches.append(Launch(
                _logprob_bwd_kernel, grid=(row_tiles * vocab_tiles,), args=args,
                constexprs=dict(shared, GRAD_H=need_hidden, GRAD_W=need_weight, GRAD_B=need_bias,
                                GROUP_N=tiles.group_n),
                **options))
    else:
        if need_hidden:
            launches.append(Launch(
                _logprob_bwd_ordered_kernel, grid=(row_tiles,), args=args,
                constexprs=dict(shared, WEIGHT_SIDE=False, GRAD_W=False, GRAD_B=False), **options))
        if need_weight or need_bias:
            launches.append(Launch(
                _logprob_bwd_ordered_kernel, grid=(vocab_tiles,), args=args,
                constexprs=dict(shared, WEIGHT_SIDE=True, GRAD_W=need_weight, GRAD_B=need_bias), **options))
    return launches, (d_hidden, d_weight, d_bias)


def logprob_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    rows: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    temperature: float = 1.0,
    need_hidden: bool = True,
    need_weight: bool = True,
    need_bias: bool = False,
    deterministic: bool = False,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    ref_softcap: float | None = None,
    ref_temperature: float = 1.0,
    ref_lse: torch.Tensor | None = None,
    kl_grad: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    entropy_grad: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of sum_r grad_r logprob_r (+ kl_grad_r KL_r + entropy_grad_r H_r) w.r.t. the policy head.

    Args:
        hidden, weight, rows, labels, bias, softcap, temperature: as given to `logprob_forward`.
        lse: float32 [R], the forward's log-sum-exp per row. grad: float32 [R], dL/d logprob.
        need_*: which gradients to produce (a frozen head skips dWeight entirely).
        deterministic: single-writer kernels with a fixed summation order instead of atomics.
        ref_hidden, ref_weight, ref_bias, ref_softcap, ref_temperature: the reference head, as given
            to `token_stats_forward`; read only with kl_grad.
        ref_lse, kl_grad: the reference's float32 [R] log-sum-exp and dL/d KL(ref || policy) per row
            (the reference gets no gradient).
        entropy, entropy_grad: float32 [R] policy entropy from the forward and dL/d entropy; both or none.

    Returns:
        (d_hidden float32 [R, D] for the scored rows, d_weight float32 [V, D], d_bias float32 [V]),
        each None when not requested.
    """
    launches, outputs = logprob_backward_launches(
        hidden, weight, rows, labels, lse, grad, bias=bias, softcap=softcap, temperature=temperature,
        need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias, deterministic=deterministic,
        ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias, ref_softcap=ref_softcap,
        ref_temperature=ref_temperature, ref_lse=ref_lse, kl_grad=kl_grad, entropy=entropy, entropy_grad=entropy_grad)
    if rows.numel():
        for launch in launches:
            launch()
    return outputs


def aot_launches(dtype: torch.dtype) -> dict[str, Launch]:
    """Every launch variant of this module on meta operands, for `fdpo.kernels.aot`."""
    op = meta_operands(dtype)
    args = (op["hidden"], op["weight"], op["rows"], op["labels"], op["f32"], op["f32"])
    common = dict(bias=op["bias"], softcap=30.0, temperature=0.7, need_bias=True)
    (atomic,), _ = logprob_backward_launches(*args, **common)
    (hidden_side, weight_side), _ = logprob_backward_launches(*args, deterministic=True, **common)
    stats = dict(ref_hidden=op["hidden"], ref_weight=op["weight"], ref_bias=op["bias"], ref_softcap=30.0,
                 ref_temperature=0.7, ref_lse=op["f32"], kl_grad=op["f32"], entropy=op["f32"], entropy_grad=op["f32"])
    (two_heads,), _ = logprob_backward_launches(*args, **common, **stats)
    return {"atomics, dH+dW+db": atomic, "ordered, dH": hidden_side, "ordered, dW+db": weight_side,
            "atomics, + KL and entropy terms": two_heads}
